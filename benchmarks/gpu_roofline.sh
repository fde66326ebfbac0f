#!/usr/bin/env bash
# Issue 31 on the GPU machine, in one call: the card's measured ceilings (tracer.cuda.ceilings), the roofline per
# layer, stage and decode step of DeepSeek-OCR-2's default page and of DeepSeek-OCR's 1000x1400 page (real mode,
# kernel attribution, random bf16 weights, 10 decode steps, cache off), Nsight Compute on v2's
# model.language_model.layers.1 (bytes and FP32 counts per kernel and per layer), where v1's run spends its host time
# (cProfile), then benchmarks/bench_cuda_v1.sh (5 runs). Writes the recordings the CPU tests replay
# (benchmarks/roofline_recording.py) to OUTDIR.
#   WHEELS_V1=DIR WHEELS_V2=DIR V1_DIR=DIR bash benchmarks/gpu_roofline.sh OUTDIR
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FLOPDIFF_CACHE=off
s1=$(mktemp -d) s2=$(mktemp -d) runs=$(mktemp -d)
trap 'rm -rf "$s1" "$s2" "$runs"' EXIT
pip install -q --no-index --no-deps --no-compile --target "$s1" "$WHEELS_V1"/*.whl || exit 1
pip install -q --no-index --no-deps --no-compile --target "$s2" "$WHEELS_V2"/*.whl || exit 1
card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 | tr ' ' '-')
nvidia-smi -L
echo "== ceilings, measured twice (cache off)"
PYTHONPATH="$s2:$PWD" python -c "
import time
from tracer.cuda.ceilings import measure
for _ in range(2):
    t = time.perf_counter(); m = measure(); print(round(time.perf_counter() - t, 2), 's', {k: v for k, v in m.items() if k != 'how'})"
common=(--device cuda --mode real --decode-steps 10 --quiet --timings)
v1=(--model deepseek-ocr --vendor-dir "$V1_DIR" --trust-remote-code --image-shape 1000x1400 --text-tokens 9)
run() {  # name, site, flopdiff arguments...
  local name=$1 site=$2; shift 2
  local t0=$SECONDS
  PYTHONPATH="$site:$PWD" python -m tracer.diff "$@" --out "$runs/$name" > "$runs/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
  grep -A40 "where the time goes" "$runs/$name.log" | grep -v "^│ *│" | head -40
  grep -A60 "Nsight Compute inside" "$runs/$name.log" | head -60
  tail -1 "$runs/$name.log"
  python benchmarks/roofline_recording.py "$runs/$name" "$out/$name-$card.json.gz" "flopdiff $* on $card"
}
run v2-default "$s2" "${common[@]}"
run v2-ncu-layers1 "$s2" --device cuda --mode real --decode-steps 1 --quiet --timings --ncu model.language_model.layers.1
run v1-page "$s1" "${v1[@]}" "${common[@]}"
cp "$runs/v2-default/report.html" "$out/v2-default-report.html"
echo "== v1 page under cProfile (host time per function)"
PYTHONPATH="$s1:$PWD" python - "${v1[@]}" "${common[@]}" --out "$runs/prof" <<'PY' > "$out/v1-profile.txt" 2>&1
import cProfile, pstats, sys
from tracer.cli import main
prof = cProfile.Profile()
prof.runcall(main, sys.argv[1:])
stats = pstats.Stats(prof)
stats.sort_stats("cumulative").print_stats(60)
stats.sort_stats("tottime").print_stats(40)
PY
echo "== bench_cuda_v1.sh, 5 runs"
WHEELS_V1="$WHEELS_V1" V1_DIR="$V1_DIR" bash benchmarks/bench_cuda_v1.sh "$runs/bench" 5
