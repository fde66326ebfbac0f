"""The roofline per layer of a CUDA run: where the kernel time goes against what the layer's work should cost on the
card. Pure arithmetic over the report (no torch): CPU tests replay recorded runs.

Per (stage, layer) with kernel time (`kernel_layers`, tracer.cuda.kernels): the bound is
`max(tc_flops / tensor peak, cuda_flops / fp32 peak, bytes / HBM bandwidth)`, the roof that gives it names the limit
(tensor, cuda-core, memory), once from the trace's columns (tensor-core FLOPs `flops_full`, `cuda_flops`, fused I/O
`io_fused`) and once from the analytic model's; efficiency = the traced bound / the measured time, lost time =
measured - bound. A stage's bound is the sum of its layers' (they run one after another), over the layers with
kernel time; the kernels outside every layer count as lost. Each decode step too (`steps`): its kernels' time and
launches against the sum of its layers' bounds (per step, from its nodes and its own graph's fused I/O): a step whose
efficiency is a few percent over hundreds of launches is launch-bound, not compute- or memory-bound. Ceilings are the datasheet's dense peaks of the card
(`DATASHEETS`, by the name torch reports), never a clock-derived number: the tensor peaks assume the boost clock
(1,830 MHz on H100/H200), below the maximum nvidia-smi reports (1,980 MHz), which put every "% of peak" 8% low. The
datasheets' bandwidth is what HBM can move; a layer's fused I/O is what it must move, not what an L2 hit saves.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tracer.compare.io import fused_io

#: dense peaks (no sparsity) from NVIDIA's datasheets, by the device name torch.cuda reports
DATASHEETS: dict[str, dict[str, Any]] = {
    "NVIDIA H200": {"bf16_tflops": 989.5, "fp32_tflops": 67.0, "hbm_gbps": 4800.0,
                    "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity, FP32 "
                              "67 TFLOPS, HBM3e 4.8 TB/s"},
    "NVIDIA H100 80GB HBM3": {"bf16_tflops": 989.5, "fp32_tflops": 67.0, "hbm_gbps": 3350.0,
                              "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity, "
                                        "FP32 67 TFLOPS, HBM3 3.35 TB/s"},
    "NVIDIA H100 PCIe": {"bf16_tflops": 756.5, "fp32_tflops": 51.0, "hbm_gbps": 2000.0,
                         "source": "NVIDIA H100 Tensor Core GPU datasheet (PCIe): BF16 1,513 TFLOPS with sparsity, "
                                   "FP32 51 TFLOPS, HBM2e 2 TB/s"},
    "NVIDIA A100-SXM4-80GB": {"bf16_tflops": 312.0, "fp32_tflops": 19.5, "hbm_gbps": 2039.0,
                              "source": "NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): BF16 312 TFLOPS, FP32 "
                                        "19.5 TFLOPS, HBM2e 2,039 GB/s"},
}
ROOFS = ("tensor", "cuda-core", "memory")


def ceilings(device: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's datasheet peaks, or None for a card the table lacks (the roofline is then left out, said so)."""
    sheet = DATASHEETS.get((device or {}).get("name", ""))
    return None if sheet is None else {"name": device["name"], **sheet, "used": "datasheet",
                                       "measured": None}  # measured ceilings (a GEMM, a copy): not run yet


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
        stages.append(_row({"stage": stage}, time, sums["traced"], sums["analytic"], bounds))
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
                      "lost_us": round(time[step] - b, 3)})
    return steps


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
