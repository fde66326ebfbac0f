"""Benchmark: DeepSeek-OCR (v1) from its remote code, the 1000x1400 page (crop mode, 7 views, 9 text tokens,
10 decode steps), end to end, beside FlopCounterMode over the real vendor model on random weights.

    FLOPDIFF_DSOCR_V1_DIR=DIR python benchmarks/bench_v1.py [--skip-real]

Run it in the v1 environment (transformers 4.46.x, README). Target (issue 4): flopdiff <= 10 s and
<= 1.5 GiB on a 2-core machine.
"""

from __future__ import annotations

import os
import sys

from harness import compare

FLOPDIFF = ["--model", "deepseek-ocr", "--vendor-dir", "{dir}", "--trust-remote-code", "--image-shape", "1000x1400",
            "--text-tokens", "9", "--decode-steps", "10"]

REAL = """
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from tracer.vendors import BuildOptions, get_vendor
from tracer.core.workload import Workload
opts = BuildOptions(vendor_dir={dir!r}, trust_remote_code=True, mode="real")
vendor = get_vendor("deepseek-ocr")
config = vendor.load_config(None, opts)
prepared = vendor.prepare(Workload(model="deepseek-ocr", image_wh=(1000, 1400), text_tokens=9, decode_steps=10), config)
torch.manual_seed(0)
model = vendor.build(config, opts)
counts = {{}}
with torch.no_grad(), vendor.shims():
    with FlopCounterMode(display=False) as fc:
        out = vendor.prefill(model, prepared)()
    counts["prefill"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        for k in range(10):
            out = vendor.decode(model, out, k)()
    counts["decode"] = fc.get_total_flops()
print(json.dumps(counts), file=sys.stderr)
"""


def main() -> None:
    folder = os.environ.get("FLOPDIFF_DSOCR_V1_DIR")
    if not folder:
        sys.exit("set FLOPDIFF_DSOCR_V1_DIR to a copy of the DeepSeek-OCR remote code (README)")
    compare(__doc__, "DeepSeek-OCR 1000x1400 (7 views), vision + prefill + 10 decode steps",
            [a.format(dir=folder) for a in FLOPDIFF], REAL.format(dir=folder), "FlopCounterMode, vendor code on random bf16 weights")


if __name__ == "__main__":
    main()
