"""The trace cache (tracer.core.cache): a warm run serves the counted trace with byte-identical reports; any part of the
key changed is a miss; an unreadable entry is a miss with one note line and is rebuilt; two runs writing one entry
at once both finish with the same report and a readable entry; --no-cache bypasses it."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.core import cache
from tracer.diff import main
from tracer.pipeline import Options, run
from tracer.core.workload import Workload

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


def test_an_entry_is_written_in_pieces_byte_for_byte_the_whole_json(cache_on, tiny_v2_config, monkeypatch):
    """The entry is streamed (a long decode traced step by step is gigabytes of JSON, once held whole twice over):
    the same bytes as json.dumps of the whole document, its node list cut into many slices here."""
    monkeypatch.setattr(cache, "ITEMS_PER_PIECE", 7)
    report = _run(tiny_v2_config).report
    doc = {**report, "cache_key": "k"}
    assert len(doc["nodes"]) > 7 * 20
    assert "".join(cache.pieces(doc)) == json.dumps(doc, separators=(",", ":"))
    (entry,) = cache_on.glob("*.json.gz")
    stored = json.loads(gzip.decompress(entry.read_bytes()))
    counted = [{k: v for k, v in n.items() if k not in ("layer", "unmapped")} for n in report["nodes"]]  # undiffed
    assert stored["nodes"] == json.loads(json.dumps(counted))  # the cache kept what was counted


def test_report_json_is_written_in_pieces_one_node_a_line(tiny_v2_config, tmp_path, monkeypatch):
    """report.json is streamed into the output set in slices of nodes: valid JSON whatever the slices, the document
    itself, a line per node."""
    from tracer.core.lifecycle import OutputSet
    from tracer.count import document

    monkeypatch.setattr(document, "NODES_PER_PIECE", 5)
    result = _run(tiny_v2_config)
    with OutputSet(tmp_path / "out") as outputs:
        result.write(outputs)
    text = (tmp_path / "out" / "report.json").read_text()
    assert text == result.to_json() and json.loads(text) == json.loads(json.dumps(result.report))
    lines = text.splitlines()
    assert len(lines) == len(result.report["nodes"]) + 2 and lines[1].startswith('{"id":"vision/')


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
    again = _run(tiny_v2_config)
    err = again.notes
    assert not again.cached and len(err) == 1 and "is unreadable" in err[0] and "tracing again" in err[0]
    assert capsys.readouterr().err == ""  # the library prints nothing: the command line prints the notes
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


def test_prune_keeps_the_most_recently_used_and_only_ever_prunes_flopdiffs_entries(tmp_path):
    import os

    names = [f"{i}" * 64 + ".json.gz" for i in range(3)]
    for i, name in enumerate(names):
        p = tmp_path / name
        p.write_bytes(b"x" * 400)
        os.utime(p, (i + 10, i + 10))
    (tmp_path / "notes.json.gz").write_bytes(b"a user's file" * 100)  # oldest of all, and not flopdiff's
    os.utime(tmp_path / "notes.json.gz", (1, 1))
    cache.prune(tmp_path, limit=900)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:], "notes.json.gz"])


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


# ---- wrong numbers served with exit 0 (issue: cache keys), each against a --no-cache run of the same input --------

def _png(path, wh):
    from PIL import Image

    Image.new("RGB", wh, "white").save(path)
    return path


def _bash(cmd: str, tmp_path) -> dict:
    """`flopdiff` through bash (process substitution is bash's), its report.json."""
    out = tmp_path / "bash-out"
    subprocess.run(["bash", "-c", f"{sys.executable} -m tracer.diff {cmd} --quiet --out {out}"], check=True,
                   capture_output=True)
    return json.loads((out / "report.json").read_text())


def _flops(doc: dict) -> list[int]:
    return [s["flops_full"] for s in doc["stages"]]


def test_a_piped_image_is_keyed_by_its_bytes_not_its_path(cache_on, tmp_path, tiny_v2_config):
    """`--image <(cat sq640.png)` then `--image <(cat wide.png)`: both are /dev/fd/63; the second was served the
    first page's trace (grid [1,1] for a 2000x700 page)."""
    square, wide = _png(tmp_path / "sq640.png", (640, 640)), _png(tmp_path / "wide.png", (2000, 700))
    args = f"--config {tiny_v2_config} --text-tokens 3 --decode-steps 1"
    first = _bash(f"--image <(cat {square}) {args}", tmp_path)
    piped = _bash(f"--image <(cat {wide}) {args}", tmp_path)
    truth = _bash(f"--image {wide} {args} --no-cache", tmp_path)
    assert first["workload"]["crop_grid_wh"] == [1, 1]
    assert piped["workload"]["image_wh"] == [2000, 700] and piped["workload"]["crop_grid_wh"] == [3, 1]
    assert _flops(piped) == _flops(truth) != _flops(first)
    assert piped["workload"]["image_path"].startswith("/dev/fd/")  # named as given, not as flopdiff's copy
    assert _bash(f"--image <(cat {wide}) {args}", tmp_path)["workload"] == piped["workload"]  # a hit, the same


def test_a_piped_config_is_read_once_and_keyed_by_its_bytes(cache_on, tmp_path, tiny_v2_config):
    """`--config <(cat a.json)` exited 2 (the pipe read twice) and stored an entry the next `<(cat b.json)` got."""
    cfg = json.loads(open(tiny_v2_config).read())
    cfg["text_config"]["num_hidden_layers"] = 3
    cfg["text_config"]["mlp_layer_types"] = cfg["text_config"]["mlp_layer_types"] + ["sparse"]
    other = tmp_path / "b.json"
    other.write_text(json.dumps(cfg))
    args = "--image-shape 640x640 --text-tokens 3 --decode-steps 1"
    a = _bash(f"--config <(cat {tiny_v2_config}) {args}", tmp_path)
    b = _bash(f"--config <(cat {other}) {args}", tmp_path)
    assert _flops(a) == _flops(_bash(f"--config {tiny_v2_config} {args} --no-cache", tmp_path))
    assert _flops(b) == _flops(_bash(f"--config {other} {args} --no-cache", tmp_path)) != _flops(a)
    assert all(s["gap"] == 0 for s in b["stages"])  # the analytic model read the same (piped) config


def test_the_key_hashes_files_in_chunks_and_only_what_the_vendor_loads(tmp_path, monkeypatch):
    """A 4 GiB file beside the vendor code was read whole into memory for the key, on every run, hit or miss."""
    from pathlib import Path

    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "modeling.py").write_text("x = 1\n")
    (vendor / "config.json").write_text("{}")
    (vendor / "model.safetensors").write_bytes(b"weights")
    (vendor / "sub").mkdir()
    (vendor / "sub" / "other.py").write_text("y = 2\n")
    before = cache._vendor_digest("deepseek-ocr", str(vendor))
    (vendor / "model.safetensors").write_bytes(b"other weights")  # never loaded: never hashed
    (vendor / "sub" / "other.py").write_text("y = 3\n")
    assert cache._vendor_digest("deepseek-ocr", str(vendor)) == before
    (vendor / "modeling.py").write_text("x = 2\n")
    assert cache._vendor_digest("deepseek-ocr", str(vendor)) != before
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(AssertionError("read whole")))
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros, hashed 1 MiB at a time
    assert cache._file_digest(str(big)) == __import__("hashlib").sha256(b"\0" * (64 << 20)).hexdigest()


# ---- a cache that cannot be used is never a failure: one note line, and the run traces ------------------------

def _entry_after_a_run(tiny) -> "Path":
    _run(tiny)
    (entry,) = cache.folder().glob("*.json.gz")
    return entry


def _damage_missing_fields(entry):
    doc = json.loads(gzip.open(entry).read())
    del doc["workload"]
    entry.write_bytes(gzip.compress(json.dumps(doc).encode()))


def _damage_nested(entry):
    name = entry.name.removesuffix(".json.gz")
    entry.write_bytes(gzip.compress(b"[" * 100_000 + b"]" * 100_000))
    return name


def _damage_wrong_type(entry):
    doc = json.loads(gzip.open(entry).read())
    doc["stages"][0]["flops_full"] = "many"  # passes the entry's field check; the diff cannot use it
    entry.write_bytes(gzip.compress(json.dumps(doc).encode()))


def _damage_folder(entry):
    entry.unlink()
    entry.mkdir()
    (entry / "x").write_text("x")


def _damage_bomb(entry):
    with gzip.open(entry, "wb", compresslevel=9) as f:  # about 200 KB inflating to 200 MB: past the limit
        block = b"0" * (1 << 20)
        for _ in range(200):
            f.write(block)


@pytest.mark.parametrize("damage, says", [
    (_damage_missing_fields, "is unreadable (ValueError: incomplete: workload"),
    (_damage_nested, "is unreadable (RecursionError"),
    (_damage_wrong_type, "could not be used (TypeError"),
    (_damage_folder, "is unreadable (ValueError: not a file)"),
    (_damage_bomb, "is unreadable (ValueError: inflates past"),
], ids=["missing fields", "deeply nested", "a field of the wrong type", "a folder at the entry", "gzip bomb"])
def test_a_damaged_entry_is_one_note_then_traced_and_rebuilt(damage, says, cache_on, tiny_v2_config, capsys):
    entry = _entry_after_a_run(tiny_v2_config)
    cold = _run(tiny_v2_config)
    damage(entry)
    again = _run(tiny_v2_config)
    err = again.notes
    assert not again.cached and len(err) == 1 and says in err[0] and "tracing again" in err[0], err
    assert again.to_json() == cold.to_json()
    assert entry.is_file() and _run(tiny_v2_config).cached  # rebuilt, and used


def test_a_cache_folder_that_cannot_be_read_is_a_note_not_a_traceback(cache_on, tiny_v2_config, capsys,
                                                                      monkeypatch):
    """No permission on the folder (root reads everything: the refusal a user gets is planted on its stat)."""
    from pathlib import Path

    real = Path.stat

    def refused(self, *args, **kwargs):
        if str(self).startswith(str(cache_on)):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "stat", refused)
    result = _run(tiny_v2_config)
    (note,) = result.notes
    assert not result.cached and "cannot be read (Permission denied); tracing without it" in note
    assert result.stages and capsys.readouterr().err == ""


def test_a_read_only_cache_with_a_valid_entry_serves_it(cache_on, tmp_path, tiny_v2_config, capsys):
    """A read-only file system (root writes through file modes: a tmpfs remounted read-only is what a user has)."""
    cache_on.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(cache_on)], check=True)
    try:
        cold = _run(tiny_v2_config)
        subprocess.run(["mount", "-o", "remount,ro", str(cache_on)], check=True)
        capsys.readouterr()
        warm = _run(tiny_v2_config)
        assert warm.cached and warm.to_json() == cold.to_json()
        assert warm.notes == [] and capsys.readouterr().err == ""
    finally:
        subprocess.run(["umount", str(cache_on)], check=True)


def test_a_killed_stores_temporary_file_goes_at_the_next_store(cache_on, tiny_v2_config):
    cache_on.mkdir()
    dead = cache_on / f".{'a' * 64}-99999999-xyz"  # a SIGKILL during a store leaves such a file (pid gone)
    dead.write_bytes(b"")
    mine = cache_on / "keep-me.txt"
    mine.write_text("a user's file")
    _run(tiny_v2_config)
    assert not dead.exists() and mine.exists()


def test_the_command_line_prints_the_notes_one_line_each(cache_on, tmp_path, tiny_v2_config, capsys):
    assert main([*BASE, "--config", tiny_v2_config, "--out", str(tmp_path / "a")]) == 0
    (entry,) = cache_on.glob("*.json.gz")
    entry.write_bytes(b"not gzip at all")
    capsys.readouterr()
    assert main([*BASE, "--config", tiny_v2_config, "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flopdiff: note: the cached trace ") and "tracing again" in err[0]
