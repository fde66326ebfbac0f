"""A stand-in for the flash-attn 2 package (Dao-AILab), so that `--attn flash_attention_2` traces in fake mode on
machines without it (flash-attn has no wheel for most setups and builds for hours).

Why it exists: the seed runs DeepSeek-OCR's decoder with `flash_attention_2`; transformers (4.46 and 5.x) refuses
that implementation unless `flash_attn` imports and a CUDA device is present, and the vendor code imports
`flash_attn_func` behind the same check. Fake mode computes nothing, so what the trace needs of flash-attn is its
Python entry points and its ops' names, schemas and output shapes. This module provides exactly those:

  * the ops `flash_attn::_flash_attn_forward` and `flash_attn::_flash_attn_varlen_forward`, defined with the schema
    flash-attn 2.8.3 registers (its own `torch.library.custom_op` signatures, inferred the same way) and its fake
    (shape) implementations only: the traced graph holds the nodes a real flash-attn run holds;
  * `flash_attn_func` / `flash_attn_varlen_func` (flash-attn 2.8.3's signatures, which transformers inspects) calling
    those ops as flash-attn's autograd functions do (softmax scale default, head-dim padding to a multiple of 8),
    and `flash_attn.bert_padding` (`index_first_axis`, `pad_input`, `unpad_input`, `index_put_first_axis`) in plain
    torch. `unpad_input` reads the attention mask's values: in fake mode it does so on the real host mask the
    preprocessing produced; a mask computed inside the model (a fake tensor) is refused, never guessed;
  * transformers' availability checks (`is_flash_attn_2_available`, `is_flash_attn_greater_or_equal*`) answered
    "flash-attn 2.8.3, usable" in every loaded module that imported them, and the names a module imports behind
    that check at import time (`flash_attn_func`, ...) bound in it.

All of it holds only inside `flash_attention_2()`, which the tracer enters around building and capturing a model; the ops'
library is destroyed and every name restored on the way out. When the real flash-attn imports, the stand-in stays out:
the real package is used as it is. FlopCounterMode counts these ops 0 (flash-attn registers no FLOP formula
and torch's `flop_registry` has none for them), which is what it reports for a real flash-attn run; flopdiff's
formulas (tracer.count.formulas) count them under policy `full`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Optional
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from tracer.core.errors import FlopdiffError

VERSION = "2.8.3"  # the flash-attn release whose op schemas and entry-point signatures these are
CHECKS = ("is_flash_attn_2_available", "is_flash_attn_greater_or_equal_2_10", "is_flash_attn_greater_or_equal")
# what modules import from flash_attn behind `if is_flash_attn_2_available():` (vendor code, transformers 4.46)
IMPORTED_NAMES = ("flash_attn_func", "flash_attn_varlen_func", "index_first_axis", "pad_input", "unpad_input")


def real_flash_attn() -> bool:
    """Whether the real flash-attn package is importable here (then it is used and nothing is stood in)."""
    mod = sys.modules.get("flash_attn")
    if mod is not None:
        return not getattr(mod, "FLOPDIFF_STANDIN", False)
    return importlib.util.find_spec("flash_attn") is not None


# ---- the ops: flash-attn 2.8.3's signatures (flash_attn/flash_attn_interface.py), fake implementations -----------

def _flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
                        causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                        alibi_slopes: Optional[torch.Tensor], return_softmax: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads, _ = q.shape
    p = q.new_empty((0,))
    if return_softmax:
        p = q.new_empty((batch, heads, _round(seqlen_q), _round(k.shape[1])))
    return (torch.empty_like(q), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32), p,
            q.new_empty((2,), dtype=torch.int64))


def _flash_attn_varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                               softmax_scale: float, causal: bool, window_size_left: int = -1,
                               window_size_right: int = -1, softcap: float = 0.0,
                               alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
                               block_table: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
                               seqused_k: Optional[torch.Tensor] = None, zero_tensors: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    total_q, heads, _ = q.shape
    p = q.new_empty((0,))
    if return_softmax:
        p = q.new_empty((cu_seqlens_q.shape[0] - 1, heads, _round(max_seqlen_q), _round(max_seqlen_k)))
    return (torch.empty_like(q), q.new_empty((heads, total_q), dtype=torch.float32), p,
            q.new_empty((2,), dtype=torch.int64))


def _round(x: int, m: int = 128) -> int:
    return (x + m - 1) // m * m


OPS = {"_flash_attn_forward": _flash_attn_forward, "_flash_attn_varlen_forward": _flash_attn_varlen_forward}


def schema(name: str) -> str:
    """The op's schema as `torch.library.custom_op` infers it from flash-attn's annotations (mutates_args=())."""
    infer = getattr(torch.library, "infer_schema", None)
    if infer is None:  # torch 2.4
        from torch._library.infer_schema import infer_schema as infer
    return name + infer(OPS[name], mutates_args=())


# ---- the Python entry points: flash-attn 2.8.3's signatures --------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """(batch, seqlen, heads, head_dim) q, k, v -> the attention output, as FlashAttnFunc.forward calls the op."""
    head = q.shape[-1]
    q, k, v = (_pad8(x) for x in (q, k, v))
    out, lse, s_dmask, _ = torch.ops.flash_attn._flash_attn_forward(
        q, k, v, dropout_p, head ** -0.5 if softmax_scale is None else softmax_scale, causal, window_size[0],
        window_size[1], softcap, alibi_slopes, return_attn_probs and dropout_p > 0)
    out = out[..., :head]
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed (total_tokens, heads, head_dim) q, k, v with cumulative sequence lengths, as FlashAttnVarlenFunc."""
    head = q.shape[-1]
    q, k, v = (_pad8(x) for x in (q, k, v))
    out, lse, s_dmask, _ = torch.ops.flash_attn._flash_attn_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        head ** -0.5 if softmax_scale is None else softmax_scale, causal, window_size[0], window_size[1], softcap,
        alibi_slopes, return_attn_probs and dropout_p > 0, block_table)
    out = out[..., :head]
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_with_kvcache(*args, **kwargs):
    raise FlopdiffError("flash_attn_with_kvcache (paged KV cache): not stood in; the decoders flopdiff traces call "
                        "flash_attn_func / flash_attn_varlen_func")


def _pad8(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] % 8 == 0 else torch.nn.functional.pad(x, [0, 8 - x.shape[-1] % 8])


# ---- flash_attn.bert_padding, in plain torch ------------------------------------------------------------------

def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)[indices].reshape(-1, *x.shape[1:])


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    out[indices] = values
    return out


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """flash-attn 2.8.3's: (tokens kept, indices, cu_seqlens, max_seqlen, used_seqlens). The lengths are the mask's
    values: read on the real host tensor (fake mode cannot know them otherwise)."""
    mask = attention_mask if unused_mask is None else attention_mask + unused_mask
    if isinstance(mask, FakeTensor):
        raise FlopdiffError("flash_attention_2 with padding in fake mode: the attention mask was computed inside "
                            "the model, so its sequence lengths are unknown; run --mode real for this workload")
    with unset_fake_temporarily():
        seqlens = mask.sum(dim=-1, dtype=torch.int32)
        used = attention_mask.sum(dim=-1, dtype=torch.int32)
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
        max_seqlen = int(seqlens.max())
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, used


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape(batch, seqlen, *out.shape[1:])


# ---- the package and its installation ------------------------------------------------------------------------

def _package() -> dict[str, types.ModuleType]:
    """flash_attn, flash_attn.flash_attn_interface and flash_attn.bert_padding as module objects."""
    modules = {}
    for name, attrs in {
        "flash_attn": ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"),
        "flash_attn.flash_attn_interface": ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"),
        "flash_attn.bert_padding": ("index_first_axis", "index_put_first_axis", "unpad_input", "pad_input"),
    }.items():
        mod = types.ModuleType(name, f"flopdiff's stand-in for {name} {VERSION} (tracer.vendors.flash_attn_standin)")
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name == "flash_attn")
        mod.FLOPDIFF_STANDIN = True
        for attr in attrs:
            setattr(mod, attr, globals()[attr])
        modules[name] = mod
    modules["flash_attn"].__version__ = VERSION
    modules["flash_attn"].__path__ = []
    modules["flash_attn"].flash_attn_interface = modules["flash_attn.flash_attn_interface"]
    modules["flash_attn"].bert_padding = modules["flash_attn.bert_padding"]
    return modules


def _answers() -> dict[str, object]:
    from packaging.version import Version

    return {"is_flash_attn_2_available": lambda *a, **k: True,
            "is_flash_attn_greater_or_equal_2_10": lambda *a, **k: True,
            "is_flash_attn_greater_or_equal": lambda library_version, *a, **k: Version(VERSION) >= Version(
                library_version)}


@contextmanager
def flash_attention_2(fake: bool) -> Iterator[bool]:
    """What `--attn flash_attention_2` needs, for the duration of the block: the stand-in unless the real flash-attn
    imports, and in fake mode the packed-sequence answer (`single_sequence`). Yields whether the stand-in is in."""
    with ExitStack() as stack:
        standin = not real_flash_attn()
        if standin and not getattr(sys.modules.get("flash_attn"), "FLOPDIFF_STANDIN", False):  # not yet in
            stack.enter_context(_installed())
        if fake:
            stack.enter_context(single_sequence())
        yield standin


def rebind(stack: ExitStack, name: str, replacement: Callable[[Any], Any], skip: tuple[str, ...] = ()) -> int:
    """In every loaded module (but those whose name starts with one of `skip`) that bound `name`, patch it to
    `replacement(value)` for the life of `stack`, where that is not None: how a function imported by name (`from
    x import f`) is reached in the modules that imported it. Returns how many modules were patched."""
    patched = 0
    for module in list(sys.modules.values()):
        bound = getattr(module, "__dict__", None)
        if not bound or name not in bound or (skip and str(bound.get("__name__", "")).startswith(skip)):
            continue
        new = replacement(bound[name])
        if new is not None:
            stack.enter_context(mock.patch.object(module, name, new))
            patched += 1
    return patched


@contextmanager
def single_sequence() -> Iterator[None]:
    """Fake mode: transformers' FA2 path asks whether the position ids hold several packed sequences (5.x:
    `_is_packed_sequence`, 4.46: an inline `torch.diff(position_ids) >= 0` test inside `_flash_attention_forward`),
    reading their values, which fake tensors do not hold. flopdiff passes no position ids: the model makes them as
    one arange over the page, one sequence. The answer is that one: 5.x's test returns False; 4.46's
    `_flash_attention_forward` gets `position_ids=None`, which takes the same branch."""
    import transformers.modeling_flash_attention_utils as fa_utils

    with ExitStack() as stack:
        if hasattr(fa_utils, "_is_packed_sequence"):
            stack.enter_context(mock.patch.object(fa_utils, "_is_packed_sequence", lambda *a, **k: False))
        else:
            original = fa_utils._flash_attention_forward

            def one_sequence(*args, **kwargs):
                return original(*args, **{**kwargs, "position_ids": None})

            rebind(stack, "_flash_attention_forward", lambda fn: one_sequence if fn is original else None)
        yield


@contextmanager
def _installed() -> Iterator[None]:
    with ExitStack() as stack:
        lib = torch.library.Library("flash_attn", "FRAGMENT")
        stack.callback(lib._destroy)
        for name, fake in OPS.items():
            lib.define(schema(name))
            torch.library.register_fake(f"flash_attn::{name}", fake, lib=lib)
        stack.enter_context(_in_sys_modules(_package()))
        originals = _checks()
        answers = _answers()
        # the modules that ran `if is_flash_attn_2_available(): from flash_attn import ...` at their import
        importers = [m for m in list(sys.modules.values()) if CHECKS[0] in originals
                     and getattr(m, "__dict__", {}).get(CHECKS[0]) is originals[CHECKS[0]]]
        for name, fn in originals.items():
            rebind(stack, name, lambda value, fn=fn, name=name: answers[name] if value is fn else None)
        for module in importers:
            for name in IMPORTED_NAMES:  # what that import would have bound
                if name not in module.__dict__:
                    stack.enter_context(mock.patch.object(module, name, globals()[name], create=True))
            if module.__name__.endswith("modeling_flash_attention_utils"):  # 4.46 binds this beside the names
                stack.enter_context(mock.patch.object(module, "_flash_supports_window_size", True, create=True))
        fa_utils = sys.modules.get("transformers.modeling_flash_attention_utils")
        matrix = getattr(fa_utils, "FLASH_ATTENTION_COMPATIBILITY_MATRIX", {})
        if 2 in matrix:  # transformers 5.x reads its availability checks through this table
            stack.enter_context(mock.patch.dict(matrix[2], general_availability_check=answers[CHECKS[0]],
                                                pkg_availability_check=lambda *a, **k: True))
        if hasattr(fa_utils, "_loaded_implementation"):  # 5.x caches the imported functions: forget them after
            for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn",
                         "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
                if hasattr(fa_utils, name):
                    stack.enter_context(mock.patch.object(fa_utils, name, getattr(fa_utils, name)))
        yield


@contextmanager
def _in_sys_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """These modules importable by name, and only these taken out after (mock.patch.dict would also drop every
    module first imported inside the block, which torch's registrations do not survive being imported twice)."""
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)


def _checks() -> dict[str, object]:
    """transformers' own check functions (what modules imported), by name."""
    try:
        from transformers.utils import import_utils
    except ImportError:
        return {}
    return {name: getattr(import_utils, name) for name in CHECKS if hasattr(import_utils, name)}


def check_real_mode(attn: str | dict[str, str] | None, mode: str) -> None:
    """--attn flash_attention_2 in real mode runs flash-attn's kernels: the real package must be there."""
    chosen = set(attn.values()) if isinstance(attn, dict) else {attn}
    if "flash_attention_2" in chosen and mode == "real" and not real_flash_attn():
        raise FlopdiffError("--attn flash_attention_2 --mode real: runs flash-attn's kernels, and the flash-attn "
                            "package is not installed here (pip install flash-attn); in fake mode flopdiff traces "
                            "its ops without it")

