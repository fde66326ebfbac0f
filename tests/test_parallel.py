"""The forked decode worker (tracer.capture.decode_worker): same report as capturing every step here, checked and fallen
back from when its synthesized cache or the worker itself is wrong; the graph codec round trip."""

import struct
import time
import types
from dataclasses import replace

import pytest

import tracer.capture.decode_worker as worker_module
from tracer.capture import graph_codec
from tracer.core import forking
from tracer.pipeline import Options, run
from tracer.count.records import node_record
from tracer.core.workload import Workload

WORKLOAD = Workload(image_wh=(640, 640), text_tokens=2, decode_steps=6)

needs_two_cpus = pytest.mark.skipif(not forking.available(),
                                    reason="the decode worker needs fork() and a second CPU; this machine has one")


def captured(config: str, sequential: bool = False, workload: Workload = WORKLOAD):
    """The pipeline's result (its trace's worker_steps say which steps the worker captured)."""
    return run(workload, Options(config=config, sequential=sequential))


@pytest.fixture(scope="module")
def sequential(tiny_v2_config):
    result = captured(tiny_v2_config, sequential=True)
    assert result.trace.worker_steps == []
    return result.to_json()


@needs_two_cpus
def test_worker_steps_give_the_same_report(tiny_v2_config, sequential, worker_claims_first, capsys):
    result = captured(tiny_v2_config)
    steps = result.trace.worker_steps
    assert steps and steps == list(range(6 - len(steps), 6))
    # step 0 reads the prefill's own cache: captured here, unless the worker took every step and its step 0 read
    # exactly that cache (DecodeWorker.step0_taken; a loaded machine lets it get there first)
    assert 0 not in steps or steps == list(range(6))
    assert result.to_json() == sequential
    assert result.notes == [] and capsys.readouterr().err == ""


@needs_two_cpus
def test_steps_arrive_as_rows_that_share_their_repeated_values(tiny_v2_config, worker_claims_first):
    """Every step captured with the worker is rows once it arrives (this process's own steps too, not graphs kept
    until the end), and the values steps repeat are one object (tracer.count.records.Shared: a 4,000-step v2 decode
    traced step by step held 3 MB of rows a step, half of it repeats); node ids and what the KV length changes stay
    each step's own."""
    result = captured(tiny_v2_config)
    decode = result.trace.stages["decode"]
    assert all(sg.graph is None and sg.rows for sg in decode)
    worker, here = decode[-1], decode[0]  # steps 5 and 0 (the worker takes from the top, never step 0 here)
    assert worker.step in result.trace.worker_steps and here.step not in result.trace.worker_steps
    shared = grown = 0
    for a, b in zip(here.rows, worker.rows):
        assert a["id"] != b["id"] and a["source"] is b["source"] and a["module"] is b["module"]
        for key in ("input_shapes", "output_shapes", "input_dtypes", "reads"):
            if key in a:
                same = a[key] == b[key]
                assert (a[key] is b[key]) == same
                shared, grown = shared + same, grown + (not same)
    assert shared > 10 * grown > 0  # the KV cache's shapes and bytes grow: those are the step's own


ONE_STEP = Workload(image_wh=(640, 640), text_tokens=2, decode_steps=1)


@needs_two_cpus
def test_counted_where_captured_under_the_run_s_conventions(tiny_v2_config, worker_claims_first):
    """With --causal-halving, the worker's steps (sent counted) and this process's graphs (counted while it waits)
    give the sequential run's report, whose prefill the convention halved."""
    options = Options(config=tiny_v2_config, causal_halving=True)
    sequential = run(WORKLOAD, replace(options, sequential=True))
    result = run(WORKLOAD, options)
    assert result.trace.worker_steps
    assert result.trace.stages["prefill"][0].rows is not None  # counted while waiting for the worker
    assert result.to_json() == sequential.to_json()
    plain = run(WORKLOAD, Options(config=tiny_v2_config, sequential=True))
    assert sequential.report["stages"][1]["flops_full"] < plain.report["stages"][1]["flops_full"]


@needs_two_cpus
def test_the_worker_takes_step_0_when_the_prefill_leaves_the_cache_it_synthesized(tiny_v2_config, worker_claims_first,
                                                                                   capsys):
    """DeepSeek-OCR-2's prefill leaves its KV cache in the layout the worker synthesizes: one decode step (the
    default workload) is captured beside the prefill, and the report is the sequential one."""
    sequential = captured(tiny_v2_config, sequential=True, workload=ONE_STEP)
    result = captured(tiny_v2_config, workload=ONE_STEP)
    assert result.trace.worker_steps == [0]
    assert result.to_json() == sequential.to_json()
    assert result.notes == [] and capsys.readouterr().err == ""


@needs_two_cpus
def test_a_step_0_that_read_another_cache_is_captured_here_quietly(tiny_v2_config, monkeypatch, capsys):
    """A prefill cache in another layout than the synthesized one (DeepSeek-OCR v1's: another stride order): the
    worker's step 0 is dropped and captured here, its later steps are kept once the real step 0 checks them; a
    layout is no fault, so nothing is printed."""
    workload = Workload(image_wh=(640, 640), text_tokens=2, decode_steps=2)
    sequential = captured(tiny_v2_config, sequential=True, workload=workload)
    original_low, original_taken = worker_module._Claims.low, worker_module.DecodeWorker.step0_taken

    def low(self):  # this process claims only once the worker has claimed every step, step 0 included
        deadline = time.monotonic() + 120
        while struct.unpack("ii", self._mem[:])[1] >= 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        return original_low(self)

    asked = []

    def prefill_elsewhere(self, prefill, model):  # a prefill cache whose signature is not the synthesized one
        asked.append(prefill)
        return original_taken(self, types.SimpleNamespace(cache=None, past_key_values=None), model)
    monkeypatch.setattr(worker_module._Claims, "low", low)
    monkeypatch.setattr(worker_module.DecodeWorker, "step0_taken", prefill_elsewhere)
    result = captured(tiny_v2_config, workload=workload)
    assert len(asked) == 1  # the worker had taken step 0
    assert result.trace.worker_steps == [1]
    assert result.to_json() == sequential.to_json()
    assert result.notes == [] and capsys.readouterr().err == ""  # a layout is no fault: no note


@needs_two_cpus
def test_wrong_synthesized_cache_is_caught(tiny_v2_config, sequential, worker_claims_first, monkeypatch, capsys):
    original = worker_module.synthesized_state
    monkeypatch.setattr(worker_module, "synthesized_state", lambda template, kv_len: original(template, kv_len + 1))
    result = captured(tiny_v2_config)
    assert result.trace.worker_steps == []
    assert result.to_json() == sequential
    (note,) = result.notes
    assert "synthesized KV cache differs from the real one" in note and capsys.readouterr().err == ""


@needs_two_cpus
def test_failing_worker_falls_back(tiny_v2_config, sequential, worker_claims_first, monkeypatch, capsys):
    original = worker_module.to_bytes

    def to_bytes(sg):
        if sg.step == 4:
            raise RuntimeError("planted failure in step 4")
        return original(sg)
    monkeypatch.setattr(worker_module, "to_bytes", to_bytes)
    result = captured(tiny_v2_config)
    assert result.trace.worker_steps == []
    assert result.to_json() == sequential
    (note,) = result.notes
    assert "RuntimeError: planted failure in step 4" in note and capsys.readouterr().err == ""


def test_codec_round_trip(tiny_v2_config):
    from tracer.count.counter import count_graph
    from tracer.capture.trace import trace

    tr = trace(Workload(image_wh=(640, 640), text_tokens=2, decode_steps=1), config_path=tiny_v2_config)
    for sg in tr.stages["prefill"] + tr.stages["decode"]:
        back = graph_codec.from_bytes(graph_codec.to_bytes(sg))
        count_graph(sg)
        count_graph(back)
        assert (back.stage, back.step, back.kv_len) == (sg.stage, sg.step, sg.kv_len)
        assert [n.name for n in back.graph.nodes] == [n.name for n in sg.graph.nodes]
        assert [n.target for n in back.graph.nodes] == [n.target for n in sg.graph.nodes]
        assert [node_record(back, n) for n in back.op_nodes()] == [node_record(sg, n) for n in sg.op_nodes()]
        assert sum(n.meta["flops_full"] for n in back.op_nodes()) == sum(n.meta["flops_full"] for n in sg.op_nodes()) > 0


@needs_two_cpus
def test_forked_job_runs_once_in_a_child_and_again_here_only_if_it_failed(tmp_path):
    import os

    log, here = tmp_path / "runs", os.getpid()

    def job(fail_in_child):
        with open(log, "a") as f:
            f.write("child\n" if os.getpid() != here else "here\n")
        if fail_in_child and os.getpid() != here:
            raise RuntimeError("planted")

    forking.forked(lambda: job(False))()
    assert log.read_text() == "child\n"
    log.unlink()
    forking.forked(lambda: job(True))()
    assert log.read_text() == "child\nhere\n"
