"""A persistent cache of counted traces: a fake-mode run's counted report document (what `tracer.count.records.build_report`
makes of the trace), kept under `$FLOPDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/flopdiff`, else `~/.cache/flopdiff`.

Why: users run flopdiff many times on the same workload (a gate in CI, `--explain` or another `--analytic` after a
run), and every run paid the whole trace again. What follows the count (the analytic model, the mapping, the diff,
the reports) is recomputed on every run, so a hit serves any preset, policy, mapping table or `--explain`.

The key is everything that shapes the counted graph, hashed (sha256): flopdiff's own source files (tracer, analytic,
mapping: code, tables, configs, templates), the torch and transformers versions, the vendor's code (v1: the *.py and
*.json files the vendor code loads from --vendor-dir, after a `hub:ORG/NAME` is resolved to its snapshot, so two
repositories never share an entry; v2: transformers' deepseek_ocr2 package files), the config file's bytes, the
workload (an image file and a tokenizer by their bytes, read in chunks, never by their paths: a pipe is first copied
by tracer.core.inputs), the build options (attention, experts, dtype, device, mode) and the counting convention (causal
halving). An entry that does not match is never used. Not cached: real mode
(random weights, kernels), `--graph onnx`, `--model-explorer` (they need the traced graphs), attention plugins (their
code is the user's), a run with `--ncu`.

Entries are gzipped JSON written to a temporary file and renamed into place (two runs writing one entry at once
both leave a complete one; a temporary file whose writer was killed is removed by the next store). An entry that
is unreadable, not of this key, incomplete, nested past the parser's depth or inflating past `inflate_limit` (a
gzip bomb) is reported in one note line, removed and rebuilt. A cache folder that cannot be read or written is
no error: the run traces, with one note line. The folder is bounded (`MAX_BYTES`): the least recently used
entries go first, and only flopdiff's own entries (`ENTRY`) are ever pruned. `--no-cache` bypasses it; `FLOPDIFF_CACHE=off`
too (the test suite's default, so that its runs trace).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tracer.core.inputs import digest
from tracer.core.lifecycle import remove, sweep_dead
from tracer.core.models import model
from tracer.core.workload import Workload

FORMAT = 1
MAX_BYTES = 2 * 2**30  # the folder's bound: entries are a few MB each
ROOT = Path(__file__).resolve().parents[2]  # the folder holding tracer/, analytic/, mapping/
SOURCES = ("tracer", "analytic", "mapping")
SOURCE_SUFFIXES = (".py", ".yaml", ".json", ".j2")
VENDOR_SUFFIXES = (".py", ".json")  # what the v1 remote code loads from its folder (and what `hub:` fetches)
TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")  # what tokenizer loaders read in a folder
ENTRY = re.compile(r"[0-9a-f]{64}\.json\.gz")
# the entry's report document, as stored: the fields every reader of a cached document uses
ENTRY_FIELDS = {"schema": str, "model": str, "workload": dict, "options": dict, "notes": list, "stages": list,
                "nodes": list, "unknown_ops": list}
WORKLOAD_FIELDS = ("image_wh", "image_path", "base_size", "tile_size", "crop_mode", "views", "crop_grid_wh",
                   "image_tokens", "prompt_len", "decode_steps")


def folder() -> Path:
    base = os.environ.get("FLOPDIFF_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flopdiff"


def wanted_by_default() -> bool:
    """The default of the one switch (`Options.cache`): on, unless the environment says `FLOPDIFF_CACHE=off` (the
    test suite's setting, so that its runs trace)."""
    return os.environ.get("FLOPDIFF_CACHE", "on") != "off"


def usable(mode: str, device: str, graph: str, plugins: tuple[str, ...], needs_graphs: bool, ncu: bool,
           wanted: bool) -> bool:
    """Whether this run may read and write the cache (see the module's docstring for what is not cached)."""
    return (wanted and mode == "fake" and device == "cpu"
            and graph == "fx" and not plugins and not needs_graphs and not ncu)


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        h.update(digest(p).encode())
    return h.hexdigest()


def _files(folder_: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The regular files of `folder_` itself (not its sub-folders) with these suffixes: what a loader reads there
    (a checkpoint's weights beside them are never read, so never hashed)."""
    return [p for p in folder_.iterdir() if p.suffix in suffixes and p.is_file()]


@functools.cache
def source_digest() -> str:
    """flopdiff's own code, tables and templates (asked once per process)."""
    return _digest_files([p for pkg in SOURCES for p in (ROOT / pkg).rglob("*")
                          if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _vendor_digest(name: str, vendor_dir: str | None) -> str:
    """The code that runs: the remote-code folder's files, or the model's package in transformers (an hf: model's by
    its model type, as transformers names the folder; the version is in the key beside, for the code models share)."""
    where = model(name).code
    if where == "vendor-dir":
        folder_ = Path(vendor_dir or "")
        return _digest_files(_files(folder_, VENDOR_SUFFIXES)) if folder_.is_dir() else f"absent:{vendor_dir}"
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    package = Path(list(spec.submodule_search_locations)[0]) / "models" / where.split(":", 1)[1]
    return _digest_files([p for p in package.glob("*.py")]) if package.is_dir() else "absent"


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return _digest_files(_files(p, TOKENIZER_SUFFIXES))
    return digest(p) if p.is_file() else f"absent:{path}"


def key(workload: Workload, build: Any, config: str | None, causal_halving: bool, every_step: bool = False) -> str:
    """The entry's name: a hash of everything that shapes the counted graph (`build`: the effective BuildOptions;
    `every_step`: a long decode traced step by step, not in closed form)."""
    workload_fields = {k: v for k, v in dataclasses.asdict(workload).items() if k != "image_label"}  # a label only
    parts = {
        "format": FORMAT, "flopdiff": source_digest(), "torch": _version("torch"),
        "transformers": _version("transformers"), "vendor": _vendor_digest(workload.model, build.vendor_dir),
        "config": _file_digest(config),
        "workload": {**workload_fields, "image_path": _file_digest(workload.image_path),
                     "tokenizer": _file_digest(workload.tokenizer)},
        "build": {"attn": build.attn, "experts": build.experts, "dtype": str(build.dtype), "device": build.device,
                  "mode": build.mode},
        "causal_halving": causal_halving, "every_step": every_step,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def inflate_limit(stored: int) -> int:
    """The most bytes an entry of `stored` gzipped bytes may inflate to: report documents compress about 20x
    (measured: 465 KB for 8.9 MB), a gzip bomb 1000x."""
    return (64 << 20) + 100 * stored


Note = Callable[[str], None]  # where the cache's one-line notes go (the pipeline's note callback)


def _check_entry(doc: Any, name: str) -> None:
    """ValueError unless `doc` is a complete entry of this key (its fields present, of their types)."""
    if not isinstance(doc, dict) or doc.get("cache_key") != name:
        raise ValueError("not an entry of this key")
    wrong = [k for k, kind in ENTRY_FIELDS.items() if not isinstance(doc.get(k), kind)]
    wrong += [f"workload.{k}" for k in WORKLOAD_FIELDS if k not in doc.get("workload", {})]
    if wrong:
        raise ValueError(f"incomplete: {', '.join(wrong)}")


def load(name: str, note: Note) -> dict[str, Any] | None:
    """The entry's report document, or None (absent; unusable: one `note`, and the entry removed)."""
    path = folder() / f"{name}.json.gz"
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        note(f"the trace cache {path.parent} cannot be read ({exc.strerror}); tracing without it")
        return None
    try:
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a file")
        limit = inflate_limit(st.st_size)
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"inflates past {limit >> 20} MiB")
        doc = json.loads(data)
        _check_entry(doc, name)
    except (OSError, ValueError, EOFError, RecursionError, zlib.error) as exc:
        note(f"the cached trace {path} is unreadable ({exc.__class__.__name__}: {exc}); tracing again")
        remove(path)
        return None
    try:
        os.utime(path)  # recently used: pruned last (a read-only cache keeps its order)
    except OSError:
        pass
    doc.pop("cache_key")
    return doc


def discard(name: str, why: str, note: Note) -> None:
    """Drop an entry whose document the run could not use (one `note`): it is traced again."""
    path = folder() / f"{name}.json.gz"
    note(f"the cached trace {path} could not be used ({why}); tracing again")
    remove(path)


_COMPACT = json.JSONEncoder(separators=(",", ":"))
ITEMS_PER_PIECE = 4096


def pieces(doc: dict[str, Any]) -> Iterator[str]:
    """json.dumps(doc, separators=(",", ":")), byte for byte, in pieces: its lists a slice at a time. A long decode
    traced step by step has millions of nodes (DeepSeek-OCR's page at 2,000 steps: 4.4 M), gigabytes that a whole
    string held twice over, as text and as its bytes."""
    yield "{"
    for i, (key, value) in enumerate(doc.items()):
        yield ("," if i else "") + _COMPACT.encode(key) + ":"
        if not isinstance(value, list):
            yield _COMPACT.encode(value)
            continue
        yield "["
        for start in range(0, len(value), ITEMS_PER_PIECE):
            yield ("," if start else "") + _COMPACT.encode(value[start:start + ITEMS_PER_PIECE])[1:-1]
        yield "]"
    yield "}"


def store(name: str, report: dict[str, Any], note: Note) -> None:
    """Write the entry whole (a temporary file renamed into place), then keep the folder under MAX_BYTES. A cache
    that cannot be written is no error: the run has its result."""
    target = folder()
    try:
        target.mkdir(parents=True, exist_ok=True)
        sweep_dead(target, r"\.[0-9a-f]{64}")  # temporary files of stores that were killed
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-{os.getpid()}-", dir=target)
        try:
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) as f:
                for piece in pieces({**report, "cache_key": name}):
                    f.write(piece.encode())
            os.replace(tmp, target / f"{name}.json.gz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        prune(target)
    except OSError as exc:
        note(f"could not write the trace cache in {target} ({exc.strerror or exc}); runs will trace again")


def prune(target: Path, limit: int = MAX_BYTES) -> None:
    """Remove the least recently used entries until the folder is under `limit` bytes (flopdiff's entries only)."""
    entries = []
    for p in target.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if ENTRY.fullmatch(p.name) and stat.S_ISREG(st.st_mode):
            entries.append((st.st_mtime, st.st_size, p))
    entries.sort(key=lambda e: e[0])
    total = sum(size for _, size, _ in entries)
    for _, size, p in entries:
        if total <= limit:
            break
        total -= size
        p.unlink(missing_ok=True)
