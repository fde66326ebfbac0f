"""flopdiff as a library: one call runs the pipeline, top to bottom, and returns a typed result. The command line
(tracer.cli), the tests and the benchmarks use it; so can a notebook:

    from tracer.pipeline import Options, run
    from tracer.workload import Workload

    result = run(Workload(image_wh=(1000, 1400), text_tokens=9, decode_steps=2), Options(analytic="seed-naive"))
    for stage in result.stages:
        print(stage.name, stage.flops_analytic, stage.flops_full, stage.gap_pct)
    worst = max(result.layers, key=lambda layer: abs(layer.gap))
    rows = result.records("nodes")          # list of dicts; result.dataframe("nodes") with pandas installed
    html = result.to_html()                 # the self-contained page; result.to_json() is report.json

The pipeline: check the inputs (before any trace) -> trace every stage weight-free (tracer.trace) -> count FLOPs
per node under both policies (tracer.count) -> the report document (tracer.report) -> the analytic model for the
same workload (analytic) -> map every FLOP-bearing node to an analytic layer (mapping) -> gaps per stage and layer
(tracer.gaps) -> on CUDA, kernels (tracer.kernels) and Nsight Compute (tracer.ncu) -> optionally the ONNX graph
(tracer.onnx_graph) -> optionally one layer or node explained (tracer.explain).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from tracer.conventions import Conventions
from tracer.errors import FlopdiffError
from tracer.lifecycle import OutputSet
from tracer.vendors import BuildOptions, get_vendor
from tracer.workload import Workload, validate


@dataclass(frozen=True)
class Options:
    """Everything besides the workload: how to build and run the vendor model, what to diff against, extras."""

    build: BuildOptions = field(default_factory=BuildOptions)
    config: str | None = None           # vendor config.json (None: the model's default)
    mode: str = "fake"                  # fake (no weights, no compute) or real (random weights)
    analytic: str = "aligned"           # analytic preset name or YAML file
    mapping: str | None = None          # mapping table YAML (None: the model's built-in one)
    causal_halving: bool = False
    graph: str = "fx"                   # "onnx": also export and count the ONNX graph
    ncu: str | None = None              # a module path: Nsight Compute on its kernels (CUDA)
    ncu_argv: tuple[str, ...] = ()      # the command line --ncu runs again under Nsight Compute
    nvtx_module: str | None = None      # --ncu's own child run: NVTX ranges around this module's calls
    explain: str | None = None          # an analytic layer id or a node id
    sequential: bool = False            # no decode worker process
    allow_long: bool = False            # run captures estimated at more than about five minutes


def check(workload: Workload, options: Options) -> Workload:
    """The checks that need no trace (a bad model, preset, table, graph or workload fails in a second)."""
    from analytic.api import variant
    from mapping.table import load_table
    from tracer.onnx_graph import check_onnx

    if options.ncu and options.build.device != "cuda":
        raise FlopdiffError(f"--ncu {options.ncu}: needs --device cuda --mode real")
    vendor = get_vendor(workload.model)
    if options.graph == "onnx":
        check_onnx(vendor)
    variant(options.analytic, "--analytic")
    load_table(options.mapping or workload.model)
    return validate(workload)


def real_run_warning(workload: Workload, options: Options) -> str | None:
    """What `--mode real` on the CPU is about to cost (an upper bound, tracer.trace.real_run_estimate); None else."""
    if options.mode != "real" or options.build.device != "cpu":
        return None
    from pathlib import Path

    from tracer.trace import real_run_estimate

    vendor_dir = options.build.vendor_dir
    config = options.config or (str(Path(vendor_dir) / "config.json") if vendor_dir else None)
    return real_run_estimate(workload, config)


def check_max_gap(max_gap: float | None) -> float | None:
    """A --max-gap percentage (None: no gate)."""
    if max_gap is not None and not (math.isfinite(max_gap) and max_gap >= 0):
        raise FlopdiffError(f"--max-gap {max_gap}: must be a number, 0 or more (percent of the full count)")
    return max_gap


@dataclass(frozen=True)
class Stage:
    name: str
    flops_analytic: int
    flops_torch: int
    flops_full: int
    gap: int
    gap_pct: float
    unknown_ops: int
    coverage: dict[str, int]
    steps: list[dict[str, int]] | None = None  # decode: kv_len and FLOPs per step


@dataclass(frozen=True)
class Layer:
    id: str
    stage: str
    flops_analytic: int
    flops_torch: int
    flops_full: int
    gap: int
    gap_pct: float
    reason: str | None
    nodes: list[str]


@dataclass(frozen=True)
class GapGroup:
    """A stage's gap by where it comes from (layer ids up to their first index) and why."""

    stage: str
    group: str
    reason: str | None
    layers: int
    gap: int


@dataclass(frozen=True)
class Unseen:
    """FLOPs that only policy `full` counts (FlopCounterMode misses them), per stage and op."""

    stage: str
    op: str
    nodes: int
    flops: int


@dataclass(frozen=True)
class Coverage:
    nodes_with_flops: int
    mapped: int
    unmapped: int
    unmapped_flops: int


def _typed(cls: type, row: dict[str, Any]) -> Any:
    return cls(**{f.name: row.get(f.name) for f in fields(cls)})


@dataclass
class Result:
    """One run: typed views (`stages`, `layers`, `gap_groups`, `unseen`, `coverage`; `kernels` and `ncu` on CUDA,
    `onnx_report` with --graph onnx) over `report`, the JSON document (report.json's schema)."""

    report: dict[str, Any]
    trace: Any
    analytic: Any
    mapping: Any
    onnx_report: dict[str, Any] | None = None
    onnx_protos: dict[str, Any] | None = None
    ncu_csv: str | None = None
    detail: Any = None  # the --explain text (a rich renderable)

    @property
    def stages(self) -> list[Stage]:
        return [_typed(Stage, s) for s in self.report["stages"]]

    @property
    def layers(self) -> list[Layer]:
        return [_typed(Layer, r) for r in self.report["layers"]]

    @property
    def gap_groups(self) -> list[GapGroup]:
        from tracer.gaps import gap_groups

        return [GapGroup(stage=s.name, **g) for s in self.stages for g in gap_groups(self.report, s.name)]

    @property
    def unseen(self) -> list[Unseen]:
        from tracer.report import unseen_ops

        return [_typed(Unseen, r) for r in unseen_ops(self.report)]

    @property
    def coverage(self) -> Coverage:
        return _typed(Coverage, self.report["coverage"])

    @property
    def kernels(self) -> list[dict[str, Any]]:
        """CUDA runs: per kernel name, calls, time, FLOPs and whether FlopCounterMode counts them ([] elsewhere)."""
        return self.records("kernels")

    @property
    def ncu(self) -> dict[str, Any] | None:
        return self.report.get("ncu")

    def records(self, what: str) -> list[dict[str, Any]]:
        """Rows of `stages`, `layers`, `nodes` or `kernels` as plain dicts (report.json's fields)."""
        if what not in ("stages", "layers", "nodes", "kernels", "unknown_ops"):
            raise FlopdiffError(f"records({what!r}): choose stages, layers, nodes, kernels or unknown_ops")
        return [dict(r) for r in self.report.get(what, [])]

    def dataframe(self, what: str) -> Any:
        """The same rows as a pandas DataFrame (pandas is not a dependency of flopdiff: install it to use this)."""
        try:
            import pandas
        except ImportError:
            raise FlopdiffError("dataframe(): needs pandas (pip install pandas); records() gives the same rows") from None
        return pandas.DataFrame.from_records(self.records(what))

    def over(self, max_gap: float | None) -> list[Stage]:
        """The stages whose |gap| exceeds `max_gap` percent of their full count (None: no gate, none)."""
        if check_max_gap(max_gap) is None:
            return []
        return [s for s in self.stages if abs(s.gap_pct) > max_gap]

    def to_json(self, only_flops: bool = False) -> str:
        from tracer.report import dumps

        return dumps(self.report, only_flops=only_flops)

    def to_html(self) -> str:
        from tracer.html import render_html

        return render_html(self.report)

    def tables(self) -> list[Any]:
        """The terminal tables (rich renderables), in the order the command line prints them."""
        from tracer.tables import (consistency_table, gap_table, kernel_table, ncu_table, stage_table, unmapped_table,
                                   unseen_table)

        report = self.report
        out: list[Any] = [stage_table(report), gap_table(report), unseen_table(report)]
        if report.get("kernels"):
            out.append(kernel_table(report))
        if report.get("ncu"):
            out.append(ncu_table(report))
        if self.onnx_report is not None:
            out.append(consistency_table(self.onnx_report))
        if report["coverage"]["unmapped"]:
            out.append(unmapped_table(report))
        if report["unknown_ops"]:
            out.append("[bold red]ops that may carry FLOPs and have no formula:[/] " +
                       ", ".join(f"{u['op']} x{u['count']}" for u in report["unknown_ops"]))
        if self.detail is not None:
            out.append(self.detail)
        return out

    def write(self, outputs: OutputSet, only_flops: bool = False) -> list[str]:
        """Every output file into `outputs` (staged: the caller commits or discards); the names written."""
        from tracer.forking import forked
        from tracer.onnx_graph import save as save_onnx
        from tracer.overlay import graph_collection, overlay
        from tracer.report import dumps

        # the largest file, independent of the others: built and encoded in a forked child meanwhile
        graph_written = forked(lambda: outputs.write("model-explorer-graph.json", json.dumps(
            graph_collection(self.trace, self.report), separators=(",", ":"))))
        outputs.write("report.json", self.to_json(only_flops))
        outputs.write("report.html", self.to_html())
        outputs.write("model-explorer.json", json.dumps(overlay(self.report), separators=(",", ":")))
        names = ["report.json", "report.html", "model-explorer.json", "model-explorer-graph.json"]
        if self.ncu_csv is not None:
            outputs.write("ncu.csv", self.ncu_csv)
            names.append("ncu.csv")
        if self.onnx_report is not None:
            save_onnx(self.onnx_protos, outputs)
            outputs.write("report-onnx.json", dumps(self.onnx_report))
            names += ["report-onnx.json", *self.onnx_protos]
        graph_written()
        return names


def run(workload: Workload, options: Options = Options(), progress: Callable[[str], None] = lambda msg: None) -> Result:
    """Trace, count, diff and (as asked) attribute kernels, run Nsight Compute, export ONNX, explain."""
    from tracer.count import count_graph
    from tracer.explain import explain
    from tracer.gaps import add_diff, analytic_for, map_report, shape_of_trace
    from tracer.instruments import NvtxRanges
    from tracer.kernels import attribute_kernels
    from tracer.ncu import join as ncu_join
    from tracer.ncu import run_ncu
    from tracer.onnx_graph import run_onnx
    from tracer.report import build_report
    from tracer.trace import trace

    workload = check(workload, options)
    tr = trace(workload, options.build, options.config, progress=lambda msg: progress(f"tracing: {msg}"),
               mode=options.mode, parallel=not options.sequential, allow_long=options.allow_long,
               instrument=NvtxRanges(options.nvtx_module) if options.nvtx_module else None)
    progress("counting FLOPs per node")
    conventions = Conventions(causal_halving=options.causal_halving)
    for sg in tr.graphs():
        if sg.selection is None:  # a selection's nodes (vision) are counted with the graph they belong to
            count_graph(sg, conventions)
    report = build_report(tr)
    progress(f"analytic model ({options.analytic}) and mapping")
    analytic = analytic_for(workload.model, shape_of_trace(tr), options.analytic, options.causal_halving,
                            options.config, tr.prepared.derived.image_tokens)
    mapping = map_report(report, analytic, options.mapping)
    add_diff(report, analytic, mapping)
    result = Result(report, tr, analytic, mapping)
    if options.build.device == "cuda":
        progress("attributing kernels")
        attribute_kernels(tr, report, mapping.matcher)
    if options.ncu:
        progress(f"Nsight Compute on the kernels inside {options.ncu} (runs flopdiff again)")
        rows, result.ncu_csv = run_ncu(list(options.ncu_argv), options.ncu)
        report["ncu"] = ncu_join(report, options.ncu, rows)
    if options.graph == "onnx":
        progress("exporting the prefill and decode step 0 to ONNX (no weights) and counting their nodes")
        result.onnx_report, result.onnx_protos = run_onnx(tr, report, analytic, options.mapping)
    if options.explain:
        result.detail = explain(report, analytic, mapping, options.explain, options.causal_halving)
    return result
