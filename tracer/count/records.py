"""Report: the stable JSON document (schema `flopdiff.report/1`) built from a trace, and its encoding.

Counting lives in `tracer.count.counter`, the terminal tables in `tracer.render.tables`, the files in `tracer.pipeline`. The JSON is deterministic: the same input gives
byte-identical output (no timestamps, node order = execution order).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from tracer.capture.recorder import StageGraph
from tracer.capture.trace import Trace
from tracer.core.conventions import Conventions
from tracer.core.modulepaths import STAGES, node_id
from tracer.count.counter import Totals, count_graph, totals
from tracer.count.document import SCHEMA


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


def node_record(sg: StageGraph, node) -> dict[str, Any]:
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
        **({"note": m["flop_note"]} if m.get("flop_note") else {}),
        **({"attention": m["params"], "inner": len(m["inner"])} if "params" in m else {}),
    }


def as_rows(graphs: list[StageGraph], conventions: Conventions) -> list[StageGraph]:
    """Captured graphs counted and turned into their report rows (a selection, vision, is counted with the graph its
    nodes belong to, which must be among `graphs`). The decode worker sends its steps so (a v1 step's rows unpickle in
    3 ms; its graph took 30 ms to rebuild and 8 more to count and turn into rows here), and this process turns its
    own graphs so while it waits for the worker's last step."""
    for sg in graphs:
        if sg.selection is None and sg.rows is None:
            count_graph(sg, conventions)
    return [sg if sg.rows is not None else
            StageGraph(sg.stage, None, step=sg.step, kv_len=sg.kv_len, notes=sg.notes,
                       rows=[node_record(sg, node) for node in sg.op_nodes()])
            for sg in graphs]


def stage_record(name: str, graphs: list[StageGraph]) -> dict[str, Any]:
    t = totals(graphs)
    rec: dict[str, Any] = {"name": name, "flops_torch": t.flops_torch, "flops_full": t.flops_full,
                           "unknown_ops": sum(t.unknown.values())}
    if name == "decode":
        rec["steps"] = [{"kv_len": g.kv_len, **_flops(totals([g]))} for g in graphs]
    return rec


def _flops(t: Totals) -> dict[str, int]:
    return {"flops_torch": t.flops_torch, "flops_full": t.flops_full}


def build_report(tr: Trace) -> dict[str, Any]:
    w, d = tr.workload, tr.prepared.derived
    stages = [stage_record(name, tr.stages.get(name, [])) for name in STAGES]
    unknown: Counter = Counter()
    nodes = []
    for sg in tr.graphs():
        rows = sg.rows if sg.rows is not None else [node_record(sg, node) for node in sg.op_nodes()]
        nodes += rows
        if sg.stage != "vision":  # vision nodes repeat prefill's
            unknown.update(r["op"] for r in rows if r["status"] == "unknown")
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
