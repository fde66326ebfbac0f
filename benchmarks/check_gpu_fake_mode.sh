#!/usr/bin/env bash
# Fake mode on a machine with a GPU must write the report a CPU-only machine writes (issue 12).
# Runs v2 (default config) and v1 (its remote code) twice each on one machine, GPU visible and hidden
# (CUDA_VISIBLE_DEVICES=), and compares the report.json bytes.
#   WHEELS_V2=DIR WHEELS_V1=DIR V1_DIR=DIR bash benchmarks/check_gpu_fake_mode.sh OUTDIR
# WHEELS_*: folders of wheels for the two environments (v2: transformers 5.x, omegaconf, antlr4;
# v1: transformers 4.46.3, tokenizers 0.20.3, huggingface_hub 0.36.2, addict, easydict, omegaconf, antlr4),
# installed with --target into scratch folders and put first on PYTHONPATH.
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
env_of() {  # $1 wheel folder -> an installed --target folder
  local t; t=$(mktemp -d)
  pip install -q --no-deps --no-build-isolation --target "$t" "$1"/* >/dev/null 2>&1 || echo "install from $1 failed" >&2
  echo "$t"
}
v2=$(env_of "$WHEELS_V2"); v1=$(env_of "$WHEELS_V1")
run() {  # $1 name, $2 site folder, $3 CUDA_VISIBLE_DEVICES value or "visible", rest: flopdiff args
  local name=$1 site=$2 vis=$3; shift 3
  local t0=$SECONDS
  if [ "$vis" = visible ]; then
    PYTHONPATH="$site:$PWD" python -m tracer.diff --quiet --out "$out/$name" "$@" >"$out/$name.log" 2>&1
  else
    CUDA_VISIBLE_DEVICES= PYTHONPATH="$site:$PWD" python -m tracer.diff --quiet --out "$out/$name" "$@" >"$out/$name.log" 2>&1
  fi
  echo "$name: exit $? in $((SECONDS - t0)) s; $(sha256sum "$out/$name/report.json" 2>/dev/null | cut -c1-16)"
}
nvidia-smi -L
v2args=(--image-shape 1000x1400 --text-tokens 9 --decode-steps 10)
v1args=(--model deepseek-ocr --vendor-dir "$V1_DIR" --trust-remote-code --image-shape 1000x1400 --text-tokens 9 --decode-steps 10)
run v2-gpu "$v2" visible "${v2args[@]}"
run v2-cpu "$v2" "" "${v2args[@]}"
run v1-gpu "$v1" visible "${v1args[@]}"
run v1-cpu "$v1" "" "${v1args[@]}"
for m in v1 v2; do
  if cmp -s "$out/$m-gpu/report.json" "$out/$m-cpu/report.json"; then echo "$m: report.json byte-identical"
  else echo "$m: report.json DIFFERS"; tail -3 "$out/$m-gpu.log"; fi
done
PYTHONPATH="$v1:$PWD" python - "$out/v1-gpu/report.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print({s["name"]: (s["flops_torch"], s["flops_full"], s["gap"]) for s in d["stages"]})
PY
