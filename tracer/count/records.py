"""Report: the stable JSON document (schema `flopdiff.report/1`) built from a trace, and its encoding.

Counting lives in `tracer.count.counter`, the terminal tables in `tracer.render.tables`, the files in `tracer.pipeline`. The JSON is deterministic: the same input gives
byte-identical output (no timestamps, node order = execution order).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch

from tracer.capture.recorder import StageGraph
from tracer.capture.series import STEP_SUMS
from tracer.capture.trace import Trace
from tracer.core.conventions import Conventions
from tracer.core.modulepaths import STAGES, node_id
from tracer.count.counter import count_graph, steps_in, totals
from tracer.count.document import SCHEMA
from tracer.count.memory import graph_memory, node_memory


def _tensors(v) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


_DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _shapes(values) -> tuple[list[list[int]], list[str]]:
    flat = _tensors(values)
    return [list(v.shape) for v in flat], [_DTYPE_NAMES[v.dtype] for v in flat]


def node_record(sg: StageGraph, node, memory: dict[str, Any] | None = None) -> dict[str, Any]:
    m = node.meta
    in_vals = [a.meta.get("val") for a in node.all_input_nodes]
    in_shapes, in_dtypes = _shapes(in_vals)
    out_shapes, out_dtypes = _shapes(m.get("val"))
    return {
        "id": node_id(sg, node.name), "stage": sg.stage, "step": sg.step, "op": m["op"],
        "module": m["module_call"], "module_class": m["module_class"],
        "source": m["source"], "vendor_source": m["vendor_source"], "vendor_function": m["vendor_function"],
        "input_shapes": in_shapes, "input_dtypes": in_dtypes,
        "output_shapes": out_shapes, "output_dtypes": out_dtypes,
        "flops_torch": m["flops_torch"], "flops_full": m["flops_full"], "status": m["flop_status"],
        **(memory if memory is not None else node_memory(node, sg.params)),
        **({"note": m["flop_note"]} if m.get("flop_note") else {}),
        **({"attention": m["params"], "inner": len(m["inner"])} if "params" in m else {}),
    }


class Shared:
    """Equal values of many graphs' rows held once: the strings (op, module, source lines, statuses) and the lists
    (shapes, dtypes, storage records) of a row, each by its content. A decode traced step by step repeats nearly
    every value at every step, and a step's rows arrive as objects of their own (unpickled from the decode worker,
    or built from a graph of their own): DeepSeek-OCR-2's 1,359 rows a step were 3.0 MB of objects, 1.5 MB of it
    repeats, and 4,000 steps did not fit in 23 GB. No pass changes a row's values in place (they read them, or put
    a new value under a key), so the sharing is invisible in the report. Node ids are unique per step: not kept.
    Only in the process that made it: a forked decode worker's steps are shared where they arrive (unpickled, they
    are objects of their own again), and sharing them before they leave took 9 ms a step."""

    def __init__(self) -> None:
        self._strings: dict[str, str] = {}
        self._lists: dict[str, list] = {}
        self._pid = os.getpid()

    def rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if os.getpid() != self._pid:
            return rows
        strings, lists = self._strings, self._lists
        for r in rows:
            for key, v in r.items():
                if key == "id":
                    continue
                if type(v) is str:
                    r[key] = strings.setdefault(v, v)
                elif type(v) is list:  # ints, strings and lists of them: equal reprs are equal values
                    r[key] = lists.setdefault(repr(v), v)
        return rows


def as_rows(graphs: list[StageGraph], conventions: Conventions, shared: Shared | None = None) -> list[StageGraph]:
    """Captured graphs counted and turned into their report rows (a selection, vision, is counted with the graph its
    nodes belong to, which must be among `graphs`), their values `shared` with the rows before them where given
    (stages that came as rows too: the decode worker's, unpickled). A graph given is consumed (its nodes' metadata
    dropped): use the stages returned. The decode worker sends its steps so (a v1 step's rows unpickle in 3 ms; its
    graph took 30 ms to rebuild and 8 more to count and turn into rows here), and this process turns each of its
    own steps so once captured."""
    for sg in graphs:
        if sg.selection is None and sg.rows is None:
            count_graph(sg, conventions)
    out = [sg if sg.rows is not None else _as_rows(sg) for sg in graphs]
    for sg in graphs:  # consumed: its tensors freed now, by reference counts (see _release)
        if sg.rows is None and sg.selection is None:
            _release(sg.graph)
    if shared is not None:
        for sg in out:
            shared.rows(sg.rows)
    return out


def _release(graph) -> None:
    """A graph whose rows are made: its nodes' metadata (the meta tensors, the records) dropped. A graph is a cycle
    (each node points to it and to its neighbours), so only the cyclic collector frees it; DeepSeek-OCR-2's step
    graph is 25,000 objects, which that collector freed in 30 ms, and its metadata, 80% of them, dropped here frees
    in 2 (tracer.capture.recorder.collect_steps frees the rest)."""
    for node in graph.nodes:
        node.meta = {}


def _as_rows(sg: StageGraph) -> StageGraph:
    rows = graph_rows(sg)
    return StageGraph(sg.stage, None, step=sg.step, kv_len=sg.kv_len, notes=sg.notes, rows=rows,
                      kv_layers=sg.kv_layers, memory=sg.memory)


def graph_rows(sg: StageGraph) -> list[dict[str, Any]]:
    """A counted graph's report rows, and its stage memory into `sg.memory` (once). Storage ids are renumbered in
    the order the rows first touch them (and the graph's outputs after them): the capture's own ids depend on how many
    storages the mode made on the way (FakeTensorMode lifts constants into storages of their own, meta capture does
    not), the report's must not."""
    nodes = list(sg.op_nodes())
    per_node, memory = graph_memory(sg, nodes)
    if sg.memory is None:
        sg.memory = memory
    rows = [node_record(sg, n, per_node[n.name]) for n in nodes]
    ids: dict[int, int] = {}
    for r in rows:
        for key in ("reads", "writes"):
            if key in r:
                r[key] = [[ids.setdefault(sid, len(ids)), b] for sid, b in r[key]]
    sg.memory["outputs"] = sorted({ids.setdefault(r[0], len(ids)) for r in sg.outputs})  # what the graph returns
    return rows


MEMORY_SUMS = ("bytes_read", "bytes_written", "weight_bytes", "cuda_flops")  # per node; a stage's are their sums


def stage_record(name: str, graphs: list[StageGraph], rows: list[dict[str, Any]],
                 graph_rows_of: dict[int, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """A stage's counts: FLOPs (both policies), the node columns summed (`weight_bytes` here: each parameter once
    per graph, a decode step's read at every step), the activation peak (the largest of its graphs') and the KV
    cache after it (bytes, per layer); a decode's per step too (`graph_rows_of`: each graph's rows, by id(graph))."""
    t = totals(graphs)
    rec: dict[str, Any] = {"name": name, "flops_torch": t.flops_torch, "flops_full": t.flops_full,
                           "unknown_ops": sum(t.unknown.values())}
    rec.update({k: sum(r[k] for r in rows) for k in MEMORY_SUMS})
    rec["cuda_uncounted"] = sum(1 for r in rows if r["cuda_status"] == "uncounted")
    memories = [g.memory for g in graphs if g.memory is not None]
    if memories:
        rec["weight_bytes"] = sum(m["weight_bytes"] for m in memories)
        top = max(memories, key=lambda m: m["act_peak_bytes"])
        rec["act_peak_bytes"] = top["act_peak_bytes"]
        rec["act_peak_node"] = node_id(graphs[memories.index(top)], top["act_peak_node"]) if top["act_peak_node"] else None
    # the storages each graph returns (its outputs, the KV cache among them), by step: what a layer writes to memory
    # in the fused convention besides what other layers read (tracer.compare.io)
    rec["outputs"] = [(g.memory or {}).get("outputs", []) for g in graphs]
    kv = graphs[-1].kv_layers if graphs else None
    if kv is not None:
        rec["kv_bytes"], rec["kv_layers"] = sum(kv), kv
    if name == "decode":
        rec["steps"] = [step for g in graphs for step in _steps(g, (graph_rows_of or {}).get(id(g), g.rows or []))]
        spans = [{"steps": list(g.span), **g.series} for g in graphs if g.span is not None]
        if spans:  # steps in closed form (tracer.capture.series): each total's affine form [a, b], a + b * step
            rec["series"] = spans
    return rec


STEP_KEYS = ("kv_len", *STEP_SUMS, "weight_bytes", "act_peak_bytes", "kv_bytes")


def _steps(g: StageGraph, rows: list[dict[str, Any]]) -> list[dict[str, int]]:
    """A decode graph's per-step totals (STEP_KEYS: what a sweep needs to sum a shorter decode): its own, or each
    step of its span from the series' affine forms (tracer.capture.series)."""
    if g.span is None:
        memory = g.memory or {}
        step = {"kv_len": g.kv_len, **{k: sum(r[k] for r in rows) for k in STEP_SUMS},
                "weight_bytes": memory.get("weight_bytes", sum(r["weight_bytes"] for r in rows)),
                "act_peak_bytes": memory.get("act_peak_bytes", 0)}
        return [{**step, **({"kv_bytes": sum(g.kv_layers)} if g.kv_layers is not None else {})}]
    keys = [k for k in STEP_KEYS if k in g.series]
    return [{key: g.series[key][0] + g.series[key][1] * k for key in keys} for k in range(g.span[0], g.span[1] + 1)]


def build_report(tr: Trace) -> dict[str, Any]:
    w, d = tr.workload, tr.prepared.derived
    unknown: Counter = Counter()
    nodes = []
    per_stage: dict[str, list[dict[str, Any]]] = {name: [] for name in STAGES}
    per_graph: dict[int, list[dict[str, Any]]] = {}
    for sg in tr.graphs():
        rows = per_graph[id(sg)] = sg.rows if sg.rows is not None else graph_rows(sg)
        nodes += rows
        per_stage.setdefault(sg.stage, []).extend(rows)
        if sg.stage != "vision":  # vision nodes repeat prefill's; a span's node stands for one node per step
            for r in rows:
                if r["status"] == "unknown":
                    unknown[r["op"]] += steps_in(sg)
    stages = [stage_record(name, tr.stages.get(name, []), per_stage[name], per_graph) for name in STAGES]
    return {
        "schema": SCHEMA,
        "model": w.model,
        "workload": {
            "image_wh": list(d.image_wh),
            "image_path": w.image_name, "base_size": d.base_size, "tile_size": d.tile_size,
            "crop_mode": w.crop_mode, "views": d.views, "crop_grid_wh": list(d.crop_grid_wh),
            "image_tokens": d.image_tokens, "prompt_len": d.prompt_len, "decode_steps": w.decode_steps,
        },
        "options": {"attn": tr.options.attn, "experts": tr.options.experts,
                    "dtype": tr.options.dtype, "device": tr.options.device},
        "notes": tr.prepared.notes,
        "stages": stages,
        "nodes": nodes,
        "unknown_ops": [{"op": op, "count": c} for op, c in sorted(unknown.items())],
    }
