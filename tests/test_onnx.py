"""The ONNX path on the reduced-size v2 model: the exported prefill's per-node FLOPs equal the fx graph's per
stage and per module, every FLOP-bearing ONNX node maps through the same table; formulas by hand; bad export."""

import json

import pytest

from tracer.diff import main
from tracer.onnx_graph import conv_flop, einsum_flop, gemm_flop, matmul_flop

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
