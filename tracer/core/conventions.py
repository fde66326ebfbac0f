"""The FLOP conventions the tracer's formulas and the analytic model share, with no torch: `import analytic` stays
pure arithmetic (and fast), and both sides count a causal mask the same way.

  * one multiply-add = 2 FLOPs;
  * causal attention is dense (FlopCounterMode's convention) unless `Conventions.causal_halving` is on: then
    only the (query, key) pairs the mask keeps count (`attention_pairs`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


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
