"""A persistent cache of counted traces: a fake-mode run's counted report document (what `tracer.report.build_report`
makes of the trace), kept under `$FLOPDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/flopdiff`, else `~/.cache/flopdiff`.

Why: users run flopdiff many times on the same workload (a gate in CI, `--explain` or another `--analytic` after a
run), and every run paid the whole trace again. What follows the count (the analytic model, the mapping, the diff,
the reports) is recomputed on every run, so a hit serves any preset, policy, mapping table or `--explain`.

The key is everything that shapes the counted graph, hashed (sha256): flopdiff's own source files (tracer, analytic,
mapping: code, tables, configs, templates), the torch and transformers versions, the vendor's code (v1: every file
of --vendor-dir; v2: transformers' deepseek_ocr2 package files), the config file's bytes, the workload (an image
file and a tokenizer by their bytes, not their paths), the build options (attention, experts, dtype, device, mode)
and the counting convention (causal halving). An entry that does not match is never used. Not cached: real mode
(random weights, kernels), `--graph onnx`, `--model-explorer` (they need the traced graphs), attention plugins (their
code is the user's), a run with `--ncu`.

Entries are gzipped JSON written to a temporary file and renamed into place (two runs writing one entry at once
both leave a complete one); an unreadable entry is reported in one note line, removed and rebuilt. The folder is
bounded (`MAX_BYTES`): the least recently used entries go first. `--no-cache` bypasses it; `FLOPDIFF_CACHE=off`
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
import sys
import tempfile
from pathlib import Path
from typing import Any

from tracer.workload import Workload

FORMAT = 1
MAX_BYTES = 2 * 2**30  # the folder's bound: entries are a few MB each
ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("tracer", "analytic", "mapping")
SOURCE_SUFFIXES = (".py", ".yaml", ".json", ".j2")


def folder() -> Path:
    base = os.environ.get("FLOPDIFF_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flopdiff"


def usable(mode: str, device: str, graph: str, plugins: tuple[str, ...], needs_graphs: bool, ncu: bool,
           wanted: bool) -> bool:
    """Whether this run may read and write the cache (see the module's docstring for what is not cached)."""
    return (wanted and os.environ.get("FLOPDIFF_CACHE", "on") != "off" and mode == "fake" and device == "cpu"
            and graph == "fx" and not plugins and not needs_graphs and not ncu)


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


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


def _vendor_digest(model: str, vendor_dir: str | None) -> str:
    if model == "deepseek-ocr":
        folder_ = Path(vendor_dir or "")
        return _digest_files([p for p in folder_.iterdir() if p.is_file()]) if folder_.is_dir() else "absent"
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    package = Path(list(spec.submodule_search_locations)[0]) / "models" / "deepseek_ocr2"
    return _digest_files([p for p in package.glob("*.py")]) if package.is_dir() else "absent"


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return _digest_files([f for f in p.rglob("*") if f.is_file()])
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else f"absent:{path}"


def key(workload: Workload, build: Any, config: str | None, causal_halving: bool) -> str:
    """The entry's name: a hash of everything that shapes the counted graph (`build`: the effective BuildOptions)."""
    parts = {
        "format": FORMAT, "flopdiff": source_digest(), "torch": _version("torch"),
        "transformers": _version("transformers"), "vendor": _vendor_digest(workload.model, build.vendor_dir),
        "config": _file_digest(config),
        "workload": {**dataclasses.asdict(workload), "image_path": _file_digest(workload.image_path),
                     "tokenizer": _file_digest(workload.tokenizer)},
        "build": {"attn": build.attn, "experts": build.experts, "dtype": str(build.dtype), "device": build.device,
                  "mode": build.mode},
        "causal_halving": causal_halving,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load(name: str) -> dict[str, Any] | None:
    """The entry's report document, or None (absent; unreadable: one note line, and the entry removed)."""
    path = folder() / f"{name}.json.gz"
    if not path.exists():
        return None
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("cache_key") != name:
            raise ValueError("not an entry of this key")
        os.utime(path)  # recently used: pruned last
        doc.pop("cache_key")
        return doc
    except (OSError, ValueError, EOFError) as exc:
        print(f"flopdiff: note: the cached trace {path} is unreadable ({exc.__class__.__name__}); tracing again",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        return None


def store(name: str, report: dict[str, Any]) -> None:
    """Write the entry whole (a temporary file renamed into place), then keep the folder under MAX_BYTES. A cache
    that cannot be written is no error: the run has its result."""
    target = folder()
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-{os.getpid()}-", dir=target)
        try:
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) as f:
                f.write(json.dumps({**report, "cache_key": name}, separators=(",", ":")).encode())
            os.replace(tmp, target / f"{name}.json.gz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        prune(target)
    except OSError as exc:
        print(f"flopdiff: note: could not write the trace cache in {target} ({exc.strerror}); runs will trace again",
              file=sys.stderr)


def prune(target: Path, limit: int = MAX_BYTES) -> None:
    """Remove the least recently used entries until the folder is under `limit` bytes."""
    entries = sorted(target.glob("*.json.gz"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    for p in entries:
        if total <= limit:
            break
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
