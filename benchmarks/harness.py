"""Shared by the end-to-end benchmarks: run a command in a fresh interpreter, measure wall time and peak RSS,
print the table with ratios. Each side runs in its own process so that imports and memory are its own."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


class ChildFailed(Exception):
    """A benchmarked command that did not finish (`may_fail`): its status, what it took, its last stderr line."""

    def __init__(self, returncode: int, wall: float, peak: float, last: str):
        super().__init__(f"exit {returncode} after {wall:.0f} s at {peak:.1f} GiB peak RSS: {last}")
        self.returncode, self.wall, self.peak = returncode, wall, peak


def measure(argv: list[str], again: bool = False, may_fail: bool = False) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) of a fresh process running `argv`, and its last stderr line. The kernel keeps
    one maximum over all children: `again` (the same command once more) expects no new peak. A failed child ends
    the benchmark, or with `may_fail` raises ChildFailed (a side that runs out of memory is a finding)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode and may_fail:
        tail = proc.stderr.strip().splitlines()
        raise ChildFailed(proc.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                          tail[-1] if tail else "killed (no message: out of memory?)")
    if proc.returncode:
        sys.exit(f"benchmark child failed:\n{proc.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before and not again:
        print("warning: peak RSS of this child is not above an earlier child's; run the sides separately",
              file=sys.stderr)
    lines = proc.stderr.strip().splitlines()
    return wall, peak / 2**20, lines[-1] if lines else ""


def snippet(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def head(path: str) -> dict:
    """report.json's first line: everything but the nodes (one node per line follows), read without parsing
    megabytes of nodes."""
    with open(path) as f:
        line = f.readline()
    return json.loads(line[:line.rindex(',"nodes":[')] + "}")


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        for task in os.listdir(f"/proc/{pids[i]}/task"):
            with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                pids += [int(c) for c in f.read().split()]
        i += 1
    return pids


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def peak_pss(argv: list[str], every: float = 0.25) -> float:
    """Peak proportional set size (GiB) summed over the process and its children, sampled every `every` s in a
    run of its own: flopdiff forks a decode worker that shares most pages with it, so the largest process's
    RSS alone would understate the total and the sum of RSS would count shared pages twice. Reading
    smaps_rollup costs tens of ms per process, too much to do during the timed run."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(_pss_kib(p) for p in _tree(proc.pid)))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass  # a process exited between listing and reading: the next sample sees the rest
        time.sleep(every)
    if proc.returncode:
        sys.exit(f"benchmark child failed with status {proc.returncode}: {' '.join(argv)}")
    return peak / 2**20


def flopdiff(args: list[str], report: str = "report.json",
             totals=lambda doc: {s["name"]: [s["flops_torch"], s["flops_full"]] for s in doc["stages"]},
             repeat: int = 1, own_memory: bool = False, may_fail: bool = False) -> tuple[float, float, str]:
    """The command line a user runs (`python -m tracer.diff ARGS`), timed from process start to exit (the median
    of `repeat` runs; each run's time goes to stderr); the per-stage totals are read from its report afterwards,
    outside the measured time. Memory: the larger of the largest process's peak RSS and the sampled peak PSS of
    all its processes (a run of its own, on Linux). `own_memory`: the sampled peak alone (the kernel's peak RSS of
    children is one maximum over all earlier ones: a warm run after a cold one would show the cold one's).
    `may_fail`: a failed run raises ChildFailed (measure) instead of ending the benchmark."""
    out = tempfile.mkdtemp(prefix="flopdiff-bench-")
    argv = [sys.executable, "-m", "tracer.diff", *args, "--out", out, "--quiet"]
    runs = [measure(argv, again=i > 0, may_fail=may_fail)[:2] for i in range(repeat)]
    walls = sorted(w for w, _ in runs)
    peak = max(p for _, p in runs)
    if repeat > 1:
        print(f"flopdiff runs: {', '.join(f'{w:.1f}' for w, _ in runs)} s (median in the table)", file=sys.stderr)
    if os.path.exists("/proc/self/smaps_rollup") and not may_fail:  # a long side is not run twice
        peak = peak_pss(argv, every=0.05) if own_memory else max(peak, peak_pss(argv))
    return statistics.median(walls), peak, json.dumps(totals(head(f"{out}/{report}")))


def compare(doc: str, title: str, flopdiff_args: list[str], baseline_code: str, baseline: str) -> None:
    """The command line of an end-to-end benchmark: flopdiff, then (unless --skip-real) its baseline."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--skip-real", action="store_true", help="skip FlopCounterMode on real random weights")
    parser.add_argument("--repeat", type=int, default=3, help="flopdiff runs (the table shows the median)")
    args = parser.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="flopdiff-bench-cache-")  # this benchmark's own trace cache, empty
    os.environ["FLOPDIFF_CACHE_DIR"] = cache_dir
    os.environ.pop("FLOPDIFF_CACHE", None)
    rows = [("flopdiff cold (fake weights, all stages + report)",
             *flopdiff([*flopdiff_args, "--no-cache"], repeat=args.repeat))]
    flopdiff(flopdiff_args)  # fills the cache (not in the table)
    rows.append(("flopdiff warm (the trace cache holds this workload)",
                 *flopdiff(flopdiff_args, repeat=args.repeat, own_memory=True)))
    if not args.skip_real:
        rows.append((baseline, *measure(snippet(baseline_code))))
    table(title, rows)


def table(title: str, rows: list[tuple[str, float, float, str]]) -> None:
    """rows: (run, wall s, peak GiB, FLOPs); the first row is flopdiff, a second one its baseline."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("run", "wall s", "peak memory GiB", "FLOPs per stage"):
        t.add_column(col)
    for name, wall, rss, counts in rows:
        t.add_row(name, f"{wall:.1f}", f"{rss:.2f}", counts)
    if len(rows) == 3:  # cold, warm, baseline
        for name, wall, rss, _ in rows[:2]:
            t.add_row(f"ratio baseline / flopdiff {name.split()[1]}", f"{rows[2][1] / wall:.1f}x",
                      f"{rows[2][2] / rss:.1f}x", "")
    Console(width=160).print(t)
