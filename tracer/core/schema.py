"""report.json's rows, defined once: the writers (tracer.count.records, tracer.compare, tracer.cuda.kernels) build
rows of these fields, the typed views (tracer.result) read them through `typed`, and `drift` says where a document
and this definition disagree (the test suite runs it on real reports, so a renamed key fails a test instead of
becoming None in a view). A field with a default may be absent from a row; one without must be there.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any


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
    bytes_read: int = 0         # its nodes' (tracer.count.memory: the unfused convention)
    bytes_written: int = 0
    weight_bytes: int = 0       # each parameter once per graph (a decode step's read at every step)
    cuda_flops: int = 0
    cuda_uncounted: int = 0     # nodes that may compute CUDA-core FLOPs and have no entry in the table
    act_peak_bytes: int | None = None  # activation peak by liveness, and the node where it peaks
    act_peak_node: str | None = None
    kv_bytes: int | None = None  # the KV cache after the stage, and per layer
    kv_layers: list[int] | None = None
    analytic_cuda_flops: int = 0  # the analytic model's other columns (analytic.api.COLUMNS; I/O fused)
    analytic_io_bytes: int = 0
    analytic_weight_bytes: int = 0
    analytic_act_bytes: int = 0
    analytic_kv_bytes: int = 0
    steps: list[dict[str, int]] | None = None  # decode: kv_len, FLOPs and KV bytes per step
    outputs: list[list[int]] | None = None  # per graph (step), the storage ids it returns
    io_fused: int | None = None  # fused I/O, its layers' sum (tracer.compare.io)
    metrics: dict[str, dict[str, Any]] | None = None  # per metric: traced, analytic, gap, gap_pct, cause


@dataclass(frozen=True)
class LayerDiff:
    """One analytic layer of a stage beside the graph nodes mapped to it: the gap, why, and its formula."""

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
    bytes_read: int = 0         # its nodes' sums (tracer.count.memory: the unfused convention)
    bytes_written: int = 0
    weight_bytes: int = 0
    cuda_flops: int = 0
    kv_bytes: int = 0           # the KV cache the vendor returned for its decoder layer (the table's `kv_cache`)
    io_fused: int | None = None  # fused I/O: its inputs, outputs and weights once (tracer.compare.io)
    analytic_cuda_flops: int = 0  # the analytic layer's other columns (analytic.layers.Cost; I/O fused)
    analytic_io_bytes: int = 0
    analytic_weight_bytes: int = 0
    analytic_act_bytes: int = 0
    analytic_kv_bytes: int = 0
    metrics: dict[str, dict[str, Any]] | None = None  # per metric: traced, analytic, gap, gap_pct, reason, cause


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
    bytes_read: int             # tracer.count.memory: distinct input storages, the bytes their views span
    bytes_written: int
    weight_bytes: int           # the part of bytes_read that is parameters or buffers
    kv_bytes: int               # the part of bytes_written its forward returns as the KV cache
    cuda_flops: int             # CUDA-core FLOPs (tracer.core.conventions.CUDA_CORE_OPS)
    cuda_status: str            # counted, free, uncounted (may compute, no entry: never a silent zero)
    reads: list[list[int]] | None = None   # per storage it reads: [storage id in its graph, bytes] (fused I/O)
    writes: list[list[int]] | None = None  # per storage it writes
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
    metric: str = "tc_flops"  # whose gap (tracer.compare.metrics; report.json's gap_groups_by_metric has each)


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


# the document's lists of rows, by key
ROWS: dict[str, type] = {"stages": Stage, "layers": LayerDiff, "nodes": Node, "gap_groups": GapGroup, "unseen": Unseen,
                         "kernels": Kernel}


def required(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}


def typed(cls: type, row: dict[str, Any]) -> Any:
    """`row` as `cls`: a required field missing is a KeyError naming it, never a silent None."""
    missing = required(cls) - row.keys()
    if missing:
        raise KeyError(f"{cls.__name__} row without {', '.join(sorted(missing))}")
    return cls(**{f.name: row.get(f.name, f.default) for f in fields(cls)})


def drift(report: dict[str, Any]) -> list[str]:
    """Where `report` and the schema disagree: a row's key the schema lacks, a required field a row lacks."""
    found = []
    for key, cls in {**ROWS, "coverage": Coverage}.items():
        rows = report.get(key, [])
        names = {f.name for f in fields(cls)}
        for i, row in enumerate([rows] if isinstance(rows, dict) else rows):
            found += [f"{key}[{i}].{k}: not in the schema ({cls.__name__})" for k in row.keys() - names]
            found += [f"{key}[{i}]: no {k} ({cls.__name__} requires it)" for k in required(cls) - row.keys()]
    return found
