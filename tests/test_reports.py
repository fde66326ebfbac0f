"""The curated examples in reports/ are what flopdiff writes today, byte for byte (reports/regenerate.sh makes them):
a change of output shows here first, and a refactor that must keep outputs unchanged is checked against them.

Byte for byte under the torch and transformers that made them (reports/made-with.json); under other versions, equal
but for the vendor's line numbers (`sdpa_attention.py:183`): a new transformers moves its lines, and CI installs the
newest. Anything else that differs still fails."""

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from tracer.diff import main

REPORTS = Path(__file__).resolve().parent.parent / "reports"
LINE = re.compile(rb"\.py:\d+")
ARGV = ["--image-shape", "1000x1400", "--text-tokens", "9", "--decode-steps", "2", "--json-nodes", "flops", "--quiet"]


def _curated(path: Path) -> bytes:
    """A curated file, or its gzip (report.json over 2 MiB is kept compressed: reports/regenerate.sh)."""
    packed = path.with_name(path.name + ".gz")
    return gzip.decompress(packed.read_bytes()) if packed.exists() else path.read_bytes()


def _same(tmp: Path, folder: str, argv: list[str], files: tuple[str, ...]) -> None:
    out = tmp / folder
    assert main([*ARGV, "--analytic", folder.split("-", 1)[1], "--out", str(out), *argv]) in (0, 1)
    model = "deepseek-ocr" if folder.startswith("v1") else "deepseek-ocr-2"
    made = json.loads((REPORTS / "made-with.json").read_text())[model]
    exact = made == {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in files:
        got, want = (out / name).read_bytes(), _curated(REPORTS / folder / name)
        if not exact:
            got, want = (LINE.sub(b".py:N", x) for x in (got, want))
        assert got == want, f"{folder}/{name} differs" + ("" if exact else f" (beyond line numbers; made with {made})")

@pytest.mark.v2
@pytest.mark.parametrize("folder", ["v2-aligned", "v2-seed-naive"])
def test_v2_curated_reports_are_byte_identical(folder, tmp_path):
    _same(tmp_path, folder, ["--model-explorer"], ("report.json", "report.html", "model-explorer-node-data.json"))


def test_v1_curated_report_is_byte_identical(v1_dir, tmp_path):
    _same(tmp_path, "v1-seed-naive", ["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code"],
          ("report.html",))
