"""`--ncu MODULE` (CUDA): hardware FLOPs from Nsight Compute for the kernels launched inside one module (e.g. one
decoder layer, `model.language_model.layers.1`), beside the formula FLOPs of the same launches.

flopdiff runs itself again under `ncu` with `--nvtx-module MODULE` (tracer.capture.instruments.NvtxRanges: an NVTX range
around each call of MODULE, and no profiler, since ncu owns CUPTI), which
`--nvtx-include` selects, so only that module's kernels are replayed. The program is the same, so the
kernels ncu profiled pair with the kernels flopdiff recorded under MODULE in launch order, by kernel name
(`align`: ncu sees no memsets or copies).

Metrics (Hopper, sm_90), per kernel launch (`METRICS`, read in base units: `--print-units base`):
  * tensor-core FLOPs `sm__ops_path_tensor_src_{bf16,fp16}_dst_fp32.sum` and `sm__ops_path_tensor_src_tf32_dst_fp32.sum`
    (2 per multiply-add, every tile the kernel computes: padded rows of a grouped GEMM, whole diagonal tiles of causal
    attention);
  * CUDA-core FLOPs from SASS thread instructions, fp32: `smsp__sass_thread_inst_executed_op_ffma_pred_on.sum` (x2),
    `..._fadd_pred_on.sum`, `..._fmul_pred_on.sum`; fp16: `..._hfma_pred_on.sum` (x2), `..._hadd_pred_on.sum`,
    `..._hmul_pred_on.sum` (an instruction per thread, as Nsight Compute's own roofline counts them: a packed HFMA2
    counts as one);
  * DRAM bytes `dram__bytes_read.sum` and `dram__bytes_write.sum`, L2 bytes `lts__t_bytes.sum` (every request the L2
    served, hits and misses), and the kernel's duration `gpu__time_duration.sum`.

What the bytes mean: ncu replays each kernel with its caches flushed first (`--cache-control all`, the default), so a
kernel's DRAM reads are everything it reads, as if nothing it needs were in L2: a kernel reading what the kernel
before it wrote reads it from DRAM here, where the real run often hits L2. Per kernel, DRAM bytes then sit between
the trace's fused and unfused I/O (every op's inputs and outputs); a layer's are set beside both
(`layers`: the analytic layer of each paired launch, with the layer's traced and analytic columns). Copies and
memsets are not kernels to ncu: their bytes are in the trace's I/O, not in the DRAM counts.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Any

from tracer.capture.instruments import NVTX_RANGE
from tracer.core.errors import FlopdiffError
from tracer.core.lifecycle import scratch
from tracer.core.modulepaths import plain_path, under
from tracer.cuda.kernels import compute_kernels

TENSOR = ("sm__ops_path_tensor_src_bf16_dst_fp32.sum", "sm__ops_path_tensor_src_fp16_dst_fp32.sum",
          "sm__ops_path_tensor_src_tf32_dst_fp32.sum")
_SASS = "smsp__sass_thread_inst_executed_op_{}_pred_on.sum"
FP32 = {_SASS.format("ffma"): 2, _SASS.format("fadd"): 1, _SASS.format("fmul"): 1}
FP16 = {_SASS.format("hfma"): 2, _SASS.format("hadd"): 1, _SASS.format("hmul"): 1}
#: the other counters, by the field they fill (a recording made before them has none: its fields are None)
COUNTERS = {"dram_read_bytes": "dram__bytes_read.sum", "dram_write_bytes": "dram__bytes_write.sum",
            "l2_bytes": "lts__t_bytes.sum", "duration_ns": "gpu__time_duration.sum"}
METRICS = (*TENSOR, *FP32, *FP16, *COUNTERS.values())
#: ncu's unit names -> base units (a CSV printed without `--print-units base` scales them)
UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12, "ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9,
         "nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}
SUMMED = ("hardware_flops", "tensor_flops", "cuda_core_flops", "fp16_flops", *COUNTERS)


def parse_csv(text: str) -> list[dict[str, Any]]:
    """`ncu --csv --page raw` -> one row per profiled kernel launch, in launch order: {kernel, tensor_flops,
    cuda_core_flops (fp32), fp16_flops, hardware_flops, dram_read_bytes, dram_write_bytes, l2_bytes, duration_ns}
    (None for a counter the CSV lacks)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    table = list(csv.DictReader(io.StringIO("\n".join(lines))))
    units = next((r for r in table if not r.get("ID", "").strip().isdigit()), {})  # the units row
    rows = []
    for r in table:
        if not r.get("ID", "").strip().isdigit():
            continue

        def num(k: str) -> float | None:
            if k not in r:
                return None
            return float((r[k] or "0").replace(",", "") or 0) * UNITS.get((units.get(k) or "").strip(), 1)

        tensor = sum(num(k) or 0 for k in TENSOR)
        fp32 = sum(w * (num(k) or 0) for k, w in FP32.items())
        fp16 = sum(w * (num(k) or 0) for k, w in FP16.items())
        counters = {field: num(metric) for field, metric in COUNTERS.items()}
        rows.append({"kernel": r["Kernel Name"], "tensor_flops": int(tensor), "cuda_core_flops": int(fp32),
                     "fp16_flops": int(fp16), "hardware_flops": int(tensor + fp32 + fp16),
                     **{k: None if v is None else int(v) for k, v in counters.items()}})
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
    """Per kernel name inside `module`: launches, hardware FLOPs, formula FLOPs, ratio; per analytic layer (the
    layer tracer.cuda.kernels gave each launch): the hardware's bytes and CUDA-core FLOPs beside the trace's and the
    analytic model's (`layers`)."""
    launches = [r for r in module_launches(report, module) if not r["kernel"].startswith(("Memset", "Memcpy"))]
    pairs = align(launches, rows)
    flops = compute_kernels(report, report["kernel_records"])
    per: dict[str, dict[str, Any]] = {}
    index = {id(r): i for i, r in enumerate(report["kernel_records"])}
    for rec, hw in pairs:
        k = per.setdefault(rec["kernel"], {"kernel": rec["kernel"], "launches": 0, "flops_full": 0,
                                           **{key: 0 for key in SUMMED}})
        k["launches"] += 1
        for key in SUMMED:
            k[key] = None if hw[key] is None or k[key] is None else k[key] + hw[key]
        k["flops_full"] += flops.get(index[id(rec)], 0)
    kernels = sorted(per.values(), key=lambda k: -k["hardware_flops"])
    for k in kernels:
        k["ratio"] = round(k["tensor_flops"] / k["flops_full"], 4) if k["flops_full"] else None
    return {"module": module, "metrics": list(METRICS), "kernels": kernels, "profiled": len(rows),
            "recorded": len(launches), "paired": len(pairs), "layers": _layers(report, launches, pairs)}


def _layers(report: dict[str, Any], launches: list[dict[str, Any]],
            pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (stage, layer) of the paired launches: the hardware's DRAM and L2 bytes and CUDA-core FLOPs, the layer's
    traced fused and unfused I/O and CUDA-core FLOPs and the analytic model's, and their ratios. `complete`: every
    kernel launch of the layer in that stage was paired (else the hardware saw part of it: ratios are None)."""
    if not pairs or "layer" not in pairs[0][0] or pairs[0][1]["dram_read_bytes"] is None:
        return []  # a recording from before the per-launch layers or the byte counters
    rows = {(r["stage"], r["id"]): r for r in report.get("layers", [])}
    everywhere: dict[tuple[str, str], int] = defaultdict(int)
    for r in report["kernel_records"]:
        if not r["kernel"].startswith(("Memset", "Memcpy")):
            everywhere[(r["stage"], r["layer"])] += 1
    hw: dict[tuple[str, str], dict[str, int]] = {}
    for rec, row in pairs:
        h = hw.setdefault((rec["stage"], rec["layer"]), {"paired": 0, "dram_bytes": 0, "l2_bytes": 0,
                                                         "cuda_core_flops": 0, "fp16_flops": 0, "duration_ns": 0})
        h["paired"] += 1
        h["dram_bytes"] += row["dram_read_bytes"] + row["dram_write_bytes"]
        for key in ("l2_bytes", "cuda_core_flops", "fp16_flops", "duration_ns"):
            h[key] += row[key]
    out = []
    for (stage, layer), h in hw.items():
        lay = rows.get((stage, layer), {})
        traced = {"io_fused": lay.get("io_fused"), "io_unfused": lay.get("metrics", {}).get("unfused", {}).get("traced"),
                  "cuda_flops": lay.get("cuda_flops")}
        analytic = {"io_bytes": lay.get("analytic_io_bytes"), "cuda_flops": lay.get("analytic_cuda_flops")}
        complete = h["paired"] == everywhere[(stage, layer)]
        ratio = lambda a, b: round(a / b, 4) if complete and a is not None and b else None  # noqa: E731
        out.append({"stage": stage, "layer": layer, "launches": everywhere[(stage, layer)], **h, "complete": complete,
                    "traced": traced, "analytic": analytic,
                    "dram_vs_fused": ratio(h["dram_bytes"], traced["io_fused"]),
                    "dram_vs_unfused": ratio(h["dram_bytes"], traced["io_unfused"]),
                    "dram_vs_analytic": ratio(h["dram_bytes"], analytic["io_bytes"]),
                    "cuda_core_vs_traced": ratio(h["cuda_core_flops"] + h["fp16_flops"], traced["cuda_flops"]),
                    "cuda_core_vs_analytic": ratio(h["cuda_core_flops"] + h["fp16_flops"], analytic["cuda_flops"])})
    out.sort(key=lambda r: (r["stage"], -r["dram_bytes"]))
    return out


def run_ncu(argv: list[str], module: str) -> tuple[list[dict[str, Any]], str]:
    """flopdiff's own command line again, under ncu, profiling only kernels inside `module`: the parsed rows and
    ncu's raw CSV (written beside the report as ncu.csv)."""
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(ncu):
        raise FlopdiffError("--ncu: Nsight Compute (ncu) is not on PATH")
    child = _strip(_strip(argv, "--ncu"), "--graph")  # the child only needs to launch the same kernels
    with scratch("ncu") as tmp:
        child = _strip(child, "--out") + ["--out", os.path.join(tmp, "out"), "--quiet", "--nvtx-module", module]
        cmd = [ncu, "--csv", "--page", "raw", "--print-units", "base", "--metrics", ",".join(METRICS), "--nvtx",
               "--nvtx-include",
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

