"""Count: a pass over a captured graph that writes per-node FLOPs under two policies.

  flops_torch  what `FlopCounterMode` counts for the node: torch's own `flop_registry` formula, called
               exactly as FlopCounterMode calls it (same arguments, `out_val`), 0 for ops it lacks;
  flops_full   flops_torch plus `tracer.count.formulas` for the ops torch lacks (and, with the causal-halving
               switch, torch's attention ops recounted under that convention).

Every op gets a status: `torch` (torch's formula), `formula` (ours), `free` (cannot carry tensor-core
FLOPs: elementwise, reductions, data movement) or `unknown` (may carry FLOPs and nobody has a formula:
a matmul-like aten op, a custom op, a higher-order op). Unknown ops are listed, never silently zero.

A boundary node (an attention function's call, tracer.capture.attention) carries its formula minus what the nodes inside
it were counted under policy full, never below 0: status `formula` when that leaves work the dispatcher never saw,
`group` when the ops inside carry it all. FlopCounterMode sees none of a boundary's own work (torch 0).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch._ops import HigherOrderOperator
from torch.utils.flop_counter import flop_registry

from tracer.capture.recorder import StageGraph, boundary_call, op_name
from tracer.core.conventions import Conventions, flop_counter_counts
from tracer.core.errors import CannotCount
from tracer.count.formulas import FORMULAS, boundary_attention_flop

# Name tokens (split on "_") that mark an aten op as a possible matmul/convolution/attention.
_FLOP_TOKENS = {
    "mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "einsum", "linear",
    "conv", "convolution", "conv1d", "conv2d", "conv3d", "attention", "attn", "gemm", "flex", "sdpa",
    "tensordot", "ger", "outer", "bilinear",
}
_CORE_NAMESPACES = {"aten", "prims", "prim"}
# Higher-order ops that only wrap other ops (their inner ops are what counts).
_FREE_HOPS = {"auto_functionalized", "auto_functionalized_v2", "with_effects", "run_const_graph"}


def may_carry_flops(name: str) -> bool:
    """Whether an op without a formula could hide tensor-core FLOPs (then it must be reported)."""
    namespace, _, op = name.partition("::")
    if namespace == "higher_order":
        return op not in _FREE_HOPS
    if namespace not in _CORE_NAMESPACES:
        return True  # a custom op: a kernel of unknown cost
    return bool(_FLOP_TOKENS & set(op.lower().split("_")))


def _val(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else x


def _materialize(node: torch.fx.Node):
    args = torch.fx.node.map_arg(node.args, _val)
    kwargs = torch.fx.node.map_arg(node.kwargs, _val)
    return args, kwargs


def torch_flops(node: torch.fx.Node) -> int:
    """FlopCounterMode's count for this node (it handles no higher-order op but triton and cond)."""
    target = node.target
    if isinstance(target, HigherOrderOperator):
        return 0
    formula = flop_registry.get(target._overloadpacket)
    if formula is None:
        return 0
    args, kwargs = _materialize(node)
    return int(formula(*args, **kwargs, out_val=node.meta.get("val")))


def count_node(node: torch.fx.Node, conv: Conventions) -> None:
    """Write flops_torch, flops_full, flop_status (and flop_note when unknown) into node.meta."""
    name = op_name(node.target)
    hop = isinstance(node.target, HigherOrderOperator)
    in_torch = flop_counter_counts(name)
    ft = torch_flops(node)
    ours = FORMULAS.get(name)
    meta = node.meta
    meta["flop_note"] = ""
    if ours is not None and (ft == 0 or conv.causal_halving):
        args, kwargs = _materialize(node)
        try:
            full = int(ours(*args, out=meta.get("val"), conv=conv, **kwargs))
            status = "formula" if ft == 0 else "torch"
        except CannotCount as exc:
            full, status, meta["flop_note"] = ft, "unknown", str(exc)
        except Exception as exc:  # a formula's own bug: name the node it failed on
            raise RuntimeError(f"FLOP formula for {name} failed on node {node.name} (module "
                               f"{meta.get('module_call')}, {meta.get('vendor_source') or meta.get('source')}): "
                               f"{exc.__class__.__name__}: {exc}") from exc
    elif in_torch:
        full, status = ft, "torch"
    elif may_carry_flops(name):
        full, status = 0, "unknown"
        meta["flop_note"] = "no FLOP formula for this op"
    else:
        full, status = 0, "free"
    if hop and name.split("::")[1] not in _FREE_HOPS:
        meta["flop_note"] = meta["flop_note"] or "FlopCounterMode raises on this higher-order op"
    meta.update(flops_torch=ft, flops_full=full, flop_status=status)


def count_boundary(node: torch.fx.Node, conv: Conventions, counted: dict[str, int]) -> None:
    """A boundary node: its formula minus the policy-full FLOPs of the nodes recorded inside it (`counted`)."""
    meta = node.meta
    inside = sum(counted.get(name, 0) for name in meta["inner"])
    q, k, v = (_val(a) for a in node.args)
    try:
        formula = boundary_attention_flop(q, k, v, meta["params"], conv)
    except CannotCount as exc:
        meta.update(flops_torch=0, flops_full=0, flop_status="unknown", flop_note=str(exc))
        return
    own = max(0, formula - inside)
    note = (f"attention call: {formula:,} by formula; {inside:,} counted on the {len(meta['inner'])} ops inside"
            + (f"; the remaining {own:,} ran where the dispatcher does not see (a kernel launched from Python)"
               if own else ""))
    meta.update(flops_torch=0, flops_full=own, flop_status="formula" if own else "group", flop_note=note)


def count_graph(sg: StageGraph, conv: Conventions = Conventions()) -> StageGraph:
    """Annotate every op node of `sg` (getitem nodes copy nothing and count 0), in recording order: a boundary
    node comes after the nodes inside it."""
    counted: dict[str, int] = {}
    for node in sg.call_nodes():
        if node.target is operator.getitem:
            node.meta.update(flops_torch=0, flops_full=0, flop_status="free", flop_note="")
            continue
        if node.target is boundary_call:
            count_boundary(node, conv, counted)
        else:
            count_node(node, conv)
        counted[node.name] = node.meta["flops_full"]
    return sg


@dataclass
class Totals:
    flops_torch: int = 0
    flops_full: int = 0
    unknown: Counter = field(default_factory=Counter)

    def add(self, sg: StageGraph) -> "Totals":
        if sg.rows is not None:
            for r in sg.rows:
                self.flops_torch += r["flops_torch"]
                self.flops_full += r["flops_full"]
                if r["status"] == "unknown":
                    self.unknown[r["op"]] += steps_in(sg)
            return self
        for n in sg.op_nodes():
            self.flops_torch += n.meta["flops_torch"]
            self.flops_full += n.meta["flops_full"]
            if n.meta["flop_status"] == "unknown":
                self.unknown[n.meta["op"]] += 1
        return self


def steps_in(sg: StageGraph) -> int:
    """How many steps' nodes each of a graph's rows stands for: a closed-form span's (tracer.capture.series), else 1."""
    return 1 if sg.span is None else sg.span[1] - sg.span[0] + 1


def totals(graphs: list[StageGraph]) -> Totals:
    t = Totals()
    for sg in graphs:
        t.add(sg)
    return t
