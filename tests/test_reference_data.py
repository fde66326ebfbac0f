"""The reference tables travel with the tests (tests/data/reference): they must be the published ones."""

import pytest

from conftest import REFERENCE, SHARED


@pytest.mark.parametrize("model", ["deepseek-ocr", "deepseek-ocr-2"])
def test_reference_copies_match_shared(model):
    published = SHARED / "reference" / model / "flops-reference.json"
    if not published.is_file():
        pytest.skip(f"{published} is absent (a clone without ../shared): the copies cannot be compared")
    assert (REFERENCE / model / "flops-reference.json").read_bytes() == published.read_bytes()
