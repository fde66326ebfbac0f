"""Benchmark: a long decode in closed form (tracer.capture.series, analytic.series) beside tracing every step, end
to end, cold (`--no-cache`): DeepSeek-OCR's 1000x1400 page (9 text tokens) with 2,000 decode steps (run it in the
v1 environment) or DeepSeek-OCR-2's default page with 4,000. The every-step side runs once (`--every-step
--allow-long`: minutes); both sides' per-stage totals are printed (they must be equal: every column is compared and
the verdict printed).

    FLOPDIFF_DSOCR_V1_DIR=DIR python benchmarks/bench_decode.py v1 [--skip-every-step] [--repeat N]
    python benchmarks/bench_decode.py v2 [--skip-every-step]

Target (issue 29): the v1 page with 2,000 steps <= 6 s and <= 1.3 GiB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from harness import ChildFailed, flopdiff, table

RUNS = {
    "v1": ("DeepSeek-OCR 1000x1400 (7 views, 9 text tokens), 2,000 decode steps",
           ["--model", "deepseek-ocr", "--vendor-dir", "{dir}", "--trust-remote-code", "--image-shape", "1000x1400",
            "--text-tokens", "9", "--decode-steps", "2000"]),
    "v2": ("DeepSeek-OCR-2 default page (1000x1400, 4 text tokens), 4,000 decode steps", ["--decode-steps", "4000"]),
}
COLUMNS = ("flops_torch", "flops_full", "cuda_flops", "bytes_read", "bytes_written", "weight_bytes", "io_fused",
           "kv_bytes", "act_peak_bytes", "flops_analytic", "analytic_io_bytes", "analytic_kv_bytes")


def columns(doc: dict) -> dict:
    return {s["name"]: [s.get(c) for c in COLUMNS] for s in doc["stages"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(RUNS))
    parser.add_argument("--skip-every-step", action="store_true", help="only the closed form")
    parser.add_argument("--repeat", type=int, default=3, help="closed-form runs (the table shows the median)")
    args = parser.parse_args()
    title, argv = RUNS[args.model]
    if args.model == "v1":
        folder = os.environ.get("FLOPDIFF_DSOCR_V1_DIR") or sys.exit("set FLOPDIFF_DSOCR_V1_DIR (README)")
        argv = [a.format(dir=folder) for a in argv]
    os.environ["FLOPDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="flopdiff-bench-cache-")
    sides = {"closed form": flopdiff([*argv, "--no-cache"], totals=columns, repeat=args.repeat)}
    failed = None
    if not args.skip_every_step:
        try:  # its peak RSS is the kernel's (one run: no second, sampled run)
            sides["every step traced (--every-step)"] = flopdiff([*argv, "--no-cache", "--every-step", "--allow-long"],
                                                                 totals=columns, may_fail=True)
        except ChildFailed as exc:
            failed = exc
    got = {name: json.loads(cols) for name, (_, _, cols) in sides.items()}
    rows = [(f"flopdiff cold, {name}", wall, peak, json.dumps({s: c[1] for s, c in got[name].items()}))
            for name, (wall, peak, _) in sides.items()]
    if failed is not None:
        rows.append(("flopdiff cold, every step traced (--every-step): FAILED", failed.wall, failed.peak, str(failed)))
    table(title, rows)
    print("columns per stage (" + ", ".join(COLUMNS) + "):")
    for name, cols in got.items():
        print(f"  {name}: {json.dumps(cols)}")
    if len(got) == 2:
        print("closed form = every step, every column of every stage:", len({json.dumps(c) for c in got.values()}) == 1)


if __name__ == "__main__":
    main()
