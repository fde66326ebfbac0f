"""Forked children of a run: the decode worker (tracer.capture.decode_worker) and a report file written meanwhile.

A child starts with fork() (no re-import, no model rebuild), dies with its parent (tracer.core.lifecycle), and exits
without ever returning into the caller's code or flushing the caller's buffers again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from tracer.core.lifecycle import die_with_parent


def available() -> bool:
    """A second CPU to run on and fork() to start the worker with (no re-import, no model rebuild)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return hasattr(os, "fork") and cpus >= 2


def fork_child(body: Callable[[], None]) -> int:
    """Run `body` in a forked child, which exits (status 0, or 1 if `body` raised) without ever returning into
    the caller's code or flushing the caller's buffers again; returns the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            die_with_parent()  # a killed run leaves no child behind (tracer.core.lifecycle)
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def forked(job: Callable[[], None]) -> Callable[[], None]:
    """Run `job` (say, render and write one report file) in a forked child while the caller goes on; the
    returned function waits for it, and runs `job` here when the child failed (raising what it raises) or
    when there is no fork or no second CPU."""
    if not available():
        job()
        return lambda: None
    pid = fork_child(job)

    def wait() -> None:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            job()
    return wait
