"""What every vendor adapter is and makes (tracer.vendors lists the adapters): the prepared inputs and the adapter
protocol, in a module of their own so that the adapters import it and not the registry (the build options:
tracer.vendors.options, torch-free)."""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tracer.core.workload import Derived, Workload
from tracer.vendors.options import BuildOptions

SEQ_DIM = -2  # transformers' cache layout: (batch, heads, positions, head_dim)


@dataclass
class Prepared:
    """The vendor inputs for one workload (real tensors) and what the preprocessing derived."""

    inputs: dict[str, Any]
    derived: Derived
    notes: list[str] = field(default_factory=list)


class Vendor(Protocol):
    """A model family's adapter, called by tracer.capture.trace in this order, once per run: `load_config` (which
    may keep what it loaded: the v1 adapter imports the vendor folder there and keeps the package, the folder and
    the options), `limits`, `prepare` (keeps what the forward's shims need: v1's image gate), `build`, then inside
    `shims()` `prefill` and each `decode`; `meta_inputs` after `prepare`, `attention` and `source_roots` at any time
    after `load_config`. An adapter is one object per process (tracer.vendors' registry), so a second run in the
    same process starts again at `load_config`, which replaces all it keeps."""

    name: str
    #: module paths whose nodes form the `vision` stage (vision tower + projector)
    vision_modules: tuple[str, ...]
    #: the experts implementation when --experts is not given (None: the model has no such choice)
    default_experts: str | None

    def load_config(self, path: str | None, options: BuildOptions) -> Any: ...
    # (positions the decoder takes, decoder layers): the workload's hard limit and its capture cost
    def limits(self, config: Any) -> tuple[int, int]: ...
    def prepare(self, workload: Workload, config: Any) -> Prepared: ...
    def build(self, config: Any, options: BuildOptions) -> torch.nn.Module: ...
    def shims(self) -> AbstractContextManager[None]: ...
    def prefill(self, model: torch.nn.Module, prepared: Prepared) -> Callable[[], Any]: ...
    # `previous`: the forward output before, read through its `cache` or `past_key_values`; with both None it
    # is a one-token forward without cache (the decode worker's template, tracer.capture.decode_worker)
    def decode(self, model: torch.nn.Module, previous: Any, step: int) -> Callable[[], Any]: ...
    def source_roots(self) -> list[str]: ...
    # fake mode on meta tensors (tracer.capture.meta): the inputs as that capture needs them, or None when this
    # build stays on FakeTensorMode
    def meta_inputs(self, prepared: Prepared, options: BuildOptions) -> Prepared | None: ...
    # the attention implementation of each analytic part the options choose ({"decoder": ..., "vision": ...})
    def attention(self, options: BuildOptions) -> dict[str, str]: ...


def to_meta(x):
    """The vendor inputs as meta tensors (tracer.capture.recorder's meta capture): tensors (inside lists, tuples and dicts) of the same shape, stride and dtype."""
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: to_meta(v) for k, v in x.items()}
    return x


# ---- the decode protocol's state: what a decode step reads of the forward before it -------------------------

EMPTY = types.SimpleNamespace(cache=None, past_key_values=None)  # no cache: a decode step's one-token forward


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


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """An adapter's environment shims (`Vendor.shims`): the variables set while capturing, the previous values back
    after."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
