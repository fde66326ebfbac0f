"""The curated examples in reports/ are what flopdiff writes today, byte for byte (reports/regenerate.sh makes them):
a change of output shows here first, and a refactor that must keep outputs unchanged is checked against them."""

from pathlib import Path

import pytest

from tracer.diff import main

REPORTS = Path(__file__).resolve().parent.parent / "reports"
ARGV = ["--image-shape", "1000x1400", "--text-tokens", "9", "--decode-steps", "2", "--json-nodes", "flops", "--quiet"]


def _same(tmp: Path, folder: str, argv: list[str], files: tuple[str, ...]) -> None:
    out = tmp / folder
    assert main([*ARGV, "--analytic", folder.split("-", 1)[1], "--out", str(out), *argv]) in (0, 1)
    for name in files:
        assert (out / name).read_bytes() == (REPORTS / folder / name).read_bytes(), f"{folder}/{name} differs"


@pytest.mark.v2
@pytest.mark.parametrize("folder", ["v2-aligned", "v2-seed-naive"])
def test_v2_curated_reports_are_byte_identical(folder, tmp_path):
    _same(tmp_path, folder, ["--model-explorer"], ("report.json", "report.html", "model-explorer-node-data.json"))


def test_v1_curated_report_is_byte_identical(v1_dir, tmp_path):
    _same(tmp_path, "v1-seed-naive", ["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code"],
          ("report.html",))
