"""Benchmark on a CUDA machine with Nsight Compute: hardware FLOPs of three reference kernels beside flopdiff's
formula counts, through flopdiff's own capture, counting and ncu parsing (`tracer.cuda.ncu`).

    python benchmarks/bench_ncu.py

Kernels: a 4096^3 bf16 GEMM, causal SDPA (b1 h10 s1024 d128, bf16), a grouped GEMM of 64 groups of 96 rows
(1280 -> 1792, bf16). Expected on Hopper: GEMM = 2*M*N*K; causal flash attention = the causal half plus the
diagonal tiles run whole; grouped GEMM = rows padded to the tile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from rich.console import Console
from rich.table import Table

PROBE = """
import json, sys, torch
import torch.nn.functional as F
from tracer.capture.recorder import capture
from tracer.count.counter import count_graph
from tracer.core.conventions import Conventions
torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
a = torch.randn(4096, 4096, device=dev, dtype=bf); b = torch.randn(4096, 4096, device=dev, dtype=bf)
q, k, v = (torch.randn(1, 10, 1024, 128, device=dev, dtype=bf) for _ in range(3))
x = torch.randn(64 * 96, 1280, device=dev, dtype=bf); w = torch.randn(64, 1792, 1280, device=dev, dtype=bf).transpose(1, 2)
offs = torch.arange(96, 64 * 96 + 1, 96, device=dev, dtype=torch.int32)
def run():
    torch.mm(a, b)
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch._grouped_mm(x, w, offs=offs)
    torch.cuda.synchronize()
sg, _ = capture(run, torch.nn.Module(), "probe")
rows = {}
for conv, key in ((Conventions(), "dense"), (Conventions(causal_halving=True), "halved")):
    count_graph(sg, conv)
    rows[key] = [(n.meta["op"], n.meta["flops_full"]) for n in sg.op_nodes() if n.meta["flops_full"]]
print("FLOPDIFF " + json.dumps(rows))
"""


def main() -> None:
    from tracer.cuda.ncu import METRICS, parse_csv

    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    proc = subprocess.run([ncu, "--csv", "--page", "raw", "--metrics", ",".join(METRICS), "--clock-control", "none",
                           sys.executable, "-c", PROBE], capture_output=True, text=True, env=dict(os.environ))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("FLOPDIFF ")), None)
    if proc.returncode or line is None:
        sys.exit(f"probe failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    formula = json.loads(line[len("FLOPDIFF "):])
    compute = [r for r in parse_csv(proc.stdout) if r["tensor_flops"]]
    table = Table(title="Nsight Compute hardware FLOPs vs flopdiff's formulas (tensor cores)")
    for col in ("op", "kernel", "formula (dense)", "formula (causal halved)", "hardware tensor", "hardware / halved"):
        table.add_column(col, overflow="fold")
    for (op, dense), (_, halved), hw in zip(formula["dense"], formula["halved"], compute):
        table.add_row(op, hw["kernel"][:60], f"{dense:,}", f"{halved:,}", f"{hw['tensor_flops']:,}",
                      f"{hw['tensor_flops'] / halved:.4f}")
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
