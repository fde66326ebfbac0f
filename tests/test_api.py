"""The README's Python API example runs as written (DeepSeek-OCR-2, published config, fake weights), and the typed
result agrees with the document it wraps."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.v2
def test_readme_python_api_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    out = capsys.readouterr().out
    assert "vision" in out and "largest gap:" in out
    result = namespace["result"]
    assert [s.name for s in result.stages] == ["vision", "prefill", "decode"]
    assert [(s.name, s.flops_full, s.gap) for s in result.stages] == \
        [(s["name"], s["flops_full"], s["gap"]) for s in result.report["stages"]]
    assert len(result.layers) == len(result.report["layers"]) and result.layers[0].id == result.report["layers"][0]["id"]
    assert namespace["doc"] == result.to_json() and namespace["html"].startswith("<!DOCTYPE html>")
