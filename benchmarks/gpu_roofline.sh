#!/usr/bin/env bash
# The roofline per layer on the GPU machine (tracer.cuda.roofline): DeepSeek-OCR-2's default page in real mode with
# kernel attribution (random bf16 weights), cache off; prints the ceilings, each stage's kernel time against its bound
# and the ten layers that lose the most time. v2 wheels as in check_cuda_paths.sh.
#   WHEELS_V2=DIR bash benchmarks/gpu_roofline.sh OUTDIR [flopdiff flags...]
set -uo pipefail
out=${1:?OUTDIR}; shift
mkdir -p "$out"
site=$(mktemp -d)
pip install -q --no-deps --no-build-isolation --target "$site" "$WHEELS_V2"/* >/dev/null 2>&1
export PYTHONPATH="$site:$PWD" FLOPDIFF_CACHE=off
t0=$SECONDS
python -m tracer.diff --device cuda --mode real --decode-steps 2 --json-nodes flops --quiet --out "$out/run" "$@" \
  > "$out/run.log" 2>&1
echo "exit $? in $((SECONDS - t0)) s"
python - "$out/run/report.json" "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d["roofline"]
print("device", d["device"]["name"], "ceilings", {k: r["ceilings"][k] for k in ("bf16_tflops", "fp32_tflops", "hbm_gbps", "used")})
print("kernel time attributed", d["kernel_time"]["attributed_pct"], "% of", d["kernel_time"]["total_us"], "us")
for s in r["stages"]:
    print("stage", s["stage"], "kernel", s["time_us"], "us; bound traced", s["bound_us"]["traced"], "analytic",
          s["bound_us"]["analytic"], "; efficiency", s["efficiency"], "; lost", s["lost_us"], "us")
for x in r["layers"][:10]:
    print("  ", x["stage"], x["layer"], x["time_us"], "us bound", x["bound_us"], x["roof"], "eff", x["efficiency"],
          "FLOP/B", x["intensity"], "lost", x["lost_us"])
roofs = {}
for x in r["layers"]:
    roofs[(x["stage"], x["roof"])] = roofs.get((x["stage"], x["roof"]), 0) + 1
print("layers per roof", roofs)
# the recording CPU tests replay (tests/data/cuda): what the roofline is computed from, and what it gave
keep = ("id", "stage", "flops_full", "flops_analytic", "cuda_flops", "io_fused", "analytic_cuda_flops", "analytic_io_bytes")
rec = {"what": f"flopdiff {' '.join(sys.argv[2:])} on {d['device']['name']}: kernel time per layer, the layers' columns, "
               "the roofline it gave", "model": d["model"], "workload": d["workload"], "device": d["device"],
       "kernel_layers": d["kernel_layers"], "layers": [{k: l.get(k) for k in keep} for l in d["layers"]],
       "roofline": r}
import gzip, os
with gzip.open(os.path.join(os.path.dirname(sys.argv[1]), "..", "roofline-recording.json.gz"), "wt") as f:
    json.dump(rec, f, separators=(",", ":"))
PY
