#!/usr/bin/env bash
# The CUDA paths after a change to the capture's instruments (run on the GPU machine, v2 wheels as in
# check_gpu_fake_mode.sh): real mode with kernel attribution (tracer.capture.instruments.ProfilerRanges) and --ncu on one
# decoder layer (NvtxRanges in the child run). Prints exit codes, kernel totals and the ncu pairing.
#   WHEELS_V2=DIR bash benchmarks/check_cuda_paths.sh OUTDIR
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
site=$(mktemp -d)
pip install -q --no-deps --no-build-isolation --target "$site" "$WHEELS_V2"/* >/dev/null 2>&1
export PYTHONPATH="$site:$PWD"
args=(--image-shape 640x640 --text-tokens 4 --json-nodes flops --quiet --timings)
for run in "kernels --device cuda --mode real --decode-steps 2" \
           "ncu --device cuda --mode real --decode-steps 1 --ncu model.language_model.layers.1"; do
  set -- $run; name=$1; shift
  t0=$SECONDS
  python -m tracer.diff "${args[@]}" --out "$out/$name" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
  python - "$out/$name/report.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print({s["name"]: (s["flops_torch"], s["flops_full"], s["gap"]) for s in d["stages"]})
k = d.get("kernel_time", {})
print("kernel_time", k, "layers unnamed:", [r["layer"] for r in d.get("kernel_layers", []) if r["layer"].startswith("(module")])
if d.get("ncu"):
    n = d["ncu"]; print("ncu paired", n["paired"], "of", n["profiled"], "profiled /", n["recorded"], "recorded")
PY
done
