"""Benchmark: `flopdiff sweep` over a generated corpus (tracer.corpus: 200 pages of 27 real document shapes),
DeepSeek-OCR-2 with its published config, fake weights, 4 text tokens, 1 decode step, end to end in a fresh process.

    python benchmarks/bench_sweep.py [--pages 200] [--jobs N]      # issue 24's target: --pages 2000, warm <= 10 s

Prints, for a cold sweep (a trace cache of its own, empty: every key traced) and then a warm one (the same cache:
every key served), pages, distinct workload keys, wall time, pages/s and keys/s, and, for scale, a single page's
run (the command line on one page, no cache).
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
    table = Table(title=f"flopdiff sweep, DeepSeek-OCR-2, {os.cpu_count()} CPUs")
    for col in ("run", "pages", "workload keys", "wall s", "pages/s", "keys/s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="flopdiff-bench-sweep-") as tmp:
        corpus.write(Path(tmp) / "corpus", args.pages)
        env = {**os.environ, "FLOPDIFF_CACHE": "on", "FLOPDIFF_CACHE_DIR": str(Path(tmp) / "cache")}
        for run in ("cold", "warm"):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tracer.diff", "sweep", str(Path(tmp) / "corpus"), "--quiet",
                            "--out", str(Path(tmp) / run), *(["--jobs", str(args.jobs)] if args.jobs else [])],
                           check=True, cwd=ROOT, capture_output=True, env=env)
            wall = time.perf_counter() - t0
            doc = json.loads((Path(tmp) / run / "sweep.json").read_text())
            table.add_row(run, str(doc["pages"]), str(doc["keys"]), f"{wall:.1f}", f"{doc['pages'] / wall:.1f}",
                          f"{doc['keys'] / wall:.2f}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tracer.diff", "--image-shape", "1000x1400", "--quiet", "--no-cache",
                        "--out", str(Path(tmp) / "one")], check=True, cwd=ROOT, capture_output=True)
        table.caption = f"one page's run (1000x1400, no cache): {time.perf_counter() - t0:.1f} s"
    Console().print(table)


if __name__ == "__main__":
    main()
