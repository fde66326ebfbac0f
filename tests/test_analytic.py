"""The analytic overlay against the reference tables, the tracer and the vendors' own tiling functions."""

import ast
import json
import random
from pathlib import Path

import pytest

from analytic.api import build, evaluate, counting_policy, shape_for
from analytic.layers import Policy
from analytic.blocks import VENDOR_CONSTANTS
from analytic.shapes import v1_views, v2_views

FULL, TORCH = counting_policy("full"), counting_policy("torch")


def flops(blocks, pol):
    return sum(b.cost(pol).tc_flops for b in blocks)


@pytest.fixture(scope="module")
def v1_ref(shared_reference):
    return json.loads((shared_reference / "deepseek-ocr" / "flops-reference.json").read_text())


@pytest.mark.parametrize("key, wh", [("gundam_1000x1400", (1000, 1400)), ("gundam_640x640", (640, 640))])
def test_v1_aligned_reproduces_reference_per_stage_both_policies(v1_ref, key, wh):
    ref = v1_ref["workloads"][key]
    shape = shape_for("deepseek-ocr", wh, mode="gundam", text_tokens=9, decode_steps=10)
    tree = build("deepseek-ocr", shape)
    assert (1 + tree.views.tiles, tree.views.image_tokens, tree.prompt_len) == (ref["views"], ref["image_tokens"], ref["prompt_len"])
    for stage, rk in (("vision", "vision"), ("prefill", "prefill"), ("decode", "decode10")):
        assert flops(tree.stages[stage], FULL) == ref["stages"][rk]["flops"]
        assert flops(tree.stages[stage], TORCH) == ref["stages"][rk]["flops_torch_registry_only"]


@pytest.mark.parametrize("key, wh", [("gundam_1000x1400", (1000, 1400)), ("gundam_640x640", (640, 640))])
def test_v1_aligned_per_decoder_layer_and_lm_head(v1_ref, key, wh):
    ref = v1_ref["workloads"][key]["decoder"]
    doc = evaluate("deepseek-ocr", wh, mode="gundam", text_tokens=9, decode_steps=10)
    per = {}
    for layer in doc["layers"]:
        if layer["id"].startswith("decoder.layers.") or layer["id"] == "lm_head":
            k = layer["id"].split(".")[2] if layer["id"] != "lm_head" else "lm_head"
            per[(layer["stage"], k)] = per.get((layer["stage"], k), 0) + layer["flops"]
    assert per[("prefill", "0")] == ref["prefill"]["layer0_dense"]
    assert all(per[("prefill", str(i))] == ref["prefill"]["each_moe_layer_1_to_11"] for i in range(1, 12))
    prompt_len = v1_ref["workloads"][key]["prompt_len"]  # the vendor computes logits for every prompt position
    assert per[("prefill", "lm_head")] == ref["prefill"]["lm_head_all_positions"] == 2 * prompt_len * 1280 * 129280
    assert per[("decode", "0")] == ref["decode10"]["layer0_dense"]
    assert per[("decode", "1")] == ref["decode10"]["each_moe_layer_1_to_11"]
    assert per[("decode", "lm_head")] == ref["decode10"]["lm_head"]


def test_v1_per_view(v1_ref):
    ref = v1_ref["per_view"]
    doc = evaluate("deepseek-ocr", (1000, 1400), mode="gundam", text_tokens=9, decode_steps=0)
    parts = {"sam_model": ".sam.", "vision_model": ".clip.", "projector": ".projector"}
    for view, ref_key, n in (("global", "global_1024", 1), ("tiles", "crop_640", 6)):
        for part, tag in parts.items():
            got = sum(x["flops"] for x in doc["layers"] if x["stage"] == "vision" and x["id"].startswith(f"vision.{view}")
                      and tag in x["id"])
            assert got == n * ref[ref_key][part]


def test_v2_aligned_reproduces_reference(shared_reference):
    ref = json.loads((shared_reference / "deepseek-ocr-2" / "flops-reference.json").read_text())["workloads"]["640x640"]
    shape = shape_for("deepseek-ocr-2", (640, 640), text_tokens=4, decode_steps=1)
    tree = build("deepseek-ocr-2", shape)
    assert flops(tree.stages["prefill"], FULL) == ref["prefill"]["flops"]
    assert flops(tree.stages["prefill"], TORCH) == ref["prefill"]["flops_torch_registry_only"]
    assert flops(tree.stages["decode"], FULL) == ref["decode_step_kv262"]["flops"]
    assert flops(tree.stages["decode"], TORCH) == ref["decode_step_kv262"]["flops_torch_registry_only"]


@pytest.mark.parametrize("wh", [(1000, 1400), (2000, 700), (800, 800), (3000, 3000), (500, 1600)])
@pytest.mark.v2
def test_v2_aligned_equals_traced_full_and_torch(wh):
    from tracer.count.counter import count_graph, totals
    from tracer.capture.trace import trace
    from tracer.core.workload import Workload

    tr = trace(Workload(image_wh=wh, text_tokens=7, decode_steps=2))
    shape = shape_for("deepseek-ocr-2", wh, text_tokens=7, decode_steps=2)
    tree = build("deepseek-ocr-2", shape)
    for stage in ("vision", "prefill", "decode"):
        graphs = [count_graph(g) for g in tr.stages[stage]]
        t = totals(graphs)
        assert (flops(tree.stages[stage], FULL), flops(tree.stages[stage], TORCH)) == (t.flops_full, t.flops_torch)
    assert tree.views.image_tokens == tr.prepared.derived.image_tokens


def test_seed_naive_vision_near_one_tflop():
    doc = evaluate("deepseek-ocr", (1000, 1400), preset="seed-naive", mode="gundam", text_tokens=9, decode_steps=10)
    vision = next(s["flops"] for s in doc["stages"] if s["name"] == "vision")
    assert vision == 1_005_203_963_904  # one 1024 view: SAM 976.9 G + 4 CLIP blocks 26.9 G + projector 1.3 G


def test_causal_halving_only_changes_causal_attention():
    shape = shape_for("deepseek-ocr", (640, 640), mode="gundam", text_tokens=9, decode_steps=0)
    tree = build("deepseek-ocr", shape)
    dense, halved = flops(tree.stages["prefill"], FULL), flops(tree.stages["prefill"], Policy(causal_halving=True))
    L = 283
    assert dense - halved == 12 * 2 * 10 * (L * L - L * (L + 1) // 2) * (128 + 128)


@pytest.mark.v2
def test_v2_sam_defaults_match_transformers():
    from transformers import DeepseekOcr2SamVisionConfig

    cfg = DeepseekOcr2SamVisionConfig()
    c = VENDOR_CONSTANTS["deepseek-ocr-2"]
    assert (cfg.patch_size, cfg.window_size, cfg.mlp_ratio, cfg.output_channels) == (c["patch"], c["window"], c["sam_mlp_ratio"], c["neck"])
    assert cfg.mlp_dim == int(cfg.hidden_size * cfg.mlp_ratio)


@pytest.mark.v2
def test_v2_tiling_matches_transformers_processor_on_10000_shapes():
    from transformers.models.deepseek_ocr2 import image_processing_pil_deepseek_ocr2 as pil
    rng = random.Random(0)
    shapes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(9000)]
    shapes += [(768 * c, 768 * r) for c in range(1, 7) for r in range(1, 7)]          # exact aspect ties
    shapes += [(k * a, k * b) for a, b in ((1, 2), (2, 1), (1, 1), (2, 3), (3, 2)) for k in range(1, 200)]
    for w, h in shapes:
        v = v2_views(w, h)
        expect = pil.get_optimal_tiled_canvas((h, w), (768, 768), 2, 6) if max(w, h) > 768 else (1, 1)
        assert v.crop_grid_wh == tuple(expect), (w, h)
    assert len(shapes) >= 10_000


def _vendor_v1_functions():
    from conftest import v1_folder

    folder = v1_folder()
    if not folder:
        pytest.skip("no DeepSeek-OCR remote code: set FLOPDIFF_DSOCR_V1_DIR (or keep ../shared/vendor/deepseek-ocr)")
    # Execute only the two pure functions of the vendor file (the module itself needs transformers 4.46).
    src = (Path(folder) / "modeling_deepseekocr.py").read_text()
    tree = ast.parse(src)
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("find_closest_aspect_ratio", "dynamic_preprocess")]
    ns: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "modeling_deepseekocr.py", "exec"), ns)
    return ns


def test_v1_tiling_matches_vendor_dynamic_preprocess_on_10000_shapes():
    ns = _vendor_v1_functions()

    class Img:  # dynamic_preprocess reads .size and calls resize/crop; only the ratio matters here
        def __init__(self, w, h):
            self.size = (w, h)

        def resize(self, wh):
            return self

        def crop(self, box):
            return self

    rng = random.Random(1)
    shapes = [(rng.randint(641, 8000), rng.randint(1, 8000)) for _ in range(9200)]
    shapes += [(640 * c, 640 * r) for c in range(1, 10) for r in range(1, 10) if c * r > 1]
    shapes += [(k * a, k * b) for a, b in ((1, 2), (2, 1), (1, 1), (3, 4)) for k in range(321, 600)]
    shapes = [(w, h) for w, h in shapes if max(w, h) > 640]  # infer() skips dynamic_preprocess below that
    assert v1_views(640, 640).crop_grid_wh == (1, 1) and v1_views(640, 300).tiles == 0
    for w, h in shapes:
        _, ratio = ns["dynamic_preprocess"](Img(w, h))
        assert v1_views(w, h).crop_grid_wh == tuple(ratio), (w, h)
    assert len(shapes) >= 10_000


def test_bad_input_names_it(capsys):
    from analytic.__main__ import main

    for argv, text in ((["--preset", "nope"], "--preset 'nope'"), (["--analytic", "nope"], "--analytic 'nope'"),
                       (["--image-shape=-5x10"], "--image-shape"), (["--tile-size", "650"], "--tile-size 650")):
        assert main(argv) == 2
        assert text in capsys.readouterr().err  # the flag as typed
    with pytest.raises(SystemExit) as exc:
        main(["--policy", "both"])
    assert exc.value.code == 2 and "--policy: invalid choice: 'both'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # flopdiff's --mode is fake/real: this command's old alias is gone
        main(["--mode", "gundam"])
    assert exc.value.code == 2 and "the vendor resolution mode here is --resolution (e.g. --resolution gundam)" \
        in capsys.readouterr().err


def test_analytic_and_flopdiff_share_flag_names_helps_and_defaults():
    """The same flag means the same thing in both commands: one name, one help, one default; every flag has help,
    and no default is shown twice."""
    from analytic.__main__ import build_parser as analytic_parser
    from tracer.cli import build_parser as flopdiff_parser
    from tracer.sweep import build_parser as sweep_parser

    def actions(p):
        return {a.option_strings[0]: a for a in p._actions if a.option_strings and a.dest != "help"}

    ours = actions(flopdiff_parser())
    for theirs, own in ((actions(analytic_parser()), ()), (actions(sweep_parser()), ("--decode-steps",))):
        for flag in set(ours) & set(theirs):
            # a sweep's gate is per page, its folder another default, its decode steps a list of lengths;
            # --mode: refused by the analytic command
            if flag not in ("--max-gap", "--out", "--mode", *own):
                assert (ours[flag].help, ours[flag].default) == (theirs[flag].help, theirs[flag].default), flag
    theirs = actions(analytic_parser())
    assert {"--image-shape", "--text-tokens", "--decode-steps", "--resolution", "--analytic", "--policy"} <= set(theirs)
    for p in (flopdiff_parser(), analytic_parser(), sweep_parser()):
        text = p.format_help()
        assert "(default: None)" not in text and ") (default:" not in text
        for a in actions(p).values():
            assert a.help, a.option_strings


def test_cli_image_file_is_its_size(tmp_path, capsys):
    from PIL import Image

    from analytic.__main__ import main

    Image.new("RGB", (1000, 1400), "white").save(tmp_path / "page.png")
    assert main(["--model", "deepseek-ocr", "--image", str(tmp_path / "page.png"), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["--model", "deepseek-ocr", "--image-shape", "1000x1400", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_file and from_file["workload"]["image_wh"] == [1000, 1400]


def _analytic_json(argv, capsys):
    from analytic.__main__ import main

    code = main(["--json", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


@pytest.mark.parametrize("override", ["foo=bar", "clip_layer=4", "workload.decode_step=5", "models.nope.x=1",
                                      "policy.causal=true", "=5", "decode_steps"])
def test_an_unknown_override_is_refused_by_name(override, capsys):
    """`foo=bar`, `clip_layers=2`, `workload.decode_steps=5` exited 0 with unchanged numbers."""
    code, _, err = _analytic_json([override], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"override {override}" in lines[0].replace("'", ""), err


@pytest.mark.parametrize("override, flags", [
    ("workload.decode_steps=5", ["--decode-steps", "5"]),
    ("workload.text_tokens=20", ["--text-tokens", "20"]),
    ("models.deepseek-ocr-2.modes.default.base_size=768", ["--base-size", "768"]),
    ("clip_layers=2", ["--analytic", "{preset}"]),
])
def test_a_known_override_acts_as_its_flag_does(override, flags, tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("clip_layers: 2\n")
    flags = [f.format(preset=tmp_path / "p.yaml") for f in flags]
    base = ["--image-shape", "1000x1400"]
    _, plain, _ = _analytic_json(base, capsys)
    code, over, err = _analytic_json([*base, override], capsys)
    _, flagged, _ = _analytic_json([*base, *flags], capsys)
    assert code == 0, err
    assert over["stages"] == flagged["stages"] != plain["stages"]
    assert over["workload"] == flagged["workload"]


def test_policy_causal_halving_override_halves_causal_attention(capsys):
    from analytic.api import build, evaluate_tree

    code, over, _ = _analytic_json(["policy.causal_halving=true"], capsys)
    shape = shape_for("deepseek-ocr-2", (1000, 1400))
    halved = evaluate_tree(build("deepseek-ocr-2", shape), shape, counting_policy("full", causal_halving=True))
    _, plain, _ = _analytic_json([], capsys)
    assert code == 0 and over["stages"] == halved["stages"] != plain["stages"]


def test_the_analytic_defaults_are_flopdiffs(capsys):
    """defaults.yaml said 9 text tokens and 10 decode steps while flopdiff's defaults are 4 (v2; 9 for v1, the model
    card's prompt) and 1: the workload `python -m analytic` evaluates by default is the one flopdiff traces."""
    _, v2, _ = _analytic_json([], capsys)
    assert (v2["workload"]["prompt_len"], v2["workload"]["decode_steps"]) == (1 + 1121 + 4, 1)
    _, v1, _ = _analytic_json(["--model", "deepseek-ocr"], capsys)
    assert v1["workload"]["prompt_len"] - 1 - v1["workload"]["image_tokens"] == 9
