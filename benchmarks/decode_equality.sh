#!/usr/bin/env bash
# benchmarks/decode_equality.py on the lent GPU machine's CPUs (128 GiB, 16 cores: both models at once), each
# environment's wheels installed into a folder of its own first. Its 600 s per command is short of v2's 4,000 steps
# traced one by one there (killed at 530 s, no bytecode cache): `--only v1` there, v2 on a machine of your own.
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
