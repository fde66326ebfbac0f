"""Benchmark: full-size DeepSeek-OCR-2, 1000x1400 page (vision, prefill, 1 decode step), end to end.

    python benchmarks/bench_v2.py            # flopdiff (fake weights) beside FlopCounterMode on real weights
    python benchmarks/bench_v2.py --skip-real  # flopdiff only (the real-weight baseline takes minutes)

Each side runs in its own process; the table gives wall time, peak RSS and the ratios. Target
(issue 2): flopdiff <= 8 s and <= 1.5 GiB on a 2-core machine.
"""

from __future__ import annotations

from harness import compare

FLOPDIFF = ["--image-shape", "1000x1400", "--text-tokens", "4", "--decode-steps", "1"]

REAL = """
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from tracer.vendors import BuildOptions, get_vendor
from tracer.core.workload import Workload
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


def main() -> None:
    compare(__doc__, "DeepSeek-OCR-2 1000x1400, vision + prefill + 1 decode step", FLOPDIFF, REAL,
            "FlopCounterMode, real random bf16 weights")


if __name__ == "__main__":
    main()
