"""Benchmark on a CUDA machine: DeepSeek-OCR-2 1000x1400 (4 text tokens, the default) in real mode on the GPU with kernel attribution,
end to end (load included), for SDPA and for flex attention in the text model; beside it FlopCounterMode alone
over the same flex-attention run (which it cannot count: torch.compile'd flex attention).

    python benchmarks/bench_cuda.py OUTDIR

Target (issue 6): <= 30 s per run. Writes OUTDIR/<run>/report.json, report.html, summary.txt.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RUNS = {  # the first run of a fresh machine also pays for cold caches: run it twice
    "sdpa_grouped_mm": ["--attn", "sdpa", "--experts", "grouped_mm"],
    "sdpa_grouped_mm_again": ["--attn", "sdpa", "--experts", "grouped_mm"],
    "flex_text_grouped_mm": ["--attn", "text_config=flex_attention,vision_config=sdpa", "--experts", "grouped_mm"],
}

def flopcounter_flex() -> None:
    """FlopCounterMode alone over the flex-attention prefill (in its own process, as a user would run it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tracer.vendors import BuildOptions, get_vendor
    from tracer.core.workload import Workload

    opts = BuildOptions(attn={"text_config": "flex_attention", "vision_config": "sdpa"}, mode="real", device="cuda")
    vendor = get_vendor("deepseek-ocr-2")
    config = vendor.load_config(None, opts)
    prepared = vendor.prepare(Workload(image_wh=(1000, 1400), decode_steps=0), config)
    prepared.inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in prepared.inputs.items()}
    with torch.device("cuda"):
        model = vendor.build(config, opts)
    with torch.no_grad(), vendor.shims(), FlopCounterMode(display=False) as fc:
        vendor.prefill(model, prepared)()
    print("FlopCounterMode total", fc.get_total_flops())


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "flopdiff-cuda")
    table = Table(title="DeepSeek-OCR-2 1000x1400 on CUDA, real mode + kernel attribution (4 text tokens, 2 decode steps)")
    for col in ("run", "exit", "wall s", "phases (or the last line)"):
        table.add_column(col, overflow="fold")
    for name, flags in RUNS.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "tracer.diff", "--device", "cuda", "--mode", "real", "--image-shape", "1000x1400",
                "--decode-steps", "2", "--json-nodes", "flops", "--quiet", "--timings", "--out", str(folder), *flags]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (folder / "summary.txt").write_text(proc.stdout + proc.stderr)
        timings = [line for line in proc.stderr.splitlines() if line.startswith("flopdiff: seconds per phase")]
        last = timings[-1] if timings else (proc.stderr.strip().splitlines() or [""])[-1]
        table.add_row(name, str(proc.returncode), f"{wall:.1f}", last)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--flopcounter-flex"], capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    table.add_row("FlopCounterMode alone, flex(text)", str(proc.returncode), f"{time.perf_counter() - t0:.1f}",
                  lines[-1][:90] if lines else "")
    Console(width=180).print(table)


if __name__ == "__main__":
    flopcounter_flex() if sys.argv[1:] == ["--flopcounter-flex"] else main()
