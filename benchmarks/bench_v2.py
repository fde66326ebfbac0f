"""Benchmark: full-size DeepSeek-OCR-2, 1000x1400 page (vision, prefill, 1 decode step), end to end.

    python benchmarks/bench_v2.py            # flopdiff (fake weights) beside FlopCounterMode on real weights
    python benchmarks/bench_v2.py --skip-real  # flopdiff only (the real-weight baseline takes minutes)

Each side runs in its own process; the table gives wall time, peak RSS and the ratios. Target
(issue 2): flopdiff <= 8 s and <= 1.5 GiB on a 2-core machine.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

FLOPDIFF = """
import json, sys, tempfile
from tracer.diff import main
out = tempfile.mkdtemp()
assert main(["--image-shape", "1000x1400", "--text-tokens", "4", "--decode-steps", "1", "--out", out, "--quiet"]) == 0
doc = json.load(open(out + "/report.json"))
print(json.dumps({s["name"]: [s["flops_torch"], s["flops_full"]] for s in doc["stages"]}), file=sys.stderr)
"""

REAL = """
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from tracer.vendors import BuildOptions, get_vendor
from tracer.workload import Workload
vendor = get_vendor("deepseek-ocr-2")
config = vendor.load_config(None, BuildOptions(mode="real"))
prepared = vendor.prepare(Workload(image_wh=(1000, 1400), text_tokens=4, decode_steps=1), config)
model = vendor.build(config, BuildOptions(mode="real"))
counts = {}
with torch.no_grad(), vendor.shims():
    with FlopCounterMode(display=False) as fc:
        out = vendor.prefill(model, prepared)()
    counts["prefill"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        vendor.decode(model, out, 0)()
    counts["decode"] = fc.get_total_flops()
print(json.dumps(counts), file=sys.stderr)
"""


def measure(code: str) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) of a fresh interpreter running `code`, and what it printed on stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"benchmark child failed:\n{proc.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("warning: peak RSS of this child is not above an earlier child's; run the sides separately",
              file=sys.stderr)
    return wall, peak / 2**20, proc.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-real", action="store_true", help="skip FlopCounterMode on real random weights")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    rows = [("flopdiff (fake weights, all stages + report)", *measure(FLOPDIFF))]
    if not args.skip_real:
        rows.append(("FlopCounterMode, real random bf16 weights", *measure(REAL)))
    table = Table(title="DeepSeek-OCR-2 1000x1400, vision + prefill + 1 decode step")
    for col in ("run", "wall s", "peak RSS GiB", "FLOPs (torch, full) per stage"):
        table.add_column(col)
    for name, wall, rss, counts in rows:
        table.add_row(name, f"{wall:.1f}", f"{rss:.2f}", counts)
    if len(rows) == 2:
        table.add_row("ratio real / flopdiff", f"{rows[1][1] / rows[0][1]:.1f}x", f"{rows[1][2] / rows[0][2]:.1f}x", "")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
