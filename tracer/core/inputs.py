"""The user's input files (`--image`, `--config`, `--tokenizer`), read so that what is measured is what was given.

Contract:
  * A regular file or folder is read where it is, as often as the run needs; its identity (the trace cache's key) is
    the sha256 of its bytes, read in chunks (`digest`): a 4 GiB file costs no more memory than a small one.
  * Anything else (a pipe such as `--image <(cat page.png)`, a FIFO, a device) can be read once only: `Pinned` copies
    it into a scratch folder of this run before anything reads it, and every reader (the checks, the trace cache's
    key, the vendor) reads that copy. Without the copy, a pipe read twice gave the second reader nothing, and a key
    made from the pipe's path served one page's trace for another. The copy is capped (`STREAM_LIMIT`: /dev/zero is
    refused, not copied until the disk is full) and a pipe nobody writes to is refused after `STREAM_IDLE_S` seconds
    of silence instead of hanging the run.
  * The copy goes when the run ends (`Pinned.close`); a killed run's copy is a scratch folder named after its dead
    owner, removed by the next run (tracer.core.lifecycle.sweep_scratch).
Torch-free: the trace cache and the checks before a trace use it.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import stat
import time
from pathlib import Path

from tracer.core.errors import FlopdiffError
from tracer.core.lifecycle import temp_folder

CHUNK = 1 << 20
STREAM_LIMIT = 512 << 20  # bytes: a 150 Mpx page as an uncompressed TIFF is 450 MB
STREAM_IDLE_S = 10.0  # a pipe silent this long has no writer (a FIFO nobody opened for writing)
# the name each kind of input is copied under: the tokenizer loaders look for these names in a folder
COPY_NAMES = {"--image": "image", "--config": "config.json", "--tokenizer": "tokenizer.json"}


def is_stream(path: str | os.PathLike) -> bool:
    """Whether `path` exists and is neither a regular file nor a folder (a pipe, FIFO, socket or device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def digest(path: str | os.PathLike) -> str:
    """sha256 of a regular file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def copy_stream(source: str, target: Path, what: str, limit: int | None = None, idle_s: float | None = None) -> None:
    """Read a pipe or device once into `target`: at most `limit` bytes (STREAM_LIMIT), and refused after `idle_s`
    seconds with nothing arriving (STREAM_IDLE_S: a FIFO without a writer would block forever). `what` names the
    input in errors."""
    limit = STREAM_LIMIT if limit is None else limit
    idle_s = STREAM_IDLE_S if idle_s is None else idle_s
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise FlopdiffError(f"{what} {source}: cannot open it ({exc.strerror})") from None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    size, deadline = 0, time.monotonic() + idle_s
    try:
        with open(target, "wb") as out:
            while True:
                if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    raise FlopdiffError(f"{what} {source}: nothing arrived in {idle_s:g} s (a pipe or FIFO with no "
                                        f"writer?); give a file, or write into the pipe")
                try:
                    block = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise FlopdiffError(f"{what} {source}: cannot read it ({exc.strerror})") from None
                if not block:
                    return
                size += len(block)
                if size > limit:
                    raise FlopdiffError(f"{what} {source}: more than {limit >> 20} MiB from a pipe or device; give "
                                        f"a regular file")
                out.write(block)
                deadline = time.monotonic() + idle_s
    finally:
        os.close(fd)


class Pinned:
    """Inputs that can be read once, copied so that they can be read many times (see the module's contract)."""

    def __init__(self) -> None:
        self.folder: str | None = None

    def path(self, given: str | os.PathLike | None, what: str) -> str | None:
        """`given` as a path every reader may open again: itself, or for a pipe or device a copy of its bytes."""
        if given is None:
            return None
        given = os.fspath(given)
        if not is_stream(given):
            return given
        if self.folder is None:
            self.folder = temp_folder("input")
        target = Path(self.folder) / what.strip("-") / COPY_NAMES[what]
        target.parent.mkdir()
        copy_stream(given, target, what)
        return str(target)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
