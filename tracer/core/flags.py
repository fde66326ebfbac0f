"""The command-line flags as data: one row per flag, its names and argparse keywords, each with a help text.
flopdiff (tracer.cli) and `python -m analytic` build their parsers from these tables, so a flag that means the same
thing has one name, one help and one default in both (`WORKLOAD`, `ANALYTIC`). Data and argparse only: it imports
nothing else of flopdiff (`python -m analytic` imports it). A default is shown once: the help says it in words, or the formatter appends the value."""

from __future__ import annotations

import argparse
import importlib.metadata
from typing import Any

from tracer.core.conventions import CLOSED_FORM_STEPS
from tracer.core.models import DEFAULT_MODEL, MODELS, model_for_config

Row = tuple[tuple[str, ...], dict[str, Any]]

MODEL_NAMES = (*MODELS, "hf:MODEL_TYPE")
DEFAULT_SHAPE = "1000x1400"
DEFAULT_DECODE_STEPS = 1
DESCRIPTION = ("Where the FLOPs of a vendor vision-language model go, node by node: traced weight-free, counted as "
               "FlopCounterMode counts and in full, and diffed against an analytic model.")
USAGE = ("flopdiff [FLAGS]                  one workload (an image or its size)\n"
         "       flopdiff sweep PATH... [FLAGS]  a corpus of pages")


class Help(argparse.HelpFormatter):
    """Appends `(default: X)` when the help does not say the default already and there is one to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


# the workload: what to measure (the image comes first, either a file or a white page's size: one group)
IMAGE = [
    (("--image",), dict(help="an image file; its size is the workload's")),
    (("--image-shape",), dict(default=DEFAULT_SHAPE, metavar="WxH", help="the size of a white page to measure")),
]
WORKLOAD: list[Row] = [
    (("--model",), dict(help=f"the vendor model: {', '.join(MODEL_NAMES)} (any transformers model; default: the one "
                             f"--config names, else {DEFAULT_MODEL})")),
    (("--base-size",), dict(type=int, metavar="PX", help="global view size (default: the vendor processor's)")),
    (("--tile-size",), dict(type=int, metavar="PX", help="tile size (default: the vendor processor's)")),
    (("--crop-mode",), dict(action=argparse.BooleanOptionalAction, default=None,
                            help="cut large pages into tiles (default: on)")),
    (("--resolution",), dict(metavar="MODE", help="a vendor mode setting the three knobs above unless given "
                                                  "(deepseek-ocr: tiny, small, base, large, gundam; default: the "
                                                  "model's)")),
    (("--text-tokens",), dict(type=int, metavar="N", help="prompt text tokens after the image (default: "
                                                          "deepseek-ocr-2 4; deepseek-ocr: required without a "
                                                          "tokenizer, 9 in the model card's prompt)")),
    (("--decode-steps",), dict(type=int, default=DEFAULT_DECODE_STEPS, metavar="N",
                               help="one-token decode steps after the prefill")),
]
ANALYTIC: list[Row] = [
    (("--analytic",), dict(default="aligned", metavar="MODEL", help="the analytic model: aligned (vendor-exact), "
                                                                    "seed-naive, a preset YAML file, or your own: "
                                                                    "module:function, file.py:function, a model "
                                                                    "YAML file, an installed flopdiff.analytic entry "
                                                                    "point")),
    (("--policy",), dict(choices=("full", "torch"), default="full",
                         help="full counts, or torch: what FlopCounterMode counts")),
    (("--config",), dict(help="vendor config.json (default: the published one / the one in --vendor-dir)")),
]
FLOPDIFF: list[Row] = [
    (("--workload-config",), dict(metavar="FILE", help="the workload knobs from an inference config (preprocess."
                                                       "base_size, image_size, crop_mode, decoder_prompt, "
                                                       "max_new_tokens); flags given win")),
    (("--prompt",), dict(help="prompt with one <image>, tokenized with --tokenizer")),
    (("--tokenizer",), dict(metavar="PATH", help="a local tokenizer folder or tokenizer.json")),
    (("--vendor-dir",), dict(metavar="DIR", help="deepseek-ocr: a folder with the Hugging Face repo's *.py and "
                                                 "*.json, or hub:ORG/NAME")),
    (("--trust-remote-code",), dict(action="store_true", help="allow running the vendor's Python files")),
    (("--mode",), dict(choices=("fake", "real"), default="fake", help="fake: no weights, no compute; real: random "
                                                                      "weights, real compute")),
    (("--device",), dict(choices=("cpu", "cuda"), default="cpu", help="cuda (--mode real): attribute every kernel")),
    (("--attn",), dict(help="attn_implementation, or SUBCONFIG=NAME,... (default: sdpa; deepseek-ocr: eager)")),
    (("--attn-plugin",), dict(action="append", default=[], metavar="[NAME=]MODULE:FN",
                              help="register a Python attention function as NAME (default: FN) for --attn")),
    (("--experts",), dict(help="deepseek-ocr-2: grouped_mm (default), batched_mm, or eager (--mode real only)")),
    (("--causal-halving",), dict(action="store_true", help="count only the (query, key) pairs a causal mask keeps")),
    (("--mapping",), dict(metavar="TABLE", help="mapping table YAML (default: the built-in one of --model)")),
    (("--explain",), dict(metavar="ID", help="print a gap group (decoder.layers.*.attn), an analytic layer "
                                             "(decoder.layers.3.attn) or a node (prefill/mm_12), with its cause")),
    (("--metric",), dict(default="tc_flops", choices=("tc_flops", "cuda_flops", "weights", "kv", "bytes"),
                         help="the column the gap groups and --explain follow: tensor-core FLOPs, CUDA-core FLOPs, "
                              "weight bytes, KV-cache bytes or fused I/O bytes; report.json has every column whatever "
                              "it says")),
    (("--max-gap",), dict(metavar="PCT", help="exit 1 when a stage's |gap| exceeds PCT%% of its count: tensor-core "
                                             "FLOPs, or per metric: kv=0.5, tc_flops=0,weights=1")),
    (("--graph",), dict(choices=("fx", "onnx"), default="fx", help="onnx: also export, count and check the ONNX "
                                                                    "graph")),
    (("--ncu",), dict(metavar="MODULE", help="with --device cuda: Nsight Compute FLOPs for the kernels inside "
                                             "MODULE")),
    (("--out",), dict(metavar="DIR", help="output folder, replaced as a whole (default: flopdiff-report; with "
                                          "--explain or --max-gap and no --out, nothing is written)")),
    (("--json-nodes",), dict(choices=("all", "flops"), default="all", help="nodes in report.json: all, or those "
                                                                            "with FLOPs")),
    (("--model-explorer",), dict(action="store_true", help="also write the Model Explorer graph and its overlay "
                                                           "(README: opening them)")),
    (("--sequential",), dict(action="store_true", help="no decode worker process: every step captured here")),
    (("--no-cache",), dict(action="store_true", help="trace again even when the trace cache holds this workload "
                                                     "(README: the trace cache)")),
    (("--allow-long",), dict(action="store_true", help="run captures estimated at more than about five minutes")),
    (("--every-step",), dict(action="store_true", help="trace every decode step, however many (default: from "
                                                       f"{CLOSED_FORM_STEPS} steps on, steps 1..n-1 in closed form "
                                                       "from probes)")),
    (("--quiet",), dict(action="store_true", help="no progress display")),
    (("--timings",), dict(action="store_true", help="print the seconds each phase took (stderr)")),
    (("--nvtx-module",), dict(metavar="MODULE", help=argparse.SUPPRESS)),  # --ncu's own child run under ncu
]


def version() -> str:
    """flopdiff's installed version (its distribution's metadata)."""
    try:
        return importlib.metadata.version("flopdiff")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser(prog: str, description: str, *tables: list[Row], aliases: dict[str, tuple[str, ...]] | None = None,
           image: bool = True, usage: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with --version and the image group (unless `image` is False), then the tables' flags in order
    (`aliases`: older spellings of a flag)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=Help, usage=usage, epilog=epilog)
    p.add_argument("--version", action="version", version=f"flopdiff {version()}")
    group = p.add_mutually_exclusive_group() if image else None
    for names, kwargs in IMAGE if image else ():
        group.add_argument(*names, **kwargs)
    for table in tables:
        for names, kwargs in table:
            p.add_argument(*names, *(aliases or {}).get(names[0], ()), **kwargs)
    return p


def pick(table: list[Row], *names: str) -> list[Row]:
    """The rows of `table` for these flags: a command taking some of another's flags takes them as they are."""
    rows = {row[0][0]: row for row in table}
    return [rows[name] for name in names]


def typed(argv: list[str], names: tuple[str, ...]) -> str:
    """Which spelling of a flag the user typed (errors name that one), the first when none."""
    for arg in argv:
        for name in names:
            if arg == name or arg.startswith(name + "="):
                return name
    return names[0]


def model_of(args: argparse.Namespace) -> str:
    """--model, else the model the --config file names (tracer.core.models), else the default model."""
    return args.model or model_for_config(getattr(args, "config", None))
