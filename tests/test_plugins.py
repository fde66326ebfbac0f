"""Bring your own analytic model (analytic.plugin, analytic.declarative): the refactor plan's naive model as a plug-in
written outside flopdiff and as its YAML twin give the built-in seed-naive preset's numbers and gap groups on the v1
page; the plan's corrected model in YAML is exact against the trace on three crop grids; `--workload-config` reads an
inference configuration; what a plug-in does wrong is one line and exit 2 (DeepSeek-OCR-2 at reduced size)."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from analytic import plugin
from tracer.diff import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
V1 = ["--model", "deepseek-ocr", "--trust-remote-code", "--text-tokens", "9", "--decode-steps", "10", "--quiet"]
TINY = ["--image-shape", "1000x800", "--text-tokens", "3", "--decode-steps", "2", "--quiet"]


def _report(argv, out, capsys):
    code = main([*argv, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    return json.loads((out / "report.json").read_text())


def _groups(doc):
    return [(g["stage"], g["group"], g["reason"], g["layers"], g["gap"]) for g in doc["gap_groups"]]


@pytest.fixture(scope="module")
def naive_runs(v1_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("naive")
    runs = {}
    for name, analytic in (("preset", "seed-naive"), ("python", f"{EXAMPLES / 'naive_model.py'}:build"),
                           ("yaml", str(EXAMPLES / "naive_model.yaml"))):
        assert main([*V1, "--vendor-dir", v1_dir, "--analytic", analytic, "--out", str(tmp / name)]) == 0
        runs[name] = json.loads((tmp / name / "report.json").read_text())
    return runs


def test_the_plans_naive_model_as_a_plugin_and_as_yaml_is_the_seed_naive_preset(naive_runs):
    preset = naive_runs["preset"]
    assert [s["gap"] for s in preset["stages"]] != [0, 0, 0]  # a model with gaps: the comparison says something
    for name in ("python", "yaml"):
        doc = naive_runs[name]
        assert [(s["name"], s["flops_analytic"], s["gap"]) for s in doc["stages"]] == \
            [(s["name"], s["flops_analytic"], s["gap"]) for s in preset["stages"]], name
        assert _groups(doc) == _groups(preset), name
        # the formula-symbol search finds the plug-in's KV length as it finds the preset's; the preset's own setting
        # is the preset's cause alone (a plug-in deviates from nothing of ours)
        decode = next(g for g in doc["gap_groups"] if g["stage"] == "decode")
        assert decode["cause"].startswith("s_k = ") and "preset" not in decode["cause"]


@pytest.mark.parametrize("shape, grid", [("1000x1400", [2, 3]), ("1600x900", [2, 1]), ("640x640", [1, 1])])
def test_the_plans_corrected_model_in_yaml_has_no_gap_against_the_trace(shape, grid, v1_dir, tmp_path, capsys):
    doc = _report([*V1, "--vendor-dir", v1_dir, "--image-shape", shape, "--analytic",
                   str(EXAMPLES / "corrected_model.yaml"), "--max-gap", "0"], tmp_path / "o", capsys)
    assert doc["workload"]["crop_grid_wh"] == grid
    assert [(s["name"], s["gap"]) for s in doc["stages"]] == [("vision", 0), ("prefill", 0), ("decode", 0)]
    assert all(s["flops_full"] > 0 for s in doc["stages"])


def test_workload_config_reads_an_inference_config_and_flags_win(v1_dir, tmp_path, capsys):
    infer = EXAMPLES / "conf" / "model" / "deepseek_ocr" / "infer" / "default.yaml"
    code = main([*V1[:3], "--vendor-dir", v1_dir, "--text-tokens", "9", "--quiet", "--workload-config", str(infer),
                 "--tile-size", "512", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 0, err
    w = json.loads((tmp_path / "o" / "report.json").read_text())["workload"]
    # from the file: base_size 1024, crop mode, 20 new tokens; --tile-size on the command line wins over its 640
    assert (w["base_size"], w["tile_size"], w["crop_mode"], w["decode_steps"]) == (1024, 512, True, 20)
    assert "--workload-config" in err and "decode_steps 20" in err and "tile_size" not in err


def test_workload_config_bad_values_are_one_line(tmp_path, capsys, tiny_v2_config):
    bad = tmp_path / "infer.yaml"
    bad.write_text("preprocess:\n  base_size: large\n")
    code = main(["--config", tiny_v2_config, *TINY, "--workload-config", str(bad), "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().count("\n") == 0
    assert f"--workload-config {bad}: preprocess.base_size = 'large': must be int" in err


def _plugin(tmp_path, body):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:build"


ALIGNED_PLUS = """
    from analytic.layers import Linear
    from analytic.models import builder
    from analytic.request import Shape

    def build(config, workload, policy):
        shape = Shape(*workload.image_wh, workload.base_size, workload.tile_size, workload.crop_mode,
                      workload.text_tokens, workload.decode_steps)
        stages = dict(builder(workload.model)(config, shape).stages)
        stages["prefill"] = [*stages["prefill"], Linear("my.extra", tokens=workload.prompt_len, d_in=8, d_out=8)]
        return stages
"""


def test_a_plugin_layer_no_rule_reaches_is_in_the_coverage_table(tmp_path, capsys, tiny_v2_config):
    """The vendor-exact tree and one layer of the user's own that no mapping rule names: gap 0 everywhere but there,
    where the report says no graph node maps to it."""
    doc = _report(["--config", tiny_v2_config, *TINY, "--analytic", _plugin(tmp_path, ALIGNED_PLUS)],
                  tmp_path / "o", capsys)
    extra = next(r for r in doc["layers"] if r["id"] == "my.extra")
    assert extra["reason"] == "no_nodes" and extra["gap"] == -2 * doc["workload"]["prompt_len"] * 64
    assert [r["id"] for r in doc["layers"] if r["gap"]] == ["my.extra"]
    assert [(g["group"], g["why"], g["gap"]) for g in doc["gap_groups"]] == [("my", "no graph node maps to it", extra["gap"])]
    assert all(s["metrics"]["kv"]["gap"] == 0 for s in doc["stages"] if "kv" in s["metrics"])  # after a forward of blocks


class _OwnLayer:
    """A user's layer class: an id and cost(policy) with the six columns, nothing of flopdiff's."""
    def __init__(self, lid, flops):
        self.id, self.flops = lid, flops

    def cost(self, policy):
        return {"tc_flops": self.flops, "cuda_flops": 0, "io_bytes": 0, "weight_bytes": 0, "act_bytes": 0,
                "kv_bytes": 0}


def test_a_users_own_layer_class_is_adapted_and_checked():
    from analytic.layers import Policy
    leaf = plugin.adapt(_OwnLayer("a", 6), "test", Policy())
    assert leaf.cost(Policy()).tc_flops == 6 and "(the plug-in gives no formula)" in leaf.explain(Policy())
    with pytest.raises(Exception, match="layer b: cost\\(\\) returned .*expected the six columns"):
        plugin.adapt(_OwnLayer("b", -1), "test", Policy())


@pytest.mark.parametrize("spec, says", [
    ("no_such_module_xyz:build", "--analytic no_such_module_xyz:build: cannot import no_such_module_xyz"),
    ("{tmp}/missing.py:build", "no such file"),
    ("RAISES", "the plug-in raised ZeroDivisionError: division by zero"),
    ("WRONG_TYPE", "the plug-in returned int; expected a mapping of stage"),
    ("NO_ID", "a layer needs an `id`"),
    ("{examples}/naive_model.yaml", "describes model 'deepseek-ocr', the run traces 'deepseek-ocr-2'"),
    ("BAD_YAML_FIELD", "Linear has no field 'width'"),
    ("BAD_YAML_NAME", "'nowhere' is no var, loop variable or workload.<field>"),
])
def test_plugin_errors_are_one_line_exit_2_before_the_trace(spec, says, tmp_path, capsys, tiny_v2_config):
    bodies = {"RAISES": "def build(config, workload, policy):\n    return 1 / 0\n",
              "WRONG_TYPE": "def build(config, workload, policy):\n    return 42\n",
              "NO_ID": "def build(config, workload, policy):\n    return {'prefill': [object()]}\n"}
    yamls = {"BAD_YAML_FIELD": "model: deepseek-ocr-2\nstages:\n  prefill:\n    - {Linear: a, width: 3}\n",
             "BAD_YAML_NAME": "model: deepseek-ocr-2\nstages:\n  prefill:\n    - {Linear: a, tokens: nowhere * 2}\n"}
    if spec in bodies:
        spec = _plugin(tmp_path, bodies[spec])
    elif spec in yamls:
        (tmp_path / "m.yaml").write_text(yamls[spec])
        spec = str(tmp_path / "m.yaml")
    spec = spec.format(tmp=tmp_path, examples=EXAMPLES)
    code = main(["--config", tiny_v2_config, *TINY, "--analytic", spec, "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().count("\n") == 0 and says in err, err
    assert not (tmp_path / "o").exists()


def test_an_installed_entry_point_names_a_plugin(tmp_path, capsys, monkeypatch, tiny_v2_config):
    """A package's `flopdiff.analytic` entry point, as pip installs it (a dist-info folder on sys.path)."""
    (tmp_path / "their_model.py").write_text(textwrap.dedent(ALIGNED_PLUS))
    info = tmp_path / "their_model-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: their-model\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[flopdiff.analytic]\ntheirs = their_model:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin._entry_points.cache_clear()
    try:
        doc = _report(["--config", tiny_v2_config, *TINY, "--analytic", "theirs"], tmp_path / "o", capsys)
    finally:
        plugin._entry_points.cache_clear()
        sys.modules.pop("their_model", None)
    assert doc["analytic"]["preset"] == "theirs"
    assert [r["id"] for r in doc["layers"] if r["gap"]] == ["my.extra"]
