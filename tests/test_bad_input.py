"""Bad input, one table: every case is one line `flopdiff: error: ...` naming the input, exit 2, nothing written
(no --out folder, no staging folder, no scratch folder), and no network connection attempted. Cases that the
command line can check before tracing are checked there; the rest within the first second of loading.
"""

import json
import os
import socket
from pathlib import Path

import pytest

from tracer.diff import main
from tracer.core.errors import FlopdiffError

V2_CONFIG = Path(__file__).resolve().parent.parent / "tracer" / "data" / "deepseek-ocr-2" / "config.json"


def _config(tmp: Path, edit) -> str:
    cfg = json.loads(V2_CONFIG.read_text())
    edit(cfg["text_config"])
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _preset(tmp: Path, text: str) -> str:
    path = tmp / "preset.yaml"
    path.write_text(text)
    return str(path)


def _set(**kw):
    return lambda c: c.update(kw)


# (case, argv with {tmp} for the test's folder, what the one line must say)
CASES = [
    ("out is a file", ["--out", "{tmp}/afile"], "is a file"),
    ("out under a file", ["--out", "{tmp}/afile/x"], "lies under the file"),
    ("out in /proc", ["--out", "/proc/flopdiff-x"], "cannot create an output folder there"),
    ("out holds other files", ["--out", "{tmp}/theirs"], "holds files flopdiff does not write (mine.txt)"),
    ("out is the current folder", ["--out", "."], "is the current folder or contains it"),
    ("experts eager in fake mode", ["--experts", "eager"], "--experts eager: its per-expert loop reads the routing"),
    ("experts unknown", ["--experts", "fast"], "--experts fast: choose one of grouped_mm, batched_mm, eager"),
    ("experts sub-config typo", ["--experts", "text_confg=batched_mm"], "no sub-config text_confg"),
    ("base size 7", ["--base-size", "7"], "--base-size 7: must be a multiple of the patch size 16"),
    ("tile size 3", ["--tile-size", "3"], "--tile-size 3: must be a multiple"),
    ("base size 0", ["--base-size", "0"], "--base-size 0: must be a multiple"),
    ("tile size 0", ["--tile-size", "0"], "--tile-size 0: must be a multiple"),
    ("aspect 3000:1", ["--image-shape", "3000x1"], "more than 100 times longer than wide"),
    ("20000x20000", ["--image-shape", "20000x20000"], "exceeds 20000 px on a side or 150 Mpx"),
    ("image over the pixel limit", ["--image", "{tmp}/bomb.png"], "13000x13000 exceeds"),
    ("image not an image", ["--image", "{tmp}/afile"], "cannot read it as an image"),
    # the image is read and checked by flopdiff before any vendor sees it (v1's loader gave 40-line tracebacks)
    ("image missing", ["--image", "{tmp}/nosuch.png"], "--image {tmp}/nosuch.png: no such file"),
    ("image 0 bytes", ["--image", "{tmp}/empty.png"], "empty.png: cannot read it as an image"),
    ("image truncated", ["--image", "{tmp}/truncated.png"], "truncated.png: cannot read it as an image"),
    ("image is a folder", ["--image", "{tmp}/theirs"], "theirs: is a folder; give an image file"),
    ("image /dev/zero", ["--image", "/dev/zero"], "--image /dev/zero: more than 1 MiB from a pipe or device"),
    ("image FIFO, no writer", ["--image", "{tmp}/fifo"], "fifo: nothing arrived in 0.3 s (a pipe or FIFO with no"),
    ("v1 image missing", ["--model", "deepseek-ocr", "--vendor-dir", "{tmp}", "--trust-remote-code", "--text-tokens",
                          "9", "--image", "{tmp}/nosuch.png"], "--image {tmp}/nosuch.png: no such file"),
    ("v1 image garbage", ["--model", "deepseek-ocr", "--vendor-dir", "{tmp}", "--trust-remote-code", "--text-tokens",
                          "9", "--image", "{tmp}/afile"], "afile: cannot read it as an image"),
    ("config FIFO, no writer", ["--config", "{tmp}/fifo"], "--config {tmp}/fifo: nothing arrived in 0.3 s"),
    ("max gap nan", ["--max-gap", "nan"], "--max-gap nan: 'nan' must be a number"),
    ("max gap inf", ["--max-gap", "inf"], "--max-gap inf: 'inf' must be a number"),
    ("max gap negative", ["--max-gap", "-1"], "--max-gap -1: '-1' must be a number, 0 or more"),
    ("max gap of a shown metric", ["--max-gap", "unfused=1"], "--max-gap unfused=1: unfused is shown, not diffed"),
    ("max gap unknown metric", ["--max-gap", "flops=1"], "expected PCT or METRIC=PCT"),
    ("attn sub-config typo", ["--attn", "text_confg=eager,vision_config=sdpa"], "no sub-config text_confg"),
    ("attn unknown", ["--attn", "nosuch_attention"], "--attn nosuch_attention"),
    ("prompt without tokenizer", ["--prompt", "<image>\nFree OCR."], "--prompt: needs --tokenizer"),
    ("tokenizer not a path", ["--tokenizer", "org/name"], "--tokenizer org/name: no such file or folder"),
    ("text tokens and tokenizer", ["--tokenizer", "{tmp}", "--text-tokens", "3"], "give either --text-tokens or"),
    ("past the positions: steps", ["--decode-steps", "100000"], "exceed the model's 8192 positions"),
    ("past the positions: tokens", ["--text-tokens", "10000000"], "exceed the model's 8192 positions"),
    ("minutes of capture", ["--decode-steps", "3000", "--every-step"], "pass --allow-long to run it anyway"),
    ("negative decode steps", ["--decode-steps", "-3"], "--decode-steps -3: must be 0 or more"),
    ("config layers -1", ["--config", "cfg:num_hidden_layers=-1"], "text_config.num_hidden_layers = -1 must be"),
    ("config hidden 0", ["--config", "cfg:hidden_size=0"], "text_config.hidden_size = 0 must be a positive"),
    ("config layers text", ["--config", "cfg:num_hidden_layers=twelve"], 'num_hidden_layers = "twelve" must be'),
    ("config float vocab", ["--config", "cfg:vocab_size=129280.5"], "text_config.vocab_size = 129280.5 must be"),
    ("config 0 experts", ["--config", "cfg:n_routed_experts=0"], "text_config.n_routed_experts = 0 must be"),
    ("config top-k > experts", ["--config", "cfg:num_experts_per_tok=65"], "must be at most text_config.n_routed"),
    ("config short layer list", ["--config", "cfg:mlp_layer_types=dense"], "len(text_config.mlp_layer_types) = 1"),
    ("config 100000 layers", ["--config", "cfg:num_hidden_layers=100000"], "len(text_config.mlp_layer_types) = 12"),
    ("config 3000 layers", ["--config", "cfg:3000 layers"], "3000-layer decoder takes about"),
    ("preset not YAML", ["--analytic", "yaml:single_view: [true"], "not a valid YAML preset"),
    ("preset wrong type", ["--analytic", "yaml:clip_layers: abc"], "clip_layers = 'abc': must be null or an integer"),
    ("preset negative", ["--analytic", "yaml:projector_tokens: -1"], "projector_tokens = -1: must be null or a pos"),
    ("preset unknown key", ["--analytic", "yaml:clip_layer: 4"], "the keys are single_view"),
    ("preset misspelt", ["--analytic", "seed-naiv"], "--analytic 'seed-naiv': unknown preset"),
    ("v1 vendor typo, no trust", ["--model", "deepseek-ocr", "--vendor-dir", "a/b"], "pass --trust-remote-code"),
    ("v1 vendor typo", ["--model", "deepseek-ocr", "--vendor-dir", "a/b", "--trust-remote-code"],
     "--vendor-dir a/b: no such folder (to fetch it from the Hugging Face hub, pass --vendor-dir hub:a/b)"),
]

CONFIG_EDITS = {
    "num_hidden_layers=-1": _set(num_hidden_layers=-1),
    "hidden_size=0": _set(hidden_size=0),
    "num_hidden_layers=twelve": _set(num_hidden_layers="twelve"),
    "vocab_size=129280.5": _set(vocab_size=129280.5),
    "n_routed_experts=0": _set(n_routed_experts=0),
    "num_experts_per_tok=65": _set(num_experts_per_tok=65),
    "mlp_layer_types=dense": _set(mlp_layer_types=["dense"]),
    "num_hidden_layers=100000": _set(num_hidden_layers=100000),
    "3000 layers": _set(num_hidden_layers=3000, mlp_layer_types=["dense"] + ["sparse"] * 2999),
}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (a typo must never reach the hub)."""
    def refuse(self, address):
        raise AssertionError(f"flopdiff tried to connect to {address}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _fixtures(tmp: Path) -> None:
    (tmp / "afile").write_text("not an image")
    (tmp / "theirs").mkdir()
    (tmp / "theirs" / "mine.txt").write_text("a user's file")
    from PIL import Image

    Image.new("1", (13000, 13000), 1).save(tmp / "bomb.png")  # 169 Mpx: over the limit, 20 KB on disk
    (tmp / "empty.png").write_bytes(b"")
    Image.new("RGB", (640, 640), (12, 34, 56)).save(tmp / "whole.png")
    (tmp / "truncated.png").write_bytes((tmp / "whole.png").read_bytes()[:300])
    (tmp / "whole.png").unlink()
    os.mkfifo(tmp / "fifo")


def _scratch() -> set[str]:
    """This process's scratch folders (named after their owner: other flopdiff runs on the machine do not count)."""
    import os
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob(f"flopdiff-*-{os.getpid()}-*")}


@pytest.mark.parametrize("case, argv, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, argv, says, tmp_path, capsys, monkeypatch, no_network):
    import tracer.core.inputs

    monkeypatch.setattr(tracer.core.inputs, "STREAM_LIMIT", 1 << 20)  # /dev/zero refused after 1 MiB, not 512
    monkeypatch.setattr(tracer.core.inputs, "STREAM_IDLE_S", 0.3)  # a FIFO nobody writes to: refused after 0.3 s, not 10
    _fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = []
    for a in argv:
        if a.startswith("cfg:"):
            a = _config(tmp_path, CONFIG_EDITS[a[4:]])
        elif a.startswith("yaml:"):
            a = _preset(tmp_path, a[5:] + "\n")
        args.append(a.format(tmp=tmp_path))
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = sorted(p.name for p in tmp_path.iterdir())
    scratch = _scratch()
    code = main(["--quiet", *args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flopdiff: error: "), err
    assert says.format(tmp=tmp_path) in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, no staging folder
    assert _scratch() <= scratch  # no copy of a pipe left either


def test_a_large_image_within_the_limit_gives_no_warning(tmp_path, capsys):
    """PIL warns from 89 Mpx; flopdiff's own limit (150 Mpx, from the file's header) replaces its bomb check."""
    from PIL import Image

    Image.new("1", (10000, 10000), 1).save(tmp_path / "page.png")
    code = main(["--quiet", "--image", str(tmp_path / "page.png"), "--decode-steps", "0", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 0 and err == "", err
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert doc["workload"]["image_wh"] == [10000, 10000]


@pytest.mark.parametrize("knobs, says", [
    (dict(text_tokens=-5000), "text_tokens = -5000: must be an integer >= 0"),
    (dict(decode_steps=-3), "decode_steps = -3: must be an integer >= 0"),
    (dict(base_size=-16), "base_size = -16: must be a multiple of the patch size 16"),
    (dict(base_size=0), "base_size = 0: must be a multiple"),
    (dict(crop_mode="no"), "crop_mode = 'no': must be true or false"),
    (dict(image_wh=(10**9, 10**9)), "image_wh (1000000000, 1000000000): over 20000 px"),
    (dict(image_wh=(1000, 1400, 3)), "image_wh (1000, 1400, 3): must be (width, height)"),
])
def test_analytic_api_refuses_bad_values_by_parameter_name(knobs, says):
    from analytic.api import evaluate

    kwargs = {"image_wh": (1000, 1400), **knobs}
    with pytest.raises(FlopdiffError) as err:
        evaluate("deepseek-ocr-2", kwargs.pop("image_wh"), **kwargs)
    assert says in str(err.value) and "--" not in str(err.value)


@pytest.mark.parametrize("field, value, says", [
    ("mode", "bogus", "--mode 'bogus': choose one of fake, real"),
    ("graph", "bogus", "--graph 'bogus': choose one of fx, onnx"),
    ("device", "tpu", "--device 'tpu': choose one of cpu, cuda"),
    ("dtype", "float16", "BuildOptions.dtype 'float16': choose one of bfloat16, float32"),
    ("build.mode", "bogus", "BuildOptions.mode 'bogus': choose one of fake, real"),
    ("sequential", "yes", "Options.sequential = 'yes': must be True or False"),
    ("decode_steps", 1.5, "Workload.decode_steps = 1.5 (--decode-steps): must be an integer"),
    ("base_size", 1024.0, "Workload.base_size = 1024.0 (--base-size): must be an integer"),
    ("text_tokens", True, "Workload.text_tokens = True (--text-tokens): must be an integer"),
    ("image_wh", (640.0, 640), "Workload.image_wh = (640.0, 640) (--image-shape): must be (width, height)"),
    ("image_path", 7, "Workload.image_path = 7 (--image): must be a path"),
])
def test_python_api_refuses_bad_values_by_parameter_name_before_any_work(field, value, says):
    """The API's edge checks what argparse checks for the command line (a bogus mode ran 47 s of real compute, a
    float step count failed 64 frames down in torch)."""
    from dataclasses import replace

    from tracer.pipeline import Options, check
    from tracer.core.workload import Workload

    workload, options = Workload(), Options()
    if field.startswith("build."):
        options = replace(options, build=replace(options.build, **{field[6:]: value}))
    elif field in Workload.__dataclass_fields__:
        workload = replace(workload, **{field: value})
    elif field in Options.__dataclass_fields__:
        options = replace(options, **{field: value})
    else:
        options = replace(options, build=replace(options.build, **{field: value}))
    with pytest.raises(FlopdiffError) as err:
        check(workload, options)
    assert says in str(err.value), str(err.value)


def test_python_api_takes_a_pathlib_image(tmp_path, tiny_v2_config):
    from PIL import Image

    from tracer.pipeline import Options, run
    from tracer.core.workload import Workload

    Image.new("RGB", (2000, 700), "white").save(tmp_path / "wide.png")
    result = run(Workload(image_path=tmp_path / "wide.png", text_tokens=3, decode_steps=0),
                 Options(config=tiny_v2_config, sequential=True))
    assert result.report["workload"]["image_wh"] == [2000, 700]
    assert result.report["workload"]["image_path"] == str(tmp_path / "wide.png")


def test_an_internal_error_is_one_line_and_exit_3(tmp_path, capsys, monkeypatch):
    """A crash is not a gap: a CI gate reading exit 1 as "gap too large" must never see one."""
    import tracer.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("planted\nover two lines")
    monkeypatch.setattr(tracer.pipeline, "map_report", broken)
    code = main(["--quiet", "--image-shape", "640x640", "--decode-steps", "0", "--out", str(tmp_path / "o")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(lines) == 1, lines
    assert lines[0].startswith("flopdiff: internal error: RuntimeError: planted over two lines at pipeline.py:")
    assert "please report it" in lines[0] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["o[/bold]", "o[red]x"])
def test_an_out_folder_with_rich_markup_in_its_name_prints_as_it_is(name, tmp_path, capsys):
    code = main(["--quiet", "--image-shape", "640x640", "--decode-steps", "0", "--out", str(tmp_path / name)])
    out = capsys.readouterr().out
    assert code == 0 and f"wrote {tmp_path / name}/report.json, report.html" in out
    assert (tmp_path / name / "report.json").is_file()
