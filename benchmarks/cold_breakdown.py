"""Where a cold run goes: the imports a run cannot avoid, timed one by one in a fresh interpreter, then the phases of
a `--no-cache --timings` run of the same workload (median of `--repeat` runs per row), as one table.

    python benchmarks/cold_breakdown.py                                          # DeepSeek-OCR-2, 1000x1400
    FLOPDIFF_DSOCR_V1_DIR=DIR python benchmarks/cold_breakdown.py --model v1     # the v1 page (its environment)

What it showed (issue 16, 2 cores, meta capture with memoized meta kernels): the imports are 2.6 s of the v1 page's
4.0 s and 2.9 s of v2's 3.3 s (torch, then `torch._dynamo`, which transformers, torchvision and the first dispatch
mode all import); the capture keeps both cores busy (the prefill here, the decode steps in the worker).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from rich.console import Console
from rich.table import Table

# The imports of a run, in the order a run meets them: (label, statement). Each row's time is the statement's
# alone, after the rows above it.
IMPORTS = {
    "v2": [("flopdiff's command line (tables, mapping, jinja2, rich)", "import tracer.cli"),
           ("torch", "import torch"),
           ("torch._dynamo (transformers, torchvision and FakeTensorMode() import it)",
            "from torch._subclasses.fake_tensor import FakeTensorMode; FakeTensorMode()"),
           ("transformers and DeepSeek-OCR-2's classes",
            "from tracer.vendors.deepseek_ocr2 import _transformers_classes; _transformers_classes()"),
           ("flopdiff's tracing modules", "import tracer.capture.trace, tracer.count.counter, tracer.count.records")],
    "v1": [("flopdiff's command line (tables, mapping, jinja2, rich)", "import tracer.cli"),
           ("torch", "import torch"),
           ("torch._dynamo (transformers, torchvision and FakeTensorMode() import it)",
            "from torch._subclasses.fake_tensor import FakeTensorMode; FakeTensorMode()"),
           ("torchvision, transformers and the vendor code",
            "from tracer.vendors import BuildOptions, get_vendor; get_vendor('deepseek-ocr').load_config(None, "
            "BuildOptions(vendor_dir=os.environ['FLOPDIFF_DSOCR_V1_DIR'], trust_remote_code=True))"),
           ("flopdiff's tracing modules", "import tracer.capture.trace, tracer.count.counter, tracer.count.records")],
}
WORKLOADS = {
    "v2": ["--image-shape", "1000x1400", "--text-tokens", "4", "--decode-steps", "1"],
    "v1": ["--model", "deepseek-ocr", "--vendor-dir", "{dir}", "--trust-remote-code", "--image-shape", "1000x1400",
           "--text-tokens", "9", "--decode-steps", "10"],
}
TIMER = """
import json, os, sys, time
rows = []
for label, statement in json.loads(sys.argv[1]):
    t = time.perf_counter()
    exec(statement)
    rows.append((label, time.perf_counter() - t))
print(json.dumps(rows))
"""


def imports(model: str) -> list[tuple[str, float]]:
    out = subprocess.run([sys.executable, "-c", TIMER, json.dumps(IMPORTS[model])], capture_output=True, text=True,
                         check=True)
    return [tuple(row) for row in json.loads(out.stdout)]


def phases(model: str) -> list[tuple[str, float]]:
    """One `--no-cache --timings` run: its phases in order, seconds each."""
    args = [a.format(dir=os.environ.get("FLOPDIFF_DSOCR_V1_DIR", "")) for a in WORKLOADS[model]]
    with tempfile.TemporaryDirectory(prefix="flopdiff-breakdown-") as out:
        proc = subprocess.run([sys.executable, "-m", "tracer.diff", *args, "--no-cache", "--timings", "--quiet",
                               "--out", f"{out}/set"], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"flopdiff failed:\n{proc.stderr}")
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("flopdiff: seconds per phase: "))
    items = line.removeprefix("flopdiff: seconds per phase: ").split("; ")
    return [(item.rsplit(" ", 1)[0], float(item.rsplit(" ", 1)[1])) for item in items]


def median_rows(runs: list[list[tuple[str, float]]]) -> list[tuple[str, float]]:
    return [(label, statistics.median(run[i][1] for run in runs)) for i, (label, _) in enumerate(runs[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(IMPORTS), default="v2")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (the table shows the median)")
    args = parser.parse_args()
    if args.model == "v1" and not os.environ.get("FLOPDIFF_DSOCR_V1_DIR"):
        sys.exit("set FLOPDIFF_DSOCR_V1_DIR to a copy of the DeepSeek-OCR remote code (README)")
    table = Table(title=f"a cold {args.model} run, part by part (median of {args.repeat})")
    table.add_column("part")
    table.add_column("seconds", justify="right")
    for label, seconds in median_rows([imports(args.model) for _ in range(args.repeat)]):
        table.add_row(f"import: {label}", f"{seconds:.2f}")
    for label, seconds in median_rows([phases(args.model) for _ in range(args.repeat)]):
        table.add_row(f"run: {label}", f"{seconds:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
