"""Policy `torch` on the analytic side asks torch's registry (tracer.core.conventions.CARRIERS), as the trace's count
does: a formula torch adds (or drops) moves both sides at once, with no hand-kept list to update."""

import pytest
from torch.utils import flop_counter

from analytic.layers import Experts, Linear, Policy
from tracer.core.conventions import flop_counter_counts, torch_counts


@pytest.fixture
def fresh_answers():
    flop_counter_counts.cache_clear()
    yield
    flop_counter_counts.cache_clear()


def test_what_torch_counts_today():
    # torch 2.4 - 2.14: SDPA has a formula for its CUDA kernels only; grouped GEMM, flash-attn and flex none
    assert [torch_counts(op, "cpu") for op in ("mm", "addmm", "bmm", "convolution", "sdpa")] == [True] * 4 + [False]
    assert torch_counts("sdpa", "cuda")
    assert not any(torch_counts(op, d) for op in ("grouped_mm", "flash_attn", "flex", "python") for d in ("cpu", "cuda"))
    assert torch_counts("elementwise", "cpu")  # no tensor-core work: nothing to drop


def test_a_formula_added_to_torchs_registry_is_counted_by_policy_torch(monkeypatch, fresh_answers):
    import torch

    experts = Experts("experts", op="grouped_mm", routed_rows=6, d=64, inter=32)
    torch_policy = Policy(ignore_torch_unsupported_flops=True)
    assert experts.cost(torch_policy).tc_flops == 0
    monkeypatch.setitem(flop_counter.flop_registry, torch.ops.aten._grouped_mm, lambda *a, **k: 0)
    flop_counter_counts.cache_clear()
    assert experts.cost(torch_policy).tc_flops == experts.cost(Policy()).tc_flops > 0
    monkeypatch.delitem(flop_counter.flop_registry, torch.ops.aten.mm)
    flop_counter_counts.cache_clear()
    assert Linear("l", op="mm", tokens=2, d_in=3, d_out=4).cost(torch_policy).tc_flops == 0


def test_a_higher_order_op_is_never_counted_even_where_the_registry_lists_it():
    # FlopCounterMode raises on an eager flex_attention (torch 2.13) although flop_registry lists it
    assert not flop_counter_counts("higher_order::flex_attention")
    assert not flop_counter_counts("no_such_library::op") and not flop_counter_counts("aten::no_such_op")
