"""Model Explorer node-data overlay (`model-explorer.json`): per graph (stage, decode step) the fx node
names with a value, so a graph opened in Google's Model Explorer shows the gaps coloured.

Format: Model Explorer's `ModelNodeData` (`{graph id: {"results": {node: {"value": v}}, "gradient": [...]}}`).
The value of a FLOP-bearing node is the gap % of its analytic layer (its share of the layer's analytic FLOPs
is not defined per node); unmapped nodes get 100 and a grey background.
"""

from __future__ import annotations

from typing import Any

from tracer.gaps import flop_nodes

GRADIENT = [{"stop": 0, "bgColor": "#2e7d32"}, {"stop": 0.5, "bgColor": "#ffffff"}, {"stop": 1, "bgColor": "#c62828"}]


def overlay(report: dict[str, Any]) -> dict[str, Any]:
    pct = {(r["stage"], r["id"]): r["gap_pct"] for r in report["layers"]}
    graphs: dict[str, dict[str, Any]] = {}
    for n in flop_nodes(report):
        graph = n["stage"] if n["step"] is None else f"{n['stage']}.{n['step']}"
        name = n["id"].rsplit("/", 1)[1]
        g = graphs.setdefault(graph, {"results": {}, "gradient": GRADIENT})
        if n.get("layer"):
            g["results"][name] = {"value": pct[(n["stage"], n["layer"])]}
        else:
            g["results"][name] = {"value": 100.0, "bgColor": "#9e9e9e"}
    return graphs
