"""Kernel attribution (CUDA runs), tested on CPU from data flopdiff itself recorded on an H200
(tests/data/cuda/: DeepSeek-OCR-2 640x640, 4 text tokens, 1 decode step, real bf16 weights, sdpa + grouped_mm)."""

import gzip
import json
import types
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest

from mapping.engine import map_nodes
from mapping.table import load_table
from tracer.capture.instruments import MODULE_RANGE, OP_RANGE, ProfilerRanges, kernel_records
from tracer.compare.analytic import analytic_of_report, catalogue, present_views
from tracer.cuda.kernels import OUTSIDE, attribute, counted
from tracer.result import Kernel, Result

DATA = Path(__file__).resolve().parent / "data" / "cuda" / "v2-640x640-h200.json.gz"


@pytest.fixture(scope="module")
def h200():
    doc = json.loads(gzip.open(DATA).read())
    report = {"model": doc["model"], "workload": doc["workload"], "nodes": doc["nodes"]}
    device_layers = {n["id"]: n["layer"] for n in doc["nodes"]}
    for n in report["nodes"]:
        n["layer"] = None
    an = analytic_of_report(report, "aligned")
    mapping = map_nodes(load_table("deepseek-ocr-2"), report["nodes"], present_views(report), catalogue(an.aligned))
    for n in report["nodes"]:
        n["layer"] = mapping.layer_of.get(n["id"])
    report.update(attribute(report, doc["kernel_records"], mapping.matcher, doc["device"]))
    return report, doc, device_layers


def test_the_typed_kernel_view_carries_every_field_of_the_report(h200):
    report, _, _ = h200
    kernels = Result(report, None, None, None).kernels
    assert {f.name for f in fields(Kernel)} == set(report["kernels"][0])
    from tracer.core.schema import drift

    assert drift({"kernels": report["kernels"]}) == []  # every kernel row, in the one schema
    assert [(k.kernel, k.time_us, k.flops_full) for k in kernels] == \
        [(k["kernel"], k["time_us"], k["flops_full"]) for k in report["kernels"]]


def test_every_kernel_microsecond_is_attributed_to_a_named_layer(h200):
    report, doc, _ = h200
    total = sum(r["us"] for r in doc["kernel_records"])
    assert report["kernel_time"]["total_us"] == pytest.approx(total)
    assert sum(r["time_us"] for r in report["kernel_layers"]) == pytest.approx(total)
    assert [r for r in report["kernel_layers"] if r["layer"].startswith("(module")] == []
    assert report["kernel_time"]["outside_model_us"] == sum(r["time_us"] for r in report["kernel_layers"]
                                                            if r["layer"] == OUTSIDE)
    layers = {r["layer"] for r in report["kernel_layers"]}
    assert {"decoder.layers.3.mlp.experts", "decoder.layers.3.attn", "vision.global.sam.blocks.2.attn",
            "vision.global.encoder.layers.5.attn", "lm_head", "decoder.layers.3", "vision"} <= layers


def test_mapping_on_cpu_agrees_with_the_device_run(h200):
    report, _, device_layers = h200
    assert {n["id"]: n["layer"] for n in report["nodes"]} == device_layers


def test_grouped_gemm_kernels_flagged_unseen_with_formula_flops(h200):
    report, doc, _ = h200
    grouped = sum(n["flops_full"] for n in doc["nodes"] if n["op"] == "aten::_grouped_mm" and n["stage"] != "vision")
    rows = [k for k in report["kernels"] if k["flops_full"] and "aten::_grouped_mm" in k["ops"]]
    assert rows and all(k["counted_by_flopcountermode"] == "no" for k in rows)
    assert sum(k["flops_full"] for k in rows) == grouped == sum(k["unseen_flops"] for k in rows)
    prefill = sum(n["flops_full"] for n in doc["nodes"] if n["op"] == "aten::_grouped_mm" and n["stage"] == "prefill")
    assert sum(k["flops_full_by_stage"].get("prefill", 0) for k in rows) == prefill
    assert report["kernels"][0] is rows[0]  # sorted by FLOPs FlopCounterMode misses
    assert all("cutlass" in k["kernel"] for k in rows)  # CUTLASS grouped GEMM


def test_every_attention_node_has_its_kernels_and_flops(h200):
    report, doc, _ = h200
    attn = [n for n in doc["nodes"] if "scaled_dot_product" in n["op"] and n["stage"] != "vision"]
    launched = {r["node"] for r in doc["kernel_records"]}
    assert attn and all(n["id"] in launched for n in attn)
    rows = [k for k in report["kernels"] if any("scaled_dot_product" in o for o in k["ops"]) and k["flops_full"]]
    assert sum(k["flops_full"] for k in rows) == sum(n["flops_full"] for n in attn)
    assert {k["counted_by_flopcountermode"] for k in rows} == {"yes"}  # cuDNN SDPA: torch has the formula on CUDA
    assert all(k["kernel"].startswith("cudnn_generated_fort_native_sdpa") for k in rows)


def test_kernel_flops_add_up_to_the_stage_totals(h200):
    report, doc, _ = h200
    stages = {s["name"]: s for s in doc["stages"]}
    assert sum(k["flops_full"] for k in report["kernels"]) == stages["prefill"]["flops_full"] + stages["decode"]["flops_full"]
    assert sum(k["flops_torch"] for k in report["kernels"]) == stages["prefill"]["flops_torch"] + stages["decode"]["flops_torch"]
    # a convolution's FLOPs sit on its convolution kernel, not on a layout or bias-add helper
    conv = [k for k in report["kernels"] if k["flops_full"] and "aten::convolution" in k["ops"]]
    assert conv and not any("at::native::" in k["kernel"] for k in conv)


@pytest.mark.parametrize("card, sms, mhz, cc, datasheet", [
    ("H100 SXM5", 132, 1830, (9, 0), 989.4),   # NVIDIA H100 datasheet: 989 TFLOPS dense BF16 (1,979 with sparsity)
    ("A100 SXM4", 108, 1410, (8, 0), 311.9),   # NVIDIA A100 datasheet: 312 TFLOPS dense BF16
    ("A10", 72, 1695, (8, 6), 125.0),          # NVIDIA A10 datasheet: 125 TFLOPS dense BF16
])
def test_peak_rate_formula_matches_the_datasheets(card, sms, mhz, cc, datasheet):
    from tracer.cuda.kernels import peak_bf16_tflops

    assert peak_bf16_tflops(sms, mhz, cc) == pytest.approx(datasheet, abs=0.15), card
    assert peak_bf16_tflops(sms, mhz, (7, 5)) is None and peak_bf16_tflops(sms, 0, cc) is None


def test_achieved_rate_against_the_card_peak(h200):
    from tracer.cuda.kernels import peak_bf16_tflops

    report, doc, _ = h200
    dev = doc["device"]
    assert dev["peak_bf16_tflops"] == peak_bf16_tflops(dev["sms"], dev["max_sm_clock_mhz"],
                                                       tuple(map(int, dev["compute_capability"].split("."))))
    qkv = next(r for r in report["kernel_layers"] if r["layer"] == "vision.global.sam.blocks.2.qkv")
    assert qkv["achieved_tflops"] == pytest.approx(qkv["flops_full"] / (qkv["time_us"] * 1e-6) / 1e12, rel=1e-3)
    # against the datasheet's dense bf16 peak (989.5 TFLOP/s), not the clock-derived 1,070.5 the recording carries
    assert dev["peak_bf16_tflops"] == 1070.5
    assert qkv["peak_pct"] == pytest.approx(100 * qkv["achieved_tflops"] / 989.5, abs=0.01) and 0 < qkv["peak_pct"] < 100


def test_roofline_bound_efficiency_and_lost_time_by_hand():
    """Two layers and a kernel outside every layer on an H200 (datasheet: 989.5 TFLOP/s bf16, 67 TFLOP/s fp32,
    4,800 GB/s): a GEMM bound by its tensor-core FLOPs, a decode-like layer bound by its bytes."""
    from tracer.cuda.roofline import roofline

    gemm = {"stage": "prefill", "id": "a.mm", "flops_full": 989_500_000_000, "cuda_flops": 0, "io_fused": 48_000_000,
            "flops_analytic": 989_500_000_000, "analytic_cuda_flops": 0, "analytic_io_bytes": 96_000_000}
    weights = {"stage": "prefill", "id": "b.experts", "flops_full": 1_000_000, "cuda_flops": 670_000,
               "io_fused": 480_000_000, "flops_analytic": 1_000_000, "analytic_cuda_flops": 0,
               "analytic_io_bytes": 240_000_000}
    report = {"device": {"name": "NVIDIA H200"}, "layers": [gemm, weights],
              "kernel_layers": [{"stage": "prefill", "layer": "a.mm", "kernels": 1, "time_us": 2000.0},
                                {"stage": "prefill", "layer": "b.experts", "kernels": 3, "time_us": 400.0},
                                {"stage": "prefill", "layer": OUTSIDE, "kernels": 1, "time_us": 100.0}]}
    roof = roofline(report)
    assert roof["ceilings"]["used"] == "datasheet" and roof["ceilings"]["hbm_gbps"] == 4800.0
    rows = {r["layer"]: r for r in roof["layers"]}
    # 989.5e9 FLOPs at 989.5 TFLOP/s: 1,000 us (its 48 MB take 10 us); measured 2,000 us: 50%, 1,000 us lost
    assert rows["a.mm"]["bound_us"] == {"traced": 1000.0, "analytic": 1000.0} and rows["a.mm"]["roof"] == "tensor"
    assert (rows["a.mm"]["efficiency"], rows["a.mm"]["lost_us"]) == (0.5, 1000.0)
    # 480 MB at 4,800 GB/s: 100 us (its 670 kFLOP of CUDA-core work: 10 us); the analytic model's 240 MB: 50 us
    assert rows["b.experts"]["bound_us"] == {"traced": 100.0, "analytic": 50.0} and rows["b.experts"]["roof"] == "memory"
    assert (rows["b.experts"]["efficiency"], rows["b.experts"]["lost_us"]) == (0.25, 300.0)
    assert rows["b.experts"]["intensity"] == pytest.approx(1_000_000 / 480_000_000, abs=1e-3)
    assert [r["layer"] for r in roof["layers"]] == ["a.mm", "b.experts"]  # most time lost first
    (stage,) = roof["stages"]
    # the stage: every kernel's time (the one outside the layers too) against the sum of its layers' bounds
    assert (stage["time_us"], stage["bound_us"]["traced"], stage["lost_us"]) == (2500.0, 1100.0, 1400.0)
    assert stage["efficiency"] == 0.44
    assert roofline({**report, "device": {"name": "a card nobody listed"}}) is None
    assert roof["steps"] == []  # no decode kernels


def test_roofline_per_decode_step_by_hand():
    """Two decode steps of one layer reading a 480 MB and then a 240 MB storage (fused I/O from the nodes' storage
    records), under measured ceilings (4,000 GB/s, 60 us of host time per launch): bounds of 120 and 60 us, against
    300 us over 3 launches (kernels start at 0, 150 and 400 us: 200 us idle between them; launch floor 180 us, so
    the kernels set the pace) and 100 us over 2 overlapping launches (0-50 and 25-75 us: a 75 us span, no idle
    time; launch floor 120 us > 100 us of kernels: launch-bound)."""
    from tracer.cuda.roofline import roofline

    nodes = [{"id": f"decode/{k}/mm", "stage": "decode", "step": k, "layer": "d.experts", "flops_full": 1_000_000,
              "cuda_flops": 0, "reads": [[k, b]], "writes": []} for k, b in ((0, 480_000_000), (1, 240_000_000))]
    records = ([{"stage": "decode", "step": 0, "us": 100.0, "start_us": t} for t in (0.0, 150.0, 400.0)]
               + [{"stage": "decode", "step": 1, "us": 50.0, "start_us": t} for t in (0.0, 25.0)])
    measured = {"bf16_tflops": 800.0, "fp32_tflops": 50.0, "hbm_gbps": 4000.0, "launch_us": 60.0}
    report = {"device": {"name": "NVIDIA H200", "measured_ceilings": measured}, "nodes": nodes,
              "stages": [{"name": "decode", "outputs": [[], []]}],
              "layers": [{"stage": "decode", "id": "d.experts", "flops_full": 2_000_000, "cuda_flops": 0,
                          "io_fused": 720_000_000, "flops_analytic": 2_000_000, "analytic_cuda_flops": 0,
                          "analytic_io_bytes": 720_000_000}],
              "kernel_layers": [{"stage": "decode", "layer": "d.experts", "kernels": 5, "time_us": 400.0}]}
    roof = roofline(report, records)
    c = roof["ceilings"]
    assert (c["used"], c["hbm_gbps"], c["launch_us"], c["datasheet"]["hbm_gbps"]) == ("measured", 4000.0, 60.0, 4800.0)
    assert roof["steps"] == [
        {"step": 0, "time_us": 300.0, "launches": 3, "bound_us": 120.0, "efficiency": 0.4, "lost_us": 180.0,
         "span_us": 500.0, "idle_us": 200.0, "launch_floor_us": 180.0, "limit": "kernel-bound"},
        {"step": 1, "time_us": 100.0, "launches": 2, "bound_us": 60.0, "efficiency": 0.6, "lost_us": 40.0,
         "span_us": 75.0, "idle_us": 0.0, "launch_floor_us": 120.0, "limit": "launch-bound"}]
    (layer,) = roof["layers"]
    assert layer["bound_us"]["traced"] == 180.0  # the stage's layer: both steps' bytes, 720 MB
    (stage,) = roof["stages"]  # the steps' spans add up (each step's clock starts at its first kernel)
    assert (stage["span_us"], stage["idle_us"], stage["launch_floor_us"], stage["limit"]) == \
        (575.0, 200.0, 300.0, "kernel-bound")


def test_counted_by_flopcountermode():
    assert [counted(0, 0), counted(5, 5), counted(0, 5), counted(2, 5)] == ["-", "yes", "no", "partly"]


class RawEvents:
    """torch.profiler's raw event stream (`kineto_results.events()`) as the instrument reads it: CPU events opened and
    closed on one thread (times in ns), each kernel linked to the correlation id of the CPU event that launched it."""

    def __init__(self):
        self.events, self.clock, self.open, self.ids = [], 0, [], iter(range(100, 10_000))

    def _event(self, name, device, start, end, correlation, linked, stream=0):
        from torch.autograd import DeviceType

        kind = getattr(DeviceType, device)
        return types.SimpleNamespace(
            name=lambda: name, device_type=lambda: kind, start_ns=lambda: start, end_ns=lambda: end,
            correlation_id=lambda: correlation, linked_correlation_id=lambda: linked, is_async=lambda: False,
            start_thread_id=lambda: 1, end_thread_id=lambda: 1, device_index=lambda: 0,
            device_resource_id=lambda: stream)

    def enter(self, name, correlation=None):
        self.clock += 10
        self.open.append((name, self.clock, correlation if correlation is not None else next(self.ids)))

    def exit(self, busy=0):
        self.clock += 10 + busy
        name, start, correlation = self.open.pop()
        self.events.append(self._event(name, "CPU", start, self.clock, correlation, 0))
        return correlation

    def kernel(self, name, us, launcher, start=None):
        start = self.clock * 1000 if start is None else start
        self.events.append(self._event(name, "CUDA", start, start + int(us * 1000), 10_000 + len(self.events),
                                       launcher))


def test_kernel_records_walk_to_the_innermost_op_and_module_range():
    raw = RawEvents()
    raw.enter(f"{MODULE_RANGE}model.layers.0")
    raw.enter(f"{MODULE_RANGE}model.layers.0.mlp")
    raw.enter(f"{OP_RANGE}17")
    raw.enter("aten::mm")
    mm = raw.exit()
    raw.exit()
    raw.enter("triton_launch")
    triton = raw.exit()
    raw.exit()
    raw.exit()
    raw.enter("aten::copy_")
    copy = raw.exit()
    raw.kernel("gemm", 3.0, mm, start=1_000_000)
    raw.kernel("splitk_reduce", 1.0, mm, start=1_004_000)
    raw.kernel("triton_kernel", 2.0, triton, start=1_006_500)
    raw.kernel("copy", 0.5, copy, start=1_010_000)
    raw.kernel("orphan", 9.0, 99_999, start=0)  # linked to no CPU event: not in torch's tree either (nor its clock)
    records = kernel_records(raw.events)
    assert records == [  # device start times from the first kernel's, in us
        {"kernel": "gemm", "us": 3.0, "op": 17, "module": "model.layers.0.mlp", "start_us": 0.0},
        {"kernel": "splitk_reduce", "us": 1.0, "op": 17, "module": "model.layers.0.mlp", "start_us": 4.0},
        {"kernel": "triton_kernel", "us": 2.0, "op": None, "module": "model.layers.0.mlp", "start_us": 6.5},
        {"kernel": "copy", "us": 0.5, "op": None, "module": None, "start_us": 10.0},
    ]
    assert Counter(r["module"] for r in records)[None] == 1


def test_a_kernel_the_profiler_also_hangs_on_a_nested_event_is_one_launch():
    """As seen on an H200 (torch 2.11): a cuBLASLt GEMM linked to `aten::mm` and to its child `Activity Buffer
    Request` (one correlation id); an op that really launches the same kernel twice keeps both."""
    raw = RawEvents()
    raw.enter(f"{OP_RANGE}3")
    raw.enter("aten::mm", correlation=7)
    raw.enter("Activity Buffer Request", correlation=7)
    raw.exit()
    raw.exit()
    raw.exit()
    raw.enter(f"{OP_RANGE}4")
    raw.enter("aten::sum")
    total = raw.exit()
    raw.exit()
    raw.kernel("nvjet_gemm", 7.968, 7, start=1000)
    raw.kernel("nvjet_gemm", 7.968, 7, start=1000)  # the same launch reported twice
    raw.kernel("memset", 0.7, total, start=2000)
    raw.kernel("memset", 0.7, total, start=3000)
    raw.kernel("reduce", 5.0, total, start=4000)
    records = kernel_records(raw.events)
    assert [(r["kernel"], r["op"]) for r in records] == [("nvjet_gemm", 3), ("memset", 4), ("memset", 4), ("reduce", 4)]


def test_cpu_records_take_each_aten_event_s_self_time():
    from tracer.capture.instruments import cpu_records

    raw = RawEvents()
    raw.enter(f"{MODULE_RANGE}model.mlp")
    raw.enter(f"{OP_RANGE}5")
    raw.enter("aten::linear")      # 10 ns of its own around its child
    raw.enter("aten::addmm")
    raw.exit(busy=30)              # 40 ns
    raw.exit()
    raw.exit()
    raw.exit()
    records = cpu_records(raw.events)
    assert records == [{"kernel": "aten::linear", "us": 0.02, "op": 5, "module": "model.mlp"},
                       {"kernel": "aten::addmm", "us": 0.04, "op": 5, "module": "model.mlp"}]


@pytest.mark.parametrize("model, module, layer", [
    ("deepseek-ocr-2", "model.language_model.layers.3.self_attn", "decoder.layers.3.attn"),
    ("deepseek-ocr", "model.layers.3.self_attn", "decoder.layers.3.attn"),
])
def test_flash_attn_ops_map_to_the_attention_layer_and_carry_their_kernels(model, module, layer):
    """The Dao-AILab ops (v1's flash_attention_2 path) by name: mapped like SDPA, their kernel carries the
    formula FLOPs and is flagged unseen (formula and causal switch: tests/test_custom_ops.py)."""
    from analytic.api import build, shape_for

    tree = build(model, shape_for(model, (1000, 1400), text_tokens=9, decode_steps=1))
    node = {"id": "prefill/flash_fwd", "stage": "prefill", "op": "flash_attn::_flash_attn_forward", "module": module,
            "flops_full": 1234, "flops_torch": 0, "status": "formula"}
    mapping = map_nodes(load_table(model), [node], {"global", "tiles"}, catalogue(tree))
    assert mapping.layer_of == {"prefill/flash_fwd": layer}
    report = {"nodes": [{**node, "layer": layer}]}
    records = [{"kernel": "flash_fwd_kernel", "us": 5.0, "node": "prefill/flash_fwd", "module": module,
                "stage": "prefill", "step": None}]
    (k,) = attribute(report, records, mapping.matcher)["kernels"]
    assert (k["flops_full"], k["counted_by_flopcountermode"], k["layers"]) == (1234, "no", [layer])


@pytest.fixture(scope="module")
def ncu_layer():
    from tracer.cuda.ncu import join, parse_csv

    d = json.loads(gzip.open(DATA.parent / "ncu-v2-1000x1400-layers1-h200.json.gz").read())
    rows = parse_csv(d["ncu_csv"])
    report = {"nodes": d["nodes"], "kernel_records": d["kernel_records"]}
    return d, rows, join(report, "model.language_model.layers.1", rows)


def test_ncu_csv_rows_in_launch_order_with_hardware_flops(ncu_layer):
    d, rows, _ = ncu_layer
    import csv
    import io

    table = list(csv.reader(io.StringIO(d["ncu_csv"][d["ncu_csv"].index('"ID"'):])))
    launches = {r[0] for r in table[2:] if r and r[0].isdigit()}  # a header row, a units row, then one row per metric
    assert len(rows) == len(launches) == 148  # every launch ncu replayed inside the first MoE layer
    gemm = next(r for r in rows if r["kernel"].startswith("nvjet_sm90_tst_128x88"))
    assert gemm["tensor_flops"] > 0 and gemm["cuda_core_flops"] == 0
    router = next(r for r in rows if r["kernel"].startswith("sm80_xmma_gemm_f32f32"))
    assert router["tensor_flops"] == 0 and router["cuda_core_flops"] > 0  # the fp32 router GEMM runs on CUDA cores
    # the grouped GEMMs of this MoE layer in the prefill, by hand: 1126 prompt tokens (BOS, 256 + 6 x 144 + 1 image
    # tokens for a 2x3 grid, 4 text tokens) x top-6 rows, gate+up (1280 -> 2 x 896) and down (896 -> 1280)
    grouped = sum(n["flops_full"] for n in d["nodes"] if n["op"] == "aten::_grouped_mm" and n["stage"] == "prefill")
    assert grouped == (1 + 256 + 6 * 144 + 1 + 4) * 6 * 2 * 3 * 1280 * 896
    assert d["prefill_grouped_mm_flops"] == 11 * grouped  # the README's number: 11 MoE layers


def test_ncu_join_shows_padding_and_causal_tiles(ncu_layer):
    _, _, joined = ncu_layer
    def by(prefix):
        (k,) = [k for k in joined["kernels"] if k["kernel"].startswith(prefix)]
        return k
    assert joined["paired"] == 147 and joined["profiled"] == 148
    # each kernel's hardware FLOPs are its launches' metric values in ncu's CSV, read here with the csv module:
    # for every kernel name whose launches were all paired, the sums agree exactly
    import csv
    import io

    d, _, _ = ncu_layer
    table = list(csv.reader(io.StringIO(d["ncu_csv"][d["ncu_csv"].index('"ID"'):])))
    head = table[0]
    tensor = [i for i, m in enumerate(head) if m.startswith("sm__ops_path_tensor_src_") and m.endswith(".sum")]
    launches: Counter = Counter()
    flops: Counter = Counter()
    for r in table[2:]:  # a header row and a units row, then one row per launch
        if r and r[0].isdigit():
            name = r[head.index("Kernel Name")]
            launches[name] += 1
            flops[name] += sum(int(float(r[i].replace(",", "") or 0)) for i in tensor)
    # 147 of the 148 launches are paired; the one left over carries no tensor-core FLOPs (below), so the totals agree
    assert sum(k["tensor_flops"] for k in joined["kernels"]) == sum(flops.values())
    assert sum(k["launches"] for k in joined["kernels"]) == sum(launches.values()) - 1
    # dense formula vs causal flash attention: the hardware skips the masked tiles but runs the diagonal ones whole
    assert 0.5 < by("cudnn_generated_fort_native_sdpa_sm90_")["ratio"] < 0.6
    # one decode query row against the whole cache: a 16-row tile for 1 row
    assert by("cudnn_generated_fort_native_sdpa_sm80_")["ratio"] > 10
    # a decode GEMM of one token row runs a 64-row tile: 64x the formula
    assert by("nvjet_sm90_tst_16x64_64x16_4x1_v_bz_T")["ratio"] == 64.0
    # the grouped GEMM pads every expert's rows to its tile: more hardware than formula FLOPs
    assert by("_ZN7cutlass13device_kernelIN2at4cuda6")["ratio"] > 1.2
    # a prefill GEMM with rows near a tile multiple: within a few percent of the formula
    assert by("nvjet_sm90_tst_128x88_64x7_2x1_v_bz_T")["ratio"] == pytest.approx(1.0, abs=0.02)


def test_ncu_child_command_line_drops_ncu_graph_and_out():
    from tracer.cuda.ncu import _strip

    argv = ["--device", "cuda", "--ncu", "model.layers.1", "--graph=onnx", "--out", "x", "--quiet"]
    assert _strip(_strip(_strip(argv, "--ncu"), "--graph"), "--out") == ["--device", "cuda", "--quiet"]


@pytest.mark.v2
def test_a_real_cpu_profile_drives_the_attribution_end_to_end(tiny_v2_config):
    """torch.profiler on this CPU, live (no recording): flopdiff's op and module ranges come back in the profiler's
    own event tree, each aten op's self time stands for a kernel, and the attribution puts all of it on nodes and
    named layers, with every node's FLOPs on exactly one record (what runs on a GPU, minus the GPU)."""
    from tracer.count.counter import count_graph
    from tracer.compare.analytic import map_report
    from tracer.compare.diff import with_diff
    from tracer.cuda.kernels import attribute_kernels
    from tracer.count.records import build_report
    from tracer.capture.trace import trace
    from tracer.core.workload import Workload

    tr = trace(Workload(image_wh=(1000, 800), text_tokens=3, decode_steps=2), config_path=tiny_v2_config,
               mode="real", instrument=ProfilerRanges())
    for sg in tr.graphs():
        if sg.selection is None:
            count_graph(sg)
    report = build_report(tr)
    an = analytic_of_report(report, "aligned", config=tiny_v2_config)
    mapping = map_report(report, an, None)
    report = with_diff(report, an, mapping)
    report = {**report, **attribute_kernels(tr, report, mapping.matcher)}
    records = report["kernel_records"]
    ids = {n["id"] for n in report["nodes"]}
    assert records and all(r["node"] in ids for r in records if r["node"] is not None)
    flop_nodes = {n["id"] for n in report["nodes"] if n["flops_full"] and n["stage"] != "vision"}
    assert flop_nodes <= {r["node"] for r in records}  # every FLOP node's op ran inside its own range
    total = sum(r["us"] for r in records)
    assert report["kernel_time"]["total_us"] == pytest.approx(total)
    assert sum(r["time_us"] for r in report["kernel_layers"]) == pytest.approx(total)
    assert [r for r in report["kernel_layers"] if r["layer"].startswith("(module")] == []
    stages = {s["name"]: s for s in report["stages"]}
    assert sum(k["flops_full"] for k in report["kernels"]) == stages["prefill"]["flops_full"] + stages["decode"]["flops_full"]
    layers = {r["layer"] for r in report["kernel_layers"]}
    assert {"decoder.layers.1.mlp.experts", "decoder.layers.0.attn", "vision.global.sam.blocks.1.attn", "lm_head"} <= layers
    grouped = [k for k in report["kernels"] if k["kernel"] == "aten::_grouped_mm"]
    assert grouped and grouped[0]["counted_by_flopcountermode"] == "no"


def test_raw_event_records_equal_torch_s_own_event_tree_on_a_live_profile():
    """The records read from the raw event stream against torch's FunctionEvent tree over the same profile (the
    reference: `cpu_parent` for the ranges around an event, `self_cpu_time_total` for its own time), on this CPU:
    a small model under the recorder with ProfilerRanges, nested modules and decomposed ops included."""
    import torch

    from tracer.capture.recorder import capture
    from tracer.capture.instruments import cpu_records

    kept = {}

    class Keep(ProfilerRanges):
        def session(self):
            from contextlib import contextmanager

            @contextmanager
            def around():
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    yield
                kept["prof"] = prof
                self._events = prof.profiler.kineto_results.events()
            return around()

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)))
    x = torch.randn(4, 16)
    with torch.no_grad():
        sg, _ = capture(lambda: model(x).softmax(-1), model, "prefill", instrument=Keep())

    def ranges(e):
        op = module = None
        while e is not None:
            if op is None and e.name.startswith(OP_RANGE):
                op = int(e.name[len(OP_RANGE):])
            elif module is None and e.name.startswith(MODULE_RANGE):
                module = e.name[len(MODULE_RANGE):]
            e = e.cpu_parent
        return op, module

    tree = [(e.name, e.self_cpu_time_total, *ranges(e)) for e in kept["prof"].events() if e.name.startswith("aten::")]
    raw = [(r["kernel"], r["us"], r["op"], r["module"]) for r in cpu_records(kept["prof"].profiler.kineto_results.events())]
    assert [(n, op, m) for n, _, op, m in raw] == [(n, op, m) for n, _, op, m in tree]
    assert [us for _, us, _, _ in raw] == pytest.approx([us for _, us, _, _ in tree], abs=1e-3)
    assert {m for *_, m in raw} >= {"0", "2.0", "2.1"} and len({op for _, _, op, _ in raw if op is not None}) >= 5
    if not torch.cuda.is_available():  # the instrument's own records (on a GPU it records kernels instead)
        assert sg.kernels == cpu_records(kept["prof"].profiler.kineto_results.events())
