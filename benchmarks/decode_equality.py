"""Issue 29's end-to-end check at the full lengths: DeepSeek-OCR's 1000x1400 page (9 text tokens) with 2,000
decode steps and DeepSeek-OCR-2's default page with 4,000, each in closed form and with `--every-step --allow-long`,
cold; the two every-step runs at once (each forks its decode worker; measured on the project's 2-core box: 7.1 and
9.3 GiB peak, so one at a time there: `--only`). Prints each run's wall time, peak RSS and exit, then whether closed
form = every step in every column of every stage and every layer row, and writes the numbers to
OUTDIR/decode-equality.json.

    SITE_V1=DIR SITE_V2=DIR V1_DIR=DIR python benchmarks/decode_equality.py OUTDIR [--limit S] [--only v1|v2]
(SITE_*: the folders holding each environment's packages, put first on PYTHONPATH; an empty folder where the running
environment has them.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench_decode import COLUMNS
from harness import head

LAYER_COLUMNS = ("flops_torch", "flops_full", "flops_analytic", "cuda_flops", "bytes_read", "bytes_written",
                 "weight_bytes", "io_fused", "kv_bytes", "analytic_cuda_flops", "analytic_io_bytes",
                 "analytic_weight_bytes", "analytic_kv_bytes")


def runs(v1_steps: int, v2_steps: int, only: str | None) -> dict[str, tuple[str, list[str]]]:
    got = {}
    if only in (None, "v1"):
        got["v1"] = (os.environ["SITE_V1"], ["--model", "deepseek-ocr", "--vendor-dir", os.environ["V1_DIR"],
                                             "--trust-remote-code", "--image-shape", "1000x1400", "--text-tokens", "9",
                                             "--decode-steps", str(v1_steps)])
    if only in (None, "v2"):
        got["v2"] = (os.environ["SITE_V2"], ["--decode-steps", str(v2_steps)])
    return got


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(site: str, argv: list[str], out: str) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, ROOT]), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "tracer.diff", *argv, "--no-cache", "--quiet", "--json-nodes", "flops", "--out", out]
    err = open(f"{out}.stderr", "w")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err), time.time()


def finish(proc: subprocess.Popen, t0: float, limit: float) -> dict:
    """Wait (killed `limit` s after its start) and reap with the child's own rusage: its peak RSS, not the kernel's
    maximum over every child."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.time() - t0 > limit:
            proc.kill()
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    with open(f"{proc.args[-1]}.stderr") as f:
        err = f.read().strip().splitlines()
    return {"exit": proc.returncode, "wall_s": round(time.time() - t0, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "last_line": err[-1] if err else ""}


def columns(doc: dict) -> tuple[dict, dict]:
    stages = {s["name"]: [s.get(c) for c in COLUMNS] for s in doc["stages"]}
    layers = {f"{x['stage']}:{x['id']}": [x.get(c) for c in LAYER_COLUMNS] for x in doc["layers"]}
    return stages, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--limit", type=float, default=540, help="seconds an every-step run may take")
    parser.add_argument("--v1-steps", type=int, default=2000)
    parser.add_argument("--v2-steps", type=int, default=4000)
    parser.add_argument("--only", choices=("v1", "v2"))
    args = parser.parse_args()
    todo = runs(args.v1_steps, args.v2_steps, args.only)
    os.environ["FLOPDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="flopdiff-equality-cache-")
    work = tempfile.mkdtemp(prefix="flopdiff-equality-")
    try:
        compare(todo, work, args)
    finally:  # the reports are gigabytes: the numbers are in OUTDIR
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.environ["FLOPDIFF_CACHE_DIR"], ignore_errors=True)


def compare(todo: dict[str, tuple[str, list[str]]], work: str, args: argparse.Namespace) -> None:
    result: dict = {}
    for name, (site, argv) in todo.items():  # the closed forms one after the other (seconds each)
        proc, t0 = start(site, argv, f"{work}/{name}-closed")
        result[f"{name} closed form"] = finish(proc, t0, 300)
    every = {name: start(site, [*argv, "--every-step", "--allow-long"], f"{work}/{name}-every")
             for name, (site, argv) in todo.items()}
    for name, (proc, t0) in every.items():
        result[f"{name} every step"] = finish(proc, t0, args.limit)
    for name, info in result.items():
        print(f"{name}: exit {info['exit']}, {info['wall_s']} s, peak RSS {info['peak_rss_gib']} GiB; {info['last_line']}")
    verdicts = {}
    for name in todo:
        closed, everyone = f"{work}/{name}-closed/report.json", f"{work}/{name}-every/report.json"
        if not (os.path.exists(closed) and os.path.exists(everyone)):
            verdicts[name] = "not compared: a side did not finish"
            continue
        (cs, cl), (es, el) = columns(head(closed)), columns(head(everyone))
        differ = [k for k in cl.keys() | el.keys() if cl.get(k) != el.get(k)]
        verdicts[name] = {"stages_equal": cs == es, "layer_rows": len(cl), "layer_rows_differing": len(differ),
                          "first_differing": sorted(differ)[:5], "stages": cs}
        print(f"{name}: closed form = every step, every column of every stage: {cs == es}; layer rows {len(cl)}, "
              f"differing {len(differ)} {sorted(differ)[:5]}")
        print(f"  stages ({', '.join(COLUMNS)}): {json.dumps(cs)}")
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "decode-equality.json"), "w") as f:
        json.dump({"runs": result, "verdicts": verdicts}, f, indent=1)


if __name__ == "__main__":
    main()
