"""`--explain ID`: any id the terminal or the page shows. A gap group (`vision.global.encoder.layers.4-23`,
`decoder.layers.*.attn`): its layers, why, and the cause; one analytic layer: its formula with its numbers beside
the nodes it matched, and the cause of its gap; one graph node: its whole story (what it is, where the vendor wrote
it, how it was counted, where it maps). Layer and group ids are checked before tracing (`check_id`)."""

from __future__ import annotations

import difflib
import re
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from analytic.series import steps_of
from mapping.engine import Mapping
from tracer.compare.analytic import Analytic
from tracer.compare.groups import REASONS, group_members
from tracer.compare.metrics import METRICS, NODE_COLUMN, metric_of, metric_rows, unit_word
from tracer.core.errors import FlopdiffError


def _layer_line(row: dict[str, Any], metric: str = "tc_flops") -> str:
    """A layer's FLOPs (analytic, torch, full, gap), or another metric's traced / analytic / gap."""
    if metric == "tc_flops":
        why = f" ({REASONS[row['reason']]})" if row["reason"] else ""
        return (f"{row['id']} [{row['stage']}]: analytic {row['flops_analytic']:,}, torch {row['flops_torch']:,}, "
                f"full {row['flops_full']:,}, gap {row['gap']:,} ({row['gap_pct']:.2f}%){why}")
    m = row["metrics"][metric]
    why = f" ({REASONS[m['reason']]})" if m.get("reason") else ""
    return (f"{row['id']} [{row['stage']}]: {METRICS[metric].label}: traced {m['traced']:,}, analytic "
            f"{m['analytic']:,}, gap {m['gap']:,} ({m['gap_pct']:.2f}%){why}")


def _nodes_table(nodes: list[dict[str, Any]], metric: str = "tc_flops") -> Table:
    """The layer's nodes: FLOPs both ways, and the metric's own column when it is another (CUDA-core, weights)."""
    t = Table(title_justify="left")
    extra = NODE_COLUMN.get(metric) if metric != "tc_flops" else None
    cols = ("node", "op", "input shapes", "torch", "full", *([METRICS[metric].label] if extra else []), "vendor source")
    for col in cols:
        t.add_column(col, justify="left" if col in ("node", "op", "input shapes", "vendor source") else "right",
                     overflow="fold")
    for n in nodes:
        # vendor strings go in as Text: rich markup in a module name must print as typed
        t.add_row(Text(n["id"]), Text(n["op"]), Text(str(n["input_shapes"])), f"{n['flops_torch']:,}",
                  f"{n['flops_full']:,}", *([f"{n.get(extra, 0):,}"] if extra else []),
                  Text(n["vendor_source"] or n["source"] or "-"))
    return t


def explain_layer(report: dict[str, Any], an: Analytic, lid: str) -> Group:
    rows = [r for r in report["layers"] if r["id"] == lid]
    by_id = {n["id"]: n for n in report["nodes"]}
    pol = an.counting()
    parts: list[Any] = []
    metric = metric_of(report)
    for row in rows:
        parts.append(Text(_layer_line(row, metric), style="bold"))
        cause = row.get("cause") if metric == "tc_flops" else row["metrics"][metric].get("cause")
        if cause:
            parts.append(Text(f"  cause: {cause}"))
        leaves = [leaf for b in an.tree.stages.get(row["stage"], []) for leaf in b.leaves() if leaf.id == lid]
        k = 0
        for leaf in leaves:  # a leaf of analytic.series.Steps stands for steps k..: its text names them
            step = f"step {k}: " if row["stage"] == "decode" and steps_of(leaf) == 1 else ""
            parts.append(Text(f"  {step}{leaf.explain(pol)}"))
            k += steps_of(leaf)
        if not leaves:
            parts.append(Text(f"  the analytic model ({an.preset}) has no layer {lid} in stage {row['stage']}"))
        parts.append(Text("  " + _columns_line(row)))
        parts.append(_nodes_table([by_id[i] for i in row["nodes"]], metric))
    return Group(*parts)


def _columns_line(row: dict[str, Any]) -> str:
    """The layer's other columns, traced / analytic, as report.json holds them (I/O fused both ways, and the trace's
    unfused beside it)."""
    fused = row.get("io_fused")
    intensity = f"; {row['flops_full'] / fused:.1f} FLOP/B (fused)" if fused else ""
    shown = f"{fused:,}" if fused is not None else "-"
    return (f"I/O fused {shown} / {row.get('analytic_io_bytes', 0):,}{intensity}, "
            f"unfused (traced) read {row.get('bytes_read', 0):,} + written {row.get('bytes_written', 0):,}; weights "
            f"{row.get('weight_bytes', 0):,} / {row.get('analytic_weight_bytes', 0):,}; CUDA-core FLOPs "
            f"{row.get('cuda_flops', 0):,} / {row.get('analytic_cuda_flops', 0):,}; KV cache "
            f"{row.get('kv_bytes', 0):,} / {row.get('analytic_kv_bytes', 0):,}")


def explain_node(report: dict[str, Any], nid: str, mapping: Mapping) -> Group:
    n = next(x for x in report["nodes"] if x["id"] == nid)
    lines = [
        f"{n['id']}: {n['op']} in {n['module'] or '(top level)'} ({n['module_class'] or '-'})",
        f"  vendor source: {n['vendor_source'] or '-'}    innermost frame: {n['source'] or '-'}",
        f"  inputs: {n['input_shapes']} {n['input_dtypes']}",
        f"  outputs: {n['output_shapes']} {n['output_dtypes']}",
        f"  FLOPs: torch {n['flops_torch']:,}, full {n['flops_full']:,} (status {n['status']})"
        + (f"; {n['note']}" if n.get("note") else ""),
        f"  CUDA-core FLOPs {n.get('cuda_flops', 0):,} ({n.get('cuda_status', '-')}); bytes read "
        f"{n.get('bytes_read', 0):,}, written {n.get('bytes_written', 0):,}, of them weights {n.get('weight_bytes', 0):,}",
    ]
    if n.get("layer"):
        row = next(r for r in report["layers"] if r["id"] == n["layer"] and r["stage"] == n["stage"])
        lines.append(f"  maps to {_layer_line(row)}")
        rule = mapping.rule_of(n)
        lines.append(f"  by {rule} of {mapping.matcher.table.source}" if rule else
                     f"  no rule of {mapping.matcher.table.source} names it: the rest of its enclosing scope")
    elif n.get("unmapped"):
        lines.append(f"  unmapped: {n['unmapped']}")
    else:
        lines.append("  carries no FLOPs: not mapped")
    return Group(*(Text(line) for line in lines))


GROUP_LAYERS_SHOWN = 12


def explain_group(report: dict[str, Any], label: str) -> Group:
    """A gap group, or any prefix of the layer tree (`vision`, `vision.tiles.sam`): per stage the gap of the layers it
    covers (FLOPs, % of the stage's measured count), the gap groups inside it with why and their cause, then its
    layers with a gap (the first GROUP_LAYERS_SHOWN; report.json's `layers` has them all)."""
    metric = metric_of(report)
    unit = unit_word(metric)
    members = set(group_members(label, [r["id"] for r in report["layers"]]))
    rows = [r for r in metric_rows(report["layers"], metric) if r["id"] in members]
    full = {(r["stage"], r["id"]): r for r in report["layers"]}
    measured = {s["name"]: s["metrics"][metric]["traced"] for s in report["stages"] if metric in s["metrics"]}
    parts: list[Any] = []
    in_vision = {r["id"] for r in rows if r["stage"] == "vision"}  # prefill holds vision's layers again: list them once
    for stage in dict.fromkeys(r["stage"] for r in rows):
        here = [r for r in rows if r["stage"] == stage and not (stage == "prefill" and r["id"] in in_vision)]
        if not here:
            continue
        gap = sum(r["gap"] for r in here)
        share = f"{100 * gap / measured[stage]:.2f}% of the stage's count" if measured.get(stage) else "-"
        if stage == "vision" and measured.get("prefill"):
            share += f", {100 * gap / measured['prefill']:.2f}% of prefill's (vision is part of prefill)"
        what = "" if metric == "tc_flops" else f" ({METRICS[metric].label})"
        parts.append(Text(f"{label} [{stage}]: {len(here)} analytic layers, gap {gap:,} {unit}{what} ({share})",
                          style="bold"))
        stage_ids = [r["id"] for r in report["layers"] if r["stage"] == stage]
        for g in report["gap_groups"]:
            covered = set(group_members(g["group"], stage_ids))  # the group's layers: inside the label's subtree?
            if g["stage"] == stage and covered and covered <= members:
                cause = f"; cause: {g['cause']}" if g["cause"] else ""
                parts.append(Text(f"  group {g['group']}: {g['layers']} {g['unit']}, gap {g['gap']:,} ({g['why']})"
                                  f"{cause}"))
    gapped = [r for r in rows if r["gap"] and not (r["stage"] == "prefill" and r["id"] in in_vision)]
    if not gapped:
        parts.append(Text(f"{label}: no gap in this run ({len(rows)} analytic layers)", style="bold"))
    for row in gapped[:GROUP_LAYERS_SHOWN]:
        parts.append(Text("  " + _layer_line(full[(row["stage"], row["id"])], metric)))
    if len(gapped) > GROUP_LAYERS_SHOWN:
        parts.append(Text(f"  ... and {len(gapped) - GROUP_LAYERS_SHOWN} more layers with a gap: --explain one of them "
                          f"(its formula and nodes); report.html lists them all (a click on the group's row), "
                          f"report.json's `layers` has every row"))
    return Group(*parts)


def explain(report: dict[str, Any], an: Analytic, mapping: Mapping, ident: str) -> Group:
    if any(r["id"] == ident for r in report["layers"]):
        return explain_layer(report, an, ident)
    if any(n["id"] == ident for n in report["nodes"]):
        return explain_node(report, ident, mapping)
    if group_members(ident, [r["id"] for r in report["layers"]]):
        return explain_group(report, ident)
    raise FlopdiffError(f"--explain {ident}: no gap group, analytic layer or graph node has that id in this run "
                        f"(node ids look like prefill/mm_12: see report.json)")


NODE_ID = re.compile(r"^(vision|prefill|decode|onnx[\w-]*)/\S+$")


def check_id(ident: str, layer_ids: set[str]) -> None:
    """Before tracing: a layer or group id must name some layer of the analytic models of this workload (a node id
    can only be checked after the trace). A wrong id fails here, with the nearest ids."""
    if NODE_ID.match(ident) or ident in layer_ids or group_members(ident, sorted(layer_ids)):
        return
    # the subtrees are ids too (`vision.tiles`): a typo of one must be offered it, not only leaf ids
    prefixes = {".".join(i.split(".")[:k]) for i in layer_ids for k in range(1, i.count(".") + 1)}
    near = difflib.get_close_matches(ident, sorted(layer_ids | prefixes), n=3, cutoff=0.5)
    raise FlopdiffError(f"--explain {ident}: no analytic layer or gap group has that id for this workload; nearest: "
                        f"{', '.join(near) or 'decoder.layers.0.attn'} (groups: decoder.layers.*.attn, "
                        f"vision.global.encoder.layers.4-23; node ids: prefill/mm_12)")
