"""Benchmark: `flopdiff sweep` over a generated corpus (tracer.corpus: 200 pages of 27 real document shapes),
DeepSeek-OCR-2 with its published config, fake weights, 4 text tokens, 1 decode step, end to end in a fresh process.

    python benchmarks/bench_sweep.py [--pages 200] [--jobs N]

Prints pages, distinct workload keys (each traced once), wall time, pages/s and keys/s, and, for scale, a single
page's run (the command line on one page).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer import corpus  # noqa: E402  (the corpus generator: tracer/corpus.py)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=200)
    p.add_argument("--jobs", type=int)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="flopdiff-bench-sweep-") as tmp:
        corpus.write(Path(tmp) / "corpus", args.pages)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tracer.diff", "sweep", str(Path(tmp) / "corpus"), "--quiet", "--out",
                        str(Path(tmp) / "out"), *(["--jobs", str(args.jobs)] if args.jobs else [])],
                       check=True, cwd=ROOT, capture_output=True)
        wall = time.perf_counter() - t0
        doc = json.loads((Path(tmp) / "out" / "sweep.json").read_text())
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tracer.diff", "--image-shape", "1000x1400", "--quiet", "--out",
                        str(Path(tmp) / "one")], check=True, cwd=ROOT, capture_output=True)
        one = time.perf_counter() - t0
    table = Table(title=f"flopdiff sweep, DeepSeek-OCR-2, {os.cpu_count()} CPUs")
    for col in ("pages", "workload keys", "wall s", "pages/s", "keys/s", "one page's run s"):
        table.add_column(col, justify="right")
    table.add_row(str(doc["pages"]), str(doc["keys"]), f"{wall:.1f}", f"{doc['pages'] / wall:.1f}",
                  f"{doc['keys'] / wall:.2f}", f"{one:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
