"""What a run leaves behind: its complete output set, or the previous one, and nothing else.

Contract, whatever ends the run (a bad input, an exception, SIGINT, SIGTERM, SIGKILL, the OOM killer):
  * `OutputSet`: every file of a run is written into a fresh staging folder beside `--out`, created before
    tracing (so a bad `--out` fails in a second, not after the trace), and the run commits by swapping that
    folder with the old one in one atomic rename (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames,
    between which `--out` is briefly absent, never mixed). A reader sees the old complete set or the new one.
    An existing `--out` holding files flopdiff does not write is refused: the folder is replaced as a whole.
    A symlink `--out` is followed: the set is written at its target, and the link stays. A mount point (a
    container's `-v host:/out`) cannot be renamed, and the folder above it is another file system: there the
    staging folder is made inside it, and the commit swaps the entries one by one (each file or folder atomic,
    the set as a whole not: a reader may see old and new files for the milliseconds of the swap). A file system
    that fills up, or any other write failure, is one error naming `--out`, and the previous set stays.
    Two runs committing to the same new `--out` at once both succeed, the later set last.
  * `temp_folder`: scratch folders are named after the process that owns them (`flopdiff-<what>-<pid>-...`);
    those whose owner is gone (a SIGKILL leaves them) are removed when the next run starts (`sweep_scratch`),
    and staging folders the same way by the next run writing beside them.
  * `die_with_parent`: a forked child (the decode worker, the report writer) gets SIGTERM when its parent
    dies (Linux `PR_SET_PDEATHSIG`), so no child outlives a killed run; the child removes its own scratch.
  * `signals_as_exceptions`: SIGTERM (and SIGHUP) raise `Interrupted` in the main thread like SIGINT's
    KeyboardInterrupt, so the same `finally` blocks clean up; the command line prints one line for it. A signal
    whose exception a finalizer swallowed is raised again (`raise_caught`), at the latest before the commit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tracer.core.errors import FlopdiffError

#: every file a run may write into --out (an existing folder holding anything else is refused)
OUTPUT_NAMES = frozenset({"report.json", "report.html", "model-explorer-graph.json", "model-explorer-node-data.json",
                          "ncu.csv", "report-onnx.json", "prefill.onnx", "decode.onnx",
                          "sweep.csv", "sweep.json", "sweep.html", "keys",  # flopdiff sweep (keys/<key>/report.*)
                          "model-explorer.json"})  # the node data's name before it said what it is
STAGING = ".flopdiff-staging"  # `.NAME.flopdiff-staging-PID-XXXX` beside --out
_RENAME_EXCHANGE = 2  # linux/fs.h
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised where the main thread is (a BaseException: no `except Exception` stops it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_dead(folder: Path, prefix: str) -> None:
    """Remove `prefix-PID-*` entries of `folder` (prefix: a regular expression), folders or files, whose PID is no
    running process (left by a killed run)."""
    pattern = re.compile(prefix + r"-(\d+)-")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            remove(entry)


def remove(path: Path) -> None:
    """Remove a file or a folder (a symlink as a link), as far as the file system allows: a read-only place keeps
    it, and that is no error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def sweep_scratch() -> None:
    """Remove the scratch folders (`temp_folder`) of runs that are gone, whatever their kind (a run starts here)."""
    sweep_dead(Path(tempfile.gettempdir()), r"flopdiff-[a-z0-9]+")


def temp_folder(what: str) -> str:
    """A new scratch folder `flopdiff-<what>-<pid>-XXXX` in the system's temporary folder. The caller removes it
    (`shutil.rmtree`) when done; a killed run's folders go at the next run's `sweep_scratch`."""
    return tempfile.mkdtemp(prefix=f"flopdiff-{what}-{os.getpid()}-")


@contextmanager
def scratch(what: str) -> Iterator[str]:
    """`temp_folder` as a context manager: removed on the way out, whatever raised."""
    folder = temp_folder(what)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, for the two Linux calls Python has no wrapper for (prctl, renameat2); None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def die_with_parent() -> None:
    """In a forked child: have the kernel send SIGTERM when the parent exits (Linux; elsewhere nothing), and exit
    now if the parent is already gone (it may have died between fork() and this call)."""
    prctl = getattr(_libc(), "prctl", None)
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


_CAUGHT: list[int] = []  # the signals signals_as_exceptions' handler took, for raise_caught


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While inside: SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP `Interrupted`, each signal also noted for
    raise_caught, which a block ending normally after a signal calls on its way out (handlers restored then)."""
    def handler(signum, frame):
        _CAUGHT.append(signum)
        raise _exception(signum)

    def unraisable(info) -> None:  # the swallowed one is raised again: no traceback for it on stderr
        if not isinstance(info.exc_value, (KeyboardInterrupt, Interrupted)):
            hook(info)

    _CAUGHT.clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
        raise_caught()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sys.unraisablehook = hook
        _CAUGHT.clear()


def raise_caught() -> None:
    """Raise again the exception of a signal taken inside signals_as_exceptions, where the handler's was swallowed:
    Python ignores an exception raised in a finalizer (a weakref callback, `__del__`), and freeing a decode step's
    graph runs thousands of them (tracer.capture.recorder.collect_steps): a run interrupted there went on to the
    end, replaced its output set and exited 0. Called where that can happen and before an output set commits."""
    if _CAUGHT:
        raise _exception(_CAUGHT[0])


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (file system without exchange), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


class OutputSet:
    """The files of one run, staged beside `--out` and swapped in whole by `commit()`; `discard()` drops them."""

    def __init__(self, out: str | os.PathLike, flag: str = "--out"):
        self.out = Path(os.path.realpath(out))  # a symlink's target is the folder replaced; the link stays
        self.flag = f"{flag} {os.fspath(out)}"  # errors name the input as given
        sweep_scratch()  # a run starts here: what killed runs left in the temporary folder goes
        self._check()
        self._made: list[Path] = []  # parent folders this run created (removed again if it writes nothing)
        self.inside = os.path.ismount(self.out)  # a mount point: staged inside it, swapped entry by entry
        missing = []
        for parent in self.out.parents:
            if parent.exists():
                break
            missing.append(parent)
        try:
            for parent in reversed(missing):
                try:
                    parent.mkdir()
                except FileExistsError:  # another run made it meanwhile: not ours to remove
                    continue
                self._made.append(parent)
            where, prefix = (self.out, STAGING) if self.inside else (self.out.parent, f".{self.out.name}{STAGING}")
            sweep_dead(where, re.escape(prefix))
            self.staging = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=where))
        except OSError as exc:
            self._remove_made()
            raise FlopdiffError(f"{self.flag}: cannot create an output folder there "
                                f"({exc.strerror or exc.__class__.__name__}); choose a writable folder") from None

    def _check(self) -> None:
        out, flag = self.out, self.flag
        name = flag.split()[0]
        cwd = Path.cwd()
        if out == cwd or out in cwd.parents:
            raise FlopdiffError(f"{flag}: is the current folder or contains it; flopdiff replaces its output folder "
                                f"as a whole, so name a folder of its own (e.g. {name} flopdiff-report)")
        for p in (out, *out.parents):
            if p.exists() and not p.is_dir():
                what = "is a file" if p == out else f"lies under the file {p}"
                raise FlopdiffError(f"{flag}: {what}; give a folder path")
        if out.is_dir():
            try:
                foreign = sorted(e.name for e in out.iterdir()
                                 if e.name not in OUTPUT_NAMES and not e.name.startswith(STAGING))
            except OSError as exc:
                raise FlopdiffError(f"{flag}: cannot read it ({exc.strerror}); choose another folder") from None
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise FlopdiffError(f"{flag}: holds files flopdiff does not write ({shown}); the output folder "
                                    f"is replaced as a whole, so pass a new or empty folder, or one flopdiff wrote")

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Commit when the block ends normally; discard on anything raised (a signal's exception included, and that
        of a signal a finalizer swallowed: raise_caught)."""
        if exc_type is None:
            try:
                raise_caught()
            except BaseException:
                self.discard()
                raise
            self.commit()
        else:
            self.discard()

    def path(self, name: str) -> Path:
        assert name.split("/")[0] in OUTPUT_NAMES, name
        return self.staging / name

    def write(self, name: str, data: str | bytes | Iterable[str]) -> None:
        """`data` whole, or in pieces written as they come (tracer.count.document.encoded)."""
        path = self.path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                for piece in [data] if isinstance(data, (str, bytes)) else data:
                    f.write(piece.encode("utf-8") if isinstance(piece, str) else piece)
        except OSError as exc:
            raise self._failed(f"cannot write {name}", exc) from None

    def _failed(self, what: str, exc: OSError) -> FlopdiffError:
        fix = "free some space there" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder"
        return FlopdiffError(f"{self.flag}: {what} ({exc.strerror or exc.__class__.__name__}); {fix} or choose "
                             f"another folder (the previous output set was kept)")

    def commit(self) -> None:
        """Make the staged files the output set, in one step; the old set is deleted after."""
        try:
            self._commit()
        except OSError as exc:
            raise self._failed("cannot replace the output set", exc) from None
        self._made = []

    def _commit(self) -> None:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.staging, 0o777 & ~mask)  # mkdtemp made it 0700: give it a normal folder's mode
        for folder, dirs, files in os.walk(self.staging):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(folder, f), 0o666 & ~mask)
        if self.inside:
            self._swap_entries()
            return
        for _ in range(8):  # another run may commit the same new --out between our look and our rename
            if self.out.exists():
                if _exchange(self.staging, self.out):
                    shutil.rmtree(self.staging, ignore_errors=True)  # now the old set
                    return
                # no atomic exchange here: move the old set aside, then the new one in
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{STAGING}-{os.getpid()}-", dir=self.out.parent))
                try:
                    os.rename(self.out, old / "old")
                except FileNotFoundError:  # the other run moved it meanwhile
                    shutil.rmtree(old, ignore_errors=True)
                    continue
                try:
                    os.rename(self.staging, self.out)
                except OSError:  # the previous set back where it was; if even that fails it stays aside, whole
                    os.rename(old / "old", self.out)
                    shutil.rmtree(old, ignore_errors=True)
                    raise
                shutil.rmtree(old, ignore_errors=True)  # now the old set
                return
            try:
                os.rename(self.staging, self.out)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        raise OSError(errno.EBUSY, "other runs keep replacing it", str(self.out))

    def _swap_entries(self) -> None:
        """A mount point's commit: each new entry swapped with the old one of its name (atomic per entry), the old
        set's other entries moved into the staging folder, which then goes with all of them."""
        new = {e.name for e in self.staging.iterdir()}
        for name in sorted(new):
            target, staged = self.out / name, self.staging / name
            if not target.exists() or not _exchange(staged, target):
                if target.is_dir():
                    os.rename(target, self.staging / f".old-{name}")
                os.replace(staged, target)
        for entry in self.out.iterdir():
            if entry.name in OUTPUT_NAMES and entry.name not in new:
                os.rename(entry, self.staging / f".old-{entry.name}")
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._remove_made()

    def _remove_made(self) -> None:
        for parent in reversed(self._made):
            try:
                parent.rmdir()
            except OSError:
                pass
        self._made = []
