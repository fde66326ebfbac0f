"""Google's Model Explorer: the graphs (`model-explorer-graph.json`) and a node-data overlay
(`model-explorer.json`), so the traced graphs open there with the gaps coloured.

* Graphs: Model Explorer's graph JSON (`GraphCollection`: graphs of nodes with id, label, namespace, attrs and
  incoming edges), one graph per stage graph (`vision`, `prefill`, `decode.K`); a node's id is its fx node
  name, its namespace its module path (`model/vision_tower#1/...`), so layers fold as modules do.
* Overlay: Model Explorer's `ModelNodeData` (`{graph id: {"results": {node: {"value": v}}, "gradient": [...]}}`).
  The value of a FLOP-bearing node is the gap % of its analytic layer (its share of the layer's analytic FLOPs
  is not defined per node); unmapped nodes get 100 and a grey background.
"""

from __future__ import annotations

import operator
from typing import Any

from tracer.gaps import flop_nodes
from tracer.paths import node_id

GRADIENT = [{"stop": 0, "bgColor": "#2e7d32"}, {"stop": 0.5, "bgColor": "#ffffff"}, {"stop": 1, "bgColor": "#c62828"}]


def overlay(report: dict[str, Any]) -> dict[str, Any]:
    pct = {(r["stage"], r["id"]): r["gap_pct"] for r in report["layers"]}
    graphs: dict[str, dict[str, Any]] = {}
    for n in flop_nodes(report):
        graph = graph_id(n["stage"], n["step"])
        name = n["id"].rsplit("/", 1)[1]
        g = graphs.setdefault(graph, {"results": {}, "gradient": GRADIENT})
        if n.get("layer"):
            g["results"][name] = {"value": pct[(n["stage"], n["layer"])]}
        else:
            g["results"][name] = {"value": 100.0, "bgColor": "#9e9e9e"}
    return graphs


def graph_id(stage: str, step: int | None) -> str:
    return stage if step is None else f"{stage}.{step}"


def graph_collection(tr, report: dict[str, Any]) -> dict[str, Any]:
    """Every stage graph as a Model Explorer graph; node attrs carry the counts and the mapped layer."""
    records = {n["id"]: n for n in report["nodes"]}
    graphs = []
    for sg in tr.graphs():
        nodes = []
        kept = set(sg.op_nodes())
        for node in sg.op_nodes():
            rec = records.get(node_id(sg, node.name), {})
            attrs = [{"key": "op", "value": node.meta["op"]},
                     {"key": "flops_full", "value": str(rec.get("flops_full", 0))},
                     {"key": "flops_torch", "value": str(rec.get("flops_torch", 0))},
                     {"key": "layer", "value": rec.get("layer") or rec.get("unmapped") or "-"},
                     {"key": "source", "value": node.meta.get("vendor_source") or node.meta.get("source") or "-"}]
            edges = [{"sourceNodeId": _source(dep).name, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)}
                     for i, dep in enumerate(node.all_input_nodes) if _source(dep) in kept]
            module = node.meta.get("module_call") or ""
            nodes.append({"id": node.name, "label": node.meta["op"].split("::")[-1],
                          "namespace": "" if module == "<root>" else module.replace(".", "/"),
                          "attrs": attrs, "incomingEdges": edges})
        graphs.append({"id": graph_id(sg.stage, sg.step), "nodes": nodes})
    return {"label": f"flopdiff {report['model']}", "graphs": graphs}


def _source(node):
    """getitem nodes are not graph nodes here: an edge from one starts at the op it reads from."""
    while node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node
