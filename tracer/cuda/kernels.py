"""Kernels: every kernel torch.profiler (CUPTI) saw on a GPU, or every aten op's self time on a CPU, attributed to
a graph node and an analytic layer.

The ProfilerRanges instrument (tracer.capture.instruments) opens a profiler range around each recorded op (`flopdiff.op.<seq>`) and each module call
(`flopdiff.module.<qualified path>`); a kernel belongs to the innermost of each that was open when it was
launched. Kernels of an op belong to its node; kernels launched outside any op (Triton or CuTe kernels started
from Python, compiled regions) belong to the innermost module. A node's layer is its mapped layer; a node
without one goes to the layer a rule names for its module and op, else (and a bare module) to the closest enclosing
scope the mapping table claims whole (`Matcher.resolve_scope`); work at the root module is "the model's top-level forward", and a kernel
outside every module is "outside the model". So 100% of kernel time lands somewhere named.

FLOPs: a node's FLOPs go to its compute kernel: its longest kernel that is not one of torch's generic helpers
(`at::native::` elementwise/copy/reduce kernels, memsets), else its longest; the helpers get 0.
"counted by FlopCounterMode": yes (torch == full), no (torch 0, full > 0), partly, or "-" (no FLOPs).
A layer's "% of peak" is against the card's dense bf16 ceiling (tracer.cuda.ceilings: measured, else the datasheet's),
the clock-derived one where it has neither; the roofline per layer: tracer.cuda.roofline.
"""

from __future__ import annotations

import subprocess
from typing import Any

import torch

from mapping.engine import Matcher, node_source
from tracer.capture.recorder import StageGraph
from tracer.capture.trace import Trace
from tracer.core.modulepaths import ROOT, node_id
from tracer.cuda.ceilings import ceilings, driver_version, measured
from tracer.cuda.roofline import roofline

OUTSIDE = "(outside the model)"
TOP = "(the model's top-level forward)"  # work at the root module, outside every named submodule

# dense bf16 tensor-core FLOPs per SM per clock, by compute capability (NVIDIA architecture whitepapers)
BF16_FLOPS_PER_SM_CLOCK = {(8, 0): 2048, (8, 6): 1024, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192}


def compute_kernels(report: dict[str, Any], records: list[dict[str, Any]]) -> dict[int, int]:
    """Record index -> FLOPs (full) for each node's compute kernel: its longest kernel that is not one of torch's
    own helpers (layout copies, bias adds, reductions, memsets), else its longest kernel."""
    best: dict[str, int] = {}
    for i, r in enumerate(records):
        if r["node"] is None:
            continue
        j = best.get(r["node"])
        if j is None or (_helper(records[j]["kernel"]), -records[j]["us"]) > (_helper(r["kernel"]), -r["us"]):
            best[r["node"]] = i
    flops = {n["id"]: n["flops_full"] for n in report["nodes"]}
    return {i: flops.get(nid, 0) for nid, i in best.items() if nid in flops}


def _helper(kernel: str) -> bool:
    return "at::native::" in kernel or kernel.startswith("Memset") or kernel.startswith("Memcpy")


def counted(torch_flops: int, full: int) -> str:
    if not full:
        return "-"
    if torch_flops == full:
        return "yes"
    return "no" if torch_flops == 0 else "partly"


def device_info(measure: bool = False, use_cache: bool = True) -> dict[str, Any]:
    """The card, its driver, its dense bf16 peak = SMs x max SM clock x FLOPs per SM per clock, and (`measure`) the
    ceilings it reaches (tracer.cuda.ceilings.measured: cached per card and driver unless `use_cache` is off)."""
    props = torch.cuda.get_device_properties(0)
    cc = (props.major, props.minor)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
        mhz = int(out.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        mhz = 0
    driver = driver_version()
    info = {"name": props.name, "compute_capability": f"{cc[0]}.{cc[1]}", "sms": props.multi_processor_count,
            "driver": driver, "max_sm_clock_mhz": mhz,
            "peak_bf16_tflops": peak_bf16_tflops(props.multi_processor_count, mhz, cc),
            "peak_how": "SMs x max SM clock (nvidia-smi) x dense bf16 FLOPs per SM per clock"}
    return {**info, "measured_ceilings": measured(props.name, driver, use_cache)} if measure else info


def peak_bf16_tflops(sms: int, mhz: int, cc: tuple[int, int]) -> float | None:
    """Dense bf16 tensor-core peak in TFLOP/s (one decimal), or None for an unknown architecture or clock."""
    peak = sms * mhz * 1e6 * BF16_FLOPS_PER_SM_CLOCK.get(cc, 0)
    return round(peak / 1e12, 1) if peak else None


def stage_kernels(sg: StageGraph, node_ids: dict[int, str]) -> list[dict[str, Any]]:
    """A stage graph's kernel records with node ids in place of op sequence numbers (`node_ids`: seq -> id)."""
    return [{"kernel": r["kernel"], "us": r["us"], "node": node_ids.get(r["op"]) if r["op"] is not None else None,
             "module": r["module"], "stage": sg.stage, "step": sg.step,
             **({"start_us": r["start_us"]} if "start_us" in r else {})} for r in sg.kernels]


def attribute(report: dict[str, Any], records: list[dict[str, Any]], matcher: Matcher,
              device: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's kernel sections: `device`, `kernels` (per kernel name), `kernel_layers` (per stage and layer)
    and `kernel_time`."""
    nodes = {n["id"]: n for n in report["nodes"]}
    compute = compute_kernels(report, records)
    by_kernel: dict[str, dict[str, Any]] = {}
    by_layer: dict[tuple[str, str], dict[str, Any]] = {}
    for i, r in enumerate(records):
        node = nodes.get(r["node"]) if r["node"] else None
        flops_full = flops_torch = 0
        if i in compute:
            flops_full, flops_torch = node["flops_full"], node["flops_torch"]
        layer = r["layer"] = _layer(node, r, matcher)  # each launch's layer (tracer.cuda.ncu pairs them)
        k = by_kernel.setdefault(r["kernel"], {"kernel": r["kernel"], "calls": 0, "time_us": 0.0, "flops_full": 0,
                                               "flops_torch": 0, "flops_full_by_stage": {}, "ops": set(),
                                               "layers": set()})
        k["calls"] += 1
        k["time_us"] += r["us"]
        k["flops_full"] += flops_full
        k["flops_full_by_stage"][r["stage"]] = k["flops_full_by_stage"].get(r["stage"], 0) + flops_full
        k["flops_torch"] += flops_torch
        k["ops"].add(node["op"] if node else "(no op: launched from Python)")
        k["layers"].add(layer)
        lay = by_layer.setdefault((r["stage"], layer), {"stage": r["stage"], "layer": layer, "kernels": 0, "time_us": 0.0,
                                                   "flops_full": 0, "flops_torch": 0})
        lay["kernels"] += 1
        lay["time_us"] += r["us"]
        lay["flops_full"] += flops_full
        lay["flops_torch"] += flops_torch
    # the card's ceiling (tracer.cuda.ceilings: measured, else the datasheet's), else the clock-derived peak
    peak = (ceilings(device) or {}).get("bf16_tflops") or (device or {}).get("peak_bf16_tflops")
    kernels = []
    for k in by_kernel.values():
        k["counted_by_flopcountermode"] = counted(k["flops_torch"], k["flops_full"])
        k["unseen_flops"] = k["flops_full"] - k["flops_torch"]
        k["ops"], k["layers"] = sorted(k["ops"]), sorted(k["layers"])
        k["time_us"] = round(k["time_us"], 3)
        kernels.append(k)
    kernels.sort(key=lambda k: (-k["unseen_flops"], -k["time_us"]))
    layers = []
    for row in by_layer.values():
        row["time_us"] = round(row["time_us"], 3)
        tflops = row["flops_full"] / (row["time_us"] * 1e-6) / 1e12 if row["time_us"] and row["flops_full"] else None
        row["achieved_tflops"] = round(tflops, 2) if tflops else None
        row["peak_pct"] = round(100 * tflops / peak, 2) if tflops and peak else None
        layers.append(row)
    layers.sort(key=lambda r: (r["stage"], -r["time_us"]))
    total = sum(r["us"] for r in records)
    return {"device": device, "kernels": kernels, "kernel_layers": layers,
            "kernel_time": {"total_us": round(total, 3),
                            "outside_model_us": round(sum(r["time_us"] for r in layers if r["layer"] == OUTSIDE), 3),
                            "attributed_pct": 100.0 if records else None}}


def _layer(node: dict[str, Any] | None, record: dict[str, Any], matcher: Matcher) -> str:
    stage = record["stage"]
    if node is not None:
        if node.get("layer"):
            return node["layer"]
        own = matcher.resolve(stage, node["module"], node["op"], node.get("vendor_function", ""),
                              node_source(node)).layer
        if own is not None:  # a node the report did not map (it costs nothing the trace counts): a rule names it
            return own
        scope = node["module"]
    else:
        scope = record["module"]
    if not scope:
        return OUTSIDE
    if scope == ROOT:
        return TOP
    return matcher.resolve_scope(stage, scope, whole=True) or f"(module {scope}: no analytic scope)"


def attribute_kernels(tr: Trace, report: dict[str, Any], matcher: Matcher, use_cache: bool = True) -> dict[str, Any]:
    """The pipeline step: every stage graph's kernel records (prefill and decode; vision's are prefill's), with
    node ids, attributed: attribute()'s sections and `kernel_records`; the card's ceilings measured where there are
    kernels to put under them (`use_cache`: tracer.cuda.ceilings.measured)."""
    records: list[dict[str, Any]] = []
    for sg in tr.stages.get("prefill", []) + tr.stages.get("decode", []):
        ids = {n.meta["seq"]: node_id(sg, n.name) for n in sg.op_nodes() if "seq" in n.meta}
        records += stage_kernels(sg, ids)
    device = device_info(measure=bool(records), use_cache=use_cache) if torch.cuda.is_available() else None
    sections = attribute(report, records, matcher, device)
    return {**sections, "kernel_records": records, "roofline": roofline({**report, **sections}, records)}
