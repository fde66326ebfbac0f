"""DeepSeek-OCR (v1) from its own remote code: exact reference counts, the fake-mode shims against the
unmodified vendor code on random weights, mapping and gaps, bad input.

Needs a copy of the vendor's remote code in FLOPDIFF_DSOCR_V1_DIR (never committed) and transformers 4.46.x
(the vendor code's own requirement); skips with the reason otherwise. Tests that need neither are at the end.
"""

import json
from collections import Counter
from pathlib import Path

import pytest

from tracer.diff import main


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _v1(v1_dir, tmp, shape, *extra):
    out = tmp / shape
    argv = ["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--image-shape", shape,
            "--text-tokens", "9", "--decode-steps", "10", "--quiet", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def pages(v1_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v1")
    return {shape: _v1(v1_dir, tmp, shape) for shape in ("1000x1400", "640x640")}


@pytest.fixture(scope="module")
def fa2_pages(v1_dir, tmp_path_factory):
    """The seed's configuration: the decoder with flash_attention_2 (flash-attn absent: its stand-in), both policies
    gated at --max-gap 0 by the command line itself."""
    tmp = tmp_path_factory.mktemp("v1fa2")
    return {policy: _v1(v1_dir, tmp / policy, "1000x1400", "--attn", "flash_attention_2", "--policy", policy,
                        "--max-gap", "0") for policy in ("full", "torch")}


def test_v1_flash_attention_2_reproduces_the_eager_reference(fa2_pages, pages, shared_reference):
    """Full per stage == the public reference (an eager run's); torch == full minus the FA2 nodes (FlopCounterMode
    counts flash-attn's op 0); every FA2 node on its decoder layer's attention, equal to eager's two bmm there."""
    ref = json.loads((shared_reference / "deepseek-ocr" / "flops-reference.json").read_text())
    ref = ref["workloads"]["gundam_1000x1400"]["stages"]
    doc, eager = fa2_pages["full"], pages["1000x1400"]
    stages = {s["name"]: s for s in doc["stages"]}
    for name, ref_name in (("vision", "vision"), ("prefill", "prefill"), ("decode", "decode10")):
        assert stages[name]["flops_full"] == ref[ref_name]["flops"], name
        fa2 = sum(n["flops_full"] for n in doc["nodes"] if n["stage"] == name and n["op"].startswith("flash_attn::"))
        unseen_else = sum(n["flops_full"] - n["flops_torch"] for n in doc["nodes"]
                          if n["stage"] == name and not n["op"].startswith("flash_attn::"))
        assert stages[name]["flops_torch"] == stages[name]["flops_full"] - fa2 - unseen_else, name
    fa2_nodes = [n for n in doc["nodes"] if n["op"] == "flash_attn::_flash_attn_forward"]
    assert len(fa2_nodes) == 12 * 11 and all(n["flops_torch"] == 0 for n in fa2_nodes)
    assert {n["layer"] for n in fa2_nodes} == {f"decoder.layers.{i}.attn" for i in range(12)}

    def per_call(d, op):
        return {(n["stage"], n["step"], n["module"]): n["flops_full"] for n in d["nodes"]
                if n["op"] == op and n["module"].endswith("self_attn") and n["stage"] != "vision"}

    bmm = Counter()
    for n in eager["nodes"]:
        if n["op"] == "aten::bmm" and n["module"].endswith("self_attn") and n["stage"] != "vision":
            bmm[(n["stage"], n["step"], n["module"])] += n["flops_full"]
    assert per_call(doc, "flash_attn::_flash_attn_forward") == dict(bmm)
    calls = [n for n in doc["nodes"] if n["op"] == "attention::flash_attention_2"]
    assert len(calls) == 12 * 11 and {(n["flops_full"], n["status"]) for n in calls} == {(0, "group")}


def test_v1_flash_attention_2_aligned_gap_zero_both_policies(fa2_pages):
    for policy, doc in fa2_pages.items():
        assert doc["analytic"]["policy"] == policy and doc["analytic"]["attention"]["decoder"] == "flash_attention_2"
        assert doc["unknown_ops"] == [] and doc["coverage"]["unmapped"] == 0
        assert all(s["gap"] == 0 for s in doc["stages"]) and all(r["gap"] == 0 for r in doc["layers"]), policy
    torch_doc = fa2_pages["torch"]
    attn = [r for r in torch_doc["layers"] if r["id"].startswith("decoder") and r["id"].endswith(".attn")]
    assert attn and all(r["flops_analytic"] == r["flops_torch"] == 0 < r["flops_full"] for r in attn)


@pytest.mark.parametrize("shape, key", [("1000x1400", "gundam_1000x1400"), ("640x640", "gundam_640x640")])
def test_v1_reproduces_the_reference_exactly(pages, shared_reference, shape, key):
    ref = json.loads((shared_reference / "deepseek-ocr" / "flops-reference.json").read_text())["workloads"][key]
    doc = pages[shape]
    w = doc["workload"]
    assert (w["views"], w["crop_grid_wh"], w["image_tokens"], w["prompt_len"]) == (
        ref["views"], ref["crop_grid_wh"], ref["image_tokens"], ref["prompt_len"])
    stages = {s["name"]: s for s in doc["stages"]}
    for name, ref_name in (("vision", "vision"), ("prefill", "prefill"), ("decode", "decode10")):
        assert stages[name]["flops_full"] == ref["stages"][ref_name]["flops"], name
        assert stages[name]["flops_torch"] == ref["stages"][ref_name]["flops_torch_registry_only"], name
    # per decoder layer, from the nodes' module paths (independent of the mapping)
    per = Counter()
    for n in doc["nodes"]:
        parts = n["module"].split(".")
        if n["stage"] in ("prefill", "decode") and parts[:2] == ["model", "layers"]:
            per[(n["stage"], int(parts[2]))] += n["flops_full"]
        elif n["module"] == "lm_head":
            per[(n["stage"], "lm_head")] += n["flops_full"]
    dec = ref["decoder"]
    assert per[("prefill", 0)] == dec["prefill"]["layer0_dense"]
    assert {per[("prefill", i)] for i in range(1, 12)} == {dec["prefill"]["each_moe_layer_1_to_11"]}
    assert per[("prefill", "lm_head")] == dec["prefill"]["lm_head_all_positions"]
    assert per[("decode", 0)] == dec["decode10"]["layer0_dense"]
    assert {per[("decode", i)] for i in range(1, 12)} == {dec["decode10"]["each_moe_layer_1_to_11"]}


def test_v1_every_flop_node_mapped_aligned_gap_zero(pages):
    for doc in pages.values():
        assert doc["unknown_ops"] == [] and doc["coverage"]["unmapped"] == 0
        assert all(s["gap"] == 0 for s in doc["stages"]) and all(r["gap"] == 0 for r in doc["layers"])
        assert any("even split" in note or "evenly" in note for note in doc["notes"])
        # every other column too, per stage and per layer, fused I/O included (the vendor's layout copies modelled)
        gaps = [(row.get("name") or row["id"], m, x["gap"]) for row in doc["stages"] + doc["layers"]
                for m, x in row["metrics"].items() if x.get("gap")]
        assert gaps == [], gaps[:5]
        # the nodes that write the cache each forward returns (4.46: the first forward's roped keys and v, then the
        # cache's concatenations) sum to it
        stages = {s["name"]: s for s in doc["stages"]}
        last = max(n["step"] for n in doc["nodes"] if n["stage"] == "decode")
        for stage, step in (("prefill", None), ("decode", last)):
            assert sum(n["kv_bytes"] for n in doc["nodes"] if n["stage"] == stage and n["step"] == step) == \
                stages[stage]["kv_bytes"], stage
    by_id = {n["id"]: n for n in pages["1000x1400"]["nodes"]}
    experts = next(r for r in pages["1000x1400"]["layers"] if r["id"] == "decoder.layers.5.mlp.experts"
                   and r["stage"] == "prefill")
    # 913 x 6 rows cover every expert: gate, up, down each (the layer's other nodes: its gated products, routing)
    assert len([i for i in experts["nodes"] if by_id[i]["flops_full"]]) == 64 * 3


def test_v1_seed_naive_gap_attributed_and_max_gap_exits_1(v1_dir, tmp_path, capsys):
    out = tmp_path / "naive"
    code, _, err = _run(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--image-shape",
                         "1000x1400", "--text-tokens", "9", "--decode-steps", "10", "--quiet", "--out", str(out),
                         "--analytic", "seed-naive", "--max-gap", "1"], capsys)
    assert code == 1 and "stage vision: gap" in err
    doc = json.loads((out / "report.json").read_text())
    vision = next(s for s in doc["stages"] if s["name"] == "vision")
    named = sum(r["gap"] for r in doc["layers"] if r["stage"] == "vision" and r["reason"])
    assert named >= 0.99 * vision["gap"] > 0
    missing = {r["id"].split(".")[1] for r in doc["layers"] if r["stage"] == "vision" and r["reason"] == "missing"}
    assert missing == {"tiles", "global"}  # the tile views, and CLIP blocks 4..23 of the global view
    clip = [r for r in doc["layers"] if r["stage"] == "vision" and r["id"].startswith("vision.global.clip.layers.")]
    assert {r["reason"] for r in clip if int(r["id"].split(".")[4]) >= 4 and r["flops_full"]} == {"missing"}


def test_v1_fake_mode_on_a_gpu_machine_gives_the_cpu_report(v1_dir, pages, tmp_path, monkeypatch):
    """On a machine with a GPU, torch.cuda.is_available() is true and the vendor's `.cuda()` calls would really move
    the image mask to cuda:0 beside a CPU model (fake mode stopped with "Unhandled FakeTensor Device Propagation").
    Simulated here: CUDA reported available, and any real `Tensor.cuda()` raises. A CPU capture must never call it
    and must give the CPU machine's report."""
    import torch

    def real_cuda(self, *args, **kwargs):
        raise AssertionError("the vendor's .cuda() reached torch during a CPU capture")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # infer()'s autocast("cuda") asks
    monkeypatch.setattr(torch.Tensor, "cuda", real_cuda)
    doc = _v1(v1_dir, tmp_path, "640x640")
    assert doc == pages["640x640"]


# ---- fake (shims) against real (unmodified vendor code, random weights) on a reduced vendor model ---------

@pytest.fixture
def reduced(v1_dir, tmp_path, monkeypatch):
    """2 SAM blocks, 2 CLIP layers, 2 decoder layers (dense + MoE with 8 experts): the same vendor code."""
    from tracer.vendors import deepseek_ocr
    from tracer.vendors.deepseek_ocr import _import_package

    pkg = _import_package(Path(v1_dir).resolve())
    import sys

    enc, modeling = sys.modules[f"{pkg}.deepencoder"], sys.modules[f"{pkg}.modeling_deepseekocr"]
    monkeypatch.setattr(modeling, "build_sam_vit_b", lambda checkpoint=None: enc._build_sam(768, 2, 12, [1]))
    monkeypatch.setitem(enc.vit_model_cfg, "num_layers", 2)
    cfg = json.loads((Path(v1_dir) / "config.json").read_text())
    for c in (cfg, cfg["language_config"]):
        c.update(num_hidden_layers=2, n_routed_experts=8)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path), deepseek_ocr


def _per(doc, key):
    c = Counter()
    for n in doc["nodes"]:
        c[(n["stage"], key(n))] += n["flops_full"]
    return c


@pytest.mark.parametrize("shape", ["1000x1400", "600x500"])  # tiles (both gate branches) / global view only
def test_v1_fake_equals_real_per_module_and_stage(reduced, v1_dir, tmp_path, shape):
    config, _ = reduced
    docs = {}
    for mode in ("fake", "real"):
        out = tmp_path / mode
        argv = ["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--config", config,
                "--image-shape", shape, "--text-tokens", "5", "--decode-steps", "2", "--quiet", "--out", str(out),
                "--mode", mode]
        assert main(argv) == 0
        docs[mode] = json.loads((out / "report.json").read_text())
    fake, real = docs["fake"], docs["real"]
    assert fake["workload"] == real["workload"]
    assert [(s["name"], s["flops_torch"], s["flops_full"]) for s in fake["stages"]] == \
           [(s["name"], s["flops_torch"], s["flops_full"]) for s in real["stages"]]
    # per module with the experts folded into their MoE layer (which experts get rows is routing)
    fold = lambda n: n["module"].split(".experts.")[0]  # noqa: E731
    assert _per(fake, fold) == _per(real, fold)
    # every module outside the routed experts matches node for node in op and FLOPs
    ops = lambda d: Counter((n["stage"], n["module"], n["op"], n["flops_full"]) for n in d["nodes"]  # noqa: E731
                            if n["flops_full"] and ".experts." not in n["module"])
    assert ops(fake) == ops(real)
    views = fake["workload"]["views"]
    assert any(".sam_model#1." in n["module"] for n in fake["nodes"]) == (views > 1)


def test_v1_real_mode_is_reproducible(reduced, v1_dir, tmp_path):
    """Real mode's random weights are seeded: the same experts get the same rows on every run (what --ncu's second
    run relies on to pair its kernels with the recorded ones), so two runs write the same report."""
    config, _ = reduced
    texts = []
    for run in ("a", "b"):
        assert main(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--config", config,
                     "--image-shape", "1000x1400", "--text-tokens", "5", "--decode-steps", "2", "--mode", "real",
                     "--quiet", "--out", str(tmp_path / run)]) == 0
        texts.append((tmp_path / run / "report.json").read_text())
    experts = {n["module"] for n in json.loads(texts[0])["nodes"] if ".experts." in n["module"]}
    assert 0 < len(experts) and texts[0] == texts[1]


def test_v1_onnx_prefill_equals_fx_per_stage_and_module(reduced, v1_dir, tmp_path):
    """--graph onnx on the reduced vendor model: the exported prefill's per-node FLOPs equal the fx graph's per stage
    and per module (call indices included), and every FLOP-bearing ONNX node maps through the v1 table."""
    pytest.importorskip("onnxscript", reason="pip install -e '.[onnx]' (the test extra has it)")
    config, _ = reduced
    out = tmp_path / "onnx"
    assert main(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--config", config,
                 "--image-shape", "1000x1400", "--text-tokens", "9", "--decode-steps", "2", "--graph", "onnx",
                 "--quiet", "--out", str(out)]) == 0
    rep = json.loads((out / "report-onnx.json").read_text())
    fx = json.loads((out / "report.json").read_text())
    assert [(s["name"], s["difference"]) for s in rep["consistency"]["stages"]] == [
        ("vision", 0), ("prefill", 0), ("decode", 0)]
    assert all(s["flops_onnx"] > 0 for s in rep["consistency"]["stages"])
    assert rep["consistency"]["layers_differing"] == []
    for stage, step in (("prefill", None), ("decode", 0)):  # decode.onnx: step 0, the legacy tuple cache as inputs
        per = lambda nodes: {m: sum(n["flops_full"] for n in nodes  # noqa: E731
                                    if n["module"] == m and n["stage"] == stage and n["step"] == step)
                             for m in {n["module"] for n in nodes}}
        assert {k: v for k, v in per(rep["nodes"]).items() if v} == {k: v for k, v in per(fx["nodes"]).items() if v}
    assert rep["unknown_ops"] == [] and rep["coverage"]["unmapped"] == 0
    assert any(".sam_model#1." in n["module"] for n in rep["nodes"] if n["flops_full"])  # SAM on the tiles
    decoder_attn = {n["op"] for n in rep["nodes"] if n["flops_full"] and n.get("layer", "").endswith(".attn")
                    and n["layer"].startswith("decoder.")}
    assert decoder_attn == {"aten::matmul"}  # eager attention's two matmuls, as ONNX names their origin


def test_v1_decode_worker_gives_the_sequential_report(v1_dir, worker_claims_first):
    """The forked decode worker (tracer.capture.decode_worker) on the real vendor model: its legacy tuple cache is synthesized,
    checked after step 0, and every report byte equals capturing all steps in one process."""
    from tracer.core.forking import available
    from tracer.pipeline import Options, run
    from tracer.vendors import BuildOptions
    from tracer.core.workload import Workload

    if not available():
        pytest.skip("the decode worker needs fork() and a second CPU; this machine has one")
    workload = Workload(model="deepseek-ocr", image_wh=(640, 640), text_tokens=9, decode_steps=8)
    build = BuildOptions(vendor_dir=v1_dir, trust_remote_code=True)
    texts = []
    for worker in (True, False):
        result = run(workload, Options(build=build, sequential=not worker))
        assert bool(result.trace.worker_steps) == worker
        texts.append(result.to_json())
    assert texts[0] == texts[1]


# ---- bad input: these need no vendor code ------------------------------------------------------------------

def _stub_folder(tmp_path, modeling_text="", config=True):
    folder = tmp_path / "vendor"
    folder.mkdir()
    if config:
        src = Path(__file__).resolve().parent.parent / "tracer" / "data" / "deepseek-ocr" / "config.json"
        (folder / "config.json").write_text(src.read_text())
    for name in ("modeling_deepseekv2.py", "deepencoder.py", "configuration_deepseek_v2.py", "conversation.py"):
        (folder / name).write_text("")
    (folder / "modeling_deepseekocr.py").write_text(modeling_text)
    return folder


@pytest.mark.parametrize("shape, extra", [("1000x1400", {}), ("600x500", {}),
                                          ("640x640", {"crop_mode": False, "base_size": 640})])
def test_v1_meta_capture_records_the_fake_tensor_graph_node_for_node(v1_dir, shape, extra, capsys):
    """Fake mode runs v1 on meta tensors (tracer.capture.meta); FakeTensorMode (`meta=False`) is the reference: the
    same report rows, every field (name, op, module call, source lines, input and output shapes and dtypes, FLOPs,
    status), for the prefill, vision and each decode step, on tiles, a global view alone and a no-crop page."""
    from tracer.count.counter import count_graph
    from tracer.count.records import build_report
    from tracer.capture.trace import trace
    from tracer.vendors import BuildOptions
    from tracer.core.workload import Workload, parse_image_shape

    workload = Workload(model="deepseek-ocr", image_wh=parse_image_shape(shape), text_tokens=9, decode_steps=3,
                        **extra)
    options = BuildOptions(vendor_dir=v1_dir, trust_remote_code=True)

    notes = {}

    def rows(meta):
        tr = trace(workload, options, parallel=False, meta=meta)
        for sg in tr.graphs():
            if sg.selection is None:
                count_graph(sg)
        notes[meta] = tr.notes
        return build_report(tr)

    on_meta = rows(True)
    assert notes[True] == []  # no fallback to FakeTensorMode
    on_fake = rows(False)
    assert len(on_meta["nodes"]) == len(on_fake["nodes"]) > 10_000
    assert on_meta == on_fake


@pytest.mark.parametrize("case, argv, names", [
    ("no vendor dir", [], "--model deepseek-ocr needs --vendor-dir DIR"),
    ("no flag", ["--vendor-dir", "{dir}"], "pass --trust-remote-code"),
    ("no config", ["--vendor-dir", "{noconfig}", "--trust-remote-code"], "no config.json there"),
    ("not deepseek-ocr", ["--vendor-dir", "{dir}", "--trust-remote-code", "--config", "{v2config}"],
     "not a DeepSeek-OCR config"),
    ("old transformers API", ["--vendor-dir", "{dir}", "--trust-remote-code"], "written for transformers 4.46.x"),
])
def test_v1_bad_input_one_line_exit_2(case, argv, names, tmp_path, capsys):
    folder = _stub_folder(tmp_path, "from transformers.models.llama.modeling_llama import NoSuchAttention2\n")
    (tmp_path / "x").mkdir()
    noconfig = _stub_folder(tmp_path / "x", config=False)
    v2config = Path(__file__).resolve().parent.parent / "tracer" / "data" / "deepseek-ocr-2" / "config.json"
    argv = [a.format(dir=folder, noconfig=noconfig, v2config=v2config) for a in argv]
    out = tmp_path / "out"
    code, _, err = _run(["--model", "deepseek-ocr", "--text-tokens", "9", "--quiet", "--out", str(out), *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and names in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("name", ["truncated.png", "empty.png", "garbage.png", "folder", "missing.png"])
def test_v1_a_bad_image_is_one_line_before_the_vendor_loads_it(name, v1_dir, tmp_path, capsys):
    """The vendor's own `load_pil_images` gave a 40-line traceback and exit 1 for each of these; flopdiff reads and
    checks the page itself, and hands the vendor a PNG of what it read."""
    from PIL import Image

    Image.new("RGB", (640, 640), (12, 34, 56)).save(tmp_path / "whole.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "folder").mkdir()
    out = tmp_path / "out"
    code, _, err = _run(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--text-tokens", "9",
                         "--quiet", "--image", str(tmp_path / name), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"flopdiff: error: --image {tmp_path / name}: "), err
    assert "Traceback" not in err and not out.exists()


def test_v1_missing_text_tokens_without_tokenizer(v1_dir, tmp_path, capsys):
    code, _, err = _run(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--quiet",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--text-tokens: required for --model deepseek-ocr" in err
    assert not (tmp_path / "o").exists()



# ---- every v1 option the help offers, end to end (the full-size vendor model, fake mode) -------------------

@pytest.mark.parametrize("mode, base, views", [("tiny", 512, 1), ("small", 640, 1), ("base", 1024, 1),
                                               ("large", 1280, 1), ("gundam", 1024, 7)])
def test_v1_every_resolution_mode_gap_zero(v1_dir, tmp_path, mode, base, views):
    """The model card's modes (analytic/presets/defaults.yaml): image tokens from the vendor's own infer(); the
    aligned analytic model agrees on every stage and layer, every FLOP node mapped."""
    out = tmp_path / mode
    assert main(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--image-shape",
                 "1000x1400", "--text-tokens", "9", "--decode-steps", "2", "--resolution", mode, "--quiet",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    w = doc["workload"]
    side = base // 16 // 4  # SAM patches of 16, two stride-2 convs: features per side of the global view
    assert (w["views"], w["base_size"]) == (views, base)
    global_tokens = side * (side + 1) + 1  # rows of (side + newline), then the view separator
    # gundam: a 2x3 grid (w x h) of 640 px tiles, 10x10 features each: (3 x 10) rows of (2 x 10 + 1)
    assert w["image_tokens"] == global_tokens + (3 * 10) * (2 * 10 + 1) * (views > 1)
    assert doc["unknown_ops"] == [] and doc["coverage"]["unmapped"] == 0
    assert all(s["gap"] == 0 for s in doc["stages"]) and all(r["gap"] == 0 for r in doc["layers"])


@pytest.mark.parametrize("extra, says", [
    (["--attn", "sdpa"], "--attn sdpa: DeepSeek-OCR's decoder has eager and flash_attention_2"),
    (["--attn", "flash_attention_2", "--mode", "real"], "--attn flash_attention_2 --mode real: runs flash-attn's"),
    (["--attn-plugin", "attention_plugins:numpy_attention"], "needs transformers' AttentionInterface"),
    (["--experts", "batched_mm"], "--experts batched_mm: DeepSeek-OCR (v1) runs its experts with its own moe_infer"),
    (["--resolution", "default"], "--resolution 'default': deepseek-ocr has the modes tiny, small, base, large, gundam"),
])
def test_v1_option_refusals_are_one_line(v1_dir, tmp_path, capsys, extra, says):
    out = tmp_path / "o"
    code, _, err = _run(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--text-tokens",
                         "9", "--quiet", "--out", str(out), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0], err
    assert not out.exists()


def test_v1_prompt_with_a_tokenizer(v1_dir, tmp_path, pages):
    """--tokenizer/--prompt through the vendor's own infer(): a WordLevel tokenizer built here makes the text after
    <image> 3 tokens; the vendor adds BOS and the image tokens itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "[UNK]": 2,
                                      "Free": 5, "OCR": 6, ".": 7, "<image>": 128815}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "bos_token": "<｜begin▁of▁sentence｜>",
                                                              "eos_token": "<｜end▁of▁sentence｜>"}))
    out = tmp_path / "o"
    assert main(["--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code", "--image-shape", "640x640",
                 "--tokenizer", str(folder), "--prompt", "<image>\nFree OCR.", "--decode-steps", "10", "--quiet",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    ref = pages["640x640"]["workload"]  # 9 text tokens there
    assert doc["workload"]["image_tokens"] == ref["image_tokens"]
    assert doc["workload"]["prompt_len"] == ref["prompt_len"] - 9 + 3
    assert all(s["gap"] == 0 for s in doc["stages"]) and doc["unknown_ops"] == []


# ---- the traced model's config is the analytic model's; hub repositories; EXIF orientation (wrong numbers, exit 0) ---

def _vendor_copy(v1_dir: str, folder: Path, layers: int) -> str:
    """The vendor folder with its own config.json changed to `layers` decoder layers."""
    import shutil

    shutil.copytree(v1_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for c in (cfg, cfg["language_config"]):
        c["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


V1_ARGS = ["--model", "deepseek-ocr", "--trust-remote-code", "--text-tokens", "9", "--decode-steps", "1", "--quiet"]


def _report(tmp_path: Path, name: str, *argv: str) -> dict:
    out = tmp_path / name
    assert main([*V1_ARGS, *argv, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def test_v1_the_vendor_folders_config_drives_the_analytic_model(v1_dir, tmp_path):
    """A vendor folder with 6 decoder layers gave `--analytic aligned` a prefill gap of -399,871,912,704 (the
    analytic model read the bundled 12-layer config)."""
    six = _vendor_copy(v1_dir, tmp_path / "six", 6)
    doc = _report(tmp_path, "o", "--vendor-dir", six, "--image-shape", "1000x1400")
    assert [s["gap"] for s in doc["stages"]] == [0, 0, 0]
    assert doc["stages"][1]["flops_full"] == 4_168_508_156_672  # the 6-layer model's prefill, measured (issue)


def test_v1_hub_repositories_never_share_a_cache_entry(v1_dir, tmp_path, monkeypatch):
    """`hub:orgA/ocr` then `hub:orgB/ocr` (6 layers): the key ignored the repository and served orgA's trace."""
    import huggingface_hub

    snapshots = {"orgA/ocr": _vendor_copy(v1_dir, tmp_path / "hub" / "orgA" / "snapshots" / "c1", 12),
                 "orgB/ocr": _vendor_copy(v1_dir, tmp_path / "hub" / "orgB" / "snapshots" / "c2", 6)}
    asked = []

    def snapshot_download(repo, allow_patterns=None):  # the hub, played by local folders (no network here)
        asked.append((repo, tuple(allow_patterns)))
        return snapshots[repo]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("FLOPDIFF_CACHE", "on")
    monkeypatch.setenv("FLOPDIFF_CACHE_DIR", str(tmp_path / "cache"))
    a = _report(tmp_path, "a", "--vendor-dir", "hub:orgA/ocr", "--image-shape", "1000x1400")
    b = _report(tmp_path, "b", "--vendor-dir", "hub:orgB/ocr", "--image-shape", "1000x1400")
    assert a["stages"][1]["flops_full"] == 4_568_380_069_376 and b["stages"][1]["flops_full"] == 4_168_508_156_672
    assert [s["gap"] for s in a["stages"] + b["stages"]] == [0] * 6
    assert len(list((tmp_path / "cache").glob("*.json.gz"))) == 2
    assert {r for r, _ in asked} == {"orgA/ocr", "orgB/ocr"} and all(p == ("*.py", "*.json") for _, p in asked)


def _rotated_jpeg(path: Path) -> Path:
    """A phone photo stored 1000x1400 with EXIF orientation 6: a 1400x1000 page once turned upright."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1000, 1400), "white").save(path, exif=exif)
    return path


def test_v1_exif_orientation_is_the_page_the_vendor_loads(v1_dir, tmp_path):
    """The single run exited 2 ("903 image tokens ... the vendor preprocessing made 893"); the sweep reported the
    stored 1000x1400 page (prefill 4,568,380,069,376 for the vendor's 4,555,782,396,416)."""
    photo = _rotated_jpeg(tmp_path / "photo.jpg")
    doc = _report(tmp_path, "o", "--vendor-dir", v1_dir, "--image", str(photo))
    upright = _report(tmp_path, "u", "--vendor-dir", v1_dir, "--image-shape", "1400x1000")
    assert doc["workload"]["image_wh"] == [1400, 1000] and doc["stages"] == upright["stages"]
    assert doc["stages"][1]["flops_full"] == 4_555_782_396_416
    out = tmp_path / "sweep"
    assert main(["sweep", str(photo), "--model", "deepseek-ocr", "--vendor-dir", v1_dir, "--trust-remote-code",
                 "--text-tokens", "9", "--decode-steps", "1", "--quiet", "--out", str(out)]) == 0
    (row,) = json.loads((out / "sweep.json").read_text())["rows"]
    assert (row["width"], row["height"], row["prefill_full"]) == (1400, 1000, 4_555_782_396_416)
