"""The command line: output document, determinism, and one clear line + exit 2 for bad input."""

import json
from pathlib import Path
import os

import pytest

from tracer.diff import main


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_json_schema_and_determinism(tmp_path, capsys, tiny_v2_config):
    argv = ["--config", tiny_v2_config, "--image-shape", "1000x1400", "--text-tokens", "3", "--decode-steps", "2",
            "--quiet"]
    assert run(argv + ["--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run(argv + ["--out", str(tmp_path / "b")], capsys)[0] == 0
    a, b = (tmp_path / "a" / "report.json").read_bytes(), (tmp_path / "b" / "report.json").read_bytes()
    assert a == b
    doc = json.loads(a)
    assert doc["schema"] == "flopdiff.report/1" and doc["model"] == "deepseek-ocr-2"
    w = doc["workload"]
    assert (w["image_wh"], w["views"], w["crop_grid_wh"], w["decode_steps"]) == ([1000, 1400], 7, [2, 3], 2)
    assert w["prompt_len"] == 1 + w["image_tokens"] + 3
    stages = {s["name"]: s for s in doc["stages"]}
    assert [s["kv_len"] for s in stages["decode"]["steps"]] == [w["prompt_len"], w["prompt_len"] + 1]
    for name, s in stages.items():
        nodes = [n for n in doc["nodes"] if n["stage"] == name]
        assert s["flops_full"] == sum(n["flops_full"] for n in nodes) > s["flops_torch"] == sum(n["flops_torch"] for n in nodes)
    assert sum(s["flops_full"] for s in stages["decode"]["steps"]) == stages["decode"]["flops_full"]
    node = next(n for n in doc["nodes"] if n["op"] == "aten::_grouped_mm")
    assert node["module"].endswith("mlp.experts")
    # the source lines, read back from the installed files: the grouped GEMM call, and the vendor's experts call
    import transformers

    root = Path(transformers.__file__).parent.parent
    line = lambda src: (root / src.rsplit(":", 1)[0]).read_text().splitlines()[int(src.rsplit(":", 1)[1]) - 1]  # noqa: E731
    assert "grouped_mm(" in line(node["source"])
    assert "self.experts(" in line(node["vendor_source"])
    assert set(node) >= {"id", "stage", "step", "op", "module", "module_class", "source", "input_shapes",
                         "output_shapes", "flops_torch", "flops_full"}
    assert doc["unknown_ops"] == []


@pytest.mark.v2  # the default model
@pytest.mark.parametrize("argv, names", [
    (["--image", "does-not-exist.png"], "--image does-not-exist.png"),
    (["--image-shape", "0x100"], "--image-shape"),
    (["--image-shape", "30000x100"], "--image-shape"),
    (["--image-shape", "big"], "--image-shape"),
    (["--model", "gpt-17"], "--model 'gpt-17'"),
    (["--decode-steps", "-1"], "--decode-steps -1"),
    (["--text-tokens", "-3"], "--text-tokens -3"),
    (["--config", "missing.json"], "--config missing.json"),
    (["--resolution", "tiny"], "--resolution 'tiny': deepseek-ocr-2 has the modes default"),
])
def test_bad_input_one_line_exit_2_nothing_written(argv, names, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(argv + ["--out", str(out_dir), "--quiet"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flopdiff: error: ") and names in lines[0]
    assert not out_dir.exists()


def test_unreadable_image_and_config_missing_keys(tmp_path, capsys, tiny_v2_config):
    bad = tmp_path / "page.png"
    bad.write_bytes(b"not a png")
    code, _, err = run(["--image", str(bad), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "cannot read it as an image" in err
    cfg = json.loads(open(tiny_v2_config).read())
    del cfg["text_config"]["moe_intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, _, err = run(["--config", str(path), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "missing key 'text_config.moe_intermediate_size'" in err
    assert set(os.listdir(tmp_path)) == {"page.png", "config.json"}


def test_image_file_gives_its_own_size(tmp_path, capsys, tiny_v2_config):
    from PIL import Image

    Image.new("RGB", (900, 500), "white").save(tmp_path / "p.png")
    code, _, _ = run(["--config", tiny_v2_config, "--image", str(tmp_path / "p.png"), "--decode-steps", "0",
                      "--out", str(tmp_path / "o"), "--quiet"], capsys)
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == 0 and doc["workload"]["image_wh"] == [900, 500] and doc["workload"]["views"] == 3


def test_command_line_process_exit_status_and_output(tmp_path, tiny_v2_config):
    """`python -m tracer.diff` as a process: it leaves without interpreter teardown (tracer.diff.cli), so its
    exit status, its printed tables and its files must all be complete by then."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "tracer.diff", "--config", tiny_v2_config, "--image-shape", "640x640",
            "--text-tokens", "2", "--decode-steps", "1", "--quiet"]
    ok = subprocess.run(base + ["--out", str(tmp_path / "ok")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "decode" in ok.stdout and ok.stdout.rstrip().endswith("report.json, report.html")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["report.html", "report.json"]
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["stages"][0]["name"] == "vision"
    gap = subprocess.run(base + ["--analytic", "seed-naive", "--max-gap", "0"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert gap.returncode == 1 and "exceeds --max-gap 0" in gap.stderr
    assert list(tmp_path.glob("flopdiff-report*")) == []  # a gate without --out writes nothing
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--decode-steps", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("flopdiff: error: --decode-steps -1")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("argv, knobs", [
    ([], (None, None, True)),  # the vendor's own defaults
    (["--resolution", "tiny"], (512, 512, False)),
    (["--resolution", "large"], (1280, 1280, False)),
    (["--resolution", "gundam"], (1024, 640, True)),
    (["--resolution", "tiny", "--crop-mode", "--base-size", "1024"], (1024, 512, True)),  # explicit flags win
])
def test_resolution_modes_set_the_vendor_knobs(argv, knobs):
    from tracer.diff import build_parser, workload_from_args

    w = workload_from_args(build_parser().parse_args(["--model", "deepseek-ocr", *argv]))
    assert (w.base_size, w.tile_size, w.crop_mode) == knobs
