"""The ONNX path on the reduced-size v2 model: the exported prefill's per-node FLOPs equal the fx graph's per
stage and per module, every FLOP-bearing ONNX node maps through the same table; formulas by hand; bad export."""

import json

import pytest

from tracer.diff import main
from tracer.onnx.formulas import conv_flop, einsum_flop, gemm_flop, matmul_flop

pytest.importorskip("onnxscript", reason="pip install -e '.[onnx]' (the test extra has it)")


def _run(argv, capsys):
    code = main(argv)
    return code, *capsys.readouterr()


def test_onnx_formulas_by_hand():
    assert matmul_flop([[2, 3, 5, 7], [2, 3, 7, 11]], [2, 3, 5, 11], {}) == 2 * (2 * 3) * 5 * 11 * 7
    assert matmul_flop([[9, 4], [4, 6]], [9, 6], {}) == 2 * 9 * 6 * 4
    assert gemm_flop([[4, 9], [4, 6]], [9, 6], {"transA": 1}) == 2 * 9 * 6 * 4
    assert conv_flop([[1, 3, 32, 32], [8, 3, 3, 3]], [1, 8, 30, 30], {}) == 2 * (8 * 30 * 30) * 3 * 3 * 3
    # SAM's relative positions: q (b, h, w, c) with R (h, k, c) -> (b, h, w, k)
    assert einsum_flop([[6, 14, 14, 64], [14, 14, 64]], [6, 14, 14, 14], {"equation": "bhwc,hkc->bhwk"}) == \
        2 * 6 * 14 * 14 * 64 * 14


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory, tiny_v2_config):
    out = tmp_path_factory.mktemp("onnx")
    code = main(["--config", tiny_v2_config, "--image-shape", "1000x800", "--text-tokens", "3", "--decode-steps", "3",
                 "--graph", "onnx", "--quiet", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "report-onnx.json").read_text()), json.loads((out / "report.json").read_text())


def test_onnx_totals_equal_fx_per_stage_and_module(onnx_run):
    out, rep, fx = onnx_run
    import onnx

    model = onnx.load(out / "prefill.onnx")
    assert len(model.graph.node) > 1000 and not model.graph.initializer  # the graph; weights are typed inputs
    assert [(s["name"], s["difference"]) for s in rep["consistency"]["stages"]] == [
        ("vision", 0), ("prefill", 0), ("decode", 0)]
    assert rep["consistency"]["layers_differing"] == []
    for stage, step in (("prefill", None), ("decode", 0)):
        per = lambda nodes: {m: sum(n["flops_full"] for n in nodes  # noqa: E731
                                    if n["module"] == m and n["stage"] == stage and n["step"] == step)
                             for m in {n["module"] for n in nodes}}
        assert {k: v for k, v in per(rep["nodes"]).items() if v} == {k: v for k, v in per(fx["nodes"]).items() if v}


def test_onnx_decode_step_0_with_its_kv_cache_as_inputs(onnx_run):
    out, rep, fx = onnx_run
    import onnx

    model = onnx.load(out / "decode.onnx")
    kv = [i for i in model.graph.input if i.name.startswith("kv_")]
    # key and value per decoder layer (2 here), (batch, kv heads, prompt length, head dim): what step 0 reads
    assert len(kv) == 2 * 2
    assert {i.type.tensor_type.shape.dim[2].dim_value for i in kv} == {fx["workload"]["prompt_len"]}
    fx_step0 = next(s for s in fx["stages"] if s["name"] == "decode")["steps"][0]["flops_full"]
    decode = next(s for s in rep["stages"] if s["name"] == "decode")
    assert decode["flops_full"] == fx_step0 > 0 and decode["gap"] == 0  # against the one-step analytic model
    assert all(n["step"] == 0 and n["id"].startswith("onnx-decode/0/") for n in rep["nodes"] if n["stage"] == "decode")


def test_onnx_nodes_all_mapped_with_their_origin_ops(onnx_run):
    _, rep, _ = onnx_run
    assert rep["unknown_ops"] == [] and rep["coverage"]["unmapped"] == 0 and rep["coverage"]["mapped"] > 0
    assert all(s["gap"] == 0 for s in rep["stages"])  # aligned analytic model, as for fx
    flop = [n for n in rep["nodes"] if n["flops_full"]]
    assert {"MatMul", "Conv", "Einsum"} <= {n["onnx_op"] for n in flop} <= {"MatMul", "Gemm", "Conv", "Einsum"}
    assert {n["op"] for n in flop if n["onnx_op"] == "Einsum"} == {"aten::einsum"}
    rel = next(n for n in flop if n["onnx_op"] == "Einsum")
    assert rel["layer"].endswith(".rel_pos")
    attn = [n for n in flop if n["op"] == "aten::scaled_dot_product_attention"]
    assert attn and {n["layer"].rsplit(".", 1)[-1] for n in attn} == {"attn"}
    assert any("#1" in n["module"] and n["layer"].startswith("vision.tiles.") for n in flop)


def test_onnx_export_failure_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, tiny_v2_config):
    import torch

    from tracer.vendors.deepseek_ocr2 import DeepseekOcr2Vendor

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # control flow on data: torch.export refuses it

    monkeypatch.setattr(DeepseekOcr2Vendor, "onnx_prefill", lambda self, m, p: (DataDependent(), (torch.ones(3),)))
    out = tmp_path / "o"
    code, _, err = _run(["--config", tiny_v2_config, "--decode-steps", "0", "--graph", "onnx", "--quiet",
                         "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("flopdiff: error: --graph onnx: exporting the prefill failed")
    assert not out.exists()


def test_onnx_refused_up_front_for_a_model_without_an_export(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from tracer import vendors

    monkeypatch.setitem(vendors.VENDORS, "toy", lambda: SimpleNamespace(name="toy"))
    code, _, err = _run(["--model", "toy", "--graph", "onnx", "--quiet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--graph onnx: not available for --model toy (its adapter has no onnx_prefill)" in err
    assert not (tmp_path / "o").exists()


# ---- the per-node counter against FlopCounterMode on tiny modules exported as flopdiff exports ---------------

class _Op(__import__("torch").nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


# case -> (function, input shapes, the same product as FlopCounterMode can count it): each an op form the counter
# once got wrong. FlopCounterMode counts 0 for a 1-D operand (aten.mv has no formula in its registry; flopdiff's
# fx count lists it unknown), so there its reference is the same product with the unit dimension made explicit.
TINY = {
    "matmul 3-D @ 1-D": (lambda a, b: a @ b, [(4, 5, 6), (6,)], lambda a, b: a @ b.unsqueeze(-1)),
    "matmul 1-D @ 3-D": (lambda a, b: a @ b, [(6,), (4, 6, 7)], lambda a, b: a.unsqueeze(0) @ b),
    "matmul batched": (lambda a, b: a @ b, [(2, 3, 5, 7), (2, 3, 7, 11)], None),
    "einsum with ...": (lambda a, b: __import__("torch").einsum("...ij,...jk->...ik", a, b),
                        [(2, 3, 4, 5), (2, 3, 5, 6)], None),
    "einsum broadcast 1": (lambda a, b: __import__("torch").einsum("bij,bjk->bik", a, b), [(8, 4, 5), (1, 5, 6)], None),
}


@pytest.mark.parametrize("case", list(TINY))
def test_onnx_counter_equals_flopcountermode_on_tiny_exports(case):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tracer.onnx.export import _export

    from tracer.onnx.nodes import onnx_nodes

    fn, shapes, reference = TINY[case]
    args = tuple(torch.randn(s) for s in shapes)
    with FlopCounterMode(display=False) as fc:
        (reference or fn)(*args)
    vendor = type("V", (), {"shims": staticmethod(lambda: __import__("contextlib").nullcontext())})()
    nodes = onnx_nodes(_export(vendor, _Op(fn), args, case))
    assert [n["status"] for n in nodes if n["status"] == "unknown"] == []
    assert sum(n["flops_full"] for n in nodes) == fc.get_total_flops() > 0


def _graph(nodes, inputs, outputs, functions=()):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_onnx_einsum_formula_by_hand_with_ellipsis_and_broadcast():
    assert einsum_flop([[2, 3, 4, 5], [2, 3, 5, 6]], [2, 3, 4, 6], {"equation": "...ij,...jk->...ik"}) == 1440
    assert einsum_flop([[8, 4, 5], [1, 5, 6]], [8, 4, 6], {"equation": "bij,bjk->bik"}) == 1920
    assert einsum_flop([[3, 4, 5], [5, 6]], [3, 4, 6], {"equation": "...ij,jk->...ik"}) == 2 * 3 * 4 * 5 * 6


def test_onnx_control_flow_and_unknown_rank_are_unknown_never_zero():
    from onnx import helper

    from tracer.onnx.nodes import onnx_nodes

    body = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "then", [],
                             [helper.make_tensor_value_info("y", 1, None)])
    branch = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    model = _graph([branch], [("c", []), ("a", [4, 4]), ("b", [4, 4])], ["y"])
    model.graph.input[0].type.tensor_type.elem_type = 9  # bool condition
    assert [(n["onnx_op"], n["status"]) for n in onnx_nodes(model)] == [("If", "unknown")]
    unranked = _graph([helper.make_node("MatMul", ["a", "b"], ["y"])], [("a", None), ("b", [4, 4])], ["y"])
    assert [(n["status"], n["flops_full"]) for n in onnx_nodes(unranked)] == [("unknown", 0)]


def test_onnx_local_function_is_inlined_and_counted():
    from onnx import helper

    from tracer.onnx.nodes import onnx_nodes

    fn = helper.make_function("local", "Mm", ["a", "b"], ["y"], [helper.make_node("MatMul", ["a", "b"], ["y"])],
                              [helper.make_opsetid("", 18)])
    model = _graph([helper.make_node("Mm", ["x", "w"], ["y"], domain="local")], [("x", [3, 4]), ("w", [4, 5])], ["y"],
                   functions=[fn])
    nodes = onnx_nodes(model)
    assert sum(n["flops_full"] for n in nodes) == 2 * 3 * 4 * 5 and all(n["status"] != "unknown" for n in nodes)
