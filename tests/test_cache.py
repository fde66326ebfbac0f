"""The trace cache (tracer.cache): a warm run serves the counted trace with byte-identical reports; any part of the
key changed is a miss; an unreadable entry is a miss with one note line and is rebuilt; two runs writing one entry
at once both finish with the same report and a readable entry; --no-cache bypasses it."""

import gzip
import json
import subprocess
import sys

import pytest

from tracer import cache
from tracer.diff import main
from tracer.pipeline import Options, run
from tracer.workload import Workload

pytestmark = pytest.mark.v2

BASE = ["--image-shape", "640x640", "--text-tokens", "3", "--decode-steps", "2", "--quiet"]


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOPDIFF_CACHE", "on")
    monkeypatch.setenv("FLOPDIFF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _run(tiny, **kw):
    options = Options(config=tiny, sequential=True, **{k: v for k, v in kw.items() if k in Options.__dataclass_fields__})
    workload = Workload(image_wh=kw.get("image_wh", (640, 640)), text_tokens=kw.get("text_tokens", 3),
                        decode_steps=kw.get("decode_steps", 2))
    return run(workload, options)


def test_warm_run_is_served_with_byte_identical_reports(cache_on, tmp_path, tiny_v2_config):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        assert main([*BASE, "--config", tiny_v2_config, "--out", str(out)]) == 0
        outs.append(out)
    assert len(list(cache_on.glob("*.json.gz"))) == 1
    for name in ("report.json", "report.html"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert _run(tiny_v2_config).cached
    # another preset, policy or --explain reads the same entry: only the count is cached
    naive = _run(tiny_v2_config, analytic="seed-naive", policy="torch")
    assert naive.cached and naive.report["analytic"]["policy"] == "torch" and naive.gap_groups


@pytest.mark.parametrize("change", ["text_tokens", "decode_steps", "image_wh", "attn", "causal_halving", "config",
                                    "flopdiff source", "torch version"])
def test_any_part_of_the_key_changed_is_a_miss(change, cache_on, tmp_path, tiny_v2_config, monkeypatch):
    assert not _run(tiny_v2_config).cached
    assert _run(tiny_v2_config).cached
    kw = {}
    if change == "text_tokens":
        kw["text_tokens"] = 4
    elif change == "decode_steps":
        kw["decode_steps"] = 1
    elif change == "image_wh":
        kw["image_wh"] = (640, 656)
    elif change == "attn":
        from tracer.vendors import BuildOptions

        kw["build"] = BuildOptions(attn="eager")
    elif change == "causal_halving":
        kw["causal_halving"] = True
    elif change == "config":  # the same values, other bytes
        other = tmp_path / "config.json"
        other.write_text(open(tiny_v2_config).read() + "\n\n")
        tiny_v2_config = str(other)
    elif change == "flopdiff source":
        monkeypatch.setattr(cache, "source_digest", lambda: "another flopdiff")
    elif change == "torch version":
        real = cache._version
        monkeypatch.setattr(cache, "_version", lambda p: "9.9" if p == "torch" else real(p))
    assert not _run(tiny_v2_config, **kw).cached


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_entry_is_a_miss_with_a_note_and_is_rebuilt(damage, cache_on, tiny_v2_config, capsys):
    cold = _run(tiny_v2_config)
    (entry,) = cache_on.glob("*.json.gz")
    data = entry.read_bytes()
    entry.write_bytes(b"not gzip at all" if damage == "garbage" else data[: len(data) // 2])
    capsys.readouterr()
    again = _run(tiny_v2_config)
    err = capsys.readouterr().err.strip().splitlines()
    assert not again.cached and len(err) == 1 and "is unreadable" in err[0] and "tracing again" in err[0]
    assert again.to_json() == cold.to_json()
    assert json.loads(gzip.open(entry).read())["model"] == "deepseek-ocr-2"  # a complete entry again
    assert _run(tiny_v2_config).cached  # rebuilt


def test_two_runs_writing_one_entry_at_once(cache_on, tmp_path, tiny_v2_config):
    argv = [sys.executable, "-m", "tracer.diff", *BASE, "--config", tiny_v2_config]
    procs = [subprocess.Popen([*argv, "--out", str(tmp_path / f"p{i}")], stderr=subprocess.PIPE) for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert (tmp_path / "p0" / "report.json").read_bytes() == (tmp_path / "p1" / "report.json").read_bytes()
    (entry,) = cache_on.glob("*.json.gz")
    assert json.loads(gzip.open(entry).read())["model"] == "deepseek-ocr-2"
    assert not list(cache_on.glob(".*"))  # no temporary file left


def test_no_cache_and_what_is_never_cached(cache_on, tmp_path, tiny_v2_config):
    assert main([*BASE, "--config", tiny_v2_config, "--no-cache", "--out", str(tmp_path / "a")]) == 0
    assert main([*BASE, "--config", tiny_v2_config, "--model-explorer", "--out", str(tmp_path / "b")]) == 0
    assert not cache_on.exists() or not list(cache_on.glob("*.json.gz"))


def test_prune_keeps_the_most_recently_used(tmp_path):
    import os

    for i, size in enumerate((400, 400, 400)):
        p = tmp_path / f"e{i}.json.gz"
        p.write_bytes(b"x" * size)
        os.utime(p, (i, i))
    cache.prune(tmp_path, limit=900)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1.json.gz", "e2.json.gz"]


def test_a_warm_run_imports_neither_torch_nor_transformers(cache_on, tmp_path, tiny_v2_config):
    """The whole point of a warm run: it starts no torch (tracer.pipeline imports the tracing modules on a miss)."""
    argv = [*BASE, "--config", tiny_v2_config]
    assert main([*argv, "--out", str(tmp_path / "cold")]) == 0
    code = ("import sys; from tracer.cli import main; code = main(sys.argv[1:]); "
            "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv, "--out", str(tmp_path / "warm")], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    assert out == "0 []"
    assert (tmp_path / "cold" / "report.json").read_bytes() == (tmp_path / "warm" / "report.json").read_bytes()
