#!/usr/bin/env bash
# The whole test suite, in both environments it needs (README's test command; CI runs it):
#   1. .venv      (the README's install: CPU torch, transformers 5.x): everything but the `v1` tests
#   2. .venv-v1   (transformers 4.46.3, what the DeepSeek-OCR remote code was written for; built here on first
#                 use): the `v1` tests, on the vendor code in FLOPDIFF_DSOCR_V1_DIR
#                 (default: ../shared/vendor/deepseek-ocr beside this clone)
# Extra arguments go to both pytest runs. Exit status: non-zero if either run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
# torch and torchvision must be built together: torch 2.13.0+cpu with PyPI's torchvision 0.28.0 fails at import
# (operator torchvision::nms does not exist); 2.14.1 + 0.29.1 work
V1_PACKAGES=(torch==2.14.1 torchvision==0.29.1 'transformers==4.46.3' 'tokenizers==0.20.3' addict easydict einops)
start=$SECONDS
rc=0
# the page tests drive a real headless Chromium: without one they would skip and the run would look green
if [ -z "${FLOPDIFF_CHROMIUM:-}" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  echo "tests/run_all.sh: the HTML tests need Chromium: apt-get install chromium (or set FLOPDIFF_CHROMIUM=PATH)"
  exit 1
fi
# Model Explorer's own dataclasses check its files (tests/test_model_explorer.py): the package's 2 MB of schema and
# server code, without the 150 MB of server dependencies it declares
.venv/bin/pip show -q ai-edge-model-explorer dacite >/dev/null 2>&1 \
  || .venv/bin/pip install -q --no-deps 'ai-edge-model-explorer>=0.1.34,<0.2' 'dacite>=1.8' \
  || { echo "tests/run_all.sh: could not install ai-edge-model-explorer"; exit 1; }
.venv/bin/python -m pytest -q "$@" || rc=$?
echo "tests/run_all.sh: main environment: exit $rc after $((SECONDS - start)) s"
if [ ! -x .venv-v1/bin/python ]; then
  python3 -m venv .venv-v1 && .venv-v1/bin/pip install -q "${V1_PACKAGES[@]}" -e '.[test]' \
    || { echo "tests/run_all.sh: could not build .venv-v1"; exit 1; }
  echo "tests/run_all.sh: built .venv-v1 after $((SECONDS - start)) s"
fi
export FLOPDIFF_DSOCR_V1_DIR="${FLOPDIFF_DSOCR_V1_DIR:-$(cd .. && pwd)/shared/vendor/deepseek-ocr}"
v1=0
.venv-v1/bin/python -m pytest -q -m v1 "$@" || v1=$?
echo "tests/run_all.sh: v1 environment: exit $v1; total $((SECONDS - start)) s"
[ "$rc" -eq 0 ] && [ "$v1" -eq 0 ]
