"""Whatever ends a run, it leaves its complete output set or the previous one, no process and no scratch folder
(tracer.core.lifecycle): kills of the real command line while its decode worker runs, and a kill injected at every
step of writing and committing an output set."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tracer.core.lifecycle import OUTPUT_NAMES, OutputSet

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def _scratch_of(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"flopdiff-*-{pid}-*"))


def _until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _old_set(out: Path) -> dict[str, bytes]:
    out.mkdir()
    for name in ("report.json", "report.html"):
        (out / name).write_text(f"old {name}")
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_no_worker_no_scratch_and_the_old_set(sig, tmp_path):
    from tracer.core.forking import available

    if not available():
        pytest.skip("the decode worker needs fork() and a second CPU; this machine has one")
    out = tmp_path / "out"
    old = _old_set(out)
    proc = subprocess.Popen([sys.executable, "-m", "tracer.diff", "--quiet", "--decode-steps", "200", "--every-step",
                             "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the worker is forked once the model is built; its scratch folder is named after this process
        assert _until(lambda: _scratch_of(proc.pid) and _children(proc.pid), 60), "no decode worker started"
        workers = _children(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig
        assert err.strip().splitlines() == [f"flopdiff: interrupted ({sig.name}); the output folder was left as it was"]
    else:
        assert proc.returncode == -signal.SIGKILL
    assert _until(lambda: not any(_alive(w) for w in workers), 10), "the decode worker outlived its parent"
    assert _until(lambda: not _scratch_of(proc.pid), 10), _scratch_of(proc.pid)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert (len(staged) == 1) == (sig == signal.SIGKILL)  # a SIGKILL cannot clean its staging folder...
    OutputSet(out).discard()  # ...which the next run writing beside it sweeps
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_signal_whose_exception_a_finalizer_swallowed_still_ends_the_run(tmp_path, capsys):
    """Python ignores an exception raised in a finalizer, and freeing a decode step's graph runs thousands of them
    (tracer.capture.recorder.collect_steps): a SIGINT taken there once let a run go on, replace its output set and
    exit 0. The signal is raised again at the next check and before any commit, with no traceback on stderr."""
    import weakref

    from tracer.core.lifecycle import raise_caught, signals_as_exceptions

    class Thing:
        pass

    def signalled_in_a_finalizer(sig: int) -> None:
        thing = Thing()
        ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), sig))
        del thing  # the callback's handler raises inside it: swallowed
        assert ref() is None

    out = tmp_path / "out"
    old = _old_set(out)
    for sig, exc in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, BaseException)):
        with pytest.raises(exc) as info:
            with signals_as_exceptions(), OutputSet(out) as outputs:
                signalled_in_a_finalizer(sig)
                outputs.write("report.json", "new")  # the block goes on to its commit, which refuses
        assert getattr(info.value, "signum", signal.SIGINT) == sig
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old
        assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing staged left
    with signals_as_exceptions():  # a block after one that was interrupted starts clean
        raise_caught()
    assert capsys.readouterr().err == ""


# Every step of a run's writing, in order, each a place the process may die (os._exit: no cleanup at all).
WRITE_SCRIPT = """
import os, sys
from pathlib import Path
from tracer.core import lifecycle
from tracer.core.lifecycle import OutputSet

out, kill_at = sys.argv[1], int(sys.argv[2])
steps = [0]
def point():
    steps[0] += 1
    if steps[0] == kill_at:
        os._exit(9)
for name in ("rename", "replace", "rmdir"):  # the commit's file system steps
    real = getattr(os, name)
    def wrapped(*a, _real=real, **k):
        point()
        r = _real(*a, **k)
        point()
        return r
    setattr(os, name, wrapped)
real_exchange = lifecycle._exchange
def exchange(a, b):
    point()
    r = real_exchange(a, b)
    point()
    return r
lifecycle._exchange = exchange
outputs = OutputSet(out)
point()
for name in ("report.json", "report.html", "model-explorer-node-data.json"):
    outputs.write(name, "new " + name)
    point()
outputs.commit()
point()
print("steps", steps[0])
"""


def test_output_set_is_old_or_new_at_every_kill_point(tmp_path):
    new = {name: f"new {name}".encode() for name in ("report.json", "report.html", "model-explorer-node-data.json")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full = subprocess.run([sys.executable, "-c", WRITE_SCRIPT, str(tmp_path / "probe"), "0"], env=env,
                          capture_output=True, text=True, check=True)
    points = int(full.stdout.split()[-1])
    assert points >= 6
    for kill_at in range(1, points + 1):
        folder = tmp_path / f"k{kill_at}"
        folder.mkdir()
        out = folder / "out"
        old = _old_set(out)
        proc = subprocess.run([sys.executable, "-c", WRITE_SCRIPT, str(out), str(kill_at)], env=env,
                              capture_output=True, text=True)
        assert proc.returncode in (0, 9), proc.stderr
        seen = {p.name: p.read_bytes() for p in out.iterdir()}
        assert seen in (old, new), (kill_at, sorted(seen))
        OutputSet(out).discard()  # the next run sweeps what the killed one left
        assert [p.name for p in folder.iterdir()] == ["out"], (kill_at, list(folder.iterdir()))


def test_an_unwritable_output_place_is_one_line(tmp_path, monkeypatch, capsys):
    """A folder without write permission (root, who runs the tests here and in CI, writes anywhere: the refusal
    the system gives a user is planted where the staging folder is made)."""
    import tracer.core.lifecycle as lifecycle
    from tracer.diff import main

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(lifecycle.tempfile, "mkdtemp", refuse)
    code = main(["--quiet", "--out", str(tmp_path / "ro" / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"flopdiff: error: --out {tmp_path / 'ro' / 'out'}: cannot create an output folder "
                                   f"there (Permission denied); choose a writable folder"]
    assert list(tmp_path.iterdir()) == []  # the parent it had made for the output is gone again


def test_output_set_names_are_the_files_a_run_writes(tmp_path):
    """A default run writes exactly a subset of OUTPUT_NAMES (a new file must be added there, or the next run into
    the same folder would refuse it as a user's file)."""
    from tracer.diff import main

    assert main(["--quiet", "--decode-steps", "0", "--out", str(tmp_path / "o")]) == 0
    written = {p.name for p in (tmp_path / "o").iterdir()}
    assert written <= OUTPUT_NAMES and "report.json" in written
    assert main(["--quiet", "--decode-steps", "0", "--out", str(tmp_path / "o")]) == 0  # a second run replaces it
    assert json.loads((tmp_path / "o" / "report.json").read_text())["workload"]["decode_steps"] == 0


# ---- --out where a container or a user puts it: a mount point, a symlink, a full disk; two first commits --------

@pytest.fixture
def tmpfs(tmp_path):
    """A fresh tmpfs mounted in the test's folder (CI and the tests run as root); unmounted after."""
    mounted = []

    def mount(path: Path, size: str = "64m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _cli(*argv: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    return subprocess.run([sys.executable, "-m", "tracer.diff", "--quiet", "--image-shape", "640x640",
                           "--decode-steps", "0", *argv], cwd=ROOT, capture_output=True, text=True, env=env)


def test_out_a_mount_point_is_replaced_entry_by_entry(tmp_path, tmpfs):
    """`-v host:/out`: the mount point cannot be renamed (EBUSY) and its parent is another file system."""
    out = tmpfs(tmp_path / "out")
    (out / "ncu.csv").write_text("an older run's file")  # flopdiff's, not written by this run: goes
    first = _cli("--out", str(out))
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]
    doc = json.loads((out / "report.json").read_text())
    assert _cli("--out", str(out), "--decode-steps", "1").returncode == 0
    assert json.loads((out / "report.json").read_text())["workload"]["decode_steps"] == 1 != \
        doc["workload"]["decode_steps"]
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # no staging left inside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nor beside


def test_out_a_symlink_writes_at_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "target"
    old = _old_set(target)
    (tmp_path / "link").symlink_to(target)
    proc = _cli("--out", str(tmp_path / "link"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(target)
    assert (target / "report.json").read_bytes() != old["report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]  # no `.link.flopdiff-staging-*`


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_full_file_system_is_one_line_and_keeps_the_old_set(command, tmp_path, tmpfs, tiny_v2_config):
    disk = tmpfs(tmp_path / "disk", size="64k")  # a report.html alone is larger
    out = disk / "out"
    old = _old_set(out)
    argv = ["--out", str(out), "--config", tiny_v2_config]
    if command == "sweep":
        proc = subprocess.run([sys.executable, "-m", "tracer.diff", "sweep", "640x640", "--quiet", *argv], cwd=ROOT,
                              capture_output=True, text=True)
    else:
        proc = _cli(*argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"--out {out}: cannot write" in lines[0] and "No space left on device" in lines[0]
    assert "free some space there or choose another folder (the previous output set was kept)" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in disk.iterdir()) == ["out"]  # the staging folder went


COMMIT_SCRIPT = """
import sys
from tracer.core.lifecycle import OutputSet
with OutputSet(sys.argv[1]) as outputs:
    outputs.write("report.json", sys.argv[2])
"""


def test_two_first_commits_to_one_new_out_both_succeed(tmp_path):
    """Both see no --out, both rename their staging folder to it: the second failed with ENOTEMPTY (4 of 60)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(30):
        out = tmp_path / f"r{round_}" / "out"
        procs = [subprocess.Popen([sys.executable, "-c", COMMIT_SCRIPT, str(out), f"run {i}"], env=env,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]
        assert (out / "report.json").read_text() in ("run 0", "run 1")
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"], round_


def test_without_an_atomic_exchange_a_failed_commit_keeps_the_old_set(tmp_path, monkeypatch):
    """Where renameat2 cannot exchange, the old set moves aside before the new one moves in: if that second rename
    fails, the old set goes back, whole, and the error names --out."""
    import tracer.core.lifecycle as lifecycle
    from tracer.core.errors import FlopdiffError

    out = tmp_path / "out"
    old = _old_set(out)
    monkeypatch.setattr(lifecycle, "_exchange", lambda a, b: False)
    real_rename = os.rename

    outputs = OutputSet(out)

    def rename(src, dst):  # the new set's move into place fails; every other rename happens
        if Path(src) == outputs.staging:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)
    outputs.write("report.json", "new")
    monkeypatch.setattr(lifecycle.os, "rename", rename)
    with pytest.raises(FlopdiffError, match="cannot replace the output set"):
        outputs.commit()
    monkeypatch.setattr(lifecycle.os, "rename", real_rename)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    outputs.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
