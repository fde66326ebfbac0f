"""The analytic model for one workload (a table, or JSON with --json), or a CSV sweep over page shapes and modes.

`python -m analytic` takes flopdiff's workload and analytic flags (tracer.core.flags: the same names, helps and defaults;
`--preset`, this command's older spelling, still works; `--mode`, which meant the resolution here and means fake or
real in flopdiff, is refused with the flag to use). `key=value` overrides act or are refused (analytic.api
split_overrides: defaults.yaml keys, preset keys, policy.causal_halving)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from analytic.api import COLUMNS, evaluate, variant
from tracer.core import flags
from tracer.core.errors import FlopdiffError
from tracer.core.workload import Workload, load_image, parse_image_shape, validate

# flopdiff's names for the same things; the older spellings of this command still work
ALIASES = {"--analytic": ("--preset",)}


class _Retired(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} means fake or real in flopdiff; the vendor resolution mode here is --resolution "
                     f"(e.g. --resolution {values})")


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("python -m analytic", __doc__.splitlines()[0], flags.WORKLOAD, flags.ANALYTIC, aliases=ALIASES)
    p.add_argument("--mode", action=_Retired, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the evaluated model as JSON instead of a table")
    p.add_argument("--sweep", nargs="+", metavar="WxH", help="CSV of the stage FLOPs over these page shapes")
    p.add_argument("--sweep-modes", nargs="+", default=[None], metavar="MODE",
                   help="... and these resolutions (default: the model's)")
    p.add_argument("override", nargs="*", help="key=value overrides of analytic/presets/defaults.yaml")
    return p


HEADERS = ("tensor-core FLOPs", "CUDA-core FLOPs", "I/O", "weights", "activations", "KV cache")
UNITS = ("", "", "B", "B", "B", "B")


def _si(n: int, unit: str) -> str:
    """4.69 T, 6.45 GB: the table's units (the JSON keeps every digit)."""
    for prefix, scale in (("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n} {unit}".strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.model = flags.model_of(args)
    preset_flag = flags.typed(argv, ("--analytic", *ALIASES["--analytic"]))
    try:
        variant(args.analytic, preset_flag)  # the flags as the user typed them, before the API's checks
        validate(Workload(model=args.model, base_size=args.base_size, tile_size=args.tile_size,
                          text_tokens=args.text_tokens, decode_steps=args.decode_steps))
        # a flag given wins; else defaults.yaml with its overrides (`workload.decode_steps=5` acts)
        steps = args.decode_steps if any(a.split("=")[0] == "--decode-steps" for a in argv) else None
        knobs = dict(base_size=args.base_size, tile_size=args.tile_size, crop_mode=args.crop_mode,
                     text_tokens=args.text_tokens, decode_steps=steps, overrides=args.override)
        if args.sweep:
            buf = io.StringIO()
            out = csv.writer(buf)
            out.writerow(["image_wh", "mode", "views", "image_tokens", "prompt_len", "vision", "prefill", "decode"])
            for shape in args.sweep:
                for mode in args.sweep_modes:
                    d = evaluate(args.model, parse_image_shape(shape), args.analytic, args.policy, args.config,
                                 mode=mode, **knobs)
                    w, s = d["workload"], {x["name"]: x["flops"] for x in d["stages"]}
                    out.writerow([shape, mode or "", w["views"], w["image_tokens"], w["prompt_len"],
                                  s["vision"], s["prefill"], s["decode"]])
            sys.stdout.write(buf.getvalue())
            return 0
        wh = load_image(Workload(image_path=args.image)).size if args.image else parse_image_shape(args.image_shape)
        doc = evaluate(args.model, wh, args.analytic, args.policy, args.config, mode=args.resolution, **knobs)
    except FlopdiffError as exc:
        print(f"analytic: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc))
        return 0
    from rich.console import Console
    from rich.table import Table

    w = doc["workload"]
    caption = (f"{w['image_wh'][0]}x{w['image_wh'][1]} px, base {w['base_size']}, tile {w['tile_size']}, crop mode "
               f"{'on' if w['crop_mode'] else 'off'}, {w['views']} views (crop grid {w['crop_grid_wh'][0]}x"
               f"{w['crop_grid_wh'][1]}), {w['image_tokens']} image tokens, prompt {w['prompt_len']}, "
               f"{w['decode_steps']} decode step{'s' if w['decode_steps'] != 1 else ''}. I/O: fused (a layer's inputs, outputs and weights once); --json: "
               "every digit")
    t = Table(title=f"{args.model} analytic ({args.analytic}, policy {args.policy})", caption=caption,
              title_justify="left", caption_justify="left")
    t.add_column("stage")
    for label in HEADERS:
        t.add_column(label, justify="right", no_wrap=True)
    for s in doc["stages"]:
        t.add_row(s["name"], *(_si(s[c], unit) for c, unit in zip(COLUMNS, UNITS)))
    Console(width=max(120, Console().width)).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
