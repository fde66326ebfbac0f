#!/usr/bin/env bash
# Regenerates the curated examples in reports/: the 1000x1400 page, 9 text tokens, 2 decode steps, against
# the vendor-exact (aligned) and the seed's naive analytic model. report.json keeps the FLOP-bearing nodes.
#   reports/regenerate.sh                      # DeepSeek-OCR-2 (this environment)
#   V1_PYTHON=.venv-v1/bin/python FLOPDIFF_DSOCR_V1_DIR=DIR reports/regenerate.sh   # also DeepSeek-OCR v1
# v1 examples carry module names and file:line references only, no vendor source text.
set -euo pipefail
cd "$(dirname "$0")/.."
run() {  # python model name preset [extra flags]
  local py=$1 model=$2 name=$3 preset=$4; shift 4
  local out=reports/$name-$preset
  # flopdiff replaces its output folder as a whole and refuses one holding other files: the summary goes in after
  rm -f "$out/summary.txt" "$out/report.json.gz"
  "$py" -m tracer.diff --model "$model" --image-shape 1000x1400 --text-tokens 9 --decode-steps 2 \
      --analytic "$preset" --json-nodes flops --model-explorer --quiet --out "$out" "$@" > "$out.summary.txt" || [ $? = 1 ]
  mv "$out.summary.txt" "$out/summary.txt"
  # v2's report.json (over 2 MiB) is kept compressed; tests/test_reports.py reads either
  if [ "$model" = deepseek-ocr-2 ]; then gzip -n -9 -f "$out/report.json"; fi
}
v1=0
if [ -n "${V1_PYTHON:-}" ] && [ -n "${FLOPDIFF_DSOCR_V1_DIR:-}" ]; then v1=1; fi
for preset in aligned seed-naive; do
  run .venv/bin/python deepseek-ocr-2 v2 "$preset"
  if [ $v1 = 1 ]; then
    run "$V1_PYTHON" deepseek-ocr v1 "$preset" --vendor-dir "$FLOPDIFF_DSOCR_V1_DIR" --trust-remote-code
  fi
done
# the seed's own configuration: v1's decoder on flash_attention_2 (flash-attn absent: flopdiff's stand-in)
if [ $v1 = 1 ]; then
  run "$V1_PYTHON" deepseek-ocr v1-fa2 aligned --vendor-dir "$FLOPDIFF_DSOCR_V1_DIR" --trust-remote-code \
      --attn flash_attention_2
fi
# the versions that made them: tests/test_reports.py holds them byte-identical under these versions, and equal but for
# the vendor's line numbers (`.py:183`) under others (a new transformers moves its lines)
made_with() {  # model python
  "$2" - "$1" <<'PY'
import json, sys, torch, transformers
path = "reports/made-with.json"
try:
    known = json.load(open(path))
except FileNotFoundError:
    known = {}
known[sys.argv[1]] = {"torch": torch.__version__, "transformers": transformers.__version__}
open(path, "w").write(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
PY
}
made_with deepseek-ocr-2 .venv/bin/python
if [ $v1 = 1 ]; then made_with deepseek-ocr "$V1_PYTHON"; fi
# a sweep over the generated corpus (200 pages of 27 document shapes): its page, CSV and JSON (keys/ is not kept);
# run from the corpus's parent so that the pages' paths (`corpus/page-...`) do not depend on the temporary folder
root=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m tracer.corpus "$tmp/corpus" --pages 200 > /dev/null
rm -f reports/sweep/summary.txt
(cd "$tmp" && "$root/.venv/bin/python" -m tracer.diff sweep corpus --quiet --out "$root/reports/sweep") \
  | sed "s#$root/##" > reports/sweep.summary.txt  # the summary names the folder as this repository has it
mv reports/sweep.summary.txt reports/sweep/summary.txt
# the first screens of the seed-naive pages at 1280x800 and 1920x1080, the sweep's plots (reports/screenshots/)
pages=(reports/sweep reports/v2-seed-naive)
if [ $v1 = 1 ]; then pages+=(reports/v1-seed-naive); fi
.venv/bin/python reports/screenshots.py "${pages[@]}"
