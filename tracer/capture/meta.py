"""Meta capture: fake mode on meta tensors instead of FakeTensorMode, for the vendors whose forward allows it
(`Vendor.meta_inputs`: DeepSeek-OCR v1 with its eager decoder; DeepSeek-OCR-2 with sdpa or eager attention and the
grouped_mm or batched_mm experts).

Why: FakeTensorMode's per-op Python dispatch (its cache key, its output reconstruction) was about 60% of a capture;
meta tensors dispatch in C++. Their kernels are mostly Python still (torch._refs): `MetaKernels` memoizes them (the
same op on the same shapes recurs in every layer and step). On 2 cores, v1 1000x1400: prefill 0.68 s instead of
1.72 under FakeTensorMode, a decode step 0.09 instead of 0.27; v2 1000x1400: the whole sequential capture 0.87 s
instead of 2.3.

Why the graph is the same: a fake tensor computes with the meta kernels too; what differs is the device it
reports, and what depends on the device. `CpuChoices`, a function mode, answers each such call as on the CPU
(`CPU_CHOICES`): Python code reading `tensor.device` gets the CPU, as from a fake tensor (transformers' MoE branches
on it), and a device read so, passed back (`device=`, `.to()`, `.cpu()`), stays meta, as do factory calls without
a device (what `torch.device("meta")` would do, but `torch.get_default_device()` stays the CPU, as under
FakeTensorMode); scaled_dot_product_attention takes the CPU's backend (its C++ stub is keyed by device type: math
on meta, flash on the CPU; the CPU's own `torch._fused_sdp_choice` is asked on empty CPU tensors of the same
shapes, strides and dtypes, outside every dispatch mode, so the recorder does not see the question) and, under
flash, the CPU's boolean-mask conversion and op; `t[index] = number` and `torch.tensor(data)` record the CPU's
lift_fresh and fill_ (C++ special-cases the CPU there). Where a meta kernel answers as CUDA does, the recorder gives
the outputs the CPU's dtypes before it records them (`CPU_OUTPUT_DTYPES`: native_layer_norm's mean and rstd). Each
is tested against FakeTensorMode and the CPU kernels (tests/test_meta_capture.py), and whole models row for row:
every recorded node, its name, op, module call, source lines, input and output shapes and dtypes, FLOPs and status,
equals the FakeTensorMode capture's, prefill and decode steps (tests/test_v1.py, tests/test_meta_capture.py; also
run on torch 2.11). What meta tensors cannot do, a vendor keeps away from them: values (`.item()`, `.tolist()`: host
inputs and shims).
"""

from __future__ import annotations

import functools
import math
from contextlib import ExitStack

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import _disable_current_modes

FLASH = 1  # sdp::SDPBackend::flash_attention, what torch._fused_sdp_choice answers for it
CPU, META = torch.device("cpu"), torch.device("meta")


def _names_cpu(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


def _empty_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")


def _sdpa(func, args, kwargs):
    """scaled_dot_product_attention: the backend the CPU would take (math: the same composite ops on any device;
    flash: the CPU's boolean-mask conversion, then the op the CPU's SDPA calls)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    given = {**dict(zip(names, args)), **kwargs}
    q, k, v = given["query"], given["key"], given["value"]
    if not q.is_meta:
        return NotImplemented
    mask, dropout, causal = given.get("attn_mask"), given.get("dropout_p", 0.0), given.get("is_causal", False)
    scale, gqa = given.get("scale"), given.get("enable_gqa", False)
    with _disable_current_modes():
        choice = torch._fused_sdp_choice(_empty_cpu(q), _empty_cpu(k), _empty_cpu(v), _empty_cpu(mask), dropout,
                                         causal, scale=scale, enable_gqa=gqa)
    if choice != FLASH:
        return NotImplemented
    if mask is not None and mask.dtype == torch.bool:
        # convert_boolean_attn_mask, op for op: scalar_tensor(-inf), then where.ScalarSelf's scalar_tensor(0.0), where
        neg_inf = torch.ops.aten.scalar_tensor.default(-math.inf, dtype=q.dtype, device=mask.device)
        mask = torch.where(mask, 0.0, neg_inf)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, causal, attn_mask=mask,
                                                                      scale=scale)[0]


def _setitem(func, args, kwargs):
    """`t[index] = number`: the CPU lifts the number to a CPU scalar tensor (lift_fresh) and fills with it (fill_);
    on other devices it makes a scalar_tensor there and copies it (view, expand, copy_)."""
    target, index, value = args
    if not target.is_meta or not isinstance(value, (bool, int, float)):
        return NotImplemented
    with _disable_current_modes():
        scalar = torch.scalar_tensor(value, dtype=target.dtype, device="cpu")
    return func(target, index, torch.ops.aten.lift_fresh.default(scalar))


def _tensor(func, args, kwargs):
    """`torch.tensor(data)`: the CPU lifts the tensor it built from the data (lift_fresh); on meta it is made
    without an op. The meta tensor is lifted instead, with the CPU tensor's shape, stride and dtype."""
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "meta":
        return NotImplemented
    with _disable_current_modes():
        built = torch.tensor(*args, **{**kwargs, "device": "cpu"})
        meta = torch.empty_strided(built.shape, built.stride(), dtype=built.dtype, device="meta")
    return torch.ops.aten.lift_fresh.default(meta)


def _device(func, args, kwargs):
    """`tensor.device`: a meta tensor says it is on the CPU, as a fake tensor does, so that the vendor's Python takes
    the CPU's branches (e.g. transformers' MoE feeds histc floats on the CPU)."""
    return CPU if args[0].is_meta else NotImplemented


def _to(func, args, kwargs):
    """`tensor.to("cpu")` and the like keep a meta tensor on meta (the device it was told is the CPU's)."""
    if not args[0].is_meta:
        return NotImplemented
    return func(args[0], *(META if _names_cpu(a) else a for a in args[1:]), **kwargs)


def _cpu(func, args, kwargs):
    """`tensor.cpu()` on a tensor that says it is on the CPU: itself, as on the CPU (no op)."""
    return args[0] if args[0].is_meta else NotImplemented


# The calls whose recorded ops depend on the device, each answered as on the CPU (a handler returns NotImplemented
# where the call does not depend on it).
CPU_CHOICES = {
    torch._C._nn.scaled_dot_product_attention: _sdpa,
    torch.Tensor.__setitem__: _setitem,
    torch.tensor: _tensor,
    torch.Tensor.device.__get__: _device,
    torch.Tensor.to: _to,
    torch.Tensor.cpu: _cpu,
}


class CpuChoices(TorchFunctionMode):
    """CPU_CHOICES' calls take the ops the CPU would record; factory calls, and devices read from meta tensors, go
    to the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (device is None and func in _device_constructors()) or _names_cpu(device):
            kwargs = {**kwargs, "device": META}
        handler = CPU_CHOICES.get(func)
        out = NotImplemented if handler is None else handler(func, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


# Ops whose meta kernel gives an output another dtype than the CPU kernel: {op: {output index: input index whose
# dtype the CPU gives it}} (checked against the CPU kernels by tests/test_meta_capture.py).
CPU_OUTPUT_DTYPES = {
    torch.ops.aten.native_layer_norm.default: {1: 0, 2: 0},  # mean, rstd: float32 on meta, the input's on the CPU
}


def cpu_output_dtypes(func, args: tuple, out):
    """The outputs of a CPU_OUTPUT_DTYPES op on meta tensors, in the CPU's dtypes (the recorder applies it to those
    ops before it records them; other tensors, fake or real, are returned as they are)."""
    if type(out[0]) is not torch.Tensor or not out[0].is_meta:
        return out
    out = list(out)
    for i, source in CPU_OUTPUT_DTYPES[func].items():
        t, dtype = out[i], args[source].dtype
        if t.dtype != dtype:
            out[i] = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
    return tuple(out)


class MetaCapture:
    """What fake mode enters around the build and each capture when the vendor allows meta tensors: `CpuChoices`
    (factory calls on the meta device included). Re-entrant, as FakeTensorMode is (the build, the prefill, the decode
    steps)."""

    def __init__(self) -> None:
        self._stacks: list[ExitStack] = []
        self.kernels = MetaKernels()  # one memo for the prefill and every decode step (the forked worker keeps it)

    def __enter__(self) -> "MetaCapture":
        stack = ExitStack()
        stack.enter_context(CpuChoices())
        _ACTIVE.append(self)
        stack.callback(_ACTIVE.pop)
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._stacks.pop().close()


_ACTIVE: list[MetaCapture] = []


def active_kernels() -> "MetaKernels | None":
    """The memoized meta kernels of the meta capture entered around this call, if any (the recorder runs ops with
    them)."""
    return _ACTIVE[-1].kernels if _ACTIVE else None


# ---- the meta kernels' answers, memoized ------------------------------------------------------------------------

_SCALARS = (int, float, bool, str, torch.dtype, torch.device, torch.layout, torch.memory_format, type(None))


def _key(x):
    """What a meta kernel reads of an argument: a plain meta tensor's shape, stride, offset and dtype; a scalar as it
    is. None: something else (a tensor of another kind, an unhashable value): not memoized."""
    if type(x) is torch.Tensor:
        return (x.shape, x.stride(), x.storage_offset(), x.dtype) if x.is_meta else None
    if type(x) in (list, tuple):
        keys = tuple(_key(v) for v in x)
        return None if None in keys else (type(x), keys)
    return (type(x), x) if isinstance(x, _SCALARS) else None  # 1, 1.0 and True are equal keys, not equal arguments


class MetaKernels:
    """Memoized meta kernels: an op's outputs on meta tensors depend only on its arguments' shapes, strides, offsets
    and dtypes, its scalar arguments and the default dtype, and most meta kernels of the ops models run most
    (elementwise ops, mm, layer norm) are Python (torch._refs, torch._meta_registrations): 30-800 us a call, where the
    same op on the same shapes recurs in every layer and every decode step (v1 page: 31% of a capture saved). Only
    functional ops (no mutated or aliased argument, every output a fresh tensor) without autograd are memoized; a hit
    makes each output anew with the recorded shape, stride and dtype. Checked: tests/test_meta_capture.py, and every
    whole-model comparison of meta and FakeTensorMode captures runs with it."""

    def __init__(self) -> None:
        self._outputs: dict[tuple, tuple | bool] = {}  # False: the op's outputs are not fresh meta tensors

    def __call__(self, func, args: tuple, kwargs: dict):
        key = _memoizable(func) and not torch.is_grad_enabled() and _key((args, tuple(kwargs.items())))
        if not key:
            return func(*args, **kwargs)
        key = (func, torch.get_default_dtype(), key)  # a factory without a dtype takes the default one
        known = self._outputs.get(key)
        if known is None:
            out = func(*args, **kwargs)
            self._outputs[key] = _described(out)
            return out
        if known is False:
            return func(*args, **kwargs)
        container, outputs = known
        made = [torch.ops.aten.empty_strided.default(shape, stride, dtype=dtype, device=META)
                for shape, stride, dtype in outputs]
        return made[0] if container is None else container(made)


def _described(out):
    """(container: None for one tensor, else tuple or list; [(shape, stride, dtype)]) of fresh meta outputs; False
    when the outputs are anything else."""
    outs = (out,) if type(out) is torch.Tensor else out if type(out) in (tuple, list) else None
    if not outs or any(type(t) is not torch.Tensor or not t.is_meta or t.storage_offset() for t in outs):
        return False
    return (None if type(out) is torch.Tensor else type(out), [(t.shape, t.stride(), t.dtype) for t in outs])


@functools.cache
def _memoizable(func) -> bool:
    """An OpOverload that mutates nothing and returns fresh tensors (no alias annotation)."""
    schema = getattr(func, "_schema", None)
    if schema is None or schema.is_mutable:
        return False
    return all(r.alias_info is None for r in schema.returns) and all(
        str(r.type) in ("Tensor", "Tensor[]") for r in schema.returns)
