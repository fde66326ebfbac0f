"""The diff: the analytic model beside the traced counts, per stage and per analytic layer.

Inputs are the report's node records (already counted), the node -> layer mapping and the analytic model
evaluated for the same workload. gap = measured - analytic (positive: the analytic model undercounts);
gap % is relative to the measured count (100% when the analytic model misses a layer entirely: `gap_pct`, the
one home of that percentage). Each layer carries why it differs: the analytic model lacks it, it has no graph
node, or the formulas disagree."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from analytic.api import variant
from analytic.request import ModelTree
from mapping.engine import Mapping, coverage, flop_bearing
from tracer.compare.analytic import Analytic
from tracer.compare.causes import cause, formula
from tracer.compare.groups import gap_groups
from tracer.compare.io import fused_io
from tracer.compare.metrics import DIFFED, reason, row_metrics
from tracer.compare.unseen import unseen_ops


def gap_pct(gap: int, full: int) -> float:
    if full:
        return 100.0 * gap / full
    return 0.0 if gap == 0 else -100.0


def _row(base: dict[str, Any], analytic: int, torch_: int, full: int, measured: str = "flops_full") -> dict[str, Any]:
    counts = {"flops_torch": torch_, "flops_full": full}
    gap = counts[measured] - analytic
    return {**base, "flops_analytic": analytic, **counts, "gap": gap, "gap_pct": round(gap_pct(gap, counts[measured]), 4)}


def with_diff(report: dict[str, Any], an: Analytic, mapping: Mapping, metric: str = "tc_flops",
              in_place: bool = False) -> dict[str, Any]:
    """The report composed with its diff: `flops_analytic`, gap and coverage per stage, `layer` (or `unmapped`) per
    node, then `analytic`, `layers` (each with its formula and, when flopdiff can name it, the cause of its gap),
    `coverage`, `gap_groups` (per stage, tracer.compare.groups.gap_groups; prefill's leave out the vision layers,
    which are vision's groups) and `unseen` (per stage and op, what FlopCounterMode cannot see). The gap compares
    the analytic count with the measured one of its policy (full, or torch: FlopCounterMode's). Every stage and
    layer also carries `metrics` (every column traced / analytic / gap, tracer.compare.metrics); `metric` names the
    one the gap groups follow (default tensor-core FLOPs, the `gap` of the rows); `gap_groups_by_metric` has every
    diffed metric's (report.html switches between them).
    The input is left as it was; `in_place` (the pipeline, on a document of its own) gives its nodes their `layer`
    where they are rather than in copies of them, which doubled the memory of a long decode traced step by step."""
    measured = an.measured
    counting, preset = an.counting(), variant(an.preset)
    leaves: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for stage, blocks in an.tree.stages.items():
        for b in blocks:
            for leaf in b.leaves():
                leaves[(stage, leaf.id)].append(leaf)
    nodes = []
    per_layer: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for n in report["nodes"]:
        layer = mapping.layer_of.get(n["id"]) or mapping.rest.get(n["id"])
        if in_place:  # as the copy would be: `layer` after the node's own keys, then `unmapped` where it is
            n.pop("unmapped", None)
            n["layer"] = layer
        else:
            n = {**n, "layer": layer}
        if n["layer"] is not None:
            per_layer[(n["stage"], n["layer"])].append(n)
        elif n["id"] in mapping.unmapped:
            n["unmapped"] = mapping.unmapped[n["id"]]
        nodes.append(n)
    fused = fused_io(nodes, report["stages"])
    present = {s["name"] for s in report["stages"]}
    analytic = {(row["stage"], row["id"]): row["flops"] for row in an.doc["layers"] if row["stage"] in present}
    columns = {(row["stage"], row["id"]): _analytic_columns(row) for row in an.doc["layers"]}
    kv = _kv_layers(report, mapping)
    shown = set(per_layer) | set(kv) | {k for k in analytic if analytic[k] or any(columns[k].values())}
    layers = []
    for key in sorted(shown, key=_order(an.aligned)):
        stage, lid = key
        mapped = per_layer.get(key, [])
        row = _row({"id": lid, "stage": stage}, analytic.get(key, 0), sum(n["flops_torch"] for n in mapped),
                   sum(n["flops_full"] for n in mapped), measured)
        row["reason"] = reason(key in analytic, bool(mapped), row["gap"])
        row["nodes"] = [n["id"] for n in mapped]
        row["formula"] = formula(leaves[key], counting)
        row["rules"] = sorted({r for r in map(mapping.rule_of, mapped) if r})
        row["cause"] = cause(stage, lid, row["reason"], preset, leaves[key], mapped, counting, measured)
        row.update({k: sum(n.get(k, 0) for n in mapped) for k in TRACED_COLUMNS})
        row["kv_bytes"] = kv.get(key, 0)
        if fused is not None:
            row["io_fused"] = fused.get(key, 0)
        row.update(columns.get(key, _analytic_columns({})))
        row["metrics"] = row_metrics(row, an.policy, preset, layer=key in analytic)
        layers.append(row)
    stage_analytic = {s["name"]: s["flops"] for s in an.doc["stages"]}
    stage_columns = {s["name"]: _analytic_columns(s) for s in an.doc["stages"]}
    by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n in nodes:
        by_stage[n["stage"]].append(n)
    stages = [{**s, **_row({}, stage_analytic.get(s["name"], 0), s["flops_torch"], s["flops_full"], measured),
               "coverage": coverage(by_stage[s["name"]], mapping),
               **stage_columns.get(s["name"], _analytic_columns({}))} for s in report["stages"]]
    for s in stages:  # every column's gap where both sides count it one way (tracer.compare.metrics)
        if fused is not None:
            s["io_fused"] = sum(b for (stage, _), b in fused.items() if stage == s["name"])
        s["metrics"] = row_metrics(s, an.policy, preset)
    doc = {**report, "stages": stages, "nodes": nodes,
           "analytic": {"preset": an.preset, "policy": an.policy, "metric": metric, "causal_halving": an.causal_halving,
                        **({"attention": an.attention} if an.attention else {})},
           "layers": layers, "coverage": coverage(nodes, mapping)}
    # prefill runs the vision tower again: its layers are grouped once, as vision's
    vision = frozenset(r["id"] for r in layers if r["stage"] == "vision")
    by_metric = {m: [{"stage": s["name"], **g} for s in stages
                     for g in gap_groups(doc, s["name"], vision if s["name"] == "prefill" else frozenset(), m)]
                 for m in DIFFED}
    doc["gap_groups"] = by_metric[metric]
    doc["gap_groups_by_metric"] = by_metric
    doc["unseen"] = unseen_ops(doc)
    return doc


#: the node columns a layer sums (tracer.count.memory: the unfused convention)
TRACED_COLUMNS = ("bytes_read", "bytes_written", "weight_bytes", "cuda_flops")
#: the analytic model's other columns (analytic.api.COLUMNS beside `flops`), as `analytic_*` beside the traced ones
ANALYTIC_COLUMNS = ("cuda_flops", "io_bytes", "weight_bytes", "act_bytes", "kv_bytes")


def _kv_layers(report: dict[str, Any], mapping: Mapping) -> dict[tuple[str, str], int]:
    """Per (stage, analytic layer): the KV cache bytes the vendor returned for that decoder layer (the mapping table's
    `kv_cache` template names the layer of index i)."""
    template = mapping.matcher.table.kv_cache if mapping.matcher else None
    if not template:
        return {}
    return {(s["name"], template.format(i=i)): b for s in report["stages"] for i, b in enumerate(s.get("kv_layers") or [])}


def _analytic_columns(row: dict[str, Any]) -> dict[str, int]:
    return {f"analytic_{c}": row.get(c, 0) for c in ANALYTIC_COLUMNS}


def _order(tree: ModelTree):
    """Layers in model order (stage, then the aligned tree's leaf order); unknown ids last."""
    stages = list(tree.stages)
    rank = {(s, leaf.id): i for s, blocks in tree.stages.items() for b in blocks for i, leaf in enumerate(b.leaves())}
    return lambda key: (stages.index(key[0]) if key[0] in stages else len(stages), rank.get(key, 1 << 30), key[1])


def flop_nodes(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in report["nodes"] if flop_bearing(n)]
