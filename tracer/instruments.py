"""Instruments: what the capture calls around each module call and each recorded op, and around the whole forward,
for work that is not the graph itself. The capture is a CPU-only core that runs with no instrument; the CUDA
paths pass one in:

  * `ProfilerRanges`: torch.profiler (CUPTI on CUDA) around the forward, with a profiler range per recorded op
    (`flopdiff.op.<seq>`) and per module call (`flopdiff.module.<qualified path>`); `records()` then ties every
    kernel (on a GPU) or every aten op's self time (on a CPU) to the innermost op and module range around it
    (tracer.kernels attributes them to nodes and layers).
  * `NvtxRanges(module)`: an NVTX range named NVTX_RANGE around each call of one module, for Nsight Compute's
    `--nvtx-include` (`--ncu` runs flopdiff again under ncu with this instrument; ncu owns CUPTI there, so no
    profiler runs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


class Instrument:
    """The protocol, doing nothing: override what the instrument needs."""

    @contextmanager
    def session(self) -> Iterator[None]:
        """Around one captured forward."""
        yield

    def enter_module(self, path: str, qualified: str) -> None: ...
    def exit_module(self) -> None: ...

    @contextmanager
    def op(self, seq: int) -> Iterator[None]:
        """Around the run of recorded op number `seq` (node.meta["seq"])."""
        yield

    def records(self) -> list[dict[str, Any]]:
        """What the last session recorded (one record per kernel launch, see kernel_records)."""
        return []


OP_RANGE = "flopdiff.op."          # + the recorded op's sequence number (node.meta["seq"])
MODULE_RANGE = "flopdiff.module."  # + the module call's qualified path
NVTX_RANGE = "flopdiff-ncu"


def _range(name: str):
    """An open profiler range that does not pass through the dispatcher (so the recorder never sees it)."""
    rf = torch._C._profiler._RecordFunctionFast(name)
    rf.__enter__()
    return rf


def kernel_records(events) -> list[dict[str, Any]]:
    """torch.profiler FunctionEvents -> [{kernel, us, op (seq) or None, module (qualified) or None}].

    A kernel belongs to the event that launched it; the profiler can also hang it on an event nested inside
    that one (seen on an H200, torch 2.11: a cuBLASLt GEMM on both `aten::mm` and its child `Activity Buffer
    Request`). Such a copy, the same kernel and duration as on an enclosing event, is one launch: dropped."""
    records = []
    for e in events:
        kernels = getattr(e, "kernels", None)
        if not kernels:
            continue
        enclosing: Counter = Counter()
        p = e.cpu_parent
        while p is not None:
            enclosing.update((k.name, k.duration) for k in getattr(p, "kernels", None) or ())
            p = p.cpu_parent
        op, module = _ranges(e)
        for k in kernels:
            if enclosing[(k.name, k.duration)]:
                enclosing[(k.name, k.duration)] -= 1
                continue
            records.append({"kernel": k.name, "us": float(k.duration), "op": op, "module": module})
    return records


def cpu_records(events) -> list[dict[str, Any]]:
    """The same records for a run without a GPU, where the work items are the aten ops themselves: every aten event
    with its self CPU time (the time not spent in the ops it calls, so nothing counts twice) belongs to the op and
    module ranges around it as a kernel does. It is how the attribution runs, end to end, on a CPU machine."""
    records = []
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        op, module = _ranges(e)
        records.append({"kernel": e.name, "us": float(e.self_cpu_time_total), "op": op, "module": module})
    return records


def _ranges(e) -> tuple[int | None, str | None]:
    """The innermost op range (its sequence number) and module range (its qualified path) open around an event."""
    op = module = None
    p = e
    while p is not None and (op is None or module is None):
        if op is None and p.name.startswith(OP_RANGE):
            op = int(p.name[len(OP_RANGE):])
        elif module is None and p.name.startswith(MODULE_RANGE):
            module = p.name[len(MODULE_RANGE):]
        p = p.cpu_parent
    return op, module


class ProfilerRanges(Instrument):
    def __init__(self) -> None:
        self._open: list[object] = []
        self._events: Any = None

    @contextmanager
    def session(self) -> Iterator[None]:
        cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        with profile(activities=[ProfilerActivity.CPU, *cuda]) as prof:
            yield
            if cuda:
                torch.cuda.synchronize()
        self._events = prof.events()

    def enter_module(self, path: str, qualified: str) -> None:
        self._open.append(_range(f"{MODULE_RANGE}{qualified}"))

    def exit_module(self) -> None:
        self._open.pop().__exit__(None, None, None)

    @contextmanager
    def op(self, seq: int) -> Iterator[None]:
        rf = _range(f"{OP_RANGE}{seq}")
        try:
            yield
        finally:
            rf.__exit__(None, None, None)

    def records(self) -> list[dict[str, Any]]:
        if self._events is None:
            return []
        return (kernel_records if torch.cuda.is_available() else cpu_records)(self._events)


class NvtxRanges(Instrument):
    def __init__(self, module: str) -> None:
        self.module = module
        self._pushed: list[bool] = []

    def enter_module(self, path: str, qualified: str) -> None:
        self._pushed.append(path == self.module)
        if self._pushed[-1]:
            torch.cuda.nvtx.range_push(NVTX_RANGE)

    def exit_module(self) -> None:
        if self._pushed.pop():
            torch.cuda.nvtx.range_pop()
