"""The FLOP conventions the tracer's formulas and the analytic model share, with no torch: `import analytic` stays
pure arithmetic (and fast), and both sides count a causal mask the same way.

  * one multiply-add = 2 FLOPs;
  * causal attention is dense (FlopCounterMode's convention) unless `Conventions.causal_halving` is on: then
    only the (query, key) pairs the mask keeps count (`attention_pairs`).
"""

from __future__ import annotations

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
