#!/usr/bin/env bash
# DeepSeek-OCR (v1) on a CUDA machine, real mode with kernel attribution, the 1000x1400 page (9 text tokens, 10
# decode steps), end to end (load included), run as a user runs it, RUNS times; then twice more with Python's
# bytecode cache in a scratch folder (PYTHONPYCACHEPREFIX), for machines that set PYTHONDONTWRITEBYTECODE (the
# lent H200 does: every import compiles torch's sources again, seconds of each run). Target (issue 16): <= 20 s.
#   WHEELS_V1=DIR V1_DIR=DIR bash benchmarks/bench_cuda_v1.sh OUTDIR [RUNS]
# WHEELS_V1: wheels of the v1 environment (transformers 4.46.3, tokenizers 0.20.3, huggingface_hub 0.36.2, addict,
# easydict, omegaconf, antlr4), installed with --target into a scratch folder put first on PYTHONPATH.
set -uo pipefail
out=${1:?OUTDIR}
runs=${2:-3}
mkdir -p "$out"
site=$(mktemp -d)
pycache=$(mktemp -d)
trap 'rm -rf "$site" "$pycache"' EXIT
pip install -q --no-deps --no-build-isolation --target "$site" "$WHEELS_V1"/* >/dev/null 2>&1 || echo "install failed" >&2
export PYTHONPATH="$site:$PWD"
args=(--model deepseek-ocr --vendor-dir "$V1_DIR" --trust-remote-code --image-shape 1000x1400 --text-tokens 9
      --decode-steps 10 --device cuda --mode real --json-nodes flops --quiet --timings --no-cache)
nvidia-smi -L
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}"
one() {  # $1 run name, rest: environment assignments
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  env "$@" python -m tracer.diff "${args[@]}" --out "$out/$name" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(python -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
  grep "seconds per phase" "$out/$name.log"
}
for i in $(seq 1 "$runs"); do one "run$i"; done
one bytecode-first PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX="$pycache"
one bytecode-cached PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX="$pycache"
python -c "import json,sys; d=json.load(open(sys.argv[1])); print({s['name']: (s['flops_torch'], s['flops_full'], s['gap']) for s in d['stages']}); print('kernel_time', d.get('kernel_time'))" "$out/run1/report.json"
