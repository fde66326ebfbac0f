"""Meta capture: fake mode on meta tensors instead of FakeTensorMode, for the vendors whose forward allows it
(`Vendor.meta_inputs`; DeepSeek-OCR v1 with its eager decoder).

Why: FakeTensorMode's per-op Python dispatch (its cache key, its output reconstruction) was about 60% of a capture;
meta tensors dispatch in C++. v1 1000x1400 on 2 cores: prefill 0.93 s instead of 1.72, a decode step 0.14 instead
of 0.27, the build 0.10 instead of 0.36.

Why the graph is the same: a fake tensor computes with the meta kernels too; what differs is the device it
reports, and two things on these models' paths depend on it. scaled_dot_product_attention's backend (a C++ stub
keyed by device type: math on meta, flash attention on the CPU): `CpuSdpa` asks the CPU's own
`torch._fused_sdp_choice` on empty CPU tensors of the same shapes, strides and dtypes (outside every dispatch mode,
so the recorder does not see the question) and, when it answers flash, calls the op the CPU's SDPA calls. And
output dtypes where the meta kernel answers as CUDA does (`CPU_OUTPUT_DTYPES`: native_layer_norm's mean and rstd,
float32 on meta, the input's dtype on the CPU): `CpuDtypes`, below the recorder, gives them the CPU's. Tested
(tests/test_v1.py): every recorded node, its name, op, input and output shapes and dtypes, FLOPs and module call,
equals the FakeTensorMode capture's, prefill and decode steps. What meta tensors cannot do, a vendor keeps away
from them: values (`.item()`, `.tolist()`: host inputs and shims), a boolean attention mask under the flash choice
(the CPU converts it first; not reproduced here: refused). DeepSeek-OCR-2 stays on FakeTensorMode: besides both of
those, its meta capture recorded other ops for tensors made from Python constants (`scalar_tensor` where fake
tensors record `lift_fresh` and `fill_`), so its graphs were not the same.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

FLASH = 1  # sdp::SDPBackend::flash_attention, what torch._fused_sdp_choice answers for it


def _empty_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")


class CpuSdpa(TorchFunctionMode):
    """scaled_dot_product_attention on meta tensors takes the backend the CPU would take."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch._C._nn.scaled_dot_product_attention or args[0].device.type != "meta":
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        given = {**dict(zip(names, args)), **kwargs}
        q, k, v = given["query"], given["key"], given["value"]
        mask, dropout, causal = given.get("attn_mask"), given.get("dropout_p", 0.0), given.get("is_causal", False)
        scale, gqa = given.get("scale"), given.get("enable_gqa", False)
        with _disable_current_modes():
            choice = torch._fused_sdp_choice(_empty_cpu(q), _empty_cpu(k), _empty_cpu(v), _empty_cpu(mask), dropout,
                                             causal, scale=scale, enable_gqa=gqa)
        if choice != FLASH:
            return func(*args, **kwargs)  # the math path: the same composite ops on any device
        if mask is not None and mask.dtype == torch.bool:
            raise RuntimeError("meta capture: a boolean attention mask under the CPU's flash choice is not reproduced")
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, causal, attn_mask=mask,
                                                                          scale=scale)[0]


# Ops whose meta kernel gives an output another dtype than the CPU kernel: {op: {output index: input index whose
# dtype the CPU gives it}} (checked against the CPU kernels by tests/test_meta_capture.py).
CPU_OUTPUT_DTYPES = {
    torch.ops.aten.native_layer_norm.default: {1: 0, 2: 0},  # mean, rstd: float32 on meta, the input's on the CPU
}


class CpuDtypes(TorchDispatchMode):
    """Below the recorder: the ops of CPU_OUTPUT_DTYPES return their outputs in the CPU's dtypes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fix = CPU_OUTPUT_DTYPES.get(func)
        if fix is None:
            return out
        out = list(out)
        for i, source in fix.items():
            t, dtype = out[i], args[source].dtype
            if t.dtype != dtype:
                out[i] = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
        return tuple(out)


class MetaCapture:
    """What fake mode enters around the build and each capture when the vendor allows meta tensors: factory calls on
    the meta device, `CpuSdpa` and `CpuDtypes`. Re-entrant, as FakeTensorMode is (the build, the prefill, the decode
    steps); entered before the recorder, so that `CpuDtypes` sits below it."""

    def __init__(self) -> None:
        self._stacks: list[ExitStack] = []

    def __enter__(self) -> "MetaCapture":
        stack = ExitStack()
        stack.enter_context(torch.device("meta"))
        stack.enter_context(CpuSdpa())
        stack.enter_context(CpuDtypes())
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._stacks.pop().close()


def to_meta(x):
    """Tensors (inside lists, tuples and dicts) as meta tensors of the same shape, stride and dtype."""
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: to_meta(v) for k, v in x.items()}
    return x
