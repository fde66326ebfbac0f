"""FlashAttention without flash-attn (the stand-in), attention calls as boundary nodes, and attention plugins.

References are independent of the code under test: flash-attn 2.8.3's own op schemas (copied from its source), the
attention formula by hand, FlopCounterMode itself, and the eager and SDPA runs of the same workload."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from tracer.capture.attention import boundary
from tracer.capture.recorder import capture
from tracer.count.counter import count_graph, totals
from tracer.core.conventions import Conventions
from tracer.vendors import flash_attn_standin as standin

# flash-attn 2.8.3, flash_attn/flash_attn_interface.py: torch.library.custom_op("flash_attn::...", mutates_args=())
# over these annotations gives these schemas (q, k, v: (batch, seq, heads, dim); varlen: packed (tokens, heads, dim))
FORWARD_SCHEMA = ("_flash_attn_forward(Tensor q, Tensor k, Tensor v, float dropout_p, float softmax_scale, "
                  "bool causal, SymInt window_size_left, SymInt window_size_right, float softcap, Tensor? alibi_slopes, "
                  "bool return_softmax) -> (Tensor, Tensor, Tensor, Tensor)")
VARLEN_SCHEMA = ("_flash_attn_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                 "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, float softmax_scale, bool causal, "
                 "SymInt window_size_left=-1, SymInt window_size_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, "
                 "bool return_softmax=False, Tensor? block_table=None, Tensor? leftpad_k=None, Tensor? seqused_k=None, "
                 "bool zero_tensors=False) -> (Tensor, Tensor, Tensor, Tensor)")

needs_standin = pytest.mark.skipif(standin.real_flash_attn(), reason="the real flash-attn is installed here: "
                                   "the stand-in stays out (tested where it is absent, as in CI)")


def test_standin_ops_have_flash_attn_283_schemas():
    assert standin.schema("_flash_attn_forward") == FORWARD_SCHEMA
    assert standin.schema("_flash_attn_varlen_forward") == VARLEN_SCHEMA


@needs_standin
def test_standin_exists_only_inside_its_block():
    import transformers.utils as tu

    before = tu.is_flash_attn_2_available()
    with standin.flash_attention_2(fake=True) as stood_in:
        import flash_attn
        import flash_attn.bert_padding  # what transformers imports pad_input and unpad_input from

        assert stood_in and flash_attn.__version__ == "2.8.3"
        assert tu.is_flash_attn_2_available() and tu.is_flash_attn_greater_or_equal("2.6.0")
        assert str(torch.ops.flash_attn._flash_attn_forward.default._schema) == "flash_attn::" + FORWARD_SCHEMA
    assert "flash_attn" not in sys.modules and tu.is_flash_attn_2_available() == before
    assert not hasattr(torch.ops.flash_attn, "_flash_attn_forward")


def test_a_real_flash_attn_is_used_as_it_is(monkeypatch):
    """With flash_attn importable (here a module standing for the installed package), nothing is stood in: no op
    library, no module swapped, transformers' own checks untouched."""
    import types

    import transformers.utils as tu

    real = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", real)
    before = tu.is_flash_attn_2_available
    with standin.flash_attention_2(fake=False) as stood_in:
        assert stood_in is False and sys.modules["flash_attn"] is real and tu.is_flash_attn_2_available is before
        assert not hasattr(torch.ops.flash_attn, "_flash_attn_varlen_forward")


@needs_standin
def test_flopcountermode_counts_flash_attn_ops_zero():
    """What FlopCounterMode reports for flash-attn's op: 0 (flash-attn registers no FLOP formula: checked in its
    2.8.3 source; torch's flop_registry has none for a custom op it does not know); flopdiff's full policy counts it."""
    with standin.flash_attention_2(fake=True):
        import flash_attn

        with FakeTensorMode():
            q = torch.empty(1, 64, 4, 32, dtype=torch.bfloat16)
            with FlopCounterMode(display=False) as fc:
                flash_attn.flash_attn_func(q, q, q, causal=True)
        assert fc.get_total_flops() == 0
        sg, _ = capture(lambda: flash_attn.flash_attn_func(q, q, q, causal=True), torch.nn.Module(), "prefill")
    count_graph(sg)
    (node,) = [n for n in sg.op_nodes() if n.meta["op"] == "flash_attn::_flash_attn_forward"]
    assert (node.meta["flops_torch"], node.meta["flops_full"]) == (0, 4 * 1 * 4 * 64 * 64 * 32)


@needs_standin
def test_unpad_reads_the_real_mask_and_varlen_counts_per_sequence():
    """A padded batch in fake mode: the lengths come from the host mask (3 and 5 tokens), never guessed."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with standin.flash_attention_2(fake=True):
        from flash_attn import flash_attn_varlen_func
        from flash_attn.bert_padding import unpad_input

        def run():
            x = torch.empty(2, 5, 2, 16)
            packed, _, cu, max_len, _ = unpad_input(x, mask)
            return flash_attn_varlen_func(packed, packed, packed, cu, cu, max_len, max_len)

        with FakeTensorMode(allow_non_fake_inputs=True):
            sg, _ = capture(run, torch.nn.Module(), "prefill")
    count_graph(sg)
    (node,) = [n for n in sg.op_nodes() if n.meta["op"] == "flash_attn::_flash_attn_varlen_forward"]
    assert node.meta["flops_full"] == 4 * 2 * (3 * 3 + 5 * 5) * 16


# ---- the boundary rule ---------------------------------------------------------------------------------------------

class _Layer(torch.nn.Module):
    """An attention module calling `fn(self, q, k, v, None, scaling=...)` as transformers' interface does."""

    is_causal = False

    def __init__(self, fn):
        super().__init__()
        self.fn = boundary("test_impl", fn, "interface")

    def forward(self, q, k, v):
        return self.fn(self, q, k, v, None, scaling=q.shape[-1] ** -0.5)[0]


B, H, S, D = 2, 3, 8, 16
DENSE = 4 * B * H * S * S * D  # Q K^T and P V, 2 FLOPs per multiply-add


def _numpy_matmul(a, b):
    return torch.from_numpy(a.numpy() @ b.numpy())


def sdpa_inside(module, q, k, v, mask, scaling=None, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2), None


def numpy_inside(module, q, k, v, mask, scaling=None, **kw):
    p = torch.softmax(_numpy_matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)
    return _numpy_matmul(p, v).transpose(1, 2), None


def half_inside(module, q, k, v, mask, scaling=None, **kw):
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)  # counted: Q K^T
    return _numpy_matmul(p, v).transpose(1, 2), None                          # unseen: P V


def mystery_inside(module, q, k, v, mask, scaling=None, **kw):
    return torch.ops.flopdiffattn.mystery(q).transpose(1, 2), None


@pytest.fixture(scope="module")
def mystery_op():
    lib = torch.library.Library("flopdiffattn", "FRAGMENT")
    lib.define("mystery(Tensor q) -> Tensor")
    lib.impl("mystery", lambda q: q.clone(), "CompositeExplicitAutograd")
    torch.library.register_fake("flopdiffattn::mystery", lambda q: torch.empty_like(q), lib=lib)
    yield
    lib._destroy()


def _boundary_trace(fn, conv=Conventions()):
    layer = _Layer(fn)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    with torch.no_grad():
        sg, out = capture(lambda: layer(q, k, v), layer, "prefill")
    count_graph(sg, conv)
    (node,) = [n for n in sg.op_nodes() if n.meta["op"] == "attention::test_impl"]
    return sg, node, out


@pytest.mark.parametrize("fn, own, status, inside", [
    (sdpa_inside, 0, "group", DENSE),              # decomposes into a counted op: a grouping node
    (numpy_inside, DENSE, "formula", 0),           # nothing inside reached the dispatcher: the formula
    (half_inside, DENSE // 2, "formula", DENSE // 2),  # the inner ops carry Q K^T: the boundary carries P V
])
def test_boundary_carries_what_nothing_inside_counted(fn, own, status, inside):
    sg, node, out = _boundary_trace(fn)
    inner = [n for n in sg.op_nodes() if n.name in node.meta["inner"]]
    assert (node.meta["flops_full"], node.meta["flop_status"], node.meta["flops_torch"]) == (own, status, 0)
    assert sum(n.meta["flops_full"] for n in inner) == inside
    assert totals([sg]).flops_full == DENSE  # never twice, never missed
    assert node.meta["params"] == {"layout": "bhsd", "causal": False, "window": None, "scale": D ** -0.5}
    assert [a.meta["val"].shape for a in node.args] == [torch.Size([B, H, S, D])] * 3
    assert out.shape == (B, S, H, D)


def test_boundary_over_an_op_without_formula_counts_the_formula_and_keeps_the_op_unknown(mystery_op):
    sg, node, _ = _boundary_trace(mystery_inside)
    assert (node.meta["flops_full"], node.meta["flop_status"]) == (DENSE, "formula")
    assert totals([sg]).unknown == {"flopdiffattn::mystery": 1}  # still reported: never a silent 0


def test_boundary_output_feeds_what_follows():
    """The graph's data flow goes through the boundary: the op after the call reads the boundary node."""
    layer = _Layer(numpy_inside)
    q = torch.randn(B, H, S, D)
    with torch.no_grad():
        sg, _ = capture(lambda: layer(q, q, q) * 2, layer, "prefill")
    after = list(sg.op_nodes())[-1]  # the `* 2`
    assert after.meta["op"] == "aten::mul" and after.args[0].meta["op"] == "attention::test_impl"


def test_boundary_causal_halving_follows_the_module():
    class Causal(_Layer):
        is_causal = True

    layer = Causal(numpy_inside)
    q = torch.randn(1, 1, 4, 8)
    with torch.no_grad():
        sg, _ = capture(lambda: layer(q, q, q), layer, "prefill")
    count_graph(sg, Conventions(causal_halving=True))
    (node,) = [n for n in sg.op_nodes() if n.meta["op"] == "attention::test_impl"]
    assert node.meta["flops_full"] == 4 * (1 + 2 + 3 + 4) * 8


# ---- DeepSeek-OCR-2: flash_attention_2, eager, SDPA and a plugin ----------------------------------------------------

def _v2(attn, workload=None, config=None, mode="fake", plugins=(), policy="full"):
    from tracer.pipeline import Options, run
    from tracer.vendors import BuildOptions, parse_impl
    from tracer.core.workload import Workload

    workload = workload or Workload(image_wh=(1000, 1400), text_tokens=9, decode_steps=10)
    return run(workload, Options(build=BuildOptions(attn=parse_impl(attn, "--attn"), attn_plugins=plugins),
                                 config=config, mode=mode, policy=policy, sequential=mode == "real"))


@pytest.fixture(scope="module")
def v2_runs():
    return {name: _v2(attn) for name, attn in {
        "fa2": "text_config=flash_attention_2,vision_config=sdpa",
        "eager": "text_config=eager,vision_config=sdpa",
        "sdpa": "sdpa"}.items()}


@pytest.mark.v2
def test_v2_flash_attention_2_equals_eager_and_sdpa_per_stage(v2_runs):
    fa2, eager, sdpa = (v2_runs[k] for k in ("fa2", "eager", "sdpa"))
    per_stage = {name: [(s.name, s.flops_full) for s in r.stages] for name, r in v2_runs.items()}
    assert per_stage["fa2"] == per_stage["eager"] == per_stage["sdpa"]
    for stage in fa2.stages:
        fa2_nodes = sum(n.flops_full for n in fa2.nodes if n.stage == stage.name and n.op.startswith("flash_attn::"))
        assert stage.flops_torch == stage.flops_full - fa2_nodes - sum(
            n.flops_full - n.flops_torch for n in fa2.nodes if n.stage == stage.name
            and not n.op.startswith("flash_attn::"))
    assert {s.name: s.gap for s in fa2.stages} == {"vision": 0, "prefill": 0, "decode": 0}


@pytest.mark.v2
def test_v2_each_fa2_node_carries_its_layers_eager_matmuls(v2_runs):
    """Per decoder layer and step: the flash_attn op's FLOPs == the two bmm (Q K^T, P V) of eager attention, and
    the attention call's boundary groups them (0 of its own) in both."""
    def attention_nodes(result, op_prefix):
        out = {}
        for n in result.nodes:
            if n.stage != "vision" and n.module.endswith("self_attn") and "language_model" in n.module \
                    and n.op.startswith(op_prefix):
                key = (n.stage, n.step, n.module)
                out[key] = out.get(key, 0) + n.flops_full
        return out

    fa2 = attention_nodes(v2_runs["fa2"], "flash_attn::")
    eager = attention_nodes(v2_runs["eager"], "aten::bmm")
    assert fa2 == eager and len(fa2) == 12 * 11  # 12 layers, prefill + 10 steps
    for run in (v2_runs["fa2"], v2_runs["eager"]):
        calls = [n for n in run.nodes if n.op.startswith("attention::") and "language_model" in n.module]
        assert len(calls) == 12 * 11 and {(n.flops_full, n.status) for n in calls} == {(0, "group")}
    assert {n.layer for n in v2_runs["fa2"].nodes if n.op.startswith("flash_attn::")} == \
        {f"decoder.layers.{i}.attn" for i in range(12)}


@pytest.mark.v2
def test_v2_aligned_analytic_holds_for_both_policies_with_flash_attention_2(v2_runs):
    from tracer.compare.analytic import analytic_of_report, map_report
    from tracer.compare.diff import with_diff

    report = v2_runs["fa2"].report
    for policy in ("full", "torch"):
        an = analytic_of_report(report, "aligned", policy_name=policy)
        doc = with_diff(report, an, map_report(report, an))
        assert [s["gap"] for s in doc["stages"]] == [0, 0, 0], policy
        assert all(r["gap"] == 0 for r in doc["layers"]), policy
    torch_attn = [r for r in with_diff(report, an, map_report(report, an))["layers"]
                  if r["id"].endswith(".attn") and r["id"].startswith("decoder")]
    assert torch_attn and all(r["flops_analytic"] == r["flops_torch"] == 0 for r in torch_attn)


@pytest.mark.v2
def test_v2_plugin_in_real_mode_is_counted_on_its_boundary(tiny_v2_config):
    """A kernel the dispatcher never sees (NumPy), registered through --attn-plugin and run for real: each text
    attention call carries the formula, and the stages equal the SDPA run's."""
    from tracer.core.workload import Workload

    workload = Workload(image_wh=(640, 640), text_tokens=3, decode_steps=2)
    plugin = _v2("text_config=numpy_attention,vision_config=sdpa", workload, tiny_v2_config, "real",
                 ("attention_plugins:numpy_attention",))
    sdpa = _v2("sdpa", workload, tiny_v2_config, "real")
    assert [(s.name, s.flops_full) for s in plugin.stages] == [(s.name, s.flops_full) for s in sdpa.stages]
    calls = [n for n in plugin.nodes if n.op == "attention::numpy_attention"]
    assert len(calls) == 2 * 3 and all(n.status == "formula" and n.flops_full > 0 and n.flops_torch == 0
                                       for n in calls)
    assert all(n.layer and n.layer.endswith(".attn") for n in calls)
    assert {u.op for u in plugin.unseen if u.stage == "decode"} >= {"attention::numpy_attention"}


@pytest.mark.v2
def test_v2_plugin_in_fake_mode_records_the_boundary_only():
    fake = _v2("text_config=numpy_attention,vision_config=sdpa", plugins=("attention_plugins:numpy_attention",))
    sdpa = _v2("sdpa")
    assert [(s.name, s.flops_full, s.gap) for s in fake.stages] == [(s.name, s.flops_full, 0) for s in sdpa.stages]
    calls = [n for n in fake.nodes if n.op == "attention::numpy_attention"]
    assert len(calls) == 12 * 11
    for n in calls:  # nothing ran inside (an allocation): the call carries the whole formula, by hand
        (b, h, s_q, d), (_, _, s_k, _), _ = n.input_shapes
        assert (n.flops_full, n.flops_torch, n.status) == (4 * b * h * s_q * s_k * d, 0, "formula")


def test_numpy_plugin_is_real_attention():
    """The test plugin computes attention (so the real-mode run above runs a real kernel, not a shape)."""
    from attention_plugins import numpy_attention

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    module = type("M", (), {"is_causal": True})()
    out, _ = numpy_attention(module, q, k, v, None, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3).transpose(1, 2)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


# ---- the H200 run, replayed ----------------------------------------------------------------------------------------

H200_TRITON = Path(__file__).resolve().parent / "data" / "cuda" / "v2-640x640-triton-fa2-h200.json.gz"


@pytest.fixture(scope="module")
def h200_triton():
    """flopdiff's own H200 recording (benchmarks/check_attention_plugin.sh): DeepSeek-OCR-2 640x640 real mode on
    CUDA, the text attention flash-attention-triton's Triton FlashAttention-2 through --attn-plugin; attributed again
    here from its kernel records and nodes."""
    from tracer.compare.analytic import analytic_of_report, map_report
    from tracer.compare.diff import with_diff
    from tracer.cuda.kernels import attribute

    rec = json.loads(gzip.open(H200_TRITON).read())
    report = {"model": rec["model"], "workload": rec["workload"], "options": rec["options"],
              "analytic": rec["analytic"], "stages": rec["stages"],
              "nodes": [{**n, "layer": None} for n in rec["nodes"]]}
    an = analytic_of_report(report, "aligned")
    report = with_diff(report, an, map_report(report, an))
    return rec, report, attribute(report, rec["kernel_records"], map_report(report, an).matcher, rec["device"])


def test_h200_triton_kernels_carry_the_boundary_formula_unseen_by_flopcountermode(h200_triton):
    rec, report, kernels = h200_triton
    (fwd,) = [k for k in kernels["kernels"] if k["kernel"] == "_forward_kernel"]
    calls = [n for n in report["nodes"] if n["op"] == "attention::triton_fa2"]
    assert len(calls) == 12 * 3 and fwd["calls"] == 36  # 12 text layers x (prefill + 2 decode steps)
    by_hand = 0
    for n in calls:  # the attention formula from the call's own q/k/v shapes: (batch, heads, seq, dim)
        (b, h, s_q, d), (_, _, s_k, _), _ = n["input_shapes"]
        by_hand += 4 * b * h * s_q * s_k * d
        assert n["status"] == "formula" and n["flops_torch"] == 0 and n["layer"].startswith("decoder.layers.")
    assert fwd["flops_full"] == by_hand == sum(n["flops_full"] for n in calls) > 0
    assert (fwd["flops_torch"], fwd["counted_by_flopcountermode"], fwd["ops"]) == (0, "no", ["attention::triton_fa2"])
    assert fwd["layers"] == sorted(f"decoder.layers.{i}.attn" for i in range(12))
    assert kernels["kernel_time"]["attributed_pct"] == 100.0
    assert sum(r["time_us"] for r in kernels["kernel_layers"]) == pytest.approx(kernels["kernel_time"]["total_us"])
    assert not [r for r in kernels["kernel_layers"] if r["layer"].startswith("(module")]


def test_h200_triton_run_counts_what_the_sdpa_run_counts(h200_triton):
    rec, report, _ = h200_triton
    assert [(s["name"], s["flops_full"]) for s in rec["stages"]] == \
        [(s["name"], s["flops_full"]) for s in rec["sdpa_stages"]]
    assert [s["gap"] for s in report["stages"]] == [0, 0, 0]
