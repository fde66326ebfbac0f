"""The FLOP conventions the tracer's formulas and the analytic model share, with no torch: `import analytic` stays
pure arithmetic (and fast), and both sides count a causal mask the same way.

  * one multiply-add = 2 FLOPs;
  * causal attention is dense (FlopCounterMode's convention) unless `Conventions.causal_halving` is on: then
    only the (query, key) pairs the mask keeps count (`attention_pairs`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

#: decode steps from this many on are counted in closed form, the trace's (tracer.capture.series) and the analytic
#: model's (analytic.series): step 0 apart, steps 1..n-1 from a few probes, each count affine in the step. Below it,
#: tracing every step takes seconds at most and the report keeps every step's nodes.
CLOSED_FORM_STEPS = 33


@dataclass(frozen=True)
class Conventions:
    """Switches of the counting convention; the defaults are FlopCounterMode's."""

    causal_halving: bool = False


def attention_pairs(s_q: int, s_k: int, causal: bool, align: str = "top_left",
                    window: tuple[int, int] = (-1, -1)) -> int:
    """Number of (query, key) pairs an attention mask keeps.

    `align="top_left"` is torch SDPA's `is_causal` (query i sees keys 0..i); `"bottom_right"` is
    flash-attn's (query i sees keys up to i + s_k - s_q). `window=(left, right)`, -1 = unbounded,
    is flash-attn's sliding window around the aligned diagonal.
    """
    offset = 0 if align == "top_left" else s_k - s_q
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    total = 0
    for i in range(s_q):
        diag = i + offset
        hi = s_k - 1 if right < 0 else min(s_k - 1, diag + right)
        lo = 0 if left < 0 else max(0, diag - left)
        total += max(0, hi - lo + 1)
    return total


#: The op (as `tracer.capture.recorder.op_name` spells it) that carries each analytic layer's tensor-core work, per
#: device where it differs: what policy `torch` asks FlopCounterMode about. "python" (a kernel launched from Python by
#: an attention plugin) issues no op FlopCounterMode could see; a layer op not listed carries no tensor-core work.
CARRIERS: dict[str, dict[str, tuple[str, ...]]] = {
    "mm": {"*": ("aten::mm",)},
    "addmm": {"*": ("aten::addmm",)},
    "bmm": {"*": ("aten::bmm",)},
    "convolution": {"*": ("aten::convolution",)},
    "grouped_mm": {"*": ("aten::_grouped_mm",)},
    "flash_attn": {"*": ("flash_attn::_flash_attn_forward",)},
    "flex": {"*": ("higher_order::flex_attention",)},
    "python": {"*": ()},
    # SDPA picks its kernel by device (and, on CUDA, by dtype and shapes: any of the three)
    "sdpa": {"cpu": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
             "cuda": ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                      "aten::_scaled_dot_product_cudnn_attention")},
    # SDPA with the values narrower than the keys (DeepSeek-V3's latent attention): the CPU flash kernel refuses it and
    # the math path's matmuls run (bmm); CUDA's memory-efficient kernel takes it
    "sdpa_unequal": {"cpu": ("aten::bmm",), "cuda": ("aten::_scaled_dot_product_efficient_attention", "aten::bmm")},
}


@functools.cache
def flop_counter_counts(op: str) -> bool:
    """Whether FlopCounterMode counts the op named `op` (`aten::mm`): torch's `flop_registry` is the only source.

    torch is imported here, not at the top, so that core (and `import analytic`) stays torch-free until a caller
    asks what torch counts. A higher-order op is never counted: FlopCounterMode's eager dispatch raises on one even
    where the registry lists it (flex_attention, torch 2.13), and the tracer's count says 0 for it too."""
    namespace, _, name = op.partition("::")
    if namespace == "higher_order" or not name:
        return False
    import torch
    from torch.utils.flop_counter import flop_registry

    try:
        packet = getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):  # an op this torch lacks, or a library not loaded: nothing to count
        return False
    return packet in flop_registry


def torch_counts(layer_op: str, device: str) -> bool:
    """Whether FlopCounterMode counts the tensor-core work of an analytic layer whose matmul `layer_op` carries
    (True for a layer with none to count: norms, the KV cache, blocks)."""
    if layer_op not in CARRIERS:
        return True
    carriers = CARRIERS[layer_op]
    return any(flop_counter_counts(op) for op in carriers.get(device, carriers.get("*", ())))


#: CUDA-core FLOPs, the column beside the tensor-core one, per element: one table for the analytic layers (by kind)
#: and the trace (by aten op). The analytic kinds: a norm 4 per element (mean, variance, normalize, scale), softmax
#: 3 (max-subtract, exp, divide), a SiLU-gated product 4 (SiLU 3, the product 1), GELU 8, a residual add 1, and the
#: interpolations per output element (the taps' weighted sum: linear 3, bicubic 31).
CUDA_CORE_PER_ELEMENT: dict[str, int] = {"norm": 4, "softmax": 3, "silu": 3, "silu_gated": 4, "gelu": 8, "add": 1,
                                         "linear_interp": 3, "bilinear_interp": 7, "bicubic_interp": 31}

#: The trace's side: per aten op, (FLOPs, per what) with "out" an output element and "in" an input element (a
#: reduction reads every element once). An op not listed that may compute is reported as uncounted
#: (`tracer.count.memory`), never taken as 0; DATA_MOVEMENT lists the ops that compute nothing.
CUDA_CORE_OPS: dict[str, tuple[int, str]] = {
    **{f"aten::{op}": (1, "out") for op in (
        "add", "sub", "mul", "div", "neg", "rsqrt", "sqrt", "reciprocal", "pow", "exp", "log", "sin", "cos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "where", "maximum", "minimum", "clamp", "clamp_min", "clamp_max",
        "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "logical_and", "logical_or", "logical_not",
        "floor_divide", "remainder", "masked_fill", "add_", "mul_", "sub_", "div_", "masked_fill_", "floor", "ceil",
        "round", "sign", "lerp", "addcmul", "rsub", "tanh", "erf")},
    "aten::sigmoid": (3, "out"),   # exp, add, reciprocal
    "aten::silu": (CUDA_CORE_PER_ELEMENT["silu"], "out"),  # x * sigmoid(x) (with the gate's mul: silu_gated)
    "aten::gelu": (CUDA_CORE_PER_ELEMENT["gelu"], "out"),
    "aten::_softmax": (CUDA_CORE_PER_ELEMENT["softmax"], "out"),
    "aten::_log_softmax": (CUDA_CORE_PER_ELEMENT["softmax"], "out"),
    "aten::native_layer_norm": (CUDA_CORE_PER_ELEMENT["norm"], "in"),
    "aten::_fused_rms_norm": (CUDA_CORE_PER_ELEMENT["norm"], "in"),
    **{f"aten::{op}": (1, "in") for op in ("sum", "mean", "cumsum", "amax", "amin", "max", "min", "argmax",
                                           "argmin", "prod", "histc", "var", "std", "norm", "linalg_vector_norm")},
    # interpolation: per output element, the taps' weighted sum (2 per tap)
    "aten::upsample_linear1d": (CUDA_CORE_PER_ELEMENT["linear_interp"], "out"),
    "aten::upsample_bilinear2d": (CUDA_CORE_PER_ELEMENT["bilinear_interp"], "out"),
    "aten::upsample_bicubic2d": (CUDA_CORE_PER_ELEMENT["bicubic_interp"], "out"),
    "aten::_upsample_bicubic2d_aa": (CUDA_CORE_PER_ELEMENT["bicubic_interp"], "out"),
}

#: Ops that move or make data and compute nothing (views, copies, casts, gathers, fills, selection by order).
DATA_MOVEMENT: frozenset[str] = frozenset(f"aten::{op}" for op in (
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "slice",
    "select", "split", "split_with_sizes", "unbind", "cat", "stack", "clone", "_to_copy", "copy_", "detach", "alias",
    "lift_fresh", "lift_fresh_copy", "constant_pad_nd", "index", "index_put_", "index_put", "index_select", "gather",
    "scatter", "scatter_", "masked_scatter", "masked_scatter_", "index_copy", "index_copy_", "index_fill_", "embedding", "arange", "full", "full_like", "zeros", "zeros_like",
    "ones", "ones_like", "new_zeros", "new_ones", "new_empty", "new_full", "empty", "empty_like", "empty_strided",
    "fill_", "zero_", "scalar_tensor", "contiguous", "repeat", "roll", "flip", "narrow", "as_strided", "unfold",
    "sort", "topk", "nonzero", "_local_scalar_dense", "item", "resize_", "set_", "diagonal", "tril", "triu",
    "bernoulli_", "uniform_", "normal_", "randn", "rand", "randint", "pixel_shuffle", "pixel_unshuffle",
    "unflatten", "flatten", "movedim", "expand_as", "view_as", "type_as", "to", "_reshape_alias", "im2col", "col2im",
    "masked_select", "repeat_interleave", "bucketize", "searchsorted", "one_hot", "isin"))
