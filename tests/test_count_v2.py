"""Per-node counts against FlopCounterMode on a reduced-size DeepSeek-OCR-2 with real random weights."""

from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tracer.capture.recorder import capture
from tracer.count.counter import count_graph, totals
from tracer.capture.trace import trace
from tracer.vendors import BuildOptions, get_vendor
from tracer.core.workload import Workload

WORKLOAD = Workload(image_wh=(1000, 1400), text_tokens=5, decode_steps=2)  # 2x3 tiles + global view


def _by_module(graph) -> Counter:
    """Sum flops_torch over each module on a node's stack, as FlopCounterMode attributes to its parents."""
    c = Counter()
    for n in graph.op_nodes():
        for path in n.meta["nn_module_stack"]:
            c[path] += n.meta["flops_torch"]
        c["Global"] += n.meta["flops_torch"]
    return +c


def _by_op(graph) -> Counter:
    c = Counter()
    for n in graph.op_nodes():
        c[n.target._overloadpacket] += n.meta["flops_torch"]
    return +c


@pytest.fixture(scope="module")
def real_run(tiny_v2_config):
    """Each stage of the tiny model run twice on the same weights: once captured, once under FlopCounterMode."""
    vendor = get_vendor("deepseek-ocr-2")
    config = vendor.load_config(tiny_v2_config, BuildOptions(mode="real"))
    prepared = vendor.prepare(WORKLOAD, config)
    torch.manual_seed(0)
    model = vendor.build(config, BuildOptions(mode="real"))
    stages = []
    with torch.no_grad(), vendor.shims():
        # FlopCounterMode sits below the recorder: both see the very same ops of the very same run.
        with FlopCounterMode(display=False) as fc:
            sg, out = capture(vendor.prefill(model, prepared), model, "prefill")
        stages.append((count_graph(sg), fc.get_flop_counts()))
        for k in range(WORKLOAD.decode_steps):
            with FlopCounterMode(display=False) as fc:
                sg, out = capture(vendor.decode(model, out, k), model, "decode", step=k)
            stages.append((count_graph(sg), fc.get_flop_counts()))
    return stages


def _module_counts(fc_counts: dict) -> Counter:
    # ModuleTracker names modules by the root class then the path; strip the root to match node paths.
    out = Counter()
    for name, ops in fc_counts.items():
        key = name if name == "Global" else name.split(".", 1)[1] if "." in name else None
        if key is not None:
            out[key] += sum(ops.values())
    return +out


def test_prefill_nodes_sum_to_flopcountermode_per_module_and_op(real_run):
    sg, fc = real_run[0]
    assert _module_counts(fc) == _by_module(sg)
    assert +Counter({k: v for k, v in fc["Global"].items()}) == _by_op(sg)


def test_decode_steps_sum_to_flopcountermode(real_run):
    for sg, fc in real_run[1:]:
        assert _by_op(sg) == +Counter(fc["Global"])
        assert _module_counts(fc) == _by_module(sg)


def test_full_minus_torch_is_the_listed_formulas(real_run):
    """What policy full adds is exactly 2*S*K*N per grouped GEMM and 4*b*h*s_q*s_k*d per CPU SDPA."""
    for sg, _ in real_run:
        expected = 0
        for n in sg.op_nodes():
            shapes = [a.meta["val"].shape for a in n.all_input_nodes]
            if n.meta["op"] == "aten::_grouped_mm":
                (s, k), (_, _, n_out) = shapes[0], shapes[1]
                expected += 2 * s * k * n_out
            elif n.meta["op"] == "aten::_scaled_dot_product_flash_attention_for_cpu":
                (b, h, sq, d), sk, dv = shapes[0], shapes[1][-2], shapes[2][-1]
                expected += 2 * b * h * sq * sk * (d + dv)
        t = totals([sg])
        assert expected > 0
        assert t.flops_full - t.flops_torch == expected


def _key(n):
    return n.meta["op"], n.meta["module_call"], n.meta["source"], n.meta["flops_torch"], n.meta["flops_full"]


def test_fake_trace_equals_real_trace_per_node(tiny_v2_config):
    fake = trace(WORKLOAD, config_path=tiny_v2_config, mode="fake")
    real = trace(WORKLOAD, config_path=tiny_v2_config, mode="real")
    for stage in ("vision", "prefill", "decode"):
        f_graphs, r_graphs = fake.stages[stage], real.stages[stage]
        assert len(f_graphs) == len(r_graphs) > 0
        for f, r in zip(f_graphs, r_graphs):
            count_graph(f), count_graph(r)
            # FLOP-free ops may differ: real tensors format their values in the vendor's f-strings (.item())
            fk = [_key(n) for n in f.op_nodes() if n.meta["flop_status"] != "free"]
            rk = [_key(n) for n in r.op_nodes() if n.meta["flop_status"] != "free"]
            assert fk == rk and len(fk) > 0


def test_vision_stage_is_the_vision_tower_and_projector(tiny_v2_config):
    tr = trace(WORKLOAD, config_path=tiny_v2_config)
    vision, prefill = tr.stages["vision"][0], tr.stages["prefill"][0]
    inside = [n for n in prefill.op_nodes()
              if any(p.startswith(("model.vision_tower", "model.multi_modal_projector")) for p in n.meta["nn_module_stack"])]
    assert [n.name for n in vision.op_nodes()] == [n.name for n in inside]
    # SAM runs twice (global view, then the 6 tiles): the second call is tagged in the module path
    calls = {n.meta["module_call"].split(".sam_encoder")[0] for n in vision.op_nodes() if ".sam_encoder" in n.meta["module_call"]}
    assert calls == {"model.vision_tower", "model.vision_tower#1"}
    assert tr.prepared.derived.views == 7 and tr.prepared.derived.crop_grid_wh == (2, 3)


def test_real_capture_keeps_no_activation_alive(real_run):
    """A real run's nodes keep each floating-point value as a meta tensor (shape, stride, dtype: what counting reads)
    and small integer tensors as data; before, every activation stayed alive and a full-size v2 page in real mode
    on CPU went past 24 GiB (now 11.0 GiB)."""
    for sg, _ in real_run:
        vals = [v for n in sg.graph.nodes for v in (n.meta.get("val"),)
                if isinstance(v, torch.Tensor)]
        assert vals and all(v.device.type == "meta" for v in vals if v.is_floating_point())
        assert all(v.numel() <= 4096 for v in vals if v.device.type != "meta")


def test_exif_orientation_is_the_page_the_vendor_loads(tmp_path, tiny_v2_config):
    """An orientation-6 photo stored 1000x1400 is a 1400x1000 page to transformers' loader (exif_transpose):
    flopdiff reported grid [2,3] where the vendor makes 3x2."""
    import json

    from PIL import Image

    from tracer.diff import main

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1000, 1400), "white").save(tmp_path / "photo.jpg", exif=exif)
    docs = []
    for name, source in (("photo", ["--image", str(tmp_path / "photo.jpg")]), ("upright", ["--image-shape", "1400x1000"])):
        assert main(["--quiet", "--config", tiny_v2_config, "--decode-steps", "0", *source,
                     "--out", str(tmp_path / name)]) == 0
        docs.append(json.loads((tmp_path / name / "report.json").read_text()))
    photo, upright = docs
    assert photo["workload"]["image_wh"] == [1400, 1000] and photo["workload"]["crop_grid_wh"] == [3, 2]
    assert photo["stages"] == upright["stages"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_pngs_orientation_is_read_from_its_header_wherever_the_exif_chunk_is(where, tmp_path):
    """PIL finds an eXIf chunk after the image data only by decoding the whole image (what exif_transpose does);
    flopdiff walks the chunk headers instead and must agree with it."""
    from PIL import Image, ImageOps

    from tracer.core.workload import image_size

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (100, 300), "white").save(tmp_path / "p.png", exif=exif)
    raw = (tmp_path / "p.png").read_bytes()
    chunks, i = [], 8
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 4], "big")
        chunks.append(raw[i:i + 12 + n])
        i += 12 + n
    if where == "after":  # eXIf moved between the last IDAT and IEND
        ex = [c for c in chunks if c[4:8] == b"eXIf"]
        rest = [c for c in chunks if c[4:8] != b"eXIf"]
        (tmp_path / "p.png").write_bytes(raw[:8] + b"".join(rest[:-1]) + ex[0] + rest[-1])
    with Image.open(tmp_path / "p.png") as im:
        assert ("exif" in im.info) == (where == "before")
        assert ImageOps.exif_transpose(im).size == (300, 100)
    assert image_size(tmp_path / "p.png", "--image p.png") == (300, 100)
