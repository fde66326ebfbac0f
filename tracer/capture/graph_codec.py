"""The graph codec: a captured stage as bytes and back (the decode worker's graphs cross a process boundary).

Every fx node with its name, target, args and metadata; values as meta tensors of the same shape, stride and dtype
(all that counting and the reports read from them).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._ops import HigherOrderOperator

from tracer.capture.recorder import StageGraph


@dataclass(frozen=True)
class _Ref:
    index: int  # a node argument: the index of the node it refers to


@dataclass(frozen=True)
class _Val:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _target(target: Any) -> Any:
    if isinstance(target, HigherOrderOperator):
        return ("hop", target.name())
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target._schema.name.split("::")
        return ("op", namespace, name, target._overloadname)
    return target  # operator.getitem: pickles as itself


def _resolve(target: Any) -> Any:
    if isinstance(target, tuple) and target[0] == "hop":
        return torch._ops._higher_order_ops[target[1]]
    if isinstance(target, tuple) and target[0] == "op":
        _, namespace, name, overload = target
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    return target


def _enc(x: Any, index: dict[torch.fx.Node, int]) -> Any:
    if isinstance(x, torch.fx.Node):
        return _Ref(index[x])
    if isinstance(x, torch.Tensor):
        return _Val(tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):  # fx keeps args as immutable_list / tuple: plain ones pickle
        return (list if isinstance(x, list) else tuple)(_enc(v, index) for v in x)
    if isinstance(x, dict):
        return {k: _enc(v, index) for k, v in x.items()}
    return x


def _dec(x: Any, nodes: list[torch.fx.Node]) -> Any:
    if isinstance(x, _Ref):
        return nodes[x.index]
    if isinstance(x, _Val):
        return torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device="meta")
    if type(x) in (list, tuple):
        return type(x)(_dec(v, nodes) for v in x)
    if isinstance(x, dict):
        return {k: _dec(v, nodes) for k, v in x.items()}
    return x


def to_bytes(sg: StageGraph) -> bytes:
    """A captured stage as bytes (the worker's side); a stage already turned into report rows, as its rows."""
    if sg.rows is not None:
        return pickle.dumps(("rows", sg.stage, sg.step, sg.kv_len, sg.notes, sg.rows, _extra(sg)),
                            protocol=pickle.HIGHEST_PROTOCOL)
    index = {n: i for i, n in enumerate(sg.graph.nodes)}
    entries = [(n.op, n.name, _target(n.target), _enc(n.args, index), _enc(n.kwargs, index),
                {k: (_enc(v, index) if k == "val" else v) for k, v in n.meta.items()})
               for n in sg.graph.nodes]
    return pickle.dumps((sg.stage, sg.step, sg.kv_len, sg.notes, entries, _extra(sg)), protocol=pickle.HIGHEST_PROTOCOL)


def _extra(sg: StageGraph) -> dict[str, Any]:
    """What a stage carries beside its nodes (its storages' roles, the KV cache it returned, its memory)."""
    return {"params": sg.params, "outputs": sg.outputs, "kv_layers": sg.kv_layers, "kv_storages": sg.kv_storages,
            "memory": sg.memory}


def from_bytes(data: bytes) -> StageGraph:
    """The stage again, as an fx graph with the same node names, args and metadata (values on the meta device).
    Call it outside any fake mode: the values are plain meta tensors."""
    decoded = pickle.loads(data)
    if decoded[0] == "rows":
        _, stage, step, kv_len, notes, rows, extra = decoded
        return StageGraph(stage, None, step=step, kv_len=kv_len, notes=notes, rows=rows, **extra)
    stage, step, kv_len, notes, entries, extra = decoded
    graph = torch.fx.Graph()
    nodes: list[torch.fx.Node] = []
    for op, name, target, args, kwargs, meta in entries:
        if op == "output":
            node = graph.output(_dec(args[0], nodes))
        else:
            node = graph.create_node(op, _resolve(target), name=name)
            if args:
                node.args = _dec(args, nodes)
            if kwargs:
                node.kwargs = _dec(kwargs, nodes)
        if node.name != name and op != "output":
            raise RuntimeError(f"graph codec: node {name!r} came back as {node.name!r}")
        node.meta = {k: (_dec(v, nodes) if k == "val" else v) for k, v in meta.items()}
        nodes.append(node)
    return StageGraph(stage, graph, step=step, kv_len=kv_len, notes=notes, **extra)
