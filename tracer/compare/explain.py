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

from mapping.engine import Mapping
from tracer.compare.analytic import Analytic
from tracer.compare.groups import REASONS, group_members
from tracer.core.errors import FlopdiffError


def _layer_line(row: dict[str, Any]) -> str:
    why = f" ({REASONS[row['reason']]})" if row["reason"] else ""
    return (f"{row['id']} [{row['stage']}]: analytic {row['flops_analytic']:,}, torch {row['flops_torch']:,}, "
            f"full {row['flops_full']:,}, gap {row['gap']:,} ({row['gap_pct']:.2f}%){why}")


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    t = Table(title_justify="left")
    for col in ("node", "op", "input shapes", "torch", "full", "vendor source"):
        t.add_column(col, justify="right" if col in ("torch", "full") else "left", overflow="fold")
    for n in nodes:
        # vendor strings go in as Text: rich markup in a module name must print as typed
        t.add_row(Text(n["id"]), Text(n["op"]), Text(str(n["input_shapes"])), f"{n['flops_torch']:,}",
                  f"{n['flops_full']:,}", Text(n["vendor_source"] or n["source"] or "-"))
    return t


def explain_layer(report: dict[str, Any], an: Analytic, lid: str) -> Group:
    rows = [r for r in report["layers"] if r["id"] == lid]
    by_id = {n["id"]: n for n in report["nodes"]}
    pol = an.counting()
    parts: list[Any] = []
    for row in rows:
        parts.append(Text(_layer_line(row), style="bold"))
        if row.get("cause"):
            parts.append(Text(f"  cause: {row['cause']}"))
        leaves = [leaf for b in an.tree.stages.get(row["stage"], []) for leaf in b.leaves() if leaf.id == lid]
        for k, leaf in enumerate(leaves):
            step = f"step {k}: " if row["stage"] == "decode" else ""
            parts.append(Text(f"  {step}{leaf.explain(pol)}"))
        if not leaves:
            parts.append(Text(f"  the analytic model ({an.preset}) has no layer {lid} in stage {row['stage']}"))
        parts.append(_nodes_table([by_id[i] for i in row["nodes"]]))
    return Group(*parts)


def explain_node(report: dict[str, Any], nid: str, mapping: Mapping) -> Group:
    n = next(x for x in report["nodes"] if x["id"] == nid)
    lines = [
        f"{n['id']}: {n['op']} in {n['module'] or '(top level)'} ({n['module_class'] or '-'})",
        f"  vendor source: {n['vendor_source'] or '-'}    innermost frame: {n['source'] or '-'}",
        f"  inputs: {n['input_shapes']} {n['input_dtypes']}",
        f"  outputs: {n['output_shapes']} {n['output_dtypes']}",
        f"  FLOPs: torch {n['flops_torch']:,}, full {n['flops_full']:,} (status {n['status']})"
        + (f"; {n['note']}" if n.get("note") else ""),
    ]
    if n.get("layer"):
        row = next(r for r in report["layers"] if r["id"] == n["layer"] and r["stage"] == n["stage"])
        lines.append(f"  maps to {_layer_line(row)}")
        lines.append(f"  by {mapping.rule_of(n)} of {mapping.matcher.table.source}")
    elif n.get("unmapped"):
        lines.append(f"  unmapped: {n['unmapped']}")
    else:
        lines.append("  carries no FLOPs: not mapped")
    return Group(*(Text(line) for line in lines))


GROUP_LAYERS_SHOWN = 12


def explain_group(report: dict[str, Any], label: str) -> Group:
    """A gap group: one line per stage it appears in, then its layers (the first GROUP_LAYERS_SHOWN)."""
    parts: list[Any] = []
    for g in (g for g in report["gap_groups"] if g["group"] == label):
        parts.append(Text(f"{label} [{g['stage']}]: {g['layers']} {g['unit']}, gap {g['gap']:,} FLOPs "
                          f"({g['why']})", style="bold"))
        if g["cause"]:
            parts.append(Text(f"  cause: {g['cause']}"))
    members = set(group_members(label, [r["id"] for r in report["layers"]]))
    stages = {g["stage"] for g in report["gap_groups"] if g["group"] == label}
    rows = [r for r in report["layers"] if r["id"] in members and (not stages or r["stage"] in stages and r["gap"])]
    if not parts:
        parts.append(Text(f"{label}: no gap in this run ({len(rows)} analytic layers)", style="bold"))
    for row in rows[:GROUP_LAYERS_SHOWN]:
        parts.append(Text("  " + _layer_line(row)))
        if row.get("cause") and row["cause"] not in {g["cause"] for g in report["gap_groups"]}:
            parts.append(Text(f"    cause: {row['cause']}"))
    if len(rows) > GROUP_LAYERS_SHOWN:
        parts.append(Text(f"  ... and {len(rows) - GROUP_LAYERS_SHOWN} more layer rows (--explain one of them: its "
                          f"formula and nodes)"))
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
    near = difflib.get_close_matches(ident, sorted(layer_ids), n=3, cutoff=0.5)
    raise FlopdiffError(f"--explain {ident}: no analytic layer or gap group has that id for this workload; nearest: "
                        f"{', '.join(near) or 'decoder.layers.0.attn'} (groups: decoder.layers.*.attn, "
                        f"vision.global.encoder.layers.4-23; node ids: prefill/mm_12)")
