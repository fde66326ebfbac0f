"""Every value the help offers, end to end through the command line (DeepSeek-OCR-2 at reduced size): each exits 0
with every stage's gap 0 against the aligned analytic model and no unknown op, or gives its documented one-line
error. (DeepSeek-OCR v1's options: tests/test_v1.py, in its environment.)"""

import json

import pytest

from tracer.diff import build_parser, main

pytestmark = pytest.mark.v2

BASE = ["--image-shape", "1000x800", "--text-tokens", "3", "--decode-steps", "3", "--quiet"]

# (case, extra argv, what else to check on the report)
RUNS = [
    ("attn sdpa", ["--attn", "sdpa"], None),
    ("attn eager", ["--attn", "eager"], "no_sdpa"),
    ("attn flex in the text model", ["--attn", "text_config=flex_attention,vision_config=sdpa"], "flex"),
    ("attn flash_attention_2 in the text model (flash-attn or its stand-in)",
     ["--attn", "text_config=flash_attention_2,vision_config=sdpa"], "fa2"),
    ("attn plugin (fake mode: its boundary)", ["--attn-plugin", "attention_plugins:numpy_attention",
                                               "--attn", "text_config=numpy_attention,vision_config=sdpa"], "plugin"),
    ("policy torch", ["--policy", "torch"], "torch_policy"),
    ("experts grouped_mm", ["--experts", "grouped_mm"], "grouped"),
    ("experts batched_mm", ["--experts", "batched_mm"], "batched"),
    ("resolution default", ["--resolution", "default"], None),
    ("graph fx", ["--graph", "fx"], None),
    ("graph onnx", ["--graph", "onnx"], "onnx"),
    ("json nodes all", ["--json-nodes", "all"], "all_nodes"),
    ("json nodes flops", ["--json-nodes", "flops"], "flop_nodes"),
    ("causal halving", ["--causal-halving"], "halved"),
    ("sequential", ["--sequential"], "sequential"),
    ("timings", ["--timings"], "timings"),
    ("no crop mode", ["--no-crop-mode"], "one_view"),
    ("mode real", ["--mode", "real"], None),
    ("metric tc_flops", ["--metric", "tc_flops"], None),
    ("metric cuda_flops", ["--metric", "cuda_flops"], "metric"),
    ("metric weights", ["--metric", "weights"], "metric"),
    ("metric kv", ["--metric", "kv"], "metric"),
    ("metric bytes", ["--metric", "bytes"], "metric"),
]

# the other implementations' layout copies are traced, not modelled: their fused I/O is not diffed to 0 here
FUSED_IO_UNALIGNED = {"attn eager", "attn flex in the text model",
                      "attn flash_attention_2 in the text model (flash-attn or its stand-in)",
                      "attn plugin (fake mode: its boundary)", "experts batched_mm"}

ERRORS = [  # documented refusals: one line, exit 2
    ("attn flash_attention_2 (whole model)", ["--attn", "flash_attention_2"], "does not support Flash Attention 2"),
    ("attn flash_attention_2 real without flash-attn", ["--attn", "text_config=flash_attention_2,vision_config=sdpa",
                                                        "--mode", "real"], "the flash-attn package is not installed"),
    ("attn name nobody registered", ["--attn", "text_config=no_such_attention,vision_config=sdpa"],
     'the model refused it: Specified `attn_implementation="no_such_attention"` is not supported'),
    ("graph onnx with flash_attention_2", ["--graph", "onnx", "--attn", "text_config=flash_attention_2,vision_config=sdpa"],
     "--graph onnx: the export runs the model outside flopdiff's capture"),
    ("attn-plugin not importable", ["--attn-plugin", "no_such_module_xyz:fn"], "cannot import no_such_module_xyz"),
    ("attn-plugin not callable", ["--attn-plugin", "os:sep"], "os.sep is not callable"),
    ("attn-plugin not a function of transformers' call", ["--attn-plugin", "os:getcwd"], "cannot take that"),
    ("attn-plugin without module:function", ["--attn-plugin", "numpy_attention"], "expected [NAME=]module:function"),
    ("attn-plugin named as a built-in", ["--attn-plugin", "sdpa=attention_plugins:numpy_attention"],
     "sdpa is one of transformers' own attention implementations"),
    ("experts eager (fake mode)", ["--experts", "eager"], "--experts eager: its per-expert loop reads the routing"),
    ("a v1 resolution", ["--resolution", "tiny"], "--resolution 'tiny': deepseek-ocr-2 has the modes default"),
    ("device cuda here", ["--device", "cuda", "--mode", "real"], "--device cuda"),
    ("ncu without cuda", ["--ncu", "model.language_model.layers.1"], "--ncu model.language_model.layers.1: needs"),
]


def test_every_choice_the_help_lists_is_covered():
    """The parser's own choices: a new value must get a row here."""
    parser = build_parser()
    choices = {a.dest: set(a.choices) for a in parser._actions if a.choices}
    covered = {dest: {argv[i + 1] for _, argv, *_ in RUNS + ERRORS for i, a in enumerate(argv)
                      if a == "--" + dest.replace("_", "-") and i + 1 < len(argv)} for dest in choices}
    for dest, values in choices.items():
        if dest == "device":
            values = values - {"cpu"}  # every other run is on the CPU
        if dest in ("mode", "policy"):
            values = values - {"fake", "full"}  # the defaults of every other run
        assert values <= covered[dest], (dest, values - covered[dest])


@pytest.fixture(scope="module")
def baseline(tiny_v2_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "o"
    assert main([*BASE, "--config", tiny_v2_config, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("case, extra, check", RUNS, ids=[r[0] for r in RUNS])
def test_option_runs_with_gap_zero(case, extra, check, tiny_v2_config, baseline, tmp_path, capsys):
    out = tmp_path / "o"
    code = main([*BASE, "--config", tiny_v2_config, "--out", str(out), *extra])
    _, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads((out / "report.json").read_text())
    assert doc["unknown_ops"] == [] and doc["coverage"]["unmapped"] == 0
    assert all(s["gap"] == 0 for s in doc["stages"]), [(s["name"], s["gap"]) for s in doc["stages"]]
    assert all(r["gap"] == 0 for r in doc["layers"])
    # every diffed column, per stage and per layer: the aligned model is exact under every option, not only in FLOPs
    # (fused I/O: on the default implementations, README "Every column")
    gaps = [(row.get("name") or row["id"], m, x["gap"]) for row in doc["stages"] + doc["layers"]
            for m, x in row["metrics"].items() if x.get("gap") and (m != "bytes" or case not in FUSED_IO_UNALIGNED)]
    assert gaps == [], gaps[:5]
    ops = {n["op"] for n in doc["nodes"]}
    full = {s["name"]: s["flops_full"] for s in doc["stages"]}
    same_flops = full == {s["name"]: s["flops_full"] for s in baseline["stages"]}
    if check == "no_sdpa":  # eager attention: matmuls and softmax, no SDPA op in the text model
        assert not any("scaled_dot_product" in n["op"] for n in doc["nodes"] if "language_model" in n["module"])
        assert same_flops
    elif check == "fa2":  # flash-attn's forward op where the SDPA op was; FlopCounterMode counts it 0
        fa2 = [n for n in doc["nodes"] if n["op"] == "flash_attn::_flash_attn_forward"]
        assert fa2 and all(n["flops_torch"] == 0 < n["flops_full"] and n["layer"].endswith(".attn") for n in fa2)
        assert same_flops
    elif check == "plugin":  # fake mode: the plugin's calls are boundary nodes carrying the formula
        calls = [n for n in doc["nodes"] if n["op"] == "attention::numpy_attention"]
        assert calls and all(n["status"] == "formula" and n["flops_full"] > 0 for n in calls) and same_flops
    elif check == "torch_policy":  # the gap compares the analytic torch view with what FlopCounterMode counts
        assert doc["analytic"]["policy"] == "torch" and same_flops
        assert [s["flops_analytic"] for s in doc["stages"]] == [s["flops_torch"] for s in doc["stages"]]
    elif check == "flex":
        assert "higher_order::flex_attention" in ops and same_flops
    elif check == "grouped":
        assert "aten::_grouped_mm" in ops and same_flops
    elif check == "batched":  # the same expert FLOPs through bmm, which FlopCounterMode counts
        assert "aten::_grouped_mm" not in ops and "aten::bmm" in ops and same_flops
        assert doc["options"]["experts"] == "batched_mm"
    elif check == "onnx":
        rep = json.loads((out / "report-onnx.json").read_text())
        assert [s["difference"] for s in rep["consistency"]["stages"]] == [0, 0, 0]
    elif check == "all_nodes":
        assert len(doc["nodes"]) == len(baseline["nodes"])
    elif check == "flop_nodes":
        assert 0 < len(doc["nodes"]) < len(baseline["nodes"])
        assert all(n["flops_full"] or n["status"] == "unknown" for n in doc["nodes"])
    elif check == "halved":  # causal prefill attention counts fewer (query, key) pairs; a one-token decode step
        base = {s["name"]: s["flops_full"] for s in baseline["stages"]}  # masks nothing
        assert full["prefill"] < base["prefill"] and full["decode"] == base["decode"]
        assert doc["analytic"]["causal_halving"] is True and baseline["analytic"]["causal_halving"] is False
    elif check == "sequential":
        assert (out / "report.json").read_bytes() == json.dumps(baseline, separators=(",", ":")).encode() or \
            {k: v for k, v in doc.items() if k != "notes"} == {k: v for k, v in baseline.items() if k != "notes"}
    elif check == "timings":
        assert any(line.startswith("flopdiff: seconds per phase: ") for line in err.splitlines())
    elif check == "one_view":
        assert doc["workload"]["views"] == 1 and doc["workload"]["crop_grid_wh"] == [1, 1]
    elif check == "metric":  # the groups follow the metric (none: no gap); every column is there whatever it is
        assert doc["analytic"]["metric"] == extra[1] and doc["gap_groups"] == doc["gap_groups_by_metric"][extra[1]]
        assert same_flops and doc["stages"] == baseline["stages"]
    elif check is None:
        assert same_flops


@pytest.mark.parametrize("case, extra, says", ERRORS, ids=[e[0] for e in ERRORS])
def test_option_refusals_are_one_line(case, extra, says, tiny_v2_config, tmp_path, capsys):
    out = tmp_path / "o"
    code = main([*BASE, "--config", tiny_v2_config, "--out", str(out), *extra])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flopdiff: error: ") and says in lines[0], err
    assert not out.exists()


def test_prompt_and_tokenizer(tiny_v2_config, baseline, tmp_path):
    """A tokenizer built here (tokenizers' WordLevel over whitespace): the prompt's text after <image> is 3 tokens,
    so the prompt is BOS + the image tokens + 3, as with --text-tokens 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "Free": 5, "OCR": 6, ".": 7}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "o"
    argv = ["--image-shape", "1000x800", "--decode-steps", "3", "--quiet"]
    assert main([*argv, "--config", tiny_v2_config, "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--prompt", "<image>\nFree OCR.", "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    w = doc["workload"]
    assert w["prompt_len"] == 1 + w["image_tokens"] + 3 == baseline["workload"]["prompt_len"]
    assert all(s["gap"] == 0 for s in doc["stages"]) and doc["unknown_ops"] == []
    assert [s["flops_full"] for s in doc["stages"]] == [s["flops_full"] for s in baseline["stages"]]
