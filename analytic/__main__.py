"""`python -m analytic`: the analytic model for one workload (table, or JSON with --json), or a sweep
over shapes and modes written as CSV (--sweep)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from analytic.api import evaluate, presets, variant
from tracer.errors import FlopdiffError
from tracer.workload import Workload, load_image, parse_image_shape, validate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analytic", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-ocr-2")
    p.add_argument("--config")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="an image file: its size is the workload's")
    src.add_argument("--image-shape", default="1000x1400")
    p.add_argument("--mode", help="vendor mode preset (v1: tiny, small, base, large, gundam)")
    p.add_argument("--base-size", type=int)
    p.add_argument("--tile-size", type=int)
    p.add_argument("--crop-mode", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--text-tokens", type=int)
    p.add_argument("--decode-steps", type=int)
    p.add_argument("--preset", default="aligned", help=f"one of {', '.join(presets())} or a YAML file")
    p.add_argument("--policy", default="full", help="torch (what FlopCounterMode counts) or full")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sweep", nargs="+", metavar="WxH", help="CSV over these shapes (and --sweep-modes)")
    p.add_argument("--sweep-modes", nargs="+", default=[None])
    p.add_argument("override", nargs="*", help="key=value overrides of presets/defaults.yaml")
    args = p.parse_args(argv)
    try:
        variant(args.preset, "--preset")  # the flags as this command names them, before the API's checks
        validate(Workload(model=args.model, base_size=args.base_size, tile_size=args.tile_size,
                          text_tokens=args.text_tokens, decode_steps=args.decode_steps or 0))
        knobs = dict(base_size=args.base_size, tile_size=args.tile_size, crop_mode=args.crop_mode,
                     text_tokens=args.text_tokens, decode_steps=args.decode_steps, overrides=args.override)
        if args.sweep:
            buf = io.StringIO()
            out = csv.writer(buf)
            out.writerow(["image_wh", "mode", "views", "image_tokens", "prompt_len", "vision", "prefill", "decode"])
            for shape in args.sweep:
                for mode in args.sweep_modes:
                    d = evaluate(args.model, parse_image_shape(shape), args.preset, args.policy, args.config,
                                 mode=mode, **knobs)
                    w, s = d["workload"], {x["name"]: x["flops"] for x in d["stages"]}
                    out.writerow([shape, mode or "", w["views"], w["image_tokens"], w["prompt_len"],
                                  s["vision"], s["prefill"], s["decode"]])
            sys.stdout.write(buf.getvalue())
            return 0
        wh = load_image(Workload(image_path=args.image)).size if args.image else parse_image_shape(args.image_shape)
        doc = evaluate(args.model, wh, args.preset, args.policy, args.config, mode=args.mode, **knobs)
    except FlopdiffError as exc:
        print(f"analytic: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.model} analytic ({args.preset}, policy {args.policy})", caption=json.dumps(doc["workload"]))
    t.add_column("stage")
    t.add_column("FLOPs", justify="right")
    for s in doc["stages"]:
        t.add_row(s["name"], f"{s['flops']:,}")
    Console(width=max(120, Console().width)).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
