"""What `--mode real` on the CPU is about to cost, as an upper bound, before it runs: the analytic model's FLOPs and
weight bytes for the request at this machine's measured bf16 matmul and fill rates (the command line prints it as
one warning line). Its own module: it needs torch (the rates) and the analytic model, and nothing of the capture."""

from __future__ import annotations

import time

import torch

from analytic.api import build, counting_policy, evaluate_tree, request_shape, weight_bytes
from tracer.core.workload import Workload


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# --mode real on CPU, measured on a 2-core machine (tracer.capture.recorder keeps no activation alive):
#   v2 1000x1400, 1 decode step: build 27.8 s, prefill 33.4 s for 6.7 TFLOP, 65 s and 11.0 GiB in all;
#   v1 1000x1400, 2 decode steps: build 33.9 s, prefill 19.8 s for 4.6 TFLOP, 60 s and 9.8 GiB in all.
# Building costs 2.5-3.5x the machine's bf16 normal_ fill per parameter; the forward runs at 23-28% of its
# 1024^3 bf16 matmul rate; peak memory is 1.7-1.8x the weights. The estimate takes a margin on each, so that it
# bounds the run: INIT_FACTOR, MATMUL_EFFICIENCY, MEMORY_FACTOR, plus the fixed cost of loading.
INIT_FACTOR = 4.0
MATMUL_EFFICIENCY = 0.15
MEMORY_FACTOR = 2.2
LOAD_SECONDS = 5.0


def real_run_estimate(workload: Workload, config: str | None) -> str:
    """What `--mode real` on CPU is about to cost, as an upper bound: building the random weights (this machine's
    measured fill rate), computing every stage's analytic FLOPs (its measured bf16 matmul rate), and memory."""
    shape = request_shape(workload)
    tree = build(workload.model, shape, "aligned", config)
    doc = evaluate_tree(tree, shape, counting_policy("full"))
    flops = sum(s["flops"] for s in doc["stages"] if s["name"] != "vision")  # prefill includes vision
    weights = weight_bytes(tree)
    a = torch.ones(1024, 1024, dtype=torch.bfloat16)
    a @ a  # warm-up
    rate = 4 * 2 * 1024**3 / _seconds(lambda: [a @ a for _ in range(4)])
    fill = torch.empty(2**22, dtype=torch.bfloat16)
    per_param = _seconds(fill.normal_) / fill.numel()
    build_s = INIT_FACTOR * per_param * weights / 2
    compute_s = flops / (rate * MATMUL_EFFICIENCY)
    return (f"--mode real on CPU: up to {_duration(LOAD_SECONDS + build_s + compute_s)} here (building "
            f"{weights / 2**30:.1f} GiB of random bf16 weights ~{_duration(build_s)}, computing "
            f"{flops / 1e12:.1f} TFLOP ~{_duration(compute_s)} at {MATMUL_EFFICIENCY:.0%} of this machine's "
            f"{rate / 1e9:.0f} GFLOP/s bf16 matmul rate) and up to {MEMORY_FACTOR * weights / 2**30:.0f} GiB of memory")


def _seconds(fn, tries: int = 3) -> float:
    """The fastest of a few runs (the first pays for thread start-up and page faults)."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
