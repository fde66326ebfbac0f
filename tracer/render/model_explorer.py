"""Google's Model Explorer: the traced graphs (`model-explorer-graph.json`) and their gaps as node data
(`model-explorer-node-data.json`), written with `--model-explorer`. Open them with
`model-explorer model-explorer-graph.json --node_data_paths=model-explorer-node-data.json` (ai-edge-model-explorer).

* Graphs: Model Explorer's graph JSON (`GraphCollection`: graphs of nodes with id, label, namespace, attrs, incoming
  edges and output metadata), one graph per stage graph (`vision`, `prefill`, `decode.K`); a node's id is its fx node
  name, its namespace its module path (`model/vision_tower#1/...`), so layers fold as modules do. An edge names the
  output it reads (`sourceNodeOutputId`: the index a split, unbind or attention output is taken at), and every output
  carries its dtype and shape (`outputsMetadata`, key `tensor_shape`).
* Node data: Model Explorer's `ModelNodeData` (`{graph id: {"results": {node: {"value": v, "bgColor": c}}}}`). The
  value of a FLOP-bearing node is the gap % of its analytic layer; the colour is absolute, the same scale in every
  graph (`gap_color`): no gap neutral, an analytic undercount orange to red by size, an overcount blue, an unmapped
  node grey. (Model Explorer's own gradient is relative to each graph's min and max: a 0.09% gap would be drawn as
  red as a 100% one, and an all-zero graph not at all.)
"""

from __future__ import annotations

import operator
from typing import Any

from tracer.compare.diff import flop_nodes
from tracer.core.modulepaths import node_id

ME_GRAPH = "model-explorer-graph.json"
ME_OVERLAY = "model-explorer-node-data.json"
# |gap %| upper bounds and their colours (an undercount: the analytic model misses work); overcounts are blue
GAP_COLORS = ((0.0, "#eeeeee"), (1.0, "#ffe082"), (10.0, "#ffb74d"), (100.0, "#e53935"))
OVERCOUNT = "#64b5f6"
UNMAPPED = "#9e9e9e"


def gap_color(pct: float) -> str:
    """The same colour for the same gap % in every graph."""
    if pct < 0:
        return OVERCOUNT
    return next(color for bound, color in GAP_COLORS if pct <= bound or bound == GAP_COLORS[-1][0])


def overlay(report: dict[str, Any]) -> dict[str, Any]:
    pct = {(r["stage"], r["id"]): r["gap_pct"] for r in report["layers"]}
    graphs: dict[str, dict[str, Any]] = {}
    for n in flop_nodes(report):
        graph = graph_id(n["stage"], n["step"])
        name = n["id"].rsplit("/", 1)[1]
        g = graphs.setdefault(graph, {"name": "gap % of the layer (full - analytic)", "results": {}})
        if n.get("layer"):
            value = pct[(n["stage"], n["layer"])]
            g["results"][name] = {"value": value, "bgColor": gap_color(value)}
        else:
            g["results"][name] = {"value": 100.0, "bgColor": UNMAPPED}
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
            edges = [{"sourceNodeId": _source(dep).name, "sourceNodeOutputId": _output_index(dep),
                      "targetNodeInputId": str(i)}
                     for i, dep in enumerate(node.all_input_nodes) if _source(dep) in kept]
            module = node.meta.get("module_call") or ""
            nodes.append({"id": node.name, "label": node.meta["op"].split("::")[-1],
                          "namespace": "" if module == "<root>" else module.replace(".", "/"),
                          "attrs": attrs, "incomingEdges": edges, "outputsMetadata": _outputs(node)})
        graphs.append({"id": graph_id(sg.stage, sg.step), "nodes": nodes})
    return {"label": f"flopdiff {report['model']}", "graphs": graphs}


def _output_index(node) -> str:
    """Which output of its source an edge reads: a getitem's index, else the only output."""
    return str(node.args[1]) if node.op == "call_function" and node.target is operator.getitem else "0"


def _outputs(node) -> list[dict[str, Any]]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    # tensors read by their shape and dtype (no torch import: the node data is written on runs that have none)
    return [{"id": str(i), "attrs": [{"key": "tensor_shape",
                                       "value": f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"}]}
            for i, v in enumerate(vals) if hasattr(v, "shape") and hasattr(v, "dtype")]


def _source(node):
    """getitem nodes are not graph nodes here: an edge from one starts at the op it reads from."""
    while node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node
