"""Capture: run a vendor forward under a recording dispatch mode and build an aten-level `torch.fx.Graph`.

The recorder sits where `torch.utils.flop_counter.FlopCounterMode` sits (a `TorchDispatchMode` above the
fake-tensor mode, or above a meta capture's modes: tracer.capture.meta), skips the same size queries and
decomposes the same composite ops, so the graph holds exactly the ops FlopCounterMode would count:
`tracer.count.counter` can then reproduce its numbers node by node.

Each call_function node's meta holds:
  val            the (fake or meta) output, as make_fx stores it; args are other nodes or constants
  nn_module_stack  {path: (qualified path with call indices, module class)}, outermost first
  module         innermost module path (`<root>` outside any submodule)
  module_call    the same path with `#k` after each module called for the k-th time (k > 0) within
                 its parent's call, e.g. `model.vision_tower#1.sam_encoder...` for SAM on the tiles
  module_class   innermost module class name
  source         first frame outside torch and flopdiff, `file:line` relative to its package root
  vendor_source  first frame in the vendor's own files (e.g. modeling_deepseek_ocr2.py), `file:line`
  vendor_function  that frame's function (e.g. `get_decomposed_rel_pos`): mapping rules can tell apart two
                 matmuls of one module by the vendor function issuing them
  storage        per tensor value (a list for a tuple of them): (storage id, byte offset, bytes the view spans,
                 bytes of the storage); an output aliasing an input keeps its id (a view, an in-place op), any
                 other output gets a new one: what tracer.count.memory reads bytes and liveness from

A call of a Python-level function the tracer wraps (an attention implementation, tracer.capture.attention) is recorded as
a boundary node of its own (`call_boundary`): placed after the ops it issued, with their names in `meta["inner"]`,
its parameters in `meta["params"]`, and its output tensor attributed to it. The instrument sees it as an op, so
kernels launched from Python inside it (no aten op around them) land on it.
"""

from __future__ import annotations

import functools
import gc
import operator
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.fx
from torch._ops import HigherOrderOperator
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from tracer.capture.instruments import Instrument
from tracer.capture.meta import CPU_OUTPUT_DTYPES, active_kernels, cpu_output_dtypes
from tracer.capture.provenance import ModuleStack, SourceLocator, module_hooks
from tracer.core.lifecycle import raise_caught
from tracer.vendors.base import cache_of, cache_tensors

# Views whose schema carries no alias annotation: their output is a view of the first argument all the same
_UNANNOTATED_VIEWS = {torch.ops.aten._unsafe_view.default}

# The ops FlopCounterMode passes through untouched (size and layout queries), and `prim::device`, which
# only fake tensors send through the dispatcher: metadata queries, never graph nodes.
_SKIPPED = {
    getattr(torch.ops.aten, name).default
    for name in (
        "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "size", "sym_size",
        "stride", "sym_stride", "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim",
    )
    if hasattr(torch.ops.aten, name)
}
_SKIPPED |= {torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.layout.default, torch.ops.prim.device.default}
if hasattr(torch.ops.aten, "sym_is_contiguous"):
    _SKIPPED.add(torch.ops.aten.sym_is_contiguous.default)



@dataclass
class StageGraph:
    """One captured forward: `stage` is vision, prefill or decode (`step` 0.. for decode). A stage counted where
    it was captured (the decode worker's steps, and this process's beside them) holds its report rows (`rows`,
    tracer.count.records.as_rows) and no graph."""

    stage: str
    graph: torch.fx.Graph | None
    step: int | None = None
    kv_len: int | None = None
    notes: list[str] = field(default_factory=list)
    kernels: list[dict] = field(default_factory=list)  # CUDA runs: one record per kernel launch
    selection: list[torch.fx.Node] | None = None  # a stage that is part of another's graph (vision of prefill)
    rows: list[dict] | None = None  # counted where it was captured: its report rows (then graph is None)
    params: set[int] = field(default_factory=set)  # storage ids of the parameters and buffers it read
    outputs: list[tuple] = field(default_factory=list)  # storage records of its outputs (live to its end)
    kv_layers: list[int] | None = None  # bytes of the KV cache it returned, per layer (keys + values)
    kv_storages: dict[int, int] = field(default_factory=dict)  # that cache's storages: id -> bytes its tensor spans
    memory: dict | None = None  # its weight bytes and activation peak (tracer.count.memory.stage_memory)
    span: tuple[int, int] | None = None  # decode steps first..last in closed form (tracer.capture.series): rows only
    series: dict | None = None  # then the per-step affine forms [a, b] of its totals (flops, kv bytes, kv length)

    def call_nodes(self) -> Iterable[torch.fx.Node]:
        if self.selection is not None:
            return iter(self.selection)
        return (n for n in self.graph.nodes if n.op == "call_function")

    def op_nodes(self) -> Iterable[torch.fx.Node]:
        return (n for n in self.call_nodes() if n.target is not operator.getitem)


SMALL_DATA = 4096  # elements: an integer tensor this small may be data a formula reads (varlen sequence lengths)


def _kept(x):
    """What a node keeps of a value: fake and meta tensors as they are (they hold no data); a real tensor as a meta
    tensor of the same shape, stride and dtype, which is all counting and the reports read, except a small integer
    tensor, kept as it is (a formula may read its values). A real run must not keep every activation alive."""
    if type(x) in (tuple, list):
        return type(x)(_kept(v) for v in x)
    if isinstance(x, tuple):  # torch.return_types (structseq): its items
        return tuple(_kept(v) for v in x)
    if (not isinstance(x, torch.Tensor) or isinstance(x, FakeTensor) or x.is_meta
            or (not x.is_floating_point() and x.numel() <= SMALL_DATA)):
        return x
    return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")


@functools.cache
def op_name(target) -> str:
    """`aten::mm`, `flash_attn::_flash_attn_forward`, `higher_order::flex_attention` (asked once per op)."""
    if isinstance(target, HigherOrderOperator):
        return f"higher_order::{target.name()}"
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name
    return getattr(target, "__name__", str(target))


@functools.cache
def _node_name(op: str) -> str:
    return op.split("::")[-1].lstrip("_") or "op"


@functools.cache
def _decomposable(func) -> bool:
    """Whether `func.decompose` can do anything (the test it makes itself), asked once per op: re-entering
    the mode to learn that it cannot costs more than most ops' fake kernels."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


def boundary_call(*tensors):
    """The target of boundary nodes (a Python function the tracer wrapped: meta["op"] names which)."""
    raise RuntimeError("boundary nodes are records; they are not run")


_ACTIVE: list["GraphRecorder"] = []  # the recorder of the capture in progress (boundaries record into it)


def active_recorder() -> "GraphRecorder | None":
    return _ACTIVE[-1] if _ACTIVE else None


class GraphRecorder(TorchDispatchMode):
    """Records every dispatched op as an fx node, mirroring FlopCounterMode's view of the program."""

    supports_higher_order_operators = True

    def __init__(self, tensor_names: dict[int, str], module_names: dict[int, str], vendor_roots: Iterable[str],
                 instrument: Instrument | None = None):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.tensor_names = tensor_names
        self.modules = ModuleStack(module_names, instrument)
        self.instrument = instrument  # around each recorded op's run (kernel attribution)
        self._seq = 0
        self.locator = SourceLocator(vendor_roots)
        self.kernels = active_kernels()  # on meta tensors: memoized meta kernels (tracer.capture.meta)
        # tensor id -> (its node, a weak reference to it): a live tensor's id is unique, and a weak reference lets
        # a real run free its activations as the vendor code drops them (strong ones kept every one alive: a v2
        # page in real mode on CPU went past 24 GiB)
        self._nodes: dict[int, tuple[torch.fx.Node, weakref.ref]] = {}
        self._first_op: torch.fx.Node | None = None
        self._sids: dict[int, int] = {}  # a live storage's address -> its storage id
        self._next_sid = 0
        self.params: set[int] = set()  # storage ids of parameters and buffers
        self._open: list[list[str]] = []  # per open boundary call, the names of the nodes recorded inside it

    def _node_for(self, t: torch.Tensor) -> torch.fx.Node:
        hit = self._nodes.get(id(t))
        if hit is not None and hit[1]() is t:
            return hit[0]
        name = self.tensor_names.get(id(t), "input")
        if self._first_op is None:
            node = self.graph.placeholder(name.replace(".", "_"))
        else:
            with self.graph.inserting_before(self._first_op):
                node = self.graph.placeholder(name.replace(".", "_"))
        node.meta["val"] = _kept(t)
        node.meta["tensor_name"] = name
        node.meta["storage"] = self._storage(t, None)
        if name != "input":
            self.params.add(node.meta["storage"][0])
        self._nodes[id(t)] = (node, weakref.ref(t))
        return node

    def _storage(self, t: torch.Tensor, inputs: set[int] | None) -> tuple[int, int, int, int]:
        """`t`'s storage record. An output takes the id of the input storage it aliases; at any other address it
        is a new storage, even where an address was seen before (a real run frees and reuses them). `inputs`:
        the storage ids of the op's inputs (None: a graph input, keyed by address alone: tied weights share one).
        An empty storage is always new: it holds nothing to share, and a real run gives a fresh one (a new cache's
        `torch.tensor([])`) the address of a freed tensor, which would make its reader read that tensor."""
        st = t.untyped_storage()
        key = st._cdata
        sid = self._sids.get(key)
        if sid is None or st.nbytes() == 0 or (inputs is not None and sid not in inputs):
            sid = self._sids[key] = self._next_sid
            self._next_sid += 1
        return (sid, t.storage_offset() * t.element_size(), _span(t), st.nbytes())

    def _view_of(self, source: torch.fx.Node, out: torch.Tensor) -> tuple[int, int, int, int]:
        """The record of a view its schema does not annotate (`_unsafe_view`): its source's storage, whatever
        tensor the op returned (a memoized meta kernel returns a fresh one: its address joins the source's id)."""
        sid, _, _, size = source.meta["storage"]
        self._sids[out.untyped_storage()._cdata] = sid
        return (sid, out.storage_offset() * out.element_size(), _span(out), size)

    def _map(self, x):
        # A hand-rolled tree_map: ops' arguments are only tensors, scalars, lists, tuples and dicts.
        if isinstance(x, torch.Tensor):
            return self._node_for(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self._map(v) for v in x) if type(x) in (list, tuple) else x
        if isinstance(x, dict):
            return {k: self._map(v) for k, v in x.items()}
        return x

    def _record(self, func, args, kwargs, out) -> None:
        node_args = self._map(tuple(args))
        node_kwargs = self._map(dict(kwargs))
        name = op_name(func)
        # args are set after creation: create_node would walk them (pytree) looking for raw SymInts, which
        # fake tensors with static shapes never produce; the walk costs more than the rest of the node
        node = self.graph.create_node("call_function", func, name=_node_name(name))
        node.args = node_args
        if node_kwargs:
            node.kwargs = node_kwargs
        if self._first_op is None:
            self._first_op = node
        stack, path, qualified, cls = self.modules.snapshot()
        source, vendor, function = self.locator.locate()
        node.meta.update(val=_kept(out), nn_module_stack=stack, module=path, module_call=qualified,
                         module_class=cls, source=source, vendor_source=vendor, vendor_function=function, op=name,
                         seq=self._seq)
        self._seq += 1
        self._inside(node)
        inputs = {r[0] for a in node.all_input_nodes for r in storage_records(a)}
        if isinstance(out, torch.Tensor):
            node.meta["storage"] = (self._view_of(node_args[0], out) if func in _UNANNOTATED_VIEWS
                                    else self._storage(out, inputs))
            self._nodes[id(out)] = (node, weakref.ref(out))
        elif isinstance(out, (tuple, list)):
            records = []
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta.update(node.meta, val=_kept(o), storage=self._storage(o, inputs))
                    records.append(item.meta["storage"])
                    self._nodes[id(o)] = (item, weakref.ref(o))
            node.meta["storage"] = records

    def _inside(self, node: torch.fx.Node) -> None:
        for names in self._open:
            names.append(node.name)

    def call_boundary(self, op: str, tensors: tuple[torch.Tensor, ...], params: dict, fn: Callable, args: tuple,
                      kwargs: dict) -> object:
        """Run `fn(*args, **kwargs)` (a wrapped Python function, e.g. an attention implementation) and record it as
        node `op` over `tensors` (its q, k, v), after the nodes its run recorded."""
        seq = self._seq
        self._seq += 1
        self._open.append([])
        try:
            if self.instrument is None:
                out = fn(*args, **kwargs)
            else:
                with self.instrument.op(seq):
                    out = fn(*args, **kwargs)
        finally:
            inner = self._open.pop()
        node = self.graph.create_node("call_function", boundary_call, name=_node_name(op))
        node.args = self._map(tuple(tensors))
        if self._first_op is None:
            self._first_op = node
        primary = next(iter(result_tensors_of(out)), None)
        stack, path, qualified, cls = self.modules.snapshot()
        source, vendor, function = self.locator.locate()
        node.meta.update(val=_kept(primary), nn_module_stack=stack, module=path, module_call=qualified,
                         module_class=cls, source=source, vendor_source=vendor, vendor_function=function, op=op,
                         seq=seq, inner=inner, params=params)
        self._inside(node)
        if primary is not None:  # its output may be an inner op's (SDPA's, transposed): the same storage then
            sources = {r[0] for a in [*node.all_input_nodes, *inner_nodes(node)] for r in storage_records(a)}
            node.meta["storage"] = self._storage(primary, sources)
        if primary is not None:  # what follows reads the boundary's output, not its last inner op's
            self._nodes[id(primary)] = (node, weakref.ref(primary))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SKIPPED:
            return NotImplemented
        if isinstance(func, HigherOrderOperator):
            out = self._run(func, args, kwargs)
            self._record(func, args, kwargs, out)
            return out
        # Same rule as FlopCounterMode: an op torch has no formula for is decomposed when it can be.
        if func._overloadpacket not in flop_registry and _decomposable(func):
            with self:
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = self._run(func, args, kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _run(self, func, args, kwargs):
        if self.instrument is None:
            out = func(*args, **kwargs) if self.kernels is None else self.kernels(func, args, kwargs)
        else:
            with self.instrument.op(self._seq):
                out = func(*args, **kwargs)
        # on meta tensors, the few ops whose meta kernel answers another dtype than the CPU's (tracer.capture.meta)
        return cpu_output_dtypes(func, args, out) if func in CPU_OUTPUT_DTYPES else out


def _span(t: torch.Tensor) -> int:
    """Bytes from a view's first element to its last (a stride-0, expanded dimension adds nothing: read once)."""
    return 0 if t.numel() == 0 else (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def inner_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes recorded inside a boundary node (`meta["inner"]`, names): just before it in the graph."""
    names, found, prev = set(node.meta.get("inner") or ()), [], node.prev
    while names and prev.op != "root":
        if prev.name in names:
            names.discard(prev.name)
            found.append(prev)
        prev = prev.prev
    return found


def storage_records(node: torch.fx.Node) -> list[tuple[int, int, int, int]]:
    """A node's storage records (meta["storage"]), one per tensor value, as a list."""
    rec = node.meta.get("storage")
    return [] if rec is None else rec if isinstance(rec, list) else [rec]


def kv_layers(cache: object) -> list[int] | None:
    """Bytes of the KV cache a forward returned, per layer (its keys and values; v1's tuples, v2's cache object):
    None when it returned none."""
    if cache is None:
        return None
    tensors = cache_tensors(cache)
    sizes = [t.numel() * t.element_size() for t in tensors]
    return [a + b for a, b in zip(sizes[::2], sizes[1::2])]


def capture(fn: Callable[[], object], model: torch.nn.Module, stage: str, *, vendor_roots: Iterable[str] = (),
            step: int | None = None, kv_len: int | None = None,
            instrument: Instrument | None = None) -> tuple[StageGraph, object]:
    """Run `fn()` (one vendor forward) and return its graph and its result. `instrument` (tracer.capture.instruments): told
    of every module call and recorded op, around the forward; what it records becomes `StageGraph.kernels`."""
    tensor_names, module_names = _names(model)
    recorder = GraphRecorder(tensor_names, module_names, vendor_roots, instrument)
    session = instrument.session() if instrument is not None else nullcontext()
    with session, module_hooks(recorder.modules), _flex_uncompiled(), recorder:
        _ACTIVE.append(recorder)
        try:
            result = fn()
        finally:
            _ACTIVE.pop()
    outputs = [recorder._node_for(t) for t in result_tensors(result)]
    recorder.graph.output(tuple(outputs))
    cache = cache_of(result)
    held = [recorder._node_for(t) for t in (cache_tensors(cache) if cache is not None else [])]
    sg = StageGraph(stage, recorder.graph, step=step, kv_len=kv_len, params=recorder.params,
                    outputs=[r for o in outputs + held for r in storage_records(o)], kv_layers=kv_layers(cache),
                    kv_storages={r[0]: r[2] for o in held for r in storage_records(o)})
    if instrument is not None:
        sg.kernels = instrument.records()
    return sg, result


STEPS_PER_COLLECTION = 32


def collect_steps(step: int) -> None:
    """After decode step `step` captured in a loop: every STEPS_PER_COLLECTION steps, the cyclic garbage the last
    ones left, their fx graphs once turned into rows (each node points to its graph and its neighbours: only the
    cyclic collector frees a graph). The command line runs with the collector off (tracer.cli: millions of
    long-lived rows), and then nothing else would: DeepSeek-OCR-2 kept 5 MB more per step in each process, and 4,000
    steps traced one by one did not fit in 23 GB. A young-generation collection: the objects allocated since the
    last one, never a rescan of the rows before them."""
    if step % STEPS_PER_COLLECTION == STEPS_PER_COLLECTION - 1:
        gc.collect(0)
        raise_caught()  # a signal's exception raised in a finalizer the collection ran is swallowed: raised here


@contextmanager
def _flex_uncompiled():
    """torch.compile cannot trace under a dispatch mode such as the recorder, so flex_attention's own
    `torch.compile(..., fullgraph=True)` of its higher-order op raises there ("found no compiled frames"). Its
    debug switch makes it call the higher-order op directly: the op the recorder records (and counts by
    formula) either way, run unfused, as any compile under the recorder would."""
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:  # torch without flex attention
        yield
        return
    saved = getattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", None)
    flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        yield
    finally:
        flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = saved


_NAMES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[dict[int, str], dict[int, str]]]" = weakref.WeakKeyDictionary()


def _names(model: torch.nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """Parameter/buffer and module names by object id, computed once per model (a decode loop captures the
    same model many times; walking a 10k-module tree each time is measurable)."""
    if model not in _NAMES:
        tensors = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
        tensors.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
        _NAMES[model] = tensors, {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return _NAMES[model]


def result_tensors(result) -> list[torch.Tensor]:
    """The tensors a forward returned that the graph should output (logits first when present)."""
    logits = getattr(result, "logits", None)
    return [logits] if isinstance(logits, torch.Tensor) else []


def result_tensors_of(out) -> list[torch.Tensor]:
    """The tensors a Python function returned, in order (a tensor, or a tuple/list holding some)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)] if isinstance(out, (tuple, list)) else []


def subgraph(source: StageGraph, stage: str, keep: Callable[[torch.fx.Node], bool]) -> StageGraph:
    """The nodes of `source` that `keep` selects, as a stage of their own over the same graph (no copy: the
    vision stage is the prefill's vision nodes, and a copy of thousands of fx nodes costs real time)."""
    kept = [n for n in source.call_nodes() if keep(n)]
    return StageGraph(stage, source.graph, step=source.step, kv_len=source.kv_len, notes=list(source.notes),
                      selection=kept, params=source.params)
