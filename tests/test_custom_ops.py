"""Ops FlopCounterMode cannot see: flash_attn custom ops (a stand-in of the real schema) and unknown ops."""

import pytest
import torch

from tracer.capture.recorder import capture
from tracer.count.counter import count_graph, may_carry_flops, totals
from tracer.core.conventions import Conventions

pytestmark = pytest.mark.v2


# flash-attn 2.x registers this op (torch.library.custom_op) with this schema; q, k, v are (batch, seq, heads, dim)
FLASH_SCHEMA = ("_flash_attn_forward(Tensor q, Tensor k, Tensor v, float dropout_p, float softmax_scale, bool causal, "
                "SymInt window_size_left, SymInt window_size_right, float softcap, Tensor? alibi_slopes, "
                "bool return_softmax) -> (Tensor, Tensor, Tensor, Tensor)")


def _flash_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                   alibi_slopes, return_softmax):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    b, s, h, _ = q.shape
    return out.contiguous(), q.new_zeros(b, h, s), q.new_zeros(2, dtype=torch.int64), q.new_zeros(0)


def _flash_fake(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                alibi_slopes, return_softmax):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty(b, h, s), q.new_empty(2, dtype=torch.int64), q.new_empty(0)


@pytest.fixture(scope="module", autouse=True)
def stand_in_ops():
    """The ops, registered for this module's tests only (library fragments destroyed after): the real flash-attn,
    where it is installed, keeps its own op and these tests use it."""
    libs = []
    if not hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        flash = torch.library.Library("flash_attn", "FRAGMENT")
        flash.define(FLASH_SCHEMA)
        flash.impl("_flash_attn_forward", _flash_forward, "CompositeExplicitAutograd")
        torch.library.register_fake("flash_attn::_flash_attn_forward", _flash_fake, lib=flash)
        libs.append(flash)
    mystery = torch.library.Library("flopdifftest", "FRAGMENT")
    mystery.define("mystery_gemm(Tensor a, Tensor b) -> Tensor")
    mystery.impl("mystery_gemm", lambda a, b: a @ b, "CompositeExplicitAutograd")
    torch.library.register_fake("flopdifftest::mystery_gemm", lambda a, b: a.new_empty(a.shape[0], b.shape[1]),
                                lib=mystery)
    libs.append(mystery)
    yield
    for lib in libs:
        lib._destroy()


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        o = torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, 0.25, True, -1, -1, 0.0, None, False)[0]
        return self.proj(o), torch.ops.flopdifftest.mystery_gemm(q.flatten(0, 2), k.flatten(0, 2).T)


def _trace(conv=Conventions()):
    m = Attn()
    q, k, v = torch.randn(2, 6, 4, 16), torch.randn(2, 6, 4, 16), torch.randn(2, 6, 4, 16)
    with torch.no_grad():
        sg, _ = capture(lambda: m(q, k, v), m, "prefill")
    return count_graph(sg, conv)


def test_flash_attn_op_counted_by_formula_not_by_torch():
    sg = _trace()
    (node,) = [n for n in sg.op_nodes() if n.meta["op"] == "flash_attn::_flash_attn_forward"]
    assert node.meta["flops_torch"] == 0
    assert node.meta["flops_full"] == 4 * 2 * 4 * 6 * 6 * 16
    assert node.meta["flop_status"] == "formula"
    assert node.meta["module"] == "<root>"


def test_flash_attn_causal_halving_switch():
    sg = _trace(Conventions(causal_halving=True))
    (node,) = [n for n in sg.op_nodes() if n.meta["op"] == "flash_attn::_flash_attn_forward"]
    assert node.meta["flops_full"] == 4 * 2 * 4 * (1 + 2 + 3 + 4 + 5 + 6) * 16


def test_custom_op_without_formula_is_unknown_never_silent():
    sg = _trace()
    t = totals([sg])
    assert t.unknown == {"flopdifftest::mystery_gemm": 1}
    # the Linear is still counted by torch's own formula: 2 * rows * in * out
    assert t.flops_torch == 2 * (2 * 6 * 4) * 16 * 16


def test_may_carry_flops_classification():
    assert may_carry_flops("aten::_int_mm") and may_carry_flops("aten::_weight_int4pack_mm")
    assert may_carry_flops("mylib::fused_thing") and may_carry_flops("higher_order::flex_attention")
    assert not may_carry_flops("aten::add") and not may_carry_flops("prims::convert_element_type")
    assert not may_carry_flops("aten::softmax")


def test_flex_attention_text_model_on_cpu_fake_mode(tmp_path, tiny_v2_config, capsys):
    """flex_attention's own torch.compile(fullgraph=True) cannot run under the recorder ("found no compiled
    frames" before the fix): it is called uncompiled, recorded as its higher-order op and counted by formula; the
    decode worker stays off (its compiled block-mask kernels crash in a forked child)."""
    import json

    from tracer.diff import main

    out = tmp_path / "flex"
    assert main(["--config", tiny_v2_config, "--image-shape", "640x640", "--text-tokens", "2", "--decode-steps", "3",
                 "--attn", "text_config=flex_attention,vision_config=sdpa", "--quiet", "--out", str(out)]) == 0
    assert "note" not in capsys.readouterr().err
    doc = json.loads((out / "report.json").read_text())
    flex = [n for n in doc["nodes"] if n["op"] == "higher_order::flex_attention"]
    assert {n["stage"] for n in flex} == {"prefill", "decode"} and all(n["status"] == "formula" for n in flex)
    assert all(n["flops_full"] > n["flops_torch"] == 0 for n in flex)
    assert all(s["gap"] == 0 for s in doc["stages"]) and doc["unknown_ops"] == []


def test_formula_that_cannot_count_is_unknown_and_a_broken_one_names_its_node(monkeypatch):
    from tracer.core.errors import CannotCount
    from tracer.count.formulas import FORMULAS

    def cannot(*args, **kwargs):
        raise CannotCount("values needed")
    monkeypatch.setitem(FORMULAS, "flopdifftest::mystery_gemm", cannot)
    sg = _trace()
    (node,) = [n for n in sg.op_nodes() if n.meta["op"] == "flopdifftest::mystery_gemm"]
    assert (node.meta["flop_status"], node.meta["flops_full"], node.meta["flop_note"]) == ("unknown", 0, "values needed")

    def broken(a, b, **kwargs):
        return a.shape[5]
    monkeypatch.setitem(FORMULAS, "flopdifftest::mystery_gemm", broken)
    with pytest.raises(RuntimeError, match=r"FLOP formula for flopdifftest::mystery_gemm failed on node "
                                           r"mystery_gemm\w* \(module <root>, \S+test_custom_ops.py:\d+\): "
                                           r"IndexError"):
        _trace()


def test_a_formula_table_refuses_a_second_formula_for_a_name():
    from tracer.core.registry import FormulaTable

    table = FormulaTable("test")
    table.register("a::b")(lambda: 1)
    with pytest.raises(RuntimeError, match="duplicate test FLOP formula for a::b"):
        table.register("a::b")(lambda: 2)
