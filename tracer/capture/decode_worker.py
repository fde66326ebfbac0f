"""Decode steps captured by a forked worker process while this one captures the prefill (fake mode, CPU).

A decode step reads the steps before it only through the KV cache, and under fake tensors a cache is nothing
but its tensors' shapes, strides and dtypes. So the worker does not wait for the prefill: it builds the cache
of step k itself (`synthesized_state`: the cache of a one-token forward, every tensor widened to the step's
KV length) and captures steps n-1, n-2, ..., 0 while this process captures the prefill and then steps 0, 1, ...
from the real cache; the two meet wherever the work balances (`_Claims`).

Checked on every run, never assumed: the real cache a worker's step reads must equal the synthesized one in every
tensor's shape, stride, dtype and device and in every other attribute, and the model (buffers, modules' plain
attributes) must still be what the worker forked from. Step 0 reads the prefill's cache: when the worker took it,
the prefill's real cache is compared with the worker's step-0 cache (DeepSeek-OCR-2's match; v1's prefill leaves
its cache in another stride order, so this process captures step 0 again, quietly: that is a layout, not a fault).
Step 1 reads step 0's: after step 0 (here, or in the worker from a cache found equal to the prefill's) its cache
must equal the synthesized step-1 cache. On any other difference, and if the worker fails, this process kills it
and captures those steps itself (one line on stderr says why).

Steps come back through tracer.capture.graph_codec (to_bytes / from_bytes): as graphs, or counted and turned into their
report rows in the worker when the pipeline does not keep graphs (tracer.count.records.as_rows). The synthesized cache is
the vendor decode protocol's (tracer.vendors.base.synthesized_state), which the ONNX path's decode export uses too.
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from tracer.capture.graph_codec import from_bytes, to_bytes
from tracer.capture.recorder import StageGraph, capture, collect_steps
from tracer.core.forking import available, fork_child
from tracer.core.lifecycle import temp_folder
from tracer.vendors.base import EMPTY, cache_of, synthesized_state

# Attention implementations whose forward runs compiled kernels on real tensors (flex attention's block masks,
# built by torch.compile'd code): a freshly compiled kernel crashed in a forked child (SIGSEGV, torch 2.13).
FORK_UNSAFE_ATTN = {"flex_attention"}


def worker_allowed(attn: str | dict[str, str] | None) -> bool:
    """Whether the decode worker can run the model with this `--attn` choice (see FORK_UNSAFE_ATTN)."""
    chosen = set(attn.values()) if isinstance(attn, dict) else {attn}
    return available() and not chosen & FORK_UNSAFE_ATTN


def signature(x: Any, depth: int = 0) -> Any:
    """Everything a decode step can observe of a cache without values: tensors' shape, stride, dtype, device
    and offset; plain attributes' values; the structure around them."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x.storage_offset())
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return x
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(signature(v, depth) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, signature(v, depth)) for k, v in x.items()))
    if hasattr(x, "__dict__") and depth < 4 and not isinstance(x, (type, torch.nn.Module)):
        return (type(x).__qualname__, signature(vars(x), depth + 1))
    return ("object", type(x).__qualname__)


def model_signature(model: torch.nn.Module) -> Any:
    """The model state a forward could read besides its inputs: buffers, and each module's plain attributes
    (e.g. a rotary embedding's cached length)."""
    buffers = tuple((n, signature(b)) for n, b in model.named_buffers())
    plain = tuple((n, tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))))
                  for n, m in model.named_modules())
    return buffers, plain


# ---- the worker ----------------------------------------------------------------------------------------------

class _Claims:
    """Which steps are taken: this process counts up from 0, the worker down from the last step, under one
    lock in memory both share (an anonymous mmap survives fork)."""

    def __init__(self, steps: int):
        self._lock = multiprocessing.get_context("fork").Lock()
        self._mem = mmap.mmap(-1, 8)
        self._mem[:] = struct.pack("ii", 0, steps - 1)

    def _take(self, low: bool) -> int | None:
        with self._lock:
            lo, hi = struct.unpack("ii", self._mem[:])
            if lo > hi:
                return None
            self._mem[:] = struct.pack("ii", lo + 1, hi) if low else struct.pack("ii", lo, hi - 1)
            return lo if low else hi

    def low(self) -> int | None:
        return self._take(True)

    def high(self) -> int | None:
        return self._take(False)

    def stop(self) -> None:
        with self._lock:
            self._mem[:] = struct.pack("ii", 1, 0)


class DecodeWorker:
    """Started with `fork()` right after the model is built (inside the fake mode and the vendor's shims)."""

    def __init__(self, steps: int, only: tuple[int, ...] = (),
                 rows: Callable[[list[StageGraph]], list[StageGraph]] | None = None):
        self.steps = steps
        self.only = only  # these steps alone (a closed form's probes, tracer.capture.series), not a share of all
        self.claims = _Claims(steps)
        self.folder = temp_folder("decode")
        self.pid = 0
        self.status: int | None = None
        self.failure = ""
        self.rows = rows or (lambda graphs: graphs)  # a step as it is sent and as it is received

    @classmethod
    def fork(cls, vendor: Any, model: torch.nn.Module, roots: list[str], prompt_len: int,
             steps: int, rows: Callable[[list[StageGraph]], list[StageGraph]] | None = None,
             only: tuple[int, ...] = ()) -> "DecodeWorker":
        """`rows` (tracer.count.records.as_rows): each captured step is sent counted, as its report rows; else as a
        graph. `only`: capture these steps and no other (this process claims none; `collect` returns them)."""
        worker = cls(steps, only, rows)

        def body() -> None:
            # SIGTERM (the parent died: die_with_parent, or someone killed this worker): take the scratch
            # folder along, since no one else will
            def terminated(signum, frame):
                shutil.rmtree(worker.folder, ignore_errors=True)
                os._exit(1)

            signal.signal(signal.SIGTERM, terminated)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole group: the parent decides
            # the parent's OpenMP threads did not survive the fork: ATen stays single-threaded here (fake
            # tensors compute nothing; a real side computation must not enter a parallel region)
            torch.set_num_threads(1)
            # what it inherited stays out of its collections (tracer.capture.recorder.collect_steps): no scan of
            # the parent's objects, no copy of their pages
            gc.freeze()
            try:
                worker._work(vendor, model, roots, prompt_len)
            except BaseException as exc:  # reported to the parent, which falls back
                worker._write("error", f"{exc.__class__.__name__}: {exc}".encode())
                raise

        worker.pid = fork_child(body)
        return worker

    def _write(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.folder, f".{name}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.folder, name))

    def _read(self, name: str) -> bytes | None:
        try:
            with open(os.path.join(self.folder, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _work(self, vendor: Any, model: torch.nn.Module, roots: list[str], prompt_len: int) -> None:
        warnings.simplefilter("ignore")  # the parent shows the vendor's warnings once, from its own steps
        start = model_signature(model)
        template = vendor.decode(model, EMPTY, 0)()
        reads = [signature(cache_of(synthesized_state(template, prompt_len + k))) for k in (0, 1)]
        self._write("expected", pickle.dumps((reads, start)))
        for k in self.only or iter(self.claims.high, None):
            sg, out = capture(vendor.decode(model, synthesized_state(template, prompt_len + k), k), model,
                              "decode", vendor_roots=roots, step=k, kv_len=prompt_len + k)
            if k == 0:  # what its own step 0 leaves for step 1, for the check when its step 0 is taken
                self._write("after-0", pickle.dumps(signature(cache_of(out))))
            self._write(f"step-{k}", to_bytes(self.rows([sg])[0]))
            del sg, out
            collect_steps(k)

    def _expected(self) -> tuple[list[Any], Any] | None:
        """The caches the worker synthesized for steps 0 and 1 and the model it forked from (None: it failed)."""
        deadline = time.monotonic() + 120
        while (expected := self._read("expected")) is None and self._alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if expected is None:
            self.cancel(self._why_failed())
            return None
        return pickle.loads(expected)

    def _why_failed(self) -> str:
        """The error the worker wrote, else how it ended."""
        error = self._read("error")
        return error.decode() if error else _died(self.status)

    def check(self, after_step0: Any, model: torch.nn.Module) -> bool:
        """After this process's step 0: is the worker's synthesized cache the real one, and the model unchanged?"""
        if (expected := self._expected()) is None:
            return False
        reads, start = expected
        if signature(cache_of(after_step0)) != reads[1]:
            return self.cancel("its synthesized KV cache differs from the real one after step 0")
        if model_signature(model) != start:
            return self.cancel("the prefill changed the model's state (buffers or module attributes)")
        return True

    def step0_taken(self, prefill: Any, model: torch.nn.Module) -> bool:
        """The worker took every step, step 0 included: whether its step 0 read the prefill's real cache (else this
        process captures step 0 and checks the worker's later steps after it, as when it had claimed step 0 itself).
        Its later steps then read what its step 0 left: that must be the synthesized step-1 cache."""
        if (expected := self._expected()) is None:
            return False
        reads, start = expected
        if signature(cache_of(prefill)) != reads[0]:
            return False
        if model_signature(model) != start:
            self.cancel("the prefill changed the model's state (buffers or module attributes)")
            return False
        if self.steps > 1:
            while (after := self._read("after-0")) is None and self._alive():
                time.sleep(0.002)
            if after is None:
                self.cancel(self._why_failed())
                return False
            if pickle.loads(after) != reads[1]:
                self.cancel("its step 0 left a KV cache that differs from the one it synthesized for step 1")
                return False
        return True

    def _alive(self) -> bool:
        """Reaps the worker once it has exited (its status kept in `self.status`)."""
        if self.pid:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid, self.status = 0, os.waitstatus_to_exitcode(status)
        return bool(self.pid)

    def cancel(self, why: str) -> bool:
        self.failure = why
        self.claims.stop()
        if self.pid:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            self.pid = 0
        return False

    def collect(self, first: int, timeout: float) -> list[StageGraph] | None:
        """Steps first..n-1 from the worker, or None: then capture them here. Steps are decoded as their
        files appear, while the worker finishes the last one."""
        if self.failure:
            return None
        deadline = time.monotonic() + timeout
        graphs: dict[int, StageGraph] = {}
        wanted = self.only or range(first, self.steps)
        while True:
            alive = self._alive()  # before reading: files written before the worker exits are all there
            for k in wanted:
                if k not in graphs and (blob := self._read(f"step-{k}")) is not None:
                    graphs[k] = self.rows([from_bytes(blob)])[0]  # rows: their values shared with the others'
            if not alive:
                break
            if time.monotonic() > deadline:
                self.cancel(f"it took over {timeout:.0f} s to finish its last step")
                return None
            time.sleep(0.002)
        if self.status != 0 or len(graphs) < len(wanted):
            self.failure = self._why_failed()
            return None
        return [graphs[k] for k in wanted]

    def close(self) -> None:
        if self.pid:
            self.cancel("closed")
        shutil.rmtree(self.folder, ignore_errors=True)


def _died(status: int | None) -> str:
    return f"it was killed by signal {-status}" if status is not None and status < 0 else f"it exited with status {status}"


def fallback_note(worker: DecodeWorker) -> str:
    """The note a run gives when the worker could not be used (tracer.capture.trace adds it to the trace's notes)."""
    return (f"the decode worker process was not used ({' '.join(worker.failure.split())}); its steps were captured "
            f"in this process")
