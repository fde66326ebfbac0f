"""The roofline per layer of a CUDA run: where the kernel time goes against what the layer's work should cost on the
card. Pure arithmetic over the report (no torch): CPU tests replay recorded runs.

Per (stage, layer) with kernel time (`kernel_layers`, tracer.cuda.kernels): the bound is
`max(tc_flops / tensor peak, cuda_flops / fp32 peak, bytes / HBM bandwidth)`, the roof that gives it names the limit
(tensor, cuda-core, memory), once from the trace's columns (tensor-core FLOPs `flops_full`, `cuda_flops`, fused I/O
`io_fused`) and once from the analytic model's; efficiency = the traced bound / the measured time, lost time =
measured - bound. A stage's bound is the sum of its layers' (they run one after another), over the layers with
kernel time; the kernels outside every layer count as lost. The ceilings are tracer.cuda.ceilings': the measured
ones where the run measured them, else the datasheet's, and `ceilings.used` says which. A layer's fused I/O is what
it must move, not what an L2 hit saves.

Host time (per stage and per decode step, from the kernels' device start times): `span_us` from the first kernel's
start to the last one's end, `idle_us` the part of it no kernel ran (the gaps between kernels). Under flopdiff's
capture every op is recorded on the way, so these gaps are the instrumented run's, far longer than the model's own;
what the model itself cannot beat is `launch_floor_us` = launches x the card's measured host time per launch
(`launch_us`): where it exceeds the kernel time the step is `launch-bound` (the GPU waits for the host however fast
its kernels are; CUDA graphs or fewer, fused kernels are the cure), else `kernel-bound`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tracer.compare.io import fused_io
from tracer.cuda.ceilings import ceilings

ROOFS = ("tensor", "cuda-core", "memory")


def bound(tc: int, cuda: int, nbytes: int, ceil: dict[str, Any]) -> tuple[float, str]:
    """(microseconds, roof): the time the work needs at the card's peaks, and which peak sets it."""
    times = (tc / (ceil["bf16_tflops"] * 1e6), cuda / (ceil["fp32_tflops"] * 1e6), nbytes / (ceil["hbm_gbps"] * 1e3))
    i = max(range(3), key=times.__getitem__)
    return times[i], ROOFS[i]


def roofline(report: dict[str, Any], records: list[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """report.json's `roofline`: the ceilings with their source, a row per layer and per stage with kernel time, and
    per decode step from the kernel `records` (tracer.cuda.kernels.stage_kernels: each kernel's stage and step)."""
    ceil = ceilings(report.get("device"))
    if ceil is None or not report.get("kernel_layers"):
        return None
    layers = {(r["stage"], r["id"]): r for r in report["layers"]}
    rows = []
    for k in report["kernel_layers"]:
        row = layers.get((k["stage"], k["layer"]))
        if row is None or not k["time_us"]:
            continue
        traced = {"tc_flops": row["flops_full"], "cuda_flops": row.get("cuda_flops", 0), "bytes": row.get("io_fused", 0)}
        analytic = {"tc_flops": row["flops_analytic"], "cuda_flops": row.get("analytic_cuda_flops", 0),
                    "bytes": row.get("analytic_io_bytes", 0)}
        (t_bound, roof), (a_bound, _) = bound(*traced.values(), ceil), bound(*analytic.values(), ceil)
        rows.append(_row({"stage": k["stage"], "layer": k["layer"], "kernels": k["kernels"], "roof": roof},
                         k["time_us"], traced, analytic, {"traced": t_bound, "analytic": a_bound}))
    stages = []
    for stage in dict.fromkeys(k["stage"] for k in report["kernel_layers"]):
        mine = [r for r in rows if r["stage"] == stage]
        time = sum(k["time_us"] for k in report["kernel_layers"] if k["stage"] == stage)  # outside layers too
        sums = {side: {c: sum(r[side][c] for r in mine) for c in ("tc_flops", "cuda_flops", "bytes")}
                for side in ("traced", "analytic")}
        # a stage's bound: its layers' (they run one after another; a stage mixes roofs, its layers say which)
        bounds = {side: sum(r["bound_exact"][side] for r in mine) for side in ("traced", "analytic")}
        host = _host([r for r in records if r["stage"] == stage], ceil)
        stages.append({**_row({"stage": stage}, time, sums["traced"], sums["analytic"], bounds), **host})
    for r in rows + stages:
        del r["bound_exact"]
    rows.sort(key=lambda r: -r["lost_us"])
    return {"ceilings": ceil, "layers": rows, "stages": stages, "steps": _steps(report, records, ceil)}


def _steps(report: dict[str, Any], records: list[dict[str, Any]], ceil: dict[str, Any]) -> list[dict[str, Any]]:
    """Per decode step: kernel time and launches, and the sum of its layers' bounds from the trace."""
    time: dict[int, float] = defaultdict(float)
    launches: dict[int, int] = defaultdict(int)
    for r in records:
        if r["stage"] == "decode":
            time[r["step"]] += r["us"]
            launches[r["step"]] += 1
    if not time:
        return []
    work: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for n in report.get("nodes", ()):
        if n["stage"] == "decode" and n.get("layer"):
            w = work[(n["step"], n["layer"])]
            w[0] += n["flops_full"]
            w[1] += n.get("cuda_flops", 0)
    for (stage, step, layer), b in (fused_io(report.get("nodes", []), report.get("stages", []), by_step=True)
                                    or {}).items():
        if stage == "decode":
            work[(step, layer)][2] += b
    steps = []
    for step in sorted(time):
        b = sum(bound(*w, ceil)[0] for (s, _), w in work.items() if s == step)
        steps.append({"step": step, "time_us": round(time[step], 3), "launches": launches[step],
                      "bound_us": round(b, 3), "efficiency": round(b / time[step], 4),
                      "lost_us": round(time[step] - b, 3),
                      **_host([r for r in records if r["stage"] == "decode" and r["step"] == step], ceil)})
    return steps


def _host(records: list[dict[str, Any]], ceil: dict[str, Any]) -> dict[str, Any]:
    """The host's side of a stage's or a decode step's kernels: the span of their device times (summed over its
    stage graphs), the part of it no kernel ran, the launch floor, and whether the launches or the kernels set the pace.
    Spans need the kernels' start times (recordings before them have none: no span, no idle time)."""
    launches = len(records)
    busy_us = sum(r["us"] for r in records)
    floor = round(launches * ceil["launch_us"], 3) if ceil.get("launch_us") else None
    out: dict[str, Any] = {"span_us": None, "idle_us": None, "launch_floor_us": floor,
                           "limit": None if floor is None else "launch-bound" if floor > busy_us else "kernel-bound"}
    if launches and all("start_us" in r for r in records):
        graphs: dict[Any, list[tuple[float, float]]] = defaultdict(list)
        for r in records:  # each stage graph's clock starts at its own first kernel: spans add up per graph
            graphs[r["step"]].append((r["start_us"], r["start_us"] + r["us"]))
        span = idle = 0.0
        for spans in graphs.values():
            spans.sort()
            covered, reach = 0.0, spans[0][0]
            for lo, hi in spans:  # the union of the kernels' spans (concurrent streams overlap)
                if hi > reach:
                    covered += hi - max(lo, reach)
                    reach = hi
            span += reach - spans[0][0]
            idle += reach - spans[0][0] - covered
        out["span_us"], out["idle_us"] = round(span, 3), round(idle, 3)
    return out


def _row(row: dict[str, Any], time_us: float, traced: dict[str, int], analytic: dict[str, int],
         bounds: dict[str, float]) -> dict[str, Any]:
    """A layer's or a stage's row: its kernel time beside its work and its bounds (microseconds, unrounded)."""
    seconds = time_us * 1e-6
    return {**row, "time_us": round(time_us, 3), "traced": traced, "analytic": analytic,
            "bound_us": {side: round(b, 3) for side, b in bounds.items()}, "bound_exact": bounds,
            "achieved_tflops": round(traced["tc_flops"] / seconds / 1e12, 3),
            "achieved_gbps": round(traced["bytes"] / seconds / 1e9, 3),
            "intensity": round(traced["tc_flops"] / traced["bytes"], 3) if traced["bytes"] else None,
            "efficiency": round(bounds["traced"] / time_us, 4) if time_us else None,
            "lost_us": round(time_us - bounds["traced"], 3)}
