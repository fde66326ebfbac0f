"""`--ncu MODULE` (CUDA): hardware FLOPs from Nsight Compute for the kernels launched inside one module (e.g. one
decoder layer, `model.language_model.layers.1`), beside the formula FLOPs of the same launches.

flopdiff runs itself again under `ncu` with `--nvtx-module MODULE` (tracer.capture.instruments.NvtxRanges: an NVTX range
around each call of MODULE, and no profiler, since ncu owns CUPTI), which
`--nvtx-include` selects, so only that module's kernels are replayed. The program is the same, so the
kernels ncu profiled pair with the kernels flopdiff recorded under MODULE in launch order, by kernel name
(`align`: ncu sees no memsets or copies).

Metrics (Hopper, sm_90): tensor-core FLOPs `sm__ops_path_tensor_src_{bf16,fp16}_dst_fp32.sum` and
`sm__ops_path_tensor_src_tf32_dst_fp32.sum` (2 per multiply-add, every tile the kernel computes: padded rows of a
grouped GEMM, whole diagonal tiles of causal attention), and CUDA-core FLOPs from SASS thread instructions:
`smsp__sass_thread_inst_executed_op_ffma_pred_on.sum` (x2), `..._fadd_pred_on.sum`, `..._fmul_pred_on.sum`.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import shutil
import subprocess
import sys
from typing import Any

from tracer.capture.instruments import NVTX_RANGE
from tracer.core.errors import FlopdiffError
from tracer.core.lifecycle import scratch
from tracer.core.modulepaths import plain_path, under
from tracer.cuda.kernels import compute_kernels

TENSOR = ("sm__ops_path_tensor_src_bf16_dst_fp32.sum", "sm__ops_path_tensor_src_fp16_dst_fp32.sum",
          "sm__ops_path_tensor_src_tf32_dst_fp32.sum")
CUDA_CORE = {"smsp__sass_thread_inst_executed_op_ffma_pred_on.sum": 2,
             "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum": 1,
             "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum": 1}
METRICS = (*TENSOR, *CUDA_CORE)


def parse_csv(text: str) -> list[dict[str, Any]]:
    """`ncu --csv --page raw` -> one row per profiled kernel launch, in launch order:
    {kernel, tensor_flops, cuda_core_flops, hardware_flops}."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = []
    for r in csv.DictReader(io.StringIO("\n".join(lines))):
        if not r.get("ID", "").strip().isdigit():
            continue  # the units row
        num = lambda k: float((r.get(k) or "0").replace(",", "") or 0)  # noqa: E731
        tensor = sum(num(k) for k in TENSOR)
        core = sum(w * num(k) for k, w in CUDA_CORE.items())
        rows.append({"kernel": r["Kernel Name"], "tensor_flops": int(tensor), "cuda_core_flops": int(core),
                     "hardware_flops": int(tensor + core)})
    return rows


def module_launches(report: dict[str, Any], module: str) -> list[dict[str, Any]]:
    """The recorded kernel launches inside `module` (any call of it), in launch order, with their formula FLOPs
    (the node's FLOPs on its compute kernel, as in `tracer.cuda.kernels`)."""
    nodes = {n["id"]: n for n in report["nodes"]}
    out = []
    for r in report["kernel_records"]:
        scope = nodes[r["node"]]["module"] if r["node"] in nodes else (r["module"] or "")
        if under(plain_path(scope), module):
            out.append(r)
    return out


def kernel_key(name: str) -> str:
    """The kernel's own name, comparable between CUPTI (demangled, or mangled for CUTLASS) and ncu (demangled
    function): the last name component before template or call arguments."""
    if name.startswith("_ZN"):
        parts, i = [], 3
        while i < len(name) and name[i].isdigit():
            j = i
            while name[j].isdigit():
                j += 1
            n = int(name[i:j])
            parts.append(name[j:j + n])
            i = j + n
        return parts[-1] if parts else name
    base = name.removeprefix("void ").split("<")[0].split("(")[0]
    return base.rsplit("::", 1)[-1].strip()


def align(launches: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs (recorded launch, ncu row) in launch order, matched by kernel name: ncu profiles kernels only (no
    memsets or copies), and a library may pick another kernel in one run; those stay unpaired."""
    a = [kernel_key(r["kernel"]) for r in launches]
    b = [kernel_key(r["kernel"]) for r in rows]
    pairs = []
    for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        pairs += [(launches[m.a + k], rows[m.b + k]) for k in range(m.size)]
    return pairs


def join(report: dict[str, Any], module: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kernel name inside `module`: launches, hardware FLOPs, formula FLOPs, ratio."""
    launches = [r for r in module_launches(report, module) if not r["kernel"].startswith(("Memset", "Memcpy"))]
    pairs = align(launches, rows)
    flops = compute_kernels(report, report["kernel_records"])
    per: dict[str, dict[str, Any]] = {}
    index = {id(r): i for i, r in enumerate(report["kernel_records"])}
    for rec, hw in pairs:
        k = per.setdefault(rec["kernel"], {"kernel": rec["kernel"], "launches": 0, "hardware_flops": 0,
                                           "tensor_flops": 0, "cuda_core_flops": 0, "flops_full": 0})
        k["launches"] += 1
        for key in ("hardware_flops", "tensor_flops", "cuda_core_flops"):
            k[key] += hw[key]
        k["flops_full"] += flops.get(index[id(rec)], 0)
    kernels = sorted(per.values(), key=lambda k: -k["hardware_flops"])
    for k in kernels:
        k["ratio"] = round(k["tensor_flops"] / k["flops_full"], 4) if k["flops_full"] else None
    return {"module": module, "metrics": list(METRICS), "kernels": kernels, "profiled": len(rows),
            "recorded": len(launches), "paired": len(pairs)}


def run_ncu(argv: list[str], module: str) -> tuple[list[dict[str, Any]], str]:
    """flopdiff's own command line again, under ncu, profiling only kernels inside `module`: the parsed rows and
    ncu's raw CSV (written beside the report as ncu.csv)."""
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(ncu):
        raise FlopdiffError("--ncu: Nsight Compute (ncu) is not on PATH")
    child = _strip(_strip(argv, "--ncu"), "--graph")  # the child only needs to launch the same kernels
    with scratch("ncu") as tmp:
        child = _strip(child, "--out") + ["--out", os.path.join(tmp, "out"), "--quiet", "--nvtx-module", module]
        cmd = [ncu, "--csv", "--page", "raw", "--metrics", ",".join(METRICS), "--nvtx", "--nvtx-include",
               f"{NVTX_RANGE}/", "--target-processes", "all", "--clock-control", "none",
               sys.executable, "-m", "tracer.diff", *child]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise FlopdiffError(f"--ncu {module}: ncu failed (exit {proc.returncode}): {tail}")
    rows = parse_csv(proc.stdout)
    if not rows:
        raise FlopdiffError(f"--ncu {module}: ncu profiled no kernel inside {module} (is it a module path of this "
                            f"model? see report.json nodes[].module)")
    return rows, proc.stdout


def _strip(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out

