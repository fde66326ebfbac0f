"""Each formula of tracer.count.formulas against numbers derived by hand."""

import pytest
import torch

from tracer.core.conventions import Conventions, attention_pairs
from tracer.count.formulas import FORMULAS

DENSE = Conventions()
HALVED = Conventions(causal_halving=True)


def t(*shape):
    return torch.empty(shape)


def test_grouped_mm_2d_3d_counts_2SKN():
    # 12 routed rows (tokens x top-k), K=64 -> N=32 over 4 experts
    a, b, out = t(12, 64), t(4, 64, 32), t(12, 32)
    assert FORMULAS["aten::_grouped_mm"](a, b, out=out, conv=DENSE) == 2 * 12 * 64 * 32


def test_grouped_mm_3d_3d_counts_2GMNK():
    a, b, out = t(4, 8, 64), t(4, 64, 32), t(4, 8, 32)
    assert FORMULAS["aten::_grouped_mm"](a, b, out=out, conv=DENSE) == 2 * 4 * 8 * 32 * 64


def test_grouped_mm_2d_2d_splits_K():
    # A (M=8, K_total=96), B (96, N=16), groups over K: total work is one 8x96x16 GEMM
    a, b, out = t(8, 96), t(96, 16), t(3, 8, 16)
    assert FORMULAS["aten::_grouped_mm"](a, b, out=out, conv=DENSE) == 2 * 8 * 96 * 16


def test_sdpa_cpu_is_torch_sdpa_formula():
    q, k, v = t(1, 14, 1126, 64), t(1, 14, 1126, 64), t(1, 14, 1126, 64)
    assert FORMULAS["aten::_scaled_dot_product_flash_attention_for_cpu"](q, k, v, out=None, conv=DENSE) == \
        4 * 1 * 14 * 1126 * 1126 * 64


def test_sdpa_causal_dense_by_default_halved_with_switch():
    q = k = v = t(2, 3, 5, 8)
    f = FORMULAS["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert f(q, k, v, 0.0, True, out=None, conv=DENSE) == 4 * 2 * 3 * 5 * 5 * 8
    # top-left causal, 5x5: 1+2+3+4+5 = 15 kept pairs
    assert f(q, k, v, 0.0, True, out=None, conv=HALVED) == 4 * 2 * 3 * 15 * 8


@pytest.mark.parametrize("op", ["aten::_scaled_dot_product_cudnn_attention",
                                "aten::_scaled_dot_product_efficient_attention"])
def test_cuda_sdpa_reads_is_causal_after_bias_and_logsumexp(op):
    """Their schema is (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, ...): the H200 run's
    cuDNN attention is causal with compute_log_sumexp False."""
    q = k = v = t(2, 3, 5, 8)
    f = FORMULAS[op]
    assert f(q, k, v, None, False, 0.0, True, out=None, conv=DENSE) == 4 * 2 * 3 * 5 * 5 * 8
    assert f(q, k, v, None, False, 0.0, True, out=None, conv=HALVED) == 4 * 2 * 3 * 15 * 8
    assert f(q, k, v, None, True, 0.0, False, out=None, conv=HALVED) == 4 * 2 * 3 * 5 * 5 * 8


def test_attention_pairs_alignment_and_window():
    assert attention_pairs(4, 4, causal=True) == 10
    assert attention_pairs(2, 5, causal=True, align="top_left") == 1 + 2
    assert attention_pairs(2, 5, causal=True, align="bottom_right") == 4 + 5
    # sliding window of 1 to the left, causal, bottom-right, 4x4: 1 + 2 + 2 + 2
    assert attention_pairs(4, 4, causal=True, align="bottom_right", window=(1, -1)) == 7
    assert attention_pairs(3, 7, causal=False) == 21


def test_flash_attn_forward_layout_bshd_and_causal_switch():
    q, k, v = t(2, 6, 4, 16), t(2, 9, 4, 16), t(2, 9, 4, 32)
    f = FORMULAS["flash_attn::_flash_attn_forward"]
    assert f(q, k, v, 0.0, None, True, out=None, conv=DENSE) == 2 * 2 * 4 * 6 * 9 * (16 + 32)
    # bottom-right causal 6x9: rows see 4..9 keys -> 4+5+6+7+8+9 = 39 pairs
    assert f(q, k, v, 0.0, None, True, out=None, conv=HALVED) == 2 * 2 * 4 * 39 * (16 + 32)


def test_flash_attn_varlen_sums_sequences():
    q, k, v = t(7, 2, 8), t(7, 2, 8), t(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    f = FORMULAS["flash_attn::_flash_attn_varlen_forward"]
    assert f(q, k, v, cu, cu, 4, 4, out=None, conv=DENSE) == 4 * 2 * (3 * 3 + 4 * 4) * 8


def test_flex_attention_dense():
    q, k, v = t(1, 2, 10, 16), t(1, 2, 12, 16), t(1, 2, 12, 16)
    assert FORMULAS["higher_order::flex_attention"](q, k, v, out=None, conv=DENSE) == 4 * 1 * 2 * 10 * 12 * 16
