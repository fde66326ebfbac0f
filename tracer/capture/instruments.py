"""Instruments: what the capture calls around each module call and each recorded op, and around the whole forward,
for work that is not the graph itself. The capture is a CPU-only core that runs with no instrument; the CUDA
paths pass one in:

  * `ProfilerRanges`: torch.profiler (CUPTI on CUDA) around the forward, with a profiler range per recorded op
    (`flopdiff.op.<seq>`) and per module call (`flopdiff.module.<qualified path>`); `records()` then ties every
    kernel (on a GPU) or every aten op's self time (on a CPU) to the innermost op and module range around it
    (tracer.cuda.kernels attributes them to nodes and layers).
  * `NvtxRanges(module)`: an NVTX range named NVTX_RANGE around each call of one module, for Nsight Compute's
    `--nvtx-include` (`--ncu` runs flopdiff again under ncu with this instrument; ncu owns CUPTI there, so no
    profiler runs).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import _filter_name
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


# Device kinds whose activities are kernels (what torch.profiler hangs on an op's `kernels`).
_DEVICES = tuple(getattr(DeviceType, name) for name in ("CUDA", "PrivateUse1", "XPU") if hasattr(DeviceType, name))


@dataclass
class _Cpu:
    """One synchronous CPU event of the raw stream: its span, and the innermost op and module ranges around it
    (itself included)."""

    index: int
    name: str
    start: int
    end: int
    op: int | None = None
    module: str | None = None
    children_ns: int = 0


def _cpu_tree(events) -> tuple[list[_Cpu], dict[int, _Cpu]]:
    """The synchronous CPU events in torch.profiler's own order (start, then the longer first), each nested in the
    innermost one around it on its thread, as torch.autograd.profiler_util builds `cpu_parent` (same filter, same
    containment rule), and the outermost event of each correlation id (a kernel's launcher)."""
    by_thread: dict[int, list[_Cpu]] = defaultdict(list)
    launcher: dict[int, _Cpu] = {}
    for i, e in enumerate(events):
        if e.device_type() != DeviceType.CPU or e.is_async() or e.start_thread_id() != e.end_thread_id():
            continue
        name = e.name()
        if _filter_name(name) or getattr(e, "is_hidden_event", lambda: False)():
            continue
        by_thread[e.start_thread_id()].append(_Cpu(i, name, e.start_ns(), e.end_ns()))
    ordered: list[_Cpu] = []
    for thread in by_thread.values():
        thread.sort(key=lambda c: (c.start, -c.end))
        stack: list[_Cpu] = []
        for c in thread:
            while stack and (c.start >= stack[-1].end or c.end > stack[-1].end):
                stack.pop()
            if stack:
                parent = stack[-1]
                parent.children_ns += c.end - c.start
                c.op, c.module = parent.op, parent.module
            if c.name.startswith(OP_RANGE):
                c.op = int(c.name[len(OP_RANGE):])
            elif c.name.startswith(MODULE_RANGE):
                c.module = c.name[len(MODULE_RANGE):]
            stack.append(c)
        ordered += thread
    ordered.sort(key=lambda c: (c.start, -c.end))
    for c in ordered:
        cid = events[c.index].correlation_id()
        if events[c.index].linked_correlation_id() == 0 and cid not in launcher:
            launcher[cid] = c
    return ordered, launcher


def kernel_records(events) -> list[dict[str, Any]]:
    """torch.profiler's raw event stream (`kineto_results.events()`) -> [{kernel, us, op (seq) or None, module
    (qualified) or None, start_us (on the device, from the session's first kernel)}], one record per device kernel: each kernel belongs to the CPU event that launched it (the
    event whose correlation id it links to), and to the op and module ranges open around that event.

    Read from the raw events, not from `prof.events()`: building torch's FunctionEvent tree and walking it took
    0.83-0.97 s per decode step of a v1 page on an H200, this 0.14 s, with identical records (checked there on v1
    and v2 profiles). One launch is one record: torch's tree can hang a kernel on
    two events that share a correlation id (a cuBLASLt GEMM on `aten::mm` and on its child `Activity Buffer
    Request`); here it goes to the outermost, once; a kernel reported twice (same name, device, stream and span)
    is one launch too."""
    _, launcher = _cpu_tree(events)
    found, seen = [], set()
    for i, e in enumerate(events):
        if e.device_type() not in _DEVICES:
            continue
        cpu = launcher.get(e.linked_correlation_id())
        key = (e.name(), e.device_index(), e.device_resource_id(), e.start_ns(), e.end_ns())
        if cpu is None or key in seen:  # a kernel no op launched is not in torch's tree either
            continue
        seen.add(key)
        record = {"kernel": _demangled(e.name()), "us": (e.end_ns() - e.start_ns()) / 1000, "op": cpu.op,
                  "module": cpu.module, "start_us": e.start_ns()}
        found.append(((cpu.start, -cpu.end, i), record))
    found.sort(key=lambda f: f[0])
    t0 = min((r["start_us"] for _, r in found), default=0)
    for _, r in found:  # the device clock, from the session's first kernel (host gaps: tracer.cuda.roofline)
        r["start_us"] = round((r["start_us"] - t0) / 1000, 3)
    return [record for _, record in found]


def cpu_records(events) -> list[dict[str, Any]]:
    """The same records for a run without a GPU, where the work items are the aten ops themselves: every aten event
    with its self CPU time (the time not spent in the events nested in it, so nothing counts twice) belongs to the op
    and module ranges around it as a kernel does. It is how the attribution runs, end to end, on a CPU machine."""
    ordered, _ = _cpu_tree(events)
    return [{"kernel": c.name, "us": (c.end - c.start - c.children_ns) / 1000, "op": c.op, "module": c.module}
            for c in ordered if c.name.startswith("aten::")]


@functools.cache
def _demangled(name: str) -> str:
    return torch._C._demangle(name) if len(name) > 1 else name


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
        self._events = prof.profiler.kineto_results.events()  # raw: no FunctionEvent tree (kernel_records)

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
