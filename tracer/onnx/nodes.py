"""An exported graph's nodes as report rows: each with its FLOPs (tracer.onnx.formulas), module path and originating
aten op from the exporter's metadata, so that the mapping tables and the diff apply unchanged."""

from __future__ import annotations

import re
from typing import Any

from tracer.core.modulepaths import call_path_of
from tracer.onnx.formulas import MAY_CARRY, ONNX_FORMULAS

_TARGET = re.compile(r"target=torch\.ops\.(\w+)\.(\w+)")


def _origin(meta: dict[str, str]) -> str:
    m = _TARGET.search(meta.get("pkg.torch.onnx.fx_node", ""))
    return f"{m.group(1)}::{m.group(2)}" if m else "onnx::unknown"


def onnx_nodes(proto: Any, wrapper: str = "m", stage: str = "prefill", step: int | None = None) -> list[dict[str, Any]]:
    """Report-style records of every ONNX node of one exported stage: op (originating aten op), onnx_op, module
    (with call indices, as the fx capture writes them), shapes, FLOPs and status."""
    prefix = "onnx" if step is None else f"onnx-{stage}/{step}"
    import onnx

    proto = _inlined(proto)
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    g = proto.graph
    dims: dict[str, list[int] | None] = {i.name: list(i.dims) for i in g.initializer}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):  # rank unknown
            dims.setdefault(v.name, None)
            continue
        dims[v.name] = [x.dim_value if x.HasField("dim_value") else None for x in t.shape.dim]
    calls: dict[str, int] = {}
    previous: set[str] = set()
    records = []
    for node in g.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = _scopes(meta.get("pkg.torch.onnx.name_scopes", ""), wrapper)
        if scopes:  # nodes without scopes (hoisted constants) say nothing about calls
            for s in scopes:  # a module whose nodes come back after others ran is called again; its
                if s not in previous:  # children count their calls afresh within the new call
                    calls[s] = calls.get(s, -1) + 1
                    for child in [k for k in calls if k.startswith(s + ".")]:
                        del calls[child]
            previous = set(scopes)
        module = call_path_of(scopes, calls)
        # None: rank or a dimension unknown to shape inference (then a formula cannot be applied: unknown)
        shapes = [dims.get(i) for i in node.input if i]
        out = dims.get(node.output[0]) if node.output else []
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                 if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        formula = ONNX_FORMULAS.get(node.op_type)
        flops, status = 0, "free"
        if formula is not None:
            known = [s for s in [*shapes[:2], out] if s is not None and None not in s]
            if len(known) < len(shapes[:2]) + 1:
                status = "unknown"
            else:
                try:
                    flops, status = int(formula(shapes, out, attrs)), "formula"
                except (IndexError, KeyError, ValueError):  # shapes the op cannot have: say so, never guess
                    status = "unknown"
        elif node.op_type in MAY_CARRY or _carries_in_subgraph(node):
            status = "unknown"  # control flow: how often its body runs is data; never a silent 0
        elif node.domain not in ("", "ai.onnx", "ai.onnx.ml") and node.op_type not in ONNX_FORMULAS:
            status = "unknown"  # a custom-domain op (or a local function inlining could not resolve)
        records.append({"id": f"{prefix}/{node.name}", "stage": stage, "step": step, "op": _origin(meta),
                        "onnx_op": node.op_type, "module": module, "input_shapes": shapes, "output_shapes": [out],
                        "flops_torch": 0, "flops_full": flops, "status": status,
                        "source": meta.get("pkg.torch.onnx.stack_trace", "").strip().splitlines()[0:1]})
    return records


def _inlined(proto: Any) -> Any:
    """Local ONNX functions inlined into the graph, so that their nodes are counted like any other (onnx >= 1.16
    has the inliner; without it a call of a local function stays one custom-domain node, reported unknown)."""
    if not proto.functions:
        return proto
    try:
        from onnx import inliner
    except ImportError:
        return proto
    return inliner.inline_local_functions(proto)


def _carries_in_subgraph(node: Any) -> bool:
    """Whether a control-flow node (If, Loop, Scan) holds, in any nested graph, an op that may carry FLOPs."""
    import onnx

    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for inner in g.node:
                if inner.op_type in ONNX_FORMULAS or inner.op_type in MAY_CARRY or _carries_in_subgraph(inner):
                    return True
    return False


def _scopes(text: str, wrapper: str) -> list[str]:
    """"['', 'm', 'm.model', 'm.model.vision_tower', ..., 'addmm']" -> the module paths below the wrapper."""
    parts = [p.strip().strip("'\"") for p in text.strip("[]").split(",")] if text else []
    mods = [p for p in parts[:-1] if p.startswith(wrapper + ".")]
    return [p[len(wrapper) + 1:] for p in mods]
