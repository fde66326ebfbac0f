"""Fused I/O per layer, from the trace: what a runtime that runs each analytic layer as one kernel reads and writes.

A layer reads once each storage its nodes read and none of them wrote (its inputs and its weights), over the most
bytes any of its nodes reads of it; it writes once each storage its nodes write that a node of another layer reads or
that the stage graph returns (its outputs, the KV cache among them); what it makes and uses up inside (an RMSNorm's
float32 temporaries, a window partition's copy, a layer norm's mean and rstd nobody reads) never reaches memory.
Computed per graph (the prefill, each decode step) from the nodes' storage records (`reads`, `writes`: storage id and
bytes, tracer.count.memory); the vision stage is the part of the prefill under the vision tower, so its layers have
their prefill rows' counts. The other convention, *unfused* (every aten op reads its inputs and writes its outputs),
is the nodes' `bytes_read` + `bytes_written`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

UNMAPPED = "(unmapped)"


def fused_io(nodes: list[dict[str, Any]], stages: list[dict[str, Any]], by_step: bool = False) -> dict[tuple, int] | None:
    """Per (stage, layer id): fused bytes read + written; `by_step`: per (stage, step, layer id), each decode step
    apart (a roofline per step). None when the nodes carry no storage records (a report from before them)."""
    if nodes and not any("reads" in n or "writes" in n for n in nodes):
        return None
    outputs = {s["name"]: s.get("outputs") or [] for s in stages}
    graphs: dict[tuple[str, int | None], list[dict[str, Any]]] = defaultdict(list)
    for n in nodes:
        if n["stage"] in ("prefill", "decode"):
            graphs[(n["stage"], n["step"])].append(n)
    out: dict[tuple, int] = defaultdict(int)
    for (stage, step), members in graphs.items():
        returned = outputs[stage][step or 0] if len(outputs[stage]) > (step or 0) else []
        for layer, b in _graph(members, set(returned)).items():
            out[(stage, step, layer) if by_step else (stage, layer)] += b
    if by_step:
        return dict(out)
    vision = {n["layer"] for n in nodes if n["stage"] == "vision" and n.get("layer")}
    for lid in vision:
        out[("vision", lid)] = out.get(("prefill", lid), 0)
    return dict(out)


def _graph(nodes: list[dict[str, Any]], returned: set[int]) -> dict[str, int]:
    writer: dict[int, set[str]] = defaultdict(set)
    readers: dict[int, set[str]] = defaultdict(set)
    reads: dict[str, dict[int, int]] = defaultdict(dict)
    writes: dict[str, dict[int, int]] = defaultdict(dict)
    for n in nodes:
        layer = n.get("layer") or UNMAPPED
        for sid, b in n.get("writes", ()):
            writer[sid].add(layer)
            writes[layer][sid] = max(b, writes[layer].get(sid, 0))
        for sid, b in n.get("reads", ()):
            readers[sid].add(layer)
            reads[layer][sid] = max(b, reads[layer].get(sid, 0))
    total: dict[str, int] = defaultdict(int)
    for layer, rs in reads.items():
        total[layer] += sum(b for sid, b in rs.items() if layer not in writer[sid])
    for layer, ws in writes.items():
        total[layer] += sum(b for sid, b in ws.items() if readers[sid] - {layer} or sid in returned)
    return total
