"""Attention at the Python boundary: every call of the model's attention function becomes a node of its own.

Why: a kernel launched from Python (Triton, CuTe DSL, a hub kernel, a function a user registers with transformers)
issues no aten op, so neither FlopCounterMode nor the op recorder sees it; its FLOPs would be missing and its time
could only land on a module. The function call itself is always visible, with its q, k, v. So the tracer wraps the
model's attention entry points, and the capture records each call as a boundary node `attention::<implementation>`
(q/k/v shapes and dtypes from its inputs, `params`: layout, causal, sliding window, scale, varlen lengths; module
path and source line as any node) placed after the ops it issued (tracer.capture.recorder.GraphRecorder.call_boundary).

The entry points (`ENTRY_POINTS`): transformers' attention interface (5.x: `AttentionInterface.get_interface`, so
every registered name and the eager default), and flash-attn's Python functions as the DeepSeek-OCR v1 remote code
and transformers 4.46 bind them (`flash_attn_func`, `flash_attn_varlen_func`, real or stood in).

Counting (tracer.count.counter): a boundary carries the attention formula minus what the ops inside it were counted (policy
full), never less than 0. So a Python kernel the dispatcher never saw is counted by formula, a function that
decomposes into counted ops (SDPA, eager matmuls, FA2's custom op) is a grouping node carrying 0, and one whose
inner ops carry part of the work carries the rest: never twice, never missed. FlopCounterMode sees none of its own.

Plugins (`--attn-plugin [NAME=]module:function`): a user's attention function registered with transformers under
NAME (default: the function's name), usable in `--attn`. In real mode it runs as written; in fake mode only its
boundary is recorded, with an output of the interface's shape (nothing runs: a kernel cannot take fake tensors).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor

from tracer.capture.recorder import active_recorder
from tracer.core.errors import FlopdiffError
from tracer.vendors.flash_attn_standin import check_real_mode, flash_attention_2, rebind
from tracer.vendors.options import BuildOptions, implementations

PREFIX = "attention::"


@dataclass(frozen=True)
class EntryPoint:
    """How to read one kind of attention function's arguments."""

    layout: str   # "bhsd": (batch, heads, seq, dim); "bshd": (batch, seq, heads, dim); "thd": packed tokens
    first: int    # position of q (k and v follow)
    causal: str   # the argument holding the causal flag ("": the module's `is_causal`, transformers' convention)
    scale: str
    window: str   # the argument holding the sliding window


ENTRY_POINTS = {
    # transformers 5.x: fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)
    "interface": EntryPoint("bhsd", 1, "", "scaling", "sliding_window"),
    # flash-attn 2.x: flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, ...)
    "flash_attn_func": EntryPoint("bshd", 0, "causal", "softmax_scale", "window_size"),
    "flash_attn_varlen_func": EntryPoint("thd", 0, "causal", "softmax_scale", "window_size"),
}


def _params(entry: EntryPoint, fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's attention parameters as plain values (they go into the graph and report.json)."""
    q = args[entry.first]
    if entry.causal:  # flash-attn's own signature: bind, so positional and keyword calls read alike
        named = inspect.signature(fn).bind(*args, **kwargs).arguments
        causal = bool(named.get("causal", False))
    else:
        named = kwargs
        causal = bool(kwargs.get("is_causal", getattr(args[0], "is_causal", False))) and q.shape[-2] > 1
    window = named.get(entry.window)
    if isinstance(window, (tuple, list)):
        window = [int(w) for w in window]
    elif window is not None:
        window = [int(window), int(window)]
    scale = named.get(entry.scale)
    params: dict[str, Any] = {"layout": entry.layout, "causal": causal,
                              "window": window if window and window != [-1, -1] else None,
                              "scale": float(scale) if isinstance(scale, (int, float)) else None}
    if entry.layout == "thd":
        params["cu_seqlens"] = [_lengths(named.get("cu_seqlens_q")), _lengths(named.get("cu_seqlens_k"))]
    return params


def _lengths(cu: Any) -> list[int] | None:
    """Host cumulative lengths (fake tensors hold none: then the boundary's formula says it cannot count)."""
    if not isinstance(cu, torch.Tensor) or isinstance(cu, FakeTensor) or cu.is_meta:
        return None
    return [int(x) for x in cu.tolist()]


def boundary(impl: str, fn: Callable, entry: str) -> Callable:
    """`fn` recorded as node `attention::<impl>` whenever a capture is in progress (a plain call otherwise)."""
    spec = ENTRY_POINTS[entry]
    if getattr(fn, "flopdiff_boundary", False):
        return fn

    def wrapper(*args, **kwargs):
        recorder = active_recorder()
        if recorder is None:
            return fn(*args, **kwargs)
        tensors = tuple(args[spec.first:spec.first + 3])
        return recorder.call_boundary(PREFIX + impl, tensors, _params(spec, fn, args, kwargs), fn, args, kwargs)

    wrapper.flopdiff_boundary = True
    wrapper.__wrapped__ = fn
    return wrapper


# ---- where the entry points are wrapped ------------------------------------------------------------------------

@contextmanager
def boundaries() -> Iterator[None]:
    """Every attention entry point wrapped for the duration of the block (builds and captures)."""
    with ExitStack() as stack:
        interface = _attention_interface()
        if interface is not None and hasattr(interface, "get_interface"):
            original = interface.get_interface

            def get_interface(self, attn_implementation, default):
                fn = original(self, attn_implementation, default)
                return boundary(attn_implementation or "eager", fn, "interface")

            stack.enter_context(mock.patch.object(interface, "get_interface", get_interface))
        for name in ("flash_attn_func", "flash_attn_varlen_func"):  # where modules bound them (v1, 4.46)
            rebind(stack, name, lambda fn, name=name: boundary("flash_attention_2", fn, name)
                   if callable(fn) and not getattr(fn, "flopdiff_boundary", False) else None,
                   skip=("flash_attn", "tracer."))  # the package itself (5.x calls it through the interface)
        yield


def _attention_interface() -> type | None:
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # transformers < 4.48: no attention interface (v1's 4.46 calls flash-attn directly)
        return None
    return AttentionInterface


# ---- plugins -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plugin:
    name: str
    target: str   # module:function
    fn: Callable


def load_plugin(spec: str) -> Plugin:
    """`[NAME=]module:function` -> the function, imported (one line naming the input when it cannot be)."""
    name, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise FlopdiffError(f"--attn-plugin {spec}: expected [NAME=]module:function (e.g. my_kernels:attention)")
    try:
        with _current_folder_importable():
            module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of the user's module: name it and the reason
        raise FlopdiffError(f"--attn-plugin {spec}: cannot import {module_name} ({exc.__class__.__name__}: {exc}); "
                            f"it must be importable from here (the current folder or PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise FlopdiffError(f"--attn-plugin {spec}: {module_name} has no {attr}")
    if not callable(fn):
        raise FlopdiffError(f"--attn-plugin {spec}: {module_name}.{attr} is not callable (a {type(fn).__name__})")
    name = name or attr
    if name in ("eager", "sdpa", "flex_attention") or name.startswith("flash_attention"):
        raise FlopdiffError(f"--attn-plugin {spec}: {name} is one of transformers' own attention implementations; "
                            f"give the plugin another name (NAME=module:function)")
    return Plugin(name, target, fn)


@contextmanager
def _current_folder_importable() -> Iterator[None]:
    """The current folder on the import path while importing a plugin (the `flopdiff` script does not put it there,
    `python -m` does): a plugin next to the user's data imports either way."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added:
            sys.path.remove(here)


def shapes_only(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """A plugin in fake mode: the interface's output, (batch, seq_q, heads, dim_v), and no weights."""
    b, h, s_q, _ = query.shape
    return torch.empty((b, s_q, h, value.shape[-1]), dtype=query.dtype, device=query.device), None


@contextmanager
def registered(plugins: tuple[Plugin, ...], fake: bool) -> Iterator[None]:
    """The plugins registered with transformers' attention interface for the duration of the block."""
    if not plugins:
        yield
        return
    with mock.patch.dict(_attention_interface()._global_mapping,
                         {p.name: shapes_only if fake else p.fn for p in plugins}):
        yield


def check_plugin_signature(plugin: Plugin) -> None:
    """transformers calls fn(module, query, key, value, attention_mask, **kwargs): refuse what cannot take that."""
    try:
        inspect.signature(plugin.fn).bind(None, None, None, None, None, scaling=1.0, dropout=0.0)
    except TypeError as exc:
        raise FlopdiffError(f"--attn-plugin {plugin.target}: transformers calls it as fn(module, query, key, value, "
                            f"attention_mask, scaling=..., dropout=..., **kwargs) and it cannot take that ({exc})"
                            ) from None
    except ValueError:  # no signature (a builtin): let transformers call it
        pass


# ---- the attention runtime of a trace ------------------------------------------------------------------------------

def check(options: BuildOptions) -> tuple[Plugin, ...]:
    """What needs no model: the plugins import and take transformers' call, the interface exists for them, and a
    real-mode flash_attention_2 has the real package."""
    plugins = tuple(load_plugin(spec) for spec in options.attn_plugins)
    for plugin in plugins:
        check_plugin_signature(plugin)
        if _attention_interface() is None:
            raise FlopdiffError(f"--attn-plugin {plugin.target}: needs transformers' AttentionInterface "
                                f"(transformers >= 4.48); DeepSeek-OCR (v1) runs on 4.46, whose decoder calls eager "
                                f"attention or flash-attn directly")
    check_real_mode(options.attn, options.mode)
    return plugins


@contextmanager
def runtime(options: BuildOptions) -> Iterator[None]:
    """Around building and capturing a model: flash-attn (or its stand-in) when chosen, the plugins registered,
    every attention entry point wrapped as a boundary (in that order: the stand-in binds the names wrapped)."""
    plugins = check(options)
    with ExitStack() as stack:
        if "flash_attention_2" in implementations(options.attn):
            stack.enter_context(flash_attention_2(fake=options.mode == "fake"))
        stack.enter_context(registered(plugins, fake=options.mode == "fake"))
        stack.enter_context(boundaries())
        yield
