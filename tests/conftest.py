from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TINY_V2 = HERE / "data" / "deepseek-ocr-2-tiny.json"
SHARED = HERE.parent.parent / "shared"


@pytest.fixture(scope="session")
def tiny_v2_config() -> str:
    """DeepSeek-OCR-2 at reduced size (2+2 vision layers, 2 decoder layers: dense + MoE, small widths)."""
    return str(TINY_V2)


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    ref = SHARED / "reference"
    if not ref.is_dir():
        pytest.skip(f"reference data not found at {ref} (the repo's ../shared folder)")
    return ref
