"""`--explain ID`: one analytic layer's formula with its numbers beside the nodes it matched, or one
graph node's whole story (what it is, where the vendor wrote it, how it was counted, where it maps)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from analytic.api import policy
from mapping.engine import Mapping
from tracer.errors import FlopdiffError
from tracer.gaps import REASONS, Analytic


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


def explain_layer(report: dict[str, Any], an: Analytic, lid: str, causal_halving: bool) -> Group:
    rows = [r for r in report["layers"] if r["id"] == lid]
    by_id = {n["id"]: n for n in report["nodes"]}
    pol = policy("full", causal_halving=causal_halving)
    parts: list[Any] = []
    for row in rows:
        parts.append(Text(_layer_line(row), style="bold"))
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


def explain(report: dict[str, Any], an: Analytic, mapping: Mapping, ident: str, causal_halving: bool) -> Group:
    if any(r["id"] == ident for r in report["layers"]):
        return explain_layer(report, an, ident, causal_halving)
    if any(n["id"] == ident for n in report["nodes"]):
        return explain_node(report, ident, mapping)
    near = sorted({r["id"] for r in report["layers"] if ident.split(".")[-1] in r["id"]})[:3]
    raise FlopdiffError(f"--explain {ident!r}: no analytic layer or graph node has that id "
                        f"(layer ids look like {', '.join(near) or 'decoder.layers.0.attn'}; node ids like "
                        f"prefill/mm_12, see report.json)")
