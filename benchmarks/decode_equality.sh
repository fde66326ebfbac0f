#!/usr/bin/env bash
# benchmarks/decode_equality.py on the lent GPU machine's CPUs (128 GiB: tracing 2,000 and 4,000 steps one by one
# fits there), each environment's wheels installed into a folder of its own first.
#   WHEELS_V1=DIR WHEELS_V2=DIR V1_DIR=DIR bash benchmarks/decode_equality.sh OUTDIR
set -uo pipefail
out=${1:?OUTDIR}
s1=$(mktemp -d) s2=$(mktemp -d)
trap 'rm -rf "$s1" "$s2"' EXIT
pip install -q --no-index --no-deps --no-compile --target "$s1" "$WHEELS_V1"/*.whl || exit 1
pip install -q --no-index --no-deps --no-compile --target "$s2" "$WHEELS_V2"/*.whl || exit 1
nproc; free -g | head -2
v1_dir=$(realpath "$V1_DIR") outdir=$(realpath -m "$out")
cd benchmarks && SITE_V1="$s1" SITE_V2="$s2" V1_DIR="$v1_dir" python decode_equality.py "$outdir" "${@:2}"
