"""flopdiff command line (`flopdiff`, `python -m tracer.diff`): parse, run the pipeline (tracer.pipeline), print, write
the output set (replaced whole: tracer.lifecycle), exit: 0; 1 when a stage's gap exceeds --max-gap; 2 for bad input (one
line, nothing written); 128 + the signal after SIGINT / SIGTERM (one line, the output folder left as it was)."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from analytic.api import mode_knobs
from tracer.errors import FlopdiffError
from tracer.lifecycle import Interrupted, OutputSet, signals_as_exceptions
from tracer.pipeline import Options, check, real_run_warning, run
from tracer.vendors import VENDORS, BuildOptions, parse_impl
from tracer.workload import Workload, parse_image_shape

STARTED = time.perf_counter()  # this module's import: the process's imports before it are not counted
DEFAULT = Workload()
SAME_NAME_BUILD = ("vendor_dir", "trust_remote_code", "device")
SAME_NAME = ("config", "mode", "analytic", "mapping", "causal_halving", "policy", "graph", "ncu", "nvtx_module",
             "explain", "sequential", "allow_long", "max_gap")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flopdiff", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=DEFAULT.model, help=f"one of: {', '.join(sorted(VENDORS))}")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="an image file (its size is the workload's)")
    src.add_argument("--image-shape", default="x".join(map(str, DEFAULT.image_wh)), help="WxH of a white page")
    a("--base-size", type=int, help="global view size (default: the vendor processor's)")
    a("--tile-size", type=int, help="tile size (default: the vendor processor's)")
    a("--crop-mode", action=argparse.BooleanOptionalAction, help="cut large pages into tiles (default: on)")
    a("--resolution", metavar="MODE", help="a vendor mode setting the three knobs above unless given "
                                           "(deepseek-ocr: tiny, small, base, large, gundam)")
    a("--text-tokens", type=int, help="prompt text tokens after the image when no tokenizer is given "
                                      "(deepseek-ocr-2: 4 by default; deepseek-ocr: required)")
    a("--prompt", help="prompt with one <image>, tokenized with --tokenizer")
    a("--tokenizer", help="a local tokenizer folder or tokenizer.json")
    a("--decode-steps", type=int, default=DEFAULT.decode_steps, help="one-token steps after the prefill")
    a("--config", help="vendor config.json (default: the published one / the one in --vendor-dir)")
    a("--vendor-dir", help="deepseek-ocr: a folder with the Hugging Face repo's *.py and *.json, or hub:ORG/NAME")
    a("--trust-remote-code", action="store_true", help="allow running the vendor's Python files from --vendor-dir")
    a("--device", choices=("cpu", "cuda"), default="cpu", help="cuda (--mode real): attribute every kernel")
    a("--graph", choices=("fx", "onnx"), default="fx", help="onnx: also export, count and check the ONNX graph")
    a("--ncu", metavar="MODULE", help="with --device cuda: Nsight Compute FLOPs for the kernels inside MODULE")
    a("--mode", choices=("fake", "real"), default="fake", help="fake: no weights, no compute; real: random weights")
    a("--attn", help="attn_implementation, or SUBCONFIG=NAME,... (default: sdpa / deepseek-ocr eager)")
    a("--attn-plugin", action="append", default=[], metavar="[NAME=]MODULE:FN",
      help="register a Python attention function as NAME (default FN) for --attn (README: custom kernels)")
    a("--experts", help="deepseek-ocr-2: grouped_mm (default), batched_mm, or eager (--mode real only)")
    a("--causal-halving", action="store_true", help="count only the (query, key) pairs a causal mask keeps")
    a("--analytic", default="aligned", metavar="PRESET", help="aligned, seed-naive, or a preset YAML file")
    a("--policy", choices=("full", "torch"), default="full", help="the gap: analytic vs full counts, or vs torch's")
    a("--mapping", metavar="TABLE", help="mapping table YAML (default: the built-in one of --model)")
    a("--explain", metavar="ID", help="print one analytic layer (decoder.layers.3.attn) or node (prefill/mm_12)")
    a("--max-gap", type=float, metavar="PCT", help="exit 1 when a stage's |gap| exceeds PCT%% of its full count")
    a("--json-nodes", choices=("all", "flops"), default="all", help="nodes in report.json: all, or with FLOPs")
    a("--out", default="flopdiff-report", help="output folder (replaced as a whole)")
    a("--sequential", action="store_true", help="no decode worker process: every step captured here")
    a("--allow-long", action="store_true", help="run captures estimated at more than about five minutes")
    a("--quiet", action="store_true", help="no progress display")
    a("--timings", action="store_true", help="print the seconds each phase took (stderr)")
    a("--nvtx-module", metavar="MODULE", help=argparse.SUPPRESS)  # --ncu's child run under Nsight Compute
    return p


def workload_from_args(args: argparse.Namespace) -> Workload:
    knobs = {"crop_mode": DEFAULT.crop_mode,
             **(mode_knobs(args.model, args.resolution, flag="--resolution") if args.resolution else {})}
    pick = lambda given, key: knobs.get(key) if given is None else given  # noqa: E731
    return Workload(model=args.model, image_wh=DEFAULT.image_wh if args.image else parse_image_shape(args.image_shape),
                    image_path=args.image, base_size=pick(args.base_size, "base_size"),
                    tile_size=pick(args.tile_size, "tile_size"), crop_mode=pick(args.crop_mode, "crop_mode"),
                    text_tokens=args.text_tokens, prompt=args.prompt, tokenizer=args.tokenizer, decode_steps=args.decode_steps)


def options_from_args(args: argparse.Namespace) -> Options:
    """Options from the flags of the same name (--attn and --experts parsed, the lists as tuples)."""
    build = BuildOptions(attn=parse_impl(args.attn, "--attn") if args.attn else None,
                         experts=parse_impl(args.experts, "--experts") if args.experts else None,
                         attn_plugins=tuple(args.attn_plugin), **{k: getattr(args, k) for k in SAME_NAME_BUILD})
    return Options(build=build, ncu_argv=tuple(args.argv), **{k: getattr(args, k) for k in SAME_NAME})


def run_command(args: argparse.Namespace) -> int:
    label, t = "loading the vendor code and the tables", time.perf_counter()
    phases = [("startup", t - STARTED)]
    workload, options = workload_from_args(args), options_from_args(args)
    workload = check(workload, options)  # bad input fails here, before minutes of tracing
    if warning := real_run_warning(workload, options):
        print(f"flopdiff: warning: {warning}", file=sys.stderr)
    with OutputSet(args.out) as outputs:  # a bad --out fails here; committed whole, or discarded on any failure
        with Console(stderr=True, quiet=args.quiet).status("tracing") as spinner:
            def progress(next_label: str) -> None:
                nonlocal label, t
                phases.append((label, time.perf_counter() - t))
                label, t = next_label, time.perf_counter()
                spinner.update(next_label)

            result = run(workload, options, progress)
            progress("writing the reports")
        out = Console(width=None if sys.stdout.isatty() else 140)  # piped output: full numbers, no ellipsis
        for table in result.tables():
            out.print(table)
        names = result.write(outputs, only_flops=args.json_nodes == "flops")
        out.print(f"wrote {Path(args.out)}/" + ", ".join(names))
        progress("done")
    if args.timings:
        print("flopdiff: seconds per phase: " + "; ".join(f"{n} {s:.2f}" for n, s in phases), file=sys.stderr)
    over = result.over(options.max_gap)
    for s in over:
        print(f"flopdiff: stage {s.name}: gap {s.gap_pct:.2f}% exceeds --max-gap {args.max_gap}", file=sys.stderr)
    return 1 if over else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --ncu runs the same command line again
    gc.disable()  # millions of long-lived graph objects: the cyclic collector would rescan them, a fifth of the run
    try:
        with signals_as_exceptions():
            return run_command(args)
    except FlopdiffError as exc:
        print(f"flopdiff: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:  # the run cleaned up on the way out: say so in one line
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"flopdiff: interrupted ({signal.Signals(signum).name}); the output folder was left as it was",
              file=sys.stderr)
        return 128 + signum
    finally:
        gc.enable()


def cli() -> None:
    """main(), then exit with no interpreter teardown (freeing millions of graph objects takes seconds)."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
