"""flopdiff command line: `python -m tracer.diff` (console script `flopdiff`).

The pipeline, top to bottom: parse the workload -> trace every stage weight-free (tracer.trace) ->
count FLOPs per node under both policies (tracer.count) -> build the report (tracer.report) -> evaluate
the analytic model for the same workload (analytic) -> map every FLOP-bearing node to an analytic layer
(mapping) -> gaps per stage and layer (tracer.gaps) -> print the tables, write DIR/report.json,
DIR/report.html and DIR/model-explorer.json atomically.
Exit status: 0; 1 when a stage's gap exceeds --max-gap; 2 for bad input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from tracer.errors import FlopdiffError
from tracer.conventions import Conventions
from tracer.lifecycle import Interrupted, OutputSet, signals_as_exceptions, sweep_scratch
from tracer.vendors import VENDORS, BuildOptions, get_vendor
from tracer.workload import Workload, parse_image_shape, validate

STARTED = time.perf_counter()  # this module's import: the process's imports before it are not counted
DEFAULT = Workload()


def parse_impl(text: str, flag: str) -> str | dict[str, str]:
    """'sdpa' or 'text_config=flex_attention,vision_config=sdpa' (one value per sub-config)."""
    if "=" not in text:
        return text
    try:
        return dict(part.split("=", 1) for part in text.split(","))
    except ValueError:
        raise FlopdiffError(f"{flag} {text!r}: expected NAME or SUBCONFIG=NAME[,SUBCONFIG=NAME...]") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flopdiff", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT.model, help=f"one of: {', '.join(sorted(VENDORS))}")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="an image file (its size is the workload's)")
    src.add_argument("--image-shape", default="x".join(map(str, DEFAULT.image_wh)),
                     help="WIDTHxHEIGHT of a synthetic white page")
    p.add_argument("--base-size", type=int, help="global view size (default: the vendor processor's)")
    p.add_argument("--tile-size", type=int, help="tile size (default: the vendor processor's)")
    p.add_argument("--crop-mode", action=argparse.BooleanOptionalAction,
                   help="cut large pages into tiles, as the vendor does (default: on, or the --resolution's)")
    p.add_argument("--resolution", metavar="MODE",
                   help="a vendor resolution mode, setting --base-size, --tile-size and --crop-mode unless given "
                        "(deepseek-ocr: tiny, small, base, large, gundam; analytic/presets/defaults.yaml)")
    p.add_argument("--text-tokens", type=int,
                   help="number of prompt text tokens after the image (BOS excluded) when no tokenizer is given "
                        "(deepseek-ocr-2: 4 by default; deepseek-ocr: required)")
    p.add_argument("--prompt", help="prompt with one <image>, tokenized with --tokenizer")
    p.add_argument("--tokenizer", help="a local tokenizer folder or tokenizer.json")
    p.add_argument("--decode-steps", type=int, default=DEFAULT.decode_steps,
                   help="one-token decode steps captured after the prefill, on the growing KV cache")
    p.add_argument("--config", help="vendor config.json (default: deepseek-ocr-2: the published one, shipped "
                                    "with flopdiff; deepseek-ocr: the one in --vendor-dir)")
    p.add_argument("--vendor-dir", help="deepseek-ocr: a local copy of the Hugging Face repo deepseek-ai/DeepSeek-OCR "
                                        "(*.py, *.json; no weights), or its hub id where the hub is reachable")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow importing and running the vendor's Python files from --vendor-dir")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda (with --mode real): run on the GPU and attribute every kernel (torch.profiler) to "
                        "nodes and analytic layers")
    p.add_argument("--graph", choices=("fx", "onnx"), default="fx",
                   help="onnx: also export the prefill and decode step 0 to ONNX (no weights), count FLOPs per ONNX node, "
                        "map them through the same table and check them against the fx graph (report-onnx.json, "
                        "prefill.onnx, decode.onnx)")
    p.add_argument("--ncu", metavar="MODULE",
                   help="with --device cuda: Nsight Compute hardware FLOPs for the kernels inside MODULE (a module "
                        "path, e.g. model.language_model.layers.1), beside the formula")
    p.add_argument("--mode", choices=("fake", "real"), default="fake",
                   help="fake: no weights, no compute (minimal declared shims); real: the vendor code on random "
                        "weights, computing for real (slow on CPU)")
    p.add_argument("--attn", help="attn_implementation, or SUBCONFIG=NAME,... (default: deepseek-ocr-2 sdpa, "
                                  "deepseek-ocr eager)")
    p.add_argument("--experts", help="deepseek-ocr-2: experts_implementation, grouped_mm (default), batched_mm, or "
                                     "eager (--mode real only: its loop reads the routing)")
    p.add_argument("--causal-halving", action="store_true",
                   help="policy full counts only the (query, key) pairs a causal mask keeps "
                        "(default: dense, FlopCounterMode's convention)")
    p.add_argument("--analytic", default="aligned", metavar="PRESET",
                   help="analytic model: aligned (vendor-exact), seed-naive, or a preset YAML file")
    p.add_argument("--mapping", metavar="TABLE", help="mapping table YAML (default: the built-in one of --model)")
    p.add_argument("--explain", metavar="ID", help="print one analytic layer (e.g. decoder.layers.3.attn) with its "
                                                   "formula and nodes, or one node (e.g. prefill/mm_12)")
    p.add_argument("--max-gap", type=float, metavar="PCT",
                   help="exit 1 when a stage's |gap| exceeds PCT percent of its full count")
    p.add_argument("--json-nodes", choices=("all", "flops"), default="all",
                   help="nodes in report.json: all, or only those with FLOPs or no formula (a much smaller file)")
    p.add_argument("--out", default="flopdiff-report",
                   help="output folder for report.json, report.html and model-explorer.json")
    p.add_argument("--sequential", action="store_true",
                   help="capture every decode step in this process (default with --mode fake on CPU, 3+ steps and 2+ "
                        "CPUs: a forked worker captures the later steps from a synthesized KV cache, checked against "
                        "the real one)")
    p.add_argument("--allow-long", action="store_true",
                   help="run workloads estimated to take more than about five minutes to capture (refused otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    # --ncu's own child run under Nsight Compute: NVTX ranges around MODULE's calls instead of the profiler
    p.add_argument("--nvtx-module", metavar="MODULE", help=argparse.SUPPRESS)
    p.add_argument("--timings", action="store_true", help="print the seconds each phase took (stderr)")
    return p


def workload_from_args(args: argparse.Namespace) -> Workload:
    image_wh = DEFAULT.image_wh if args.image else parse_image_shape(args.image_shape)
    knobs: dict = {"crop_mode": DEFAULT.crop_mode}
    if args.resolution:
        from analytic.api import mode_knobs

        knobs = dict(mode_knobs(args.model, args.resolution, flag="--resolution"))
    crop_mode = knobs["crop_mode"] if args.crop_mode is None else args.crop_mode
    return Workload(model=args.model, image_wh=image_wh, image_path=args.image,
                    base_size=knobs.get("base_size") if args.base_size is None else args.base_size,
                    tile_size=knobs.get("tile_size") if args.tile_size is None else args.tile_size,
                    crop_mode=crop_mode, text_tokens=args.text_tokens,
                    prompt=args.prompt, tokenizer=args.tokenizer, decode_steps=args.decode_steps)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# --mode real on CPU, measured on a 2-core machine (tracer.capture keeps no activation alive):
#   v2 1000x1400, 1 decode step: build 27.8 s, prefill 33.4 s for 6.7 TFLOP, 65 s and 11.0 GiB in all;
#   v1 1000x1400, 2 decode steps: build 33.9 s, prefill 19.8 s for 4.6 TFLOP, 60 s and 9.8 GiB in all.
# Building costs 2.5-3.5x the machine's bf16 normal_ fill per parameter; the forward runs at 23-28% of its
# 1024^3 bf16 matmul rate; peak memory is 1.7-1.8x the weights. The estimate takes a margin on each, so that it
# bounds the run: INIT_FACTOR, MATMUL_EFFICIENCY, MEMORY_FACTOR, plus the fixed cost of loading.
INIT_FACTOR = 4.0
MATMUL_EFFICIENCY = 0.15
MEMORY_FACTOR = 2.2
LOAD_SECONDS = 5.0


def real_run_estimate(workload: Workload, config: str | None) -> str:
    """What `--mode real` on CPU is about to cost, as an upper bound: building the random weights (this machine's
    measured fill rate), computing every stage's analytic FLOPs (its measured bf16 matmul rate), and memory."""
    import torch

    from analytic.api import build, evaluate_tree, policy, shape_for, weight_bytes

    shape = shape_for(workload.model, workload.image_wh, base_size=workload.base_size, tile_size=workload.tile_size,
                      crop_mode=workload.crop_mode, text_tokens=workload.text_tokens or 0,
                      decode_steps=workload.decode_steps)
    tree = build(workload.model, shape, "aligned", config)
    doc = evaluate_tree(tree, shape, policy("full"))
    flops = sum(s["flops"] for s in doc["stages"] if s["name"] != "vision")  # prefill includes vision
    weights = weight_bytes(tree)
    a = torch.ones(1024, 1024, dtype=torch.bfloat16)
    a @ a  # warm-up
    rate = 4 * 2 * 1024**3 / _seconds(lambda: [a @ a for _ in range(4)])
    fill = torch.empty(2**22, dtype=torch.bfloat16)
    per_param = _seconds(fill.normal_) / fill.numel()
    build_s = INIT_FACTOR * per_param * weights / 2
    compute_s = flops / (rate * MATMUL_EFFICIENCY)
    return (f"--mode real on CPU: up to {_duration(LOAD_SECONDS + build_s + compute_s)} here (building "
            f"{weights / 2**30:.1f} GiB of random bf16 weights ~{_duration(build_s)}, computing "
            f"{flops / 1e12:.1f} TFLOP ~{_duration(compute_s)} at {MATMUL_EFFICIENCY:.0%} of this machine's "
            f"{rate / 1e9:.0f} GFLOP/s bf16 matmul rate) and up to {MEMORY_FACTOR * weights / 2**30:.0f} GiB of memory")


def _seconds(fn, tries: int = 3) -> float:
    """The fastest of a few runs (the first pays for thread start-up and page faults)."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Phases:
    """The progress display, remembering how long each phase took (`--timings`)."""

    def __init__(self, spinner, started: float) -> None:
        self.spinner, self.label, self.t = spinner, "loading the vendor code and the tables", started
        self.rows: list[tuple[str, float]] = [("startup", started - STARTED)]

    def update(self, label: str) -> None:
        now = time.perf_counter()
        self.rows.append((self.label, now - self.t))
        self.label, self.t = label, now
        self.spinner.update(label)


def run(args: argparse.Namespace) -> int:
    from analytic.api import variant
    from mapping.table import load_table
    from tracer.onnx_graph import check_onnx

    started = time.perf_counter()
    if args.ncu and args.device != "cuda":
        raise FlopdiffError(f"--ncu {args.ncu}: needs --device cuda --mode real")
    if args.max_gap is not None and not (math.isfinite(args.max_gap) and args.max_gap >= 0):
        raise FlopdiffError(f"--max-gap {args.max_gap}: must be a number, 0 or more (percent of the full count)")
    vendor = get_vendor(args.model)             # bad model, preset, table or graph: fail before minutes of tracing
    if args.graph == "onnx":
        check_onnx(vendor)
    variant(args.analytic, "--analytic")
    load_table(args.mapping or args.model)
    workload = validate(workload_from_args(args))
    options = BuildOptions(attn=parse_impl(args.attn, "--attn") if args.attn else None,
                           experts=parse_impl(args.experts, "--experts") if args.experts else None,
                           vendor_dir=args.vendor_dir,
                           trust_remote_code=args.trust_remote_code, device=args.device)
    conventions = Conventions(causal_halving=args.causal_halving)
    if args.mode == "real" and options.device == "cpu":
        config = args.config or (str(Path(args.vendor_dir) / "config.json") if args.vendor_dir else None)
        print(f"flopdiff: warning: {real_run_estimate(workload, config)}", file=sys.stderr)
    sweep_scratch()
    outputs = OutputSet(args.out)  # a bad --out fails here, before the trace; nothing of it is left on failure
    try:
        report = _run_into(args, outputs, workload, options, conventions, started)
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    over = [s for s in report["stages"] if args.max_gap is not None and abs(s["gap_pct"]) > args.max_gap]
    for s in over:
        print(f"flopdiff: stage {s['name']}: gap {s['gap_pct']:.2f}% exceeds --max-gap {args.max_gap}", file=sys.stderr)
    return 1 if over else 0


def _run_into(args: argparse.Namespace, outputs: OutputSet, workload: Workload, options: BuildOptions,
              conventions: Conventions, started: float) -> dict:
    """Trace, count, map, diff, print and write every file into `outputs` (staged; the caller commits)."""
    from rich.console import Console

    from tracer.count import count_graph
    from tracer.explain import explain
    from tracer.gaps import add_diff, analytic_for, map_report
    from tracer.html import render_html
    from tracer.kernels import attribute_kernels, kernel_table
    from tracer.ncu import join as ncu_join
    from tracer.ncu import ncu_table, run_ncu
    from tracer.onnx_graph import consistency_table, run_onnx
    from tracer.onnx_graph import save as save_onnx
    from tracer.overlay import graph_collection, overlay
    from tracer.forking import forked
    from tracer.report import build_report, dumps, gap_table, stage_table, unmapped_table, unseen_table
    from tracer.instruments import NvtxRanges
    from tracer.trace import trace

    err = Console(stderr=True, quiet=args.quiet)
    with err.status("tracing") as spinner:
        status = Phases(spinner, started)
        tr = trace(workload, options, args.config, progress=lambda msg: status.update(f"tracing: {msg}"),
                   mode=args.mode, parallel=not args.sequential, allow_long=args.allow_long,
                   instrument=NvtxRanges(args.nvtx_module) if args.nvtx_module else None)
        status.update("counting FLOPs per node")
        for sg in tr.graphs():
            if sg.selection is None:  # a selection's nodes (vision) are counted with the graph they belong to
                count_graph(sg, conventions)
        report = build_report(tr)
        status.update(f"analytic model ({args.analytic}) and mapping")
        analytic = analytic_for(report, args.analytic, args.causal_halving, args.config)
        mapping = map_report(report, analytic, args.mapping)
        add_diff(report, analytic, mapping)
        if args.device == "cuda":
            status.update("attributing kernels")
            attribute_kernels(tr, report, mapping.matcher)
        if args.ncu:
            status.update(f"Nsight Compute on the kernels inside {args.ncu} (runs flopdiff again)")
            rows, ncu_csv = run_ncu(args.argv, args.ncu)
            report["ncu"] = ncu_join(report, args.ncu, rows)
        onnx_rep = protos = None
        if args.graph == "onnx":
            status.update("exporting the prefill and decode step 0 to ONNX (no weights) and counting their nodes")
            onnx_rep, protos = run_onnx(tr, report, analytic, args.mapping)
        detail = explain(report, analytic, mapping, args.explain, args.causal_halving) if args.explain else None
        status.update("writing the reports")
    # the largest file, independent of the others: built and encoded in a forked child meanwhile
    graph_written = forked(lambda: outputs.write("model-explorer-graph.json",
                                                 json.dumps(graph_collection(tr, report), separators=(",", ":"))))
    out = Console(width=None if sys.stdout.isatty() else 140)  # piped output: full numbers, no ellipsis
    out.print(stage_table(report))
    out.print(gap_table(report))
    out.print(unseen_table(report))
    if report.get("kernels"):
        out.print(kernel_table(report))
    if report.get("ncu"):
        out.print(ncu_table(report))
    if onnx_rep is not None:
        out.print(consistency_table(onnx_rep))
    if report["coverage"]["unmapped"]:
        out.print(unmapped_table(report))
    if report["unknown_ops"]:
        out.print("[bold red]ops that may carry FLOPs and have no formula:[/] " +
                  ", ".join(f"{u['op']} x{u['count']}" for u in report["unknown_ops"]))
    if detail is not None:
        out.print(detail)
    outputs.write("report.json", dumps(report, only_flops=args.json_nodes == "flops"))
    outputs.write("report.html", render_html(report))
    outputs.write("model-explorer.json", json.dumps(overlay(report), separators=(",", ":")))
    if args.ncu:
        outputs.write("ncu.csv", ncu_csv)
    if onnx_rep is not None:
        save_onnx(protos, outputs)
        outputs.write("report-onnx.json", dumps(onnx_rep))
    graph_written()
    onnx_files = "".join(f", {name}" for name in ["report-onnx.json", *(protos or {})]) if onnx_rep is not None else ""
    out.print(f"wrote {Path(args.out)}/report.json, report.html, model-explorer.json, model-explorer-graph.json{onnx_files}")
    status.update("done")
    if args.timings:
        print("flopdiff: seconds per phase: " + "; ".join(f"{label} {s:.2f}" for label, s in status.rows), file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --ncu runs the same command line again
    # The pipeline builds millions of long-lived objects (graph nodes and their metas, fake tensors): the
    # cyclic collector would rescan them again and again, about a fifth of the run. Reference counting still
    # frees everything else; peak memory is in the benchmarks' tables.
    gc.disable()
    try:
        with signals_as_exceptions():
            return run(args)
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
    """The command line (`python -m tracer.diff`, console script `flopdiff`): main(), then exit without tearing
    the interpreter down. Freeing the run's millions of graph objects one by one (and the cyclic collector's
    pass over them) takes more than a second on a large page, after every file is already written."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
