"""The card's ceilings, the roofs a roofline is drawn under: the datasheet's dense peaks (`DATASHEETS`, by the name
torch reports) and the ones this card reaches (`measure`), both kept in the report; the roofline uses the measured
ones where it has them, and says which.

Why both: a datasheet's tensor peak assumes the boost clock (1,830 MHz on H100/H200, below the 1,980 MHz maximum
nvidia-smi reports) and its bandwidth is the HBM's raw rate; what a kernel can reach is lower (a bf16 GEMM on the
lent H100 SXM: 809 of 989.5 TFLOP/s; a device-to-device copy: 3,030 of 3,350 GB/s), and a layer is only as far
from its roof as the roof it can reach.

Measured (`measure`, about a second, cached per card, driver and torch version under the trace cache's folder;
`--no-cache` / `FLOPDIFF_CACHE=off` measure again and keep nothing):
  * tensor: an 8192^3 bf16 GEMM (`torch.mm`), 2 m n k FLOPs per launch, the best of three timings of 10 launches;
  * fp32 (CUDA cores): an 8192^3 fp32 GEMM with TF32 off (cuBLAS's SGEMM: FFMA on the CUDA cores). An elementwise
    kernel would measure memory, not arithmetic: at 2 FLOPs per 8 bytes no fp32 kernel streaming HBM gets near
    the FP32 roof;
  * HBM: a device-to-device copy of 1 GiB (`Tensor.copy_`), 2 bytes moved per byte copied;
  * launch: the host's time per launch of a tiny kernel (`add_` on one element, 5,000 in a row, synchronised): a
    step of N launches cannot take less than N times this on the host, whatever its kernels take (a decode step that
    is launch-bound: tracer.cuda.roofline).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from typing import Any

from tracer.core import cache

#: dense peaks (no sparsity) from NVIDIA's datasheets, by the device name torch.cuda reports
DATASHEETS: dict[str, dict[str, Any]] = {
    "NVIDIA H200": {"bf16_tflops": 989.5, "fp32_tflops": 67.0, "hbm_gbps": 4800.0,
                    "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity, FP32 "
                              "67 TFLOPS, HBM3e 4.8 TB/s"},
    "NVIDIA H100 80GB HBM3": {"bf16_tflops": 989.5, "fp32_tflops": 67.0, "hbm_gbps": 3350.0,
                              "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity, "
                                        "FP32 67 TFLOPS, HBM3 3.35 TB/s"},
    "NVIDIA H100 PCIe": {"bf16_tflops": 756.5, "fp32_tflops": 51.0, "hbm_gbps": 2000.0,
                         "source": "NVIDIA H100 Tensor Core GPU datasheet (PCIe): BF16 1,513 TFLOPS with sparsity, "
                                   "FP32 51 TFLOPS, HBM2e 2 TB/s"},
    "NVIDIA A100-SXM4-80GB": {"bf16_tflops": 312.0, "fp32_tflops": 19.5, "hbm_gbps": 2039.0,
                              "source": "NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): BF16 312 TFLOPS, FP32 "
                                        "19.5 TFLOPS, HBM2e 2,039 GB/s"},
}
PEAKS = ("bf16_tflops", "fp32_tflops", "hbm_gbps")
MEASURED_HOW = {"bf16_tflops": "8192^3 bf16 torch.mm", "fp32_tflops": "8192^3 fp32 torch.mm, TF32 off (SGEMM)",
                "hbm_gbps": "1 GiB device-to-device copy_ (read + write)",
                "launch_us": "host time per add_ on one element, 5,000 in a row"}
FORMAT = 1


def ceilings(device: dict[str, Any] | None) -> dict[str, Any] | None:
    """The roofs of `device` (report.json's `device`): the peaks used at the top level (`bf16_tflops`,
    `fp32_tflops`, `hbm_gbps`, `launch_us`), `used` = "measured" or "datasheet", and both sets beside them; None
    for a card with neither (the roofline is then left out)."""
    device = device or {}
    sheet, measured = DATASHEETS.get(device.get("name", "")), device.get("measured_ceilings")
    used = measured or sheet
    if used is None:
        return None
    return {"name": device["name"], **{k: used[k] for k in PEAKS}, "launch_us": (measured or {}).get("launch_us"),
            "used": "measured" if measured else "datasheet", "datasheet": sheet, "measured": measured}


def measure() -> dict[str, Any]:
    """This card's ceilings (the module's docstring says how), on CUDA device 0."""
    import torch

    def best(fn, launches: int) -> float:  # seconds per launch, the best of three timings
        fn()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(launches):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / launches)
        return min(times)

    def gemm(dtype, launches: int) -> float:  # TFLOP/s of an n^3 GEMM; its tensors freed on return
        n = 8192
        x, y = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        return 2 * n**3 / best(lambda: torch.mm(x, y), launches) / 1e12

    def copy() -> float:  # GB/s of a 1 GiB device-to-device copy, read + write
        src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        return 2 * src.numel() / best(lambda: dst.copy_(src), 10) / 1e9

    def launch() -> float:  # host microseconds per launch of a one-element kernel, the best of three
        one, times = torch.zeros(1, device="cuda"), []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5000):
                one.add_(1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / 5000 * 1e6)
        return min(times)

    bf16 = gemm(torch.bfloat16, 10)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = gemm(torch.float32, 3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    hbm, host = copy(), launch()
    torch.cuda.empty_cache()
    return {"bf16_tflops": round(bf16, 1), "fp32_tflops": round(fp32, 1), "hbm_gbps": round(hbm, 0),
            "launch_us": round(host, 2), "how": MEASURED_HOW}


def measured(name: str, driver: str, use_cache: bool) -> dict[str, Any] | None:
    """`measure()` for this card, read from the cache where an earlier run measured the same card, driver and torch
    (and written there after measuring), unless `use_cache` is off; None where the card could not run it (its
    memory taken: the roofline then stands on the datasheet, and says so)."""
    import torch

    key = hashlib.sha256(json.dumps([FORMAT, name, driver, torch.__version__]).encode()).hexdigest()[:32]
    path = os.path.join(cache.folder(), "ceilings", f"{key}.json")
    if use_cache:
        try:
            with open(path) as f:
                return {**json.load(f), "cached": True}
        except (OSError, ValueError):
            pass
    try:
        found = {**measure(), "driver": driver}
    except RuntimeError:  # torch.cuda.OutOfMemoryError among them: 2.5 GiB free is all it needs
        return None
    if use_cache:
        tmp = None
        try:  # written whole or not at all: a temporary file renamed into place
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(found, f)
            os.replace(tmp, path)
            tmp = None
        except OSError:
            pass  # an unwritable cache folder: measured again next time
        finally:
            if tmp is not None:
                os.unlink(tmp)
    return {**found, "cached": False}


def driver_version() -> str:
    """The NVIDIA driver's version (nvidia-smi), "" where it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
