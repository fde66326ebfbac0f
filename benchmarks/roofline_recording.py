"""A CUDA run's report.json cut down to what the CPU tests replay (tests/data/cuda): the card and its ceilings, the
kernel records (times, device start times, layers), the layers' columns, the decode nodes' storage records (the
roofline per decode step), the nodes the kernels belong to, the roofline and the Nsight Compute section as the run
computed them, and ncu's raw CSV where the run had one.

    python benchmarks/roofline_recording.py RUN_DIR OUT.json.gz "what this run was"
"""

from __future__ import annotations

import gzip
import json
import os
import sys

LAYER_FIELDS = ("stage", "id", "flops_full", "flops_analytic", "cuda_flops", "analytic_cuda_flops", "io_fused",
                "analytic_io_bytes")


def recording(run: str, what: str) -> dict:
    with open(os.path.join(run, "report.json")) as f:
        d = json.load(f)
    kernel_nodes = {r["node"] for r in d["kernel_records"] if r["node"]}
    nodes = []
    for n in d["nodes"]:
        decode_io = n["stage"] == "decode" and ("reads" in n or "writes" in n)
        if decode_io or n["id"] in kernel_nodes:
            keep = {k: n.get(k) for k in ("id", "stage", "step", "op", "module", "layer", "flops_full", "flops_torch",
                                          "status", "cuda_flops")}
            if decode_io:
                keep.update(reads=n.get("reads", []), writes=n.get("writes", []))
            nodes.append(keep)
    layers = [{**{k: r.get(k) for k in LAYER_FIELDS},
               "metrics": {"unfused": r.get("metrics", {}).get("unfused", {})}} for r in d["layers"]]
    rec = {"what": what, "model": d["model"], "workload": d["workload"], "device": d["device"],
           "stages": [{"name": s["name"], "outputs": s.get("outputs", [])} for s in d["stages"]],
           "layers": layers, "kernel_layers": d["kernel_layers"], "kernel_time": d["kernel_time"],
           "kernel_records": d["kernel_records"], "nodes": nodes, "roofline": d.get("roofline"), "ncu": d.get("ncu")}
    csv_path = os.path.join(run, "ncu.csv")
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            rec["ncu_csv"] = f.read()
    return rec


if __name__ == "__main__":
    run, out, what = sys.argv[1:4]
    with gzip.open(out, "wt") as f:
        json.dump(recording(run, what), f, separators=(",", ":"))
    print(f"{out}: {os.path.getsize(out):,} bytes")
