"""Bytes and CUDA-core FLOPs: a pass over a captured graph that writes, per node, what it moves and what it computes
beside its tensor-core FLOPs, and per stage the activation peak. No second capture and no real compute: it reads
the storage records the recorder kept (`meta["storage"]`: storage id, byte offset, bytes the view spans, bytes of
the storage, per tensor value; tracer.capture.recorder).

Per node (the *unfused* convention: every aten op reads its inputs and writes its outputs, as the trace runs them):
  bytes_read     the distinct input storages, each the union of the byte ranges its views span (an expanded,
                 stride-0 dimension once); a gather (embedding, index, index_select) reads the rows it gathers
                 and its indices, not the whole table
  bytes_written  the outputs the same way; a view or reshape moves nothing (an output aliasing an input of an op
                 that mutates nothing); an in-place op reads and writes its target
  weight_bytes   the part of bytes_read that is parameters or buffers
  kv_bytes       the part of bytes_written that the forward returns as its KV cache (transformers' cache grown by a
                 cat, v1's first forward's roped keys and values): a step's nodes sum to the cache after it
  cuda_flops     `tracer.core.conventions.CUDA_CORE_OPS` per element; attention kernels their softmax (3 per score);
                 tensor-core ops 0 (their column is flops_full); an op that may compute and has no entry: 0 with
                 cuda_status `uncounted`, listed, never a silent zero
Per stage graph (`graph_memory`): weight_bytes with each parameter once, act_peak_bytes by liveness over the
recorded order (a storage lives from the node that makes it, or from the start for an input, to its last use; the
stage's outputs, the KV cache among them, to the end; parameters are weights, not activations) and the node where it
peaks. An input dies at its last use: a decode step's old KV tensors are dropped once the cache holds the grown ones
(transformers' caches reassign them), so old and new cache live together only while the new one is made.
What the trace cannot know: fusion (a fusing runtime reads less), caches (L2 hits), the allocator (its blocks,
rounding and caching: a real run's `max_memory_allocated` sits above the liveness peak).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from tracer.capture.recorder import StageGraph, inner_nodes, storage_records
from tracer.core.conventions import CUDA_CORE_OPS, DATA_MOVEMENT

#: gathers: they read what they gather (their output's bytes) from the table, plus their other inputs whole
_GATHERS = {"aten::embedding": 0, "aten::index": 0, "aten::index_select": 0, "aten::gather": 0}
#: grouped GEMMs: of the grouped operand (one matrix per group: the experts' weights) a kernel reads the groups
#: that have rows, at most one per row: min(rows, groups) of them (a one-token decode step touches its top-k)
_GROUPED = {"aten::_grouped_mm": 1}
_ATTENTION_KERNELS = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention",
                      "flash_attn::", "higher_order::flex_attention", "attention::")
_FREE_STATUS = ("torch", "formula", "group")  # tensor-core ops: their work is the other column


def _union(ranges: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, stop in sorted(ranges):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _bytes(records: list[tuple[int, int, int, int]], only: set[int] | None = None) -> int:
    if only is None and len({r[0] for r in records}) == len(records):  # distinct storages: no union to take
        return sum(r[2] for r in records)
    per: dict[int, list[tuple[int, int]]] = {}
    for sid, offset, span, _ in records:
        if only is None or sid in only:
            per.setdefault(sid, []).append((offset, offset + span))
    return sum(_union(r) for r in per.values())


_NOTHING = {"bytes_read": 0, "bytes_written": 0, "weight_bytes": 0, "cuda_flops": 0, "cuda_status": "free"}


def node_memory(node: torch.fx.Node, params: set[int]) -> dict[str, Any]:
    """bytes_read, bytes_written, weight_bytes, cuda_flops and cuda_status of one op node (module docstring)."""
    return _node_pass(node, params)[0]


def _node_pass(node: torch.fx.Node, params: set[int]) -> tuple[dict[str, Any], list, list, list]:
    """One node's columns, with what the stage's pass reuses: its input and output records and the parameter ranges
    it reads (one pass over its records: a v1 page has 39k nodes; kept in the node, which vision and prefill share)."""
    done = node.meta.get("memory_pass")
    if done is None:
        done = node.meta["memory_pass"] = _first_pass(node, params)
    return done


def _first_pass(node: torch.fx.Node, params: set[int]) -> tuple[dict[str, Any], list, list, list]:
    op = node.meta["op"]
    ins = [r for a in node.all_input_nodes for r in storage_records(a)]
    outs = storage_records(node)
    if node.meta.get("inner"):  # an attention call whose ops were recorded inside it: they carry its traffic
        flops, status = _boundary_cuda(node)
        return {**_NOTHING, "cuda_flops": flops, "cuda_status": status}, ins, outs, []
    in_sids = {r[0] for r in ins}
    mutates = _mutates(node)
    if outs and not mutates and (_aliases(node) or all(r[0] in in_sids for r in outs)):  # a view: nothing moves
        return _NOTHING, ins, outs, []
    writes = _per_storage(outs if mutates else [r for r in outs if r[0] not in in_sids])
    written = sum(writes.values())
    if op in _GATHERS and node.all_input_nodes:
        table = storage_records(node.all_input_nodes[0])
        table_sids = {r[0] for r in table}
        reads = _per_storage([r for r in ins if r[0] not in table_sids])
        reads.update((sid, min(span, written)) for sid, _, span, _ in table)
        param_reads = [(sid, off, min(span, written), size) for sid, off, span, size in table if sid in params]
    else:
        reads = _per_storage(ins)
        param_reads = [r for r in ins if r[0] in params]
        if op in _GROUPED and len(node.all_input_nodes) > _GROUPED[op]:
            param_reads = _grouped(node, reads, param_reads)
    flops, status = cuda_flops(node)
    return ({"bytes_read": sum(reads.values()), "bytes_written": written, "weight_bytes": _bytes(param_reads),
             "cuda_flops": flops, "cuda_status": status,
             # per storage (its id in the graph, bytes): what the layer-level fused I/O is made of (tracer.compare.io)
             "reads": [[sid, b] for sid, b in reads.items()], "writes": [[sid, b] for sid, b in writes.items()]},
            ins, outs, param_reads)


def _per_storage(records: list[tuple[int, int, int, int]]) -> dict[int, int]:
    """Per storage id, the union of the byte ranges its views span."""
    per: dict[int, list[tuple[int, int]]] = {}
    for sid, offset, span, _ in records:
        per.setdefault(sid, []).append((offset, offset + span))
    return {sid: _union(r) for sid, r in per.items()}


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _aliases(node: torch.fx.Node) -> bool:
    """The op's schema says every output aliases an input and nothing is written (`lift_fresh`, `view`): a view
    even where the mode made a new storage for it (FakeTensorMode lifting a constant)."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.returns
                and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns))


def _grouped(node: torch.fx.Node, reads: dict[int, int], param_reads: list) -> list:
    """A grouped GEMM's reads (in place) and parameter ranges less the groups no row reaches (module docstring)."""
    grouped = node.all_input_nodes[_GROUPED[node.meta["op"]]]
    rows_of = node.all_input_nodes[0].meta.get("val")
    mat = grouped.meta.get("val")
    if not isinstance(mat, torch.Tensor) or mat.dim() != 3 or not isinstance(rows_of, torch.Tensor):
        return param_reads
    groups, rows = mat.shape[0], rows_of.shape[0]
    touched = min(rows, groups)
    mine = {r[0] for r in storage_records(grouped)}
    for sid in mine & reads.keys():
        reads[sid] = reads[sid] * touched // groups
    return [(sid, off, span * touched // groups, size) if sid in mine else (sid, off, span, size)
            for sid, off, span, size in param_reads]


def _numel(vals: Any) -> int:
    if isinstance(vals, torch.Tensor):
        return vals.numel()
    if isinstance(vals, (list, tuple)):
        return sum(_numel(v) for v in vals)
    return 0


def cuda_flops(node: torch.fx.Node) -> tuple[int, str]:
    """CUDA-core FLOPs of one node and how they were known: `counted` (the table), `free` (computes nothing, or
    its work is tensor-core), `uncounted` (may compute, no entry)."""
    op, meta = node.meta["op"], node.meta
    entry = CUDA_CORE_OPS.get(op)
    if entry is not None:
        per, basis = entry
        elements = _numel(meta.get("val")) if basis == "out" else _numel(
            node.all_input_nodes[0].meta.get("val") if node.all_input_nodes else None)
        if basis == "out" and isinstance(meta.get("val"), (list, tuple)):  # layer norm: (out, mean, rstd)
            elements = _numel(meta["val"][0])
        return per * elements, "counted"
    if op.startswith(_ATTENTION_KERNELS):
        return 3 * _scores(node), "counted"
    if op in DATA_MOVEMENT or meta.get("flop_status") in _FREE_STATUS or node.target is operator.getitem:
        return 0, "free"
    return 0, "uncounted"


def _boundary_cuda(node: torch.fx.Node) -> tuple[int, str]:
    """An attention call whose ops were recorded inside it, as its FLOPs are counted (tracer.count.counter): its
    softmax (3 per score) less what the ops inside computed, never below 0 (SDPA's kernel inside carries it all; a
    kernel launched from Python, none)."""
    inside = sum(cuda_flops(n)[0] for n in inner_nodes(node))
    own = max(0, 3 * _scores(node) - inside)
    return own, "counted" if own else "free"


def _scores(node: torch.fx.Node) -> int:
    """(query, key) score elements of an attention kernel: batch x heads x s_q from its output, s_k from its key (its
    layout: aten's and a transformers boundary's (batch, heads, seq, dim), flash-attn's (batch, seq, heads, dim))."""
    out = node.meta.get("val")
    out = out[0] if isinstance(out, (list, tuple)) else out
    args = [a.meta.get("val") for a in node.all_input_nodes[:3]]
    if not isinstance(out, torch.Tensor) or len(args) < 2 or not isinstance(args[1], torch.Tensor) or out.dim() < 3:
        return 0
    layout = (node.meta.get("params") or {}).get("layout") or (
        "bhsd" if node.meta["op"].startswith(("aten::", "higher_order::")) else "bshd")
    s_k = args[1].shape[-2] if layout == "bhsd" else args[1].shape[1]
    return out.numel() // out.shape[-1] * s_k


def graph_memory(sg: StageGraph, nodes: list[torch.fx.Node]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every node's columns (by node name) and the stage graph's: weight bytes (each parameter once), the activation
    peak by liveness and where it peaks."""
    params = sg.params
    per_node: dict[str, dict[str, Any]] = {}
    weight_reads: list = []
    size: dict[int, int] = {}
    born: dict[int, int] = {}
    last: dict[int, int] = {}
    order = list(nodes)
    for i, n in enumerate(order):
        fields, ins, outs, param_reads = _node_pass(n, params)
        # the part of what it writes that the forward returns as its KV cache (the cache's tensor's span there)
        fields = {**fields, "kv_bytes": sum(min(b, sg.kv_storages[sid]) for sid, b in fields.get("writes", ())
                                            if sid in sg.kv_storages)}
        per_node[n.name] = fields
        weight_reads += param_reads
        for r in ins:
            if r[0] not in params:
                if r[3] >= size.get(r[0], 0):
                    size[r[0]] = r[3]
                born.setdefault(r[0], -1)  # first seen as an input: alive from the start
                last[r[0]] = i
        for r in outs:
            if r[0] not in params:
                if r[3] >= size.get(r[0], 0):
                    size[r[0]] = r[3]
                born.setdefault(r[0], i)
                last[r[0]] = i
    end = len(order)
    for r in sg.outputs:  # the stage's outputs (the KV cache among them) live to its end
        if r[0] in last:
            last[r[0]] = end - 1
    delta = [0] * (end + 1)  # live bytes while node t runs: every storage with born <= t <= last
    for sid, b in born.items():
        delta[max(b, 0)] += size[sid]
        delta[min(last[sid], end - 1) + 1] -= size[sid]
    live, peak, at = 0, 0, -1
    for t in range(end):
        live += delta[t]
        if live > peak:
            peak, at = live, t
    peak_node = order[at].name if 0 <= at < end else None
    return per_node, {"weight_bytes": _bytes(weight_reads), "act_peak_bytes": peak, "act_peak_node": peak_node}


