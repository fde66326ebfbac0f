"""FLOP formulas for ops `torch.utils.flop_counter` has no entry for (policy "full" adds them).

Conventions (the same as FlopCounterMode's, so the two policies add up):
  * one multiply-add = 2 FLOPs;
  * attention = two matmuls, 2*b*h*s_q*s_k*d (Q K^T) + 2*b*h*s_q*s_k*d_v (P V); softmax, scaling and
    masking are CUDA-core work and not counted here;
  * causal attention is counted dense (as FlopCounterMode does) unless `Conventions.causal_halving` is on;
    then only the (query, key) pairs the mask keeps are counted, with the op's own mask alignment.

Each formula is a small pure function of the op's arguments (fake or real tensors: only shapes are read,
except where a docstring says otherwise), registered under the op's qualified name, so that ops of
packages that are not installed (flash_attn) can still be named.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from tracer.core.conventions import Conventions, attention_pairs
from tracer.core.errors import CannotCount
from tracer.core.registry import FormulaTable

# qualified op name -> `fn(*args, out=..., conv=..., **kwargs) -> int`; raises CannotCount when it cannot
FORMULAS = FormulaTable("fx")
register = FORMULAS.register


def attention_flops(b: int, h: int, s_q: int, s_k: int, d: int, d_v: int, pairs: int | None = None) -> int:
    """2*b*h*pairs*(d + d_v): Q K^T over the kept pairs plus P V over the same pairs."""
    kept = s_q * s_k if pairs is None else pairs
    return 2 * b * h * kept * d + 2 * b * h * kept * d_v


def _causal_pairs(s_q: int, s_k: int, causal: bool, conv: Conventions, align: str,
                  window: tuple[int, int] = (-1, -1)) -> int | None:
    if not conv.causal_halving or (not causal and window == (-1, -1)):
        return None
    return attention_pairs(s_q, s_k, causal, align, window)


@register("aten::_grouped_mm")
def grouped_mm_flop(mat_a: torch.Tensor, mat_b: torch.Tensor, *args: Any, out: torch.Tensor, conv: Conventions,
                    **kwargs: Any) -> int:
    """Grouped GEMM (MoE experts): every output element costs K multiply-adds.

    2d x 3d (tokens sorted by expert, `offs` splits the rows): A (S, K), B (G, K, N) -> 2*S*K*N.
    3d x 3d: 2*G*M*N*K; 3d x 2d likewise 2*numel(out)*K. 2d x 2d splits K by `offs`: the groups
    partition A (M, K_total) so the total is 2*M*N*K_total. Rows of A that no group covers (offs[-1] < S)
    still count: the shapes are all a fake trace knows, and the MoE layers of transformers cover all rows.
    """
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        return 2 * mat_a.shape[0] * mat_a.shape[1] * mat_b.shape[1]
    return 2 * out.numel() * mat_a.shape[-1]


@register("aten::_scaled_dot_product_flash_attention_for_cpu")
def sdpa_cpu_flop(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                  is_causal: bool = False, *args: Any, out: Any, conv: Conventions, **kwargs: Any) -> int:
    """The CPU SDPA kernel, (b, h, s, d) layout: torch's own SDPA formula, 2*b*h*s_q*s_k*(d + d_v).

    An explicit `attn_mask` is counted dense (its zeros are data); `is_causal` is halved only with the
    causal-halving switch (top-left alignment, as SDPA defines it).
    """
    b, h, s_q, d = query.shape
    s_k, d_v = key.shape[-2], value.shape[-1]
    return attention_flops(b, h, s_q, s_k, d, d_v, _causal_pairs(s_q, s_k, is_causal, conv, "top_left"))


# The SDPA ops torch does count; listed here only so the causal-halving switch can apply to them.
register("aten::_scaled_dot_product_flash_attention")(sdpa_cpu_flop)


@register("aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")
def sdpa_with_bias_flop(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any = None,
                        compute_log_sumexp: bool = False, dropout_p: float = 0.0, is_causal: bool = False,
                        *args: Any, out: Any, conv: Conventions, **kwargs: Any) -> int:
    """The CUDA SDPA kernels whose schema puts `attn_bias, compute_log_sumexp` before `is_causal`: the same
    count as `sdpa_cpu_flop` (torch counts these; listed so the causal-halving switch reads the right flag)."""
    return sdpa_cpu_flop(query, key, value, dropout_p, is_causal, out=out, conv=conv)


@register("flash_attn::_flash_attn_forward")
def flash_attn_forward_flop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                            softmax_scale: float | None = None, causal: bool = False, window_size_left: int = -1,
                            window_size_right: int = -1, *args: Any, out: Any, conv: Conventions,
                            **kwargs: Any) -> int:
    """Dao-AILab flash-attn forward, (b, s, h, d) layout: 2*b*h*s_q*s_k*(d + d_v).

    `causal` and the sliding window use flash-attn's bottom-right alignment; counted dense unless the
    causal-halving switch is on (FlopCounterMode's convention for its own flash ops).
    """
    b, s_q, h, d = q.shape
    s_k, d_v = k.shape[1], v.shape[-1]
    window = (int(window_size_left), int(window_size_right))
    return attention_flops(b, h, s_q, s_k, d, d_v, _causal_pairs(s_q, s_k, causal, conv, "bottom_right", window))


@register("flash_attn::_flash_attn_varlen_forward")
def flash_attn_varlen_forward_flop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                   dropout_p: float = 0.0, softmax_scale: float | None = None,
                                   causal: bool = False, window_size_left: int = -1, window_size_right: int = -1,
                                   *args: Any, out: Any, conv: Conventions, **kwargs: Any) -> int:
    """flash-attn varlen forward, packed (total, h, d): sum over sequences of 2*h*s_q_i*s_k_i*(d + d_v).

    Reads the values of `cu_seqlens_*` (raw access): under fake tensors they are unknown and the op is
    reported as such rather than guessed.
    """
    if isinstance(cu_seqlens_q, FakeTensor) or isinstance(cu_seqlens_k, FakeTensor):
        raise CannotCount("flash_attn varlen: sequence lengths are data; capture in real mode to count it")
    h, d = q.shape[1], q.shape[2]
    d_v = v.shape[-1]
    lq = cu_seqlens_q.diff().tolist()
    lk = cu_seqlens_k.diff().tolist()
    window = (int(window_size_left), int(window_size_right))
    return sum(attention_flops(1, h, a, b, d, d_v, _causal_pairs(a, b, causal, conv, "bottom_right", window))
               for a, b in zip(lq, lk))


def boundary_attention_flop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, Any],
                            conv: Conventions) -> int:
    """An attention function's call (a boundary node, tracer.capture.attention) from its q, k, v and parameters: the same
    2*b*h*pairs*(d + d_v) as the ops above, in the call's layout. Causal pairs (with the causal-halving switch)
    use flash-attn's bottom-right alignment for its layouts and SDPA's top-left for transformers' interface
    (whose callers turn causal off for one query). Packed (`thd`) calls need their host sequence lengths."""
    causal, window = params["causal"], tuple(params["window"] or (-1, -1))
    d, d_v = q.shape[-1], v.shape[-1]
    if params["layout"] == "thd":
        lengths = params.get("cu_seqlens") or [None, None]
        if lengths[0] is None or lengths[1] is None:
            raise CannotCount("attention boundary (packed): sequence lengths are data; capture in real mode")
        h = q.shape[1]
        lq = [b - a for a, b in zip(lengths[0], lengths[0][1:])]
        lk = [b - a for a, b in zip(lengths[1], lengths[1][1:])]
        return sum(attention_flops(1, h, a, b, d, d_v, _causal_pairs(a, b, causal, conv, "bottom_right", window))
                   for a, b in zip(lq, lk))
    if params["layout"] == "bshd":
        b, s_q, h, _ = q.shape
        s_k, align = k.shape[1], "bottom_right"
    else:
        b, h, s_q, _ = q.shape
        s_k, align = k.shape[-2], "top_left"
    return attention_flops(b, h, s_q, s_k, d, d_v, _causal_pairs(s_q, s_k, causal, conv, align, window))


@register("higher_order::flex_attention")
def flex_attention_flop(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, out: Any,
                        conv: Conventions, **kwargs: Any) -> int:
    """flex_attention, (b, h, s, d) layout: dense 2*b*h*s_q*s_k*(d + d_v), as torch >= 2.13 counts it.

    The block mask's sparsity is data, so flex is counted dense, like FlopCounterMode without a hint.
    """
    b, h, s_q, d = query.shape
    return attention_flops(b, h, s_q, key.shape[-2], d, value.shape[-1])
