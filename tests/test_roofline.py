"""The roofline and the hardware counters of real CUDA runs, replayed on CPU: recordings flopdiff made on the lent
H100 SXM (tests/data/cuda/roofline-*-h100, ncu-v2-default-layers1-h100; benchmarks/gpu_roofline.sh and
benchmarks/roofline_recording.py): DeepSeek-OCR's 1000x1400 page (9 text tokens) and DeepSeek-OCR-2's default page
(1000x1400, 4 text tokens), real mode, random bf16 weights, 10 decode steps, the card's ceilings measured in the run;
Nsight Compute on v2's model.language_model.layers.1 (1 decode step). Every number below is recomputed here from the
recorded counts (kernel times and start times, the layers' columns, ncu's CSV), by hand where it says so."""

import csv
import gzip
import io
import json
from collections import defaultdict
from pathlib import Path

import pytest

from tracer.cuda.ceilings import DATASHEETS, ceilings
from tracer.cuda.ncu import join, parse_csv
from tracer.cuda.roofline import roofline

DATA = Path(__file__).resolve().parent / "data" / "cuda"
RECORDINGS = {"v1": "roofline-v1-page-h100.json.gz", "v2": "roofline-v2-default-h100.json.gz"}


@pytest.fixture(scope="module", params=sorted(RECORDINGS))
def run(request):
    return json.loads(gzip.open(DATA / RECORDINGS[request.param]).read())


@pytest.fixture(scope="module")
def ncu_run():
    return json.loads(gzip.open(DATA / "ncu-v2-default-layers1-h100.json.gz").read())


def test_the_recorded_roofline_is_what_the_report_arithmetic_gives(run):
    """roofline() on the recorded counts gives the section the run wrote, and every kernel microsecond is in a
    layer row (kernel time 100% attributed)."""
    assert roofline(run, run["kernel_records"]) == run["roofline"]
    total = sum(r["us"] for r in run["kernel_records"])
    assert sum(k["time_us"] for k in run["kernel_layers"]) == pytest.approx(total, abs=1e-3)
    assert run["kernel_time"]["attributed_pct"] == 100.0 and run["kernel_time"]["outside_model_us"] == 0


def test_measured_ceilings_are_used_and_the_datasheet_kept_beside(run):
    """The run measured the card (a bf16 GEMM, an fp32 SGEMM, a copy, tiny launches) and the roofline uses those:
    below the H100 SXM datasheet's 989.5 / 67 TFLOP/s and 3,350 GB/s, as a real card is."""
    c = run["roofline"]["ceilings"]
    m = run["device"]["measured_ceilings"]
    assert c["used"] == "measured" and c["name"] == "NVIDIA H100 80GB HBM3"
    assert (c["bf16_tflops"], c["fp32_tflops"], c["hbm_gbps"], c["launch_us"]) == \
        (m["bf16_tflops"], m["fp32_tflops"], m["hbm_gbps"], m["launch_us"])
    assert c["datasheet"] == DATASHEETS["NVIDIA H100 80GB HBM3"]
    assert 700 < m["bf16_tflops"] < 989.5 and 40 < m["fp32_tflops"] < 67 and 2500 < m["hbm_gbps"] < 3350
    assert 1 < m["launch_us"] < 50 and set(m["how"]) == {"bf16_tflops", "fp32_tflops", "hbm_gbps", "launch_us"}
    without = ceilings({"name": run["device"]["name"]})  # the same card, not measured: the datasheet
    assert without["used"] == "datasheet" and without["bf16_tflops"] == 989.5 and without["launch_us"] is None


def test_layer_bound_efficiency_and_lost_time_by_hand(run):
    """The five layers that lose the most: bound = max(tensor-core FLOPs / bf16 peak, CUDA-core FLOPs / fp32 peak,
    fused bytes / bandwidth) from the recorded columns; efficiency = bound / kernel time; lost = the difference."""
    c = run["roofline"]["ceilings"]
    layers = {(r["stage"], r["id"]): r for r in run["layers"]}
    time = {(k["stage"], k["layer"]): k["time_us"] for k in run["kernel_layers"]}
    for row in run["roofline"]["layers"][:5]:
        lay = layers[(row["stage"], row["layer"])]
        us = {"tensor": lay["flops_full"] / (c["bf16_tflops"] * 1e12) * 1e6,
              "cuda-core": lay["cuda_flops"] / (c["fp32_tflops"] * 1e12) * 1e6,
              "memory": lay["io_fused"] / (c["hbm_gbps"] * 1e9) * 1e6}
        roof = max(us, key=us.get)
        assert row["roof"] == roof and row["bound_us"]["traced"] == pytest.approx(us[roof], abs=1e-3)
        assert row["time_us"] == pytest.approx(time[(row["stage"], row["layer"])], abs=1e-3)
        assert row["efficiency"] == pytest.approx(us[roof] / row["time_us"], abs=1e-4)
        assert row["lost_us"] == pytest.approx(row["time_us"] - us[roof], abs=1e-3)
    lost = [r["lost_us"] for r in run["roofline"]["layers"]]
    assert lost == sorted(lost, reverse=True)


def test_decode_steps_are_launch_bound_by_hand(run):
    """Each decode step by hand from its kernel records: kernel time, launches, the span of the device times from
    the first start to the last end, the time no kernel ran, and the launch floor = launches x the measured host
    time per launch. On both models a decode step's launches take longer on the host than its kernels on the GPU
    (v1: 1,267 launches per step, v2: 867): launch-bound, whatever the kernels' efficiency."""
    c = run["roofline"]["ceilings"]
    steps = defaultdict(list)
    for r in run["kernel_records"]:
        if r["stage"] == "decode":
            steps[r["step"]].append(r)
    assert [s["step"] for s in run["roofline"]["steps"]] == sorted(steps) == list(range(10))
    for s in run["roofline"]["steps"]:
        mine = steps[s["step"]]
        busy = sum(r["us"] for r in mine)
        first, last = min(r["start_us"] for r in mine), max(r["start_us"] + r["us"] for r in mine)
        covered, reach = 0.0, first
        for r in sorted(mine, key=lambda r: r["start_us"]):
            end = r["start_us"] + r["us"]
            covered += max(0.0, end - max(r["start_us"], reach))
            reach = max(reach, end)
        assert (s["launches"], s["time_us"]) == (len(mine), pytest.approx(busy, abs=1e-3))
        assert s["span_us"] == pytest.approx(last - first, abs=1e-3)
        assert s["idle_us"] == pytest.approx(last - first - covered, abs=1e-3)
        assert s["launch_floor_us"] == pytest.approx(len(mine) * c["launch_us"], abs=1e-3)
        assert s["limit"] == "launch-bound" and s["launch_floor_us"] > s["time_us"]
        assert s["efficiency"] == pytest.approx(s["bound_us"] / s["time_us"], abs=1e-4) and s["efficiency"] < 0.25
    assert {len(v) for v in steps.values()} == {1267 if run["model"] == "deepseek-ocr" else 867}
    prefill = next(s for s in run["roofline"]["stages"] if s["stage"] == "prefill")
    assert prefill["limit"] == "kernel-bound"  # the prefill's big kernels keep ahead of the host


def test_ncu_join_replays_from_the_csv(ncu_run):
    """The recorded ncu section is what parse_csv + join give on the recorded CSV and kernel records, and each
    counter is read in base units (`--print-units base`: bytes and nanoseconds)."""
    rows = parse_csv(ncu_run["ncu_csv"])
    assert join(ncu_run, "model.language_model.layers.1", rows) == ncu_run["ncu"]
    table = list(csv.reader(io.StringIO(ncu_run["ncu_csv"][ncu_run["ncu_csv"].index('"ID"'):])))
    head, units = table[0], table[1]
    assert [units[head.index(m)] for m in ("dram__bytes_read.sum", "lts__t_bytes.sum", "gpu__time_duration.sum")] \
        == ["byte", "byte", "ns"]
    launches = [r for r in table[2:] if r and r[0].isdigit()]
    assert len(rows) == len(launches) == 148
    for row, raw in zip(rows, launches):  # by hand, from the CSV's own columns
        value = lambda m: float(raw[head.index(m)].replace(",", "") or 0)  # noqa: E731
        assert row["dram_read_bytes"] == int(value("dram__bytes_read.sum"))
        assert row["duration_ns"] == int(value("gpu__time_duration.sum"))
        fp32 = sum(w * value(f"smsp__sass_thread_inst_executed_op_{op}_pred_on.sum")
                   for op, w in (("ffma", 2), ("fadd", 1), ("fmul", 1)))
        assert row["cuda_core_flops"] == int(fp32)


def test_ncu_bytes_per_layer_against_the_trace_and_the_model(ncu_run):
    """Per layer inside the decoder layer, hardware against model. Decode projections read their weights once:
    DRAM bytes within 1% of the fused I/O (and of the analytic model's). The prefill's RMSNorms run unfused in
    eager mode (float32 temporaries reach memory): over 4x the fused bytes, near the unfused. The fp32 router
    GEMM (mlp.gate) is a GEMM in the model but runs on the CUDA cores: hundreds of times the CUDA-core FLOPs the
    trace gives it."""
    layers = {(r["stage"], r["layer"]): r for r in ncu_run["ncu"]["layers"]}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        r = layers[("decode", f"decoder.layers.1.{proj}")]
        assert r["complete"] and r["dram_vs_fused"] == pytest.approx(1.0, abs=0.01)
        assert r["dram_vs_analytic"] == pytest.approx(1.0, abs=0.01)
    norm = layers[("prefill", "decoder.layers.1.input_layernorm")]
    assert norm["dram_vs_fused"] > 4 and 0.4 < norm["dram_vs_unfused"] < 1.2
    assert layers[("decode", "decoder.layers.1.mlp.gate")]["cuda_core_vs_traced"] > 100
    # a layer ncu saw only part of (the run under ncu launched another kernel there) gets no ratio, never a guess
    experts = layers[("prefill", "decoder.layers.1.mlp.experts")]
    assert not experts["complete"] and experts["dram_vs_fused"] is None
    for r in layers.values():  # the sums by hand: the layer's paired launches' counters
        assert r["dram_bytes"] >= 0 and r["paired"] <= r["launches"]


def test_ncu_counters_printed_in_scaled_units_are_read_in_base_units():
    """A CSV from `ncu` without `--print-units base` scales its units per column (Kbyte, usecond): read back in
    bytes and nanoseconds; a metric the CSV lacks is None, never 0."""
    text = ('"ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum"\n'
            '"","","Kbyte","Mbyte","usecond"\n'
            '"0","gemm","1.5","2","3.25"\n')
    (row,) = parse_csv(text)
    assert (row["dram_read_bytes"], row["dram_write_bytes"], row["duration_ns"]) == (1500, 2_000_000, 3250)
    assert row["l2_bytes"] is None and row["tensor_flops"] == 0


def test_measured_ceilings_are_cached_per_card_and_driver(tmp_path, monkeypatch):
    """The measurement runs once per card, driver and torch version; `use_cache=False` measures again and keeps
    nothing (the folder is the trace cache's)."""
    from tracer.cuda import ceilings as mod

    calls = []
    monkeypatch.setenv("FLOPDIFF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mod, "measure", lambda: calls.append(1) or {"bf16_tflops": 800.0, "fp32_tflops": 50.0,
                                                                   "hbm_gbps": 3000.0, "launch_us": 6.0})
    first = mod.measured("NVIDIA H100 80GB HBM3", "580.1", use_cache=True)
    again = mod.measured("NVIDIA H100 80GB HBM3", "580.1", use_cache=True)
    other = mod.measured("NVIDIA H100 80GB HBM3", "590.0", use_cache=True)  # another driver: measured again
    assert (first["cached"], again["cached"], other["cached"], len(calls)) == (False, True, False, 2)
    assert again["bf16_tflops"] == 800.0 and again["driver"] == "580.1"
    files = sorted(p.name for p in (tmp_path / "ceilings").iterdir())
    assert len(files) == 2 and all(f.endswith(".json") for f in files)  # no temporary file left
    off = mod.measured("NVIDIA H100 80GB HBM3", "580.1", use_cache=False)
    assert off["cached"] is False and len(calls) == 3 and len(list((tmp_path / "ceilings").iterdir())) == 2
