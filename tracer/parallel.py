"""Decode steps captured by a forked worker process while this one captures the prefill (fake mode, CPU).

A decode step reads the steps before it only through the KV cache, and under fake tensors a cache is nothing
but its tensors' shapes, strides and dtypes. So the worker does not wait for the prefill: it builds the cache
of step k itself (`synthesized_state`: the cache of a one-token forward, every tensor widened to the step's
KV length) and captures steps n-1, n-2, ... while this process captures the prefill and then steps 0, 1, ...
from the real cache; the two meet wherever the work balances (`_Claims`).

Checked on every run, never assumed: after step 0 the real cache that step 1 reads must equal the synthesized
one in every tensor's shape, stride, dtype and device and in every other attribute, and the model (buffers,
modules' plain attributes) must still be what the worker forked from. On any difference, and if the worker
fails, this process kills it and captures those steps itself (one line on stderr says why). Step 0 always
stays here: it reads the prefill's cache, whose strides come from the prefill's own layout.

Graphs come back through `encode`/`decode`: every fx node with its name, target, args and metadata, values as
meta tensors of the same shape, stride and dtype (all that counting and the reports read from them).
"""

from __future__ import annotations

import copy
import mmap
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._ops import HigherOrderOperator

from tracer.capture import StageGraph, capture
from tracer.lifecycle import die_with_parent, temp_folder

SEQ_DIM = -2  # transformers' cache layout: (batch, heads, positions, head_dim)


# Attention implementations whose forward runs compiled kernels on real tensors (flex attention's block masks,
# built by torch.compile'd code): a freshly compiled kernel crashed in a forked child (SIGSEGV, torch 2.13).
FORK_UNSAFE_ATTN = {"flex_attention"}


def available() -> bool:
    """A second CPU to run on and fork() to start the worker with (no re-import, no model rebuild)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return hasattr(os, "fork") and cpus >= 2


def worker_allowed(attn: str | dict[str, str] | None) -> bool:
    """Whether the decode worker can run the model with this `--attn` choice (see FORK_UNSAFE_ATTN)."""
    chosen = set(attn.values()) if isinstance(attn, dict) else {attn}
    return available() and not chosen & FORK_UNSAFE_ATTN


def _fork(body: Callable[[], None]) -> int:
    """Run `body` in a forked child, which exits (status 0, or 1 if `body` raised) without ever returning into
    the caller's code or flushing the caller's buffers again; returns the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            die_with_parent()  # a killed run leaves no child behind (tracer.lifecycle)
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
    pid = _fork(job)

    def wait() -> None:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            job()
    return wait


# ---- the graph codec ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Ref:
    index: int  # a node argument: the index of the node it refers to


@dataclass(frozen=True)
class _Val:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _target(target: Any) -> Any:
    if isinstance(target, HigherOrderOperator):
        return ("hop", target.name())
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target._schema.name.split("::")
        return ("op", namespace, name, target._overloadname)
    return target  # operator.getitem: pickles as itself


def _resolve(target: Any) -> Any:
    if isinstance(target, tuple) and target[0] == "hop":
        return torch._ops._higher_order_ops[target[1]]
    if isinstance(target, tuple) and target[0] == "op":
        _, namespace, name, overload = target
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    return target


def _enc(x: Any, index: dict[torch.fx.Node, int]) -> Any:
    if isinstance(x, torch.fx.Node):
        return _Ref(index[x])
    if isinstance(x, torch.Tensor):
        return _Val(tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):  # fx keeps args as immutable_list / tuple: plain ones pickle
        return (list if isinstance(x, list) else tuple)(_enc(v, index) for v in x)
    if isinstance(x, dict):
        return {k: _enc(v, index) for k, v in x.items()}
    return x


def _dec(x: Any, nodes: list[torch.fx.Node]) -> Any:
    if isinstance(x, _Ref):
        return nodes[x.index]
    if isinstance(x, _Val):
        return torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device="meta")
    if type(x) in (list, tuple):
        return type(x)(_dec(v, nodes) for v in x)
    if isinstance(x, dict):
        return {k: _dec(v, nodes) for k, v in x.items()}
    return x


def encode(sg: StageGraph) -> bytes:
    """A captured stage as bytes (the worker's side)."""
    index = {n: i for i, n in enumerate(sg.graph.nodes)}
    entries = [(n.op, n.name, _target(n.target), _enc(n.args, index), _enc(n.kwargs, index),
                {k: (_enc(v, index) if k == "val" else v) for k, v in n.meta.items()})
               for n in sg.graph.nodes]
    return pickle.dumps((sg.stage, sg.step, sg.kv_len, sg.notes, entries), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> StageGraph:
    """The stage again, as an fx graph with the same node names, args and metadata (values on the meta device).
    Call it outside any fake mode: the values are plain meta tensors."""
    stage, step, kv_len, notes, entries = pickle.loads(data)
    graph = torch.fx.Graph()
    nodes: list[torch.fx.Node] = []
    for op, name, target, args, kwargs, meta in entries:
        if op == "output":
            node = graph.output(_dec(args[0], nodes))
        else:
            node = graph.create_node(op, _resolve(target), name=name)
            if args:
                node.args = _dec(args, nodes)
            if kwargs:
                node.kwargs = _dec(kwargs, nodes)
        if node.name != name and op != "output":
            raise RuntimeError(f"graph codec: node {name!r} came back as {node.name!r}")
        node.meta = {k: (_dec(v, nodes) if k == "val" else v) for k, v in meta.items()}
        nodes.append(node)
    return StageGraph(stage, graph, step=step, kv_len=kv_len, notes=notes)


# ---- the synthesized cache and the checks ------------------------------------------------------------------

def cache_of(output: Any) -> Any:
    """The cache a decode step reads from the forward before it (transformers 5 calls it `cache`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _tensors(x: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v, depth)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v, depth)
    elif hasattr(x, "__dict__") and depth < 4 and not isinstance(x, (type, torch.nn.Module)):
        yield from _tensors(vars(x), depth + 1)


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors of a cache object (legacy tuples, transformers' Cache classes), in a fixed order."""
    return list(_tensors(cache))


def synthesized_state(template: Any, kv_len: int) -> Any:
    """What a decode step at `kv_len` reads, built from `template` (a one-token forward's output): its cache
    with every tensor widened to `kv_len` positions, contiguous as a decode step's `cat` leaves it."""
    cache = cache_of(template)
    memo: dict[int, Any] = {}
    for t in cache_tensors(cache):
        shape = list(t.shape)
        shape[SEQ_DIM] = kv_len
        memo[id(t)] = torch.empty(shape, dtype=t.dtype, device=t.device)
    widened = copy.deepcopy(cache, memo)
    return types.SimpleNamespace(cache=widened, past_key_values=widened)


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


# ---- the worker ------------------------------------------------------------------------------------------------

EMPTY = types.SimpleNamespace(cache=None, past_key_values=None)  # no cache: a decode step's one-token forward


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
            if lo > hi or (not low and hi < 1):
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

    def __init__(self, steps: int):
        self.steps = steps
        self.claims = _Claims(steps)
        self.folder = temp_folder("decode")
        self.pid = 0
        self.status: int | None = None
        self.failure = ""

    @classmethod
    def fork(cls, vendor: Any, model: torch.nn.Module, roots: list[str], prompt_len: int,
             steps: int) -> "DecodeWorker":
        worker = cls(steps)

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
            try:
                worker._work(vendor, model, roots, prompt_len)
            except BaseException as exc:  # reported to the parent, which falls back
                worker._write("error", f"{exc.__class__.__name__}: {exc}".encode())
                raise

        worker.pid = _fork(body)
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
        step1 = signature(cache_of(synthesized_state(template, prompt_len + 1)))
        self._write("expected", pickle.dumps((step1, start)))
        while (k := self.claims.high()) is not None:
            sg, _ = capture(vendor.decode(model, synthesized_state(template, prompt_len + k), k), model,
                            "decode", vendor_roots=roots, step=k, kv_len=prompt_len + k)
            self._write(f"step-{k}", encode(sg))

    def check(self, after_step0: Any, model: torch.nn.Module) -> bool:
        """After this process's step 0: is the worker's synthesized cache the real one, and the model unchanged?"""
        deadline = time.monotonic() + 120
        while (expected := self._read("expected")) is None and self._alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if expected is None:
            error = self._read("error")
            return self.cancel(error.decode() if error else _died(self.status))
        step1, start = pickle.loads(expected)
        if signature(cache_of(after_step0)) != step1:
            return self.cancel("its synthesized KV cache differs from the real one after step 0")
        if model_signature(model) != start:
            return self.cancel("the prefill changed the model's state (buffers or module attributes)")
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
        while True:
            alive = self._alive()  # before reading: files written before the worker exits are all there
            for k in range(first, self.steps):
                if k not in graphs and (blob := self._read(f"step-{k}")) is not None:
                    graphs[k] = decode(blob)
            if not alive:
                break
            if time.monotonic() > deadline:
                self.cancel(f"it took over {timeout:.0f} s to finish its last step")
                return None
            time.sleep(0.002)
        if self.status != 0 or len(graphs) < self.steps - first:
            error = self._read("error")
            self.failure = error.decode() if error else _died(self.status)
            return None
        return [graphs[k] for k in range(first, self.steps)]

    def close(self) -> None:
        if self.pid:
            self.cancel("closed")
        shutil.rmtree(self.folder, ignore_errors=True)


def _died(status: int | None) -> str:
    return f"it was killed by signal {-status}" if status is not None and status < 0 else f"it exited with status {status}"


def note_fallback(worker: DecodeWorker) -> None:
    print(f"flopdiff: note: the decode worker process was not used ({' '.join(worker.failure.split())}); "
          f"its steps were captured in this process", file=sys.stderr)


def capture_decode(vendor: Any, model: torch.nn.Module, previous: Any, steps: int, prompt_len: int,
                   roots: list[str], worker: DecodeWorker | None, progress: Callable[[str], None],
                   profile: bool = False, first: int = 0) -> tuple[list[StageGraph], Any, int]:
    """This process's share of the decode steps, from the real cache: every step from `first` without a
    worker, else steps from 0 until the worker's claims meet them. Returns the graphs, the last output and
    the next step (where the worker's steps begin)."""
    graphs = []
    k = first
    while k < steps:
        if worker is not None and not worker.failure:
            claimed = worker.claims.low()
            if claimed is None:
                break
            assert claimed == k
        progress(f"decode step {k + 1}/{steps}")
        sg, previous = capture(vendor.decode(model, previous, k), model, "decode", vendor_roots=roots, step=k,
                               kv_len=prompt_len + k, profile=profile)
        graphs.append(sg)
        if k == 0 and worker is not None and not worker.failure:
            worker.check(previous, model)
        k += 1
    return graphs, previous, k
