"""The typed result of one run (tracer.pipeline.run): views over the report document (report.json's schema) as
dataclasses, its rows for a notebook, its encodings (JSON, HTML, terminal tables) and its files.

The document stays the one source of truth (what report.json holds, byte for byte); the dataclasses are read-only
views built on demand, so the two can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from tracer.compare.diff import check_max_gap
from tracer.core.errors import FlopdiffError
from tracer.core.forking import forked
from tracer.core.lifecycle import OutputSet
from tracer.count.document import dumps
from tracer.render.html import render_html
from tracer.render.model_explorer import ME_GRAPH, ME_OVERLAY, graph_collection, overlay
from tracer.render.tables import terminal_tables


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
    formula: str | None = None  # the analytic formula with its numbers
    rules: list[str] | None = None  # the mapping rules that joined its nodes to it
    cause: str | None = None    # why it differs, when flopdiff can name it (tracer.compare.causes)


@dataclass(frozen=True)
class Node:
    """One aten op (or custom op) of a stage graph, counted under both policies and mapped to a layer."""

    id: str
    stage: str
    step: int | None
    op: str
    module: str
    module_class: str
    source: str
    vendor_source: str
    vendor_function: str
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    output_shapes: list[list[int]]
    output_dtypes: list[str]
    flops_torch: int
    flops_full: int
    status: str                 # formula, zero (no FLOPs by convention), unknown (FLOP-bearing, no formula), ...
    note: str | None = None
    layer: str | None = None    # the analytic layer it maps to
    unmapped: str | None = None  # why no mapping rule took it
    attention: dict[str, Any] | None = None  # an attention call's boundary node: layout, causal, window, scale
    inner: int | None = None    # ... and how many nodes were recorded inside it


@dataclass(frozen=True)
class Kernel:
    """CUDA runs: one kernel name, its calls, time and FLOPs (its nodes' FLOPs on their compute kernel)."""

    kernel: str
    calls: int
    time_us: float
    flops_full: int
    flops_torch: int
    flops_full_by_stage: dict[str, int]
    ops: list[str]
    layers: list[str]
    counted_by_flopcountermode: str  # yes, no, partly or "-" (no FLOPs)
    unseen_flops: int


@dataclass(frozen=True)
class GapGroup:
    """A stage's gap by where it comes from and why (tracer.compare.groups.gap_groups: `group` is what --explain takes)."""

    stage: str
    group: str
    reason: str | None
    why: str
    layers: int          # how many analytic layers (`unit`)
    unit: str
    gap: int
    cause: str | None    # the preset setting or formula symbol behind every layer of the group, when named


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


def _view(cls: type, key: str, doc: str | None = None) -> property:
    """A read-only typed view of one list of the report document: `cls` per row, built on demand."""
    return property(lambda self: [_typed(cls, row) for row in self.report.get(key, [])], doc=doc or cls.__doc__)


@dataclass
class Result:
    """One run: typed views (`stages`, `layers`, `nodes`, `gap_groups`, `unseen`, `coverage`; `kernels` and `ncu` on CUDA,
    `onnx_report` with --graph onnx) over `report`, the JSON document (report.json's schema)."""

    report: dict[str, Any]
    trace: Any
    analytic: Any
    mapping: Any
    onnx_report: dict[str, Any] | None = None
    onnx_protos: dict[str, Any] | None = None
    ncu_csv: str | None = None
    detail: Any = None  # the --explain text (a rich renderable)
    cached: bool = False  # the counted trace came from the cache (tracer.core.cache); `trace` is None then
    notes: list[str] = field(default_factory=list)  # what the user should read about this run (pipeline.run's note)

    stages = _view(Stage, "stages")
    layers = _view(Layer, "layers")
    nodes = _view(Node, "nodes")
    gap_groups = _view(GapGroup, "gap_groups")
    unseen = _view(Unseen, "unseen")
    kernels = _view(Kernel, "kernels", "CUDA runs: per kernel name, calls, time, FLOPs and whether FlopCounterMode "
                                       "counts them ([] elsewhere)")

    @property
    def coverage(self) -> Coverage:
        return _typed(Coverage, self.report["coverage"])

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
        return dumps(self.report, only_flops=only_flops)

    def to_html(self) -> str:
        return render_html(self.report)

    def tables(self) -> list[Any]:
        """The terminal tables (rich renderables), in the order the command line prints them."""
        return terminal_tables(self.report, self.onnx_report, self.detail)

    def write(self, outputs: OutputSet, only_flops: bool = False, model_explorer: bool = False) -> list[str]:
        """The output files into `outputs` (staged: the caller commits or discards); the names written. What a user
        reads (report.json, report.html), and as asked the Model Explorer graph and overlay, ncu.csv, the ONNX set."""
        # the largest file, independent of the others: built and encoded in a forked child meanwhile
        graph_written = forked(lambda: outputs.write(ME_GRAPH, json.dumps(
            graph_collection(self.trace, self.report), separators=(",", ":")))) if model_explorer else (lambda: None)
        outputs.write("report.json", self.to_json(only_flops))
        outputs.write("report.html", self.to_html())
        names = ["report.json", "report.html"]
        if model_explorer:
            outputs.write(ME_OVERLAY, json.dumps(overlay(self.report), separators=(",", ":")))
            names += [ME_GRAPH, ME_OVERLAY]
        if self.ncu_csv is not None:
            outputs.write("ncu.csv", self.ncu_csv)
            names.append("ncu.csv")
        if self.onnx_report is not None:
            from tracer.onnx.graph import save as save_onnx  # torch and onnx: only a run that exported has them

            save_onnx(self.onnx_protos, outputs)
            outputs.write("report-onnx.json", dumps(self.onnx_report))
            names += ["report-onnx.json", *self.onnx_protos]
        graph_written()
        return names


