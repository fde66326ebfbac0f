"""Test-suite wiring: the two environments, the reference data, and CI's rule that nothing skips there.

Two environments run the suite (tests/run_all.sh, README's test command): the main one (transformers 5.x) runs
everything but the DeepSeek-OCR (v1) tests, marked `v1`; the v1 one (transformers 4.46.x, what the vendor's
remote code needs) runs `-m v1`. A test the environment cannot run skips with a reason starting OTHER_ENV.
Under CI (`CI` set, as .ci/run runs) any other skip is a failure: a test listed in the suite must run there.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TINY_V2 = HERE / "data" / "deepseek-ocr-2-tiny.json"
SHARED = HERE.parent.parent / "shared"
REFERENCE = HERE / "data" / "reference"
OTHER_ENV = "[runs in the other environment] "
# the attention plugins the README shows (benchmarks/attention_plugins.py) import by module name, as a user's would
sys.path.insert(0, str(HERE.parent / "benchmarks"))


@pytest.fixture(scope="session", autouse=True)
def trace_cache_off(tmp_path_factory):
    """The suite's runs trace (a cache hit would make fake-vs-real, worker-vs-sequential and every count test pass
    on an earlier run's numbers): the trace cache is off, and in a folder of the session's own, never the user's.
    tests/test_cache.py turns it on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOPDIFF_CACHE", "off")
        mp.setenv("FLOPDIFF_CACHE_DIR", str(tmp_path_factory.mktemp("trace-cache")))
        yield


def v1_folder() -> str | None:
    """The DeepSeek-OCR (v1) remote code: FLOPDIFF_DSOCR_V1_DIR, else ../shared/vendor/deepseek-ocr if present."""
    folder = os.environ.get("FLOPDIFF_DSOCR_V1_DIR")
    if folder:
        return folder
    default = SHARED / "vendor" / "deepseek-ocr"
    return str(default) if default.is_dir() else None


def _has_v2() -> bool:
    return importlib.util.find_spec("transformers.models.deepseek_ocr2") is not None


def _has_v1_transformers() -> bool:
    import transformers

    return transformers.__version__.startswith("4.46.")


@pytest.hookimpl(tryfirst=True)  # before `-m v1` selects: the marker is added here for tests using v1_dir
def pytest_collection_modifyitems(config, items):
    import transformers

    v2, v1 = _has_v2(), _has_v1_transformers()
    skip_v2 = pytest.mark.skip(reason=OTHER_ENV + f"DeepSeek-OCR-2 needs transformers 5.x "
                                                  f"(installed: {transformers.__version__})")
    skip_v1 = pytest.mark.skip(reason=OTHER_ENV + f"the DeepSeek-OCR (v1) remote code needs transformers 4.46.x "
                                                  f"(installed: {transformers.__version__}); .venv-v1 runs it")
    for item in items:
        if not v2 and (item.get_closest_marker("v2") or {"tiny_v2_config", "v2_page"} & set(item.fixturenames)):
            item.add_marker(skip_v2)
        if "v1_dir" in item.fixturenames:
            item.add_marker(pytest.mark.v1)
        if not v1 and item.get_closest_marker("v1"):
            item.add_marker(skip_v1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (os.environ.get("CI") and report.skipped):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if OTHER_ENV not in reason:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"


@pytest.fixture(scope="session")
def v1_dir() -> str:
    """The v1 vendor folder (the `v1` marker has already checked transformers 4.46.x)."""
    folder = v1_folder()
    if not folder:
        pytest.skip("no DeepSeek-OCR remote code: set FLOPDIFF_DSOCR_V1_DIR (or keep ../shared/vendor/deepseek-ocr)")
    return folder


@pytest.fixture
def worker_claims_first(monkeypatch):
    """The decode worker surely takes steps: this process's first claim waits until the worker has claimed one
    (a hook on the claims both processes share, not a race against a sleep). The worker forks after the patch but
    only ever claims from the top (`high`), so it never waits."""
    import struct
    import time

    import tracer.capture.decode_worker as worker

    original_init, original_low = worker._Claims.__init__, worker._Claims.low

    def init(self, steps):
        original_init(self, steps)
        self.first_high = steps - 1

    def low(self):
        if getattr(self, "first_high", None) is not None:
            deadline = time.monotonic() + 120
            while struct.unpack("ii", self._mem[:])[1] == self.first_high and time.monotonic() < deadline:
                time.sleep(0.005)
            self.first_high = None
        return original_low(self)

    monkeypatch.setattr(worker._Claims, "__init__", init)
    monkeypatch.setattr(worker._Claims, "low", low)


@pytest.fixture(scope="session")
def tiny_v2_config() -> str:
    """DeepSeek-OCR-2 at reduced size (2+2 vision layers, 2 decoder layers: dense + MoE, small widths)."""
    return str(TINY_V2)


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """The published reference tables (copies of ../shared/reference/*/flops-reference.json, so that a clone
    without ../shared runs every reference check; test_reference_copies_match_shared keeps them equal)."""
    return REFERENCE


@pytest.fixture(scope="session")
def v2_page(tmp_path_factory):
    """The acceptance workload: published v2 config, 1000x1400, 9 text tokens, 10 decode steps (aligned)."""
    from tracer.diff import main

    out = tmp_path_factory.mktemp("v2") / "out"
    code = main(["--image-shape", "1000x1400", "--text-tokens", "9", "--decode-steps", "10", "--quiet",
                 "--out", str(out)])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def _missing(reason: str):
    """Outside CI a missing browser skips with the reason; CI (.ci/run installs both) must run the test."""
    if os.environ.get("CI"):
        pytest.fail(reason + ": CI must run the browser test")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's `chromium`, driven by Playwright) for the page tests."""
    path = os.environ.get("FLOPDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _missing("no chromium on PATH (apt-get install chromium, or set FLOPDIFF_CHROMIUM)")
    try:
        from playwright import sync_api
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()
