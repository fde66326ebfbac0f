"""flopdiff command line (`flopdiff`, `python -m tracer.diff`; `flopdiff sweep PATH...` over a corpus: tracer.sweep):
parse, run the pipeline (tracer.pipeline), print, write the output set (replaced whole: tracer.core.lifecycle), exit:
0; 1 when a stage's gap exceeds --max-gap; 2 for bad input (one line, nothing written); 3 for an internal error (one
line naming where it happened: a crash must never read as a gap to a CI gate; FLOPDIFF_TRACEBACK=1 prints the whole
traceback too); 128 + the signal after SIGINT / SIGTERM (one line, the output folder left as it was)."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from rich.text import Text

from analytic.api import resolution_knobs
from tracer import sweep
from tracer.core import flags, workload_config
from tracer.core.errors import Aborted, FlopdiffError, describe, one_line
from tracer.core.lifecycle import Interrupted, OutputSet, signals_as_exceptions
from tracer.core.workload import Workload, parse_image_shape
from tracer.pipeline import Options, check, pinned, real_run_warning, run
from tracer.render.tables import terminal
from tracer.vendors import BuildOptions, parse_impl

STARTED = time.perf_counter()  # this module's import: the process's imports before it are not counted
DEFAULT = Workload()
SAME_NAME_BUILD = ("vendor_dir", "trust_remote_code", "device")
INTERNAL_ERROR = 3
KNOBS = ("base_size", "tile_size", "crop_mode")  # the view knobs --resolution sets unless given
SAME_NAME = ("config", "mode", "analytic", "mapping", "causal_halving", "policy", "graph", "ncu", "nvtx_module",
             "explain", "sequential", "allow_long", "every_step", "max_gap", "metric")


def build_parser() -> argparse.ArgumentParser:
    return flags.parser("flopdiff", flags.DESCRIPTION, flags.WORKLOAD, flags.ANALYTIC, flags.FLOPDIFF,
                        usage=flags.USAGE, epilog="flopdiff sweep --help: the flags of a corpus run")


def workload_from_args(args: argparse.Namespace) -> Workload:
    knobs = resolution_knobs(model := flags.model_of(args), args.resolution, {k: getattr(args, k) for k in KNOBS})
    crop_mode = DEFAULT.crop_mode if knobs["crop_mode"] is None else knobs["crop_mode"]
    return Workload(model=model, image_wh=DEFAULT.image_wh if args.image else parse_image_shape(args.image_shape),
                    image_path=args.image, base_size=knobs["base_size"], tile_size=knobs["tile_size"],
                    crop_mode=crop_mode, text_tokens=args.text_tokens, prompt=args.prompt, tokenizer=args.tokenizer,
                    decode_steps=args.decode_steps)


def options_from_args(args: argparse.Namespace) -> Options:
    """Options from the flags of the same name (--attn and --experts parsed, the lists as tuples)."""
    build = BuildOptions(attn=parse_impl(args.attn, "--attn") if args.attn else None,
                         experts=parse_impl(args.experts, "--experts") if args.experts else None,
                         attn_plugins=tuple(args.attn_plugin), **{k: getattr(args, k) for k in SAME_NAME_BUILD})
    return Options(build=build, ncu_argv=tuple(args.argv), keep_graphs=args.model_explorer,
                   **({"cache": False} if args.no_cache else {}),
                   **{k: getattr(args, k) for k in SAME_NAME})


def run_command(args: argparse.Namespace) -> int:
    if note := workload_config.apply(args, args.argv):  # flags given win over the file
        print(f"flopdiff: note: {note}", file=sys.stderr)
    with pinned(workload_from_args(args), options_from_args(args)) as (workload, options):  # pipes read once
        return _run_command(args, workload, options)


def _run_command(args: argparse.Namespace, workload: Workload, options: Options) -> int:
    label, t = "loading the vendor code and the tables", time.perf_counter()
    phases = [("startup", t - STARTED)]
    workload = check(workload, options)  # bad input fails here, before minutes of tracing
    if warning := real_run_warning(workload, options):
        print(f"flopdiff: warning: {warning}", file=sys.stderr)
    folder = args.out or (None if args.explain or args.max_gap is not None else "flopdiff-report")  # asked for
    with OutputSet(folder) if folder else nullcontext() as outputs:  # committed whole, or discarded on any failure
        with Console(stderr=True, quiet=args.quiet).status("tracing") as spinner:
            def progress(next_label: str) -> None:
                nonlocal label, t
                phases.append((label, time.perf_counter() - t))
                label, t = next_label, time.perf_counter()
                spinner.update(Text(next_label))  # as it is: a label may hold a user's path (no markup)

            result = run(workload, options, progress, note=lambda t: print(f"flopdiff: note: {one_line(t)}",
                                                                         file=sys.stderr))
            progress("writing the reports")
        out = terminal()
        for table in [result.detail] if args.explain else result.tables(out.width):  # --explain: the answer alone
            out.print(table)
        if outputs is not None:
            names = result.write(outputs, only_flops=args.json_nodes == "flops", model_explorer=args.model_explorer)
            out.print(f"wrote {Path(folder)}/" + ", ".join(names))
        progress("done")
    if args.timings:
        print("flopdiff: seconds per phase: " + "; ".join(f"{n} {s:.2f}" for n, s in phases), file=sys.stderr)
    over = result.over(options.max_gap)
    for s, metric, gap in over:
        what = "gap" if metric == "tc_flops" else f"{metric} gap"
        print(f"flopdiff: stage {s.name}: {what} {gap:.2f}% exceeds --max-gap {args.max_gap}", file=sys.stderr)
    return 1 if over else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:  # `flopdiff sweep PATH...`: a corpus of pages (tracer.sweep)
        return guarded(lambda: sweep.main(argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv  # --ncu runs the same command line again
    return guarded(lambda: run_command(args))


def guarded(command: Callable[[], int]) -> int:
    """Run a command: bad input is one line and exit 2, a signal one line and 128 + its number, any other exception
    one line and exit 3 (INTERNAL_ERROR)."""
    collecting = gc.isenabled()
    gc.disable()  # millions of long-lived graph objects: the cyclic collector would rescan them, a fifth of the run
    try:
        with signals_as_exceptions():
            return command()
    except (FlopdiffError, Aborted) as exc:  # the input, or a run aborted from outside (a worker killed)
        print(f"flopdiff: error: {one_line(str(exc))}", file=sys.stderr)  # always one line
        return 2 if isinstance(exc, FlopdiffError) else INTERNAL_ERROR
    except (KeyboardInterrupt, Interrupted) as exc:  # the run cleaned up on the way out: say so in one line
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"flopdiff: interrupted ({signal.Signals(signum).name}); the output folder was left as it was",
              file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # a bug or the machine, never the input: one line, and a code no gate reads as a gap
        print(f"flopdiff: internal error: {describe(exc)}", file=sys.stderr)
        if os.environ.get("FLOPDIFF_TRACEBACK"):
            traceback.print_exception(exc)
        return INTERNAL_ERROR
    finally:
        if collecting:
            gc.enable()


def cli() -> None:
    """main(), then exit with no interpreter teardown (freeing millions of graph objects takes seconds). The cyclic
    collector stays off to the end: switched on, its first pass over the run's objects took 0.9 s of a 6.9 s v1 page."""
    gc.disable()
    code = main()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
