"""The forked decode worker (tracer.decode_worker): same report as capturing every step here, checked and fallen
back from when its synthesized cache or the worker itself is wrong; the graph codec round trip."""

import pytest

import tracer.decode_worker as worker_module
from tracer import forking, graph_codec
from tracer.pipeline import Options, run
from tracer.report import node_record
from tracer.workload import Workload

WORKLOAD = Workload(image_wh=(640, 640), text_tokens=2, decode_steps=6)

needs_two_cpus = pytest.mark.skipif(not forking.available(),
                                    reason="the decode worker needs fork() and a second CPU; this machine has one")


def captured(config: str, sequential: bool = False):
    """The pipeline's result (its trace's worker_steps say which steps the worker captured)."""
    return run(WORKLOAD, Options(config=config, sequential=sequential))


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
    assert 0 not in steps  # step 0 reads the prefill's own cache: always captured here
    assert result.to_json() == sequential
    assert "decode worker" not in capsys.readouterr().err


@needs_two_cpus
def test_wrong_synthesized_cache_is_caught(tiny_v2_config, sequential, worker_claims_first, monkeypatch, capsys):
    original = worker_module.synthesized_state
    monkeypatch.setattr(worker_module, "synthesized_state", lambda template, kv_len: original(template, kv_len + 1))
    result = captured(tiny_v2_config)
    assert result.trace.worker_steps == []
    assert result.to_json() == sequential
    err = capsys.readouterr().err
    assert "synthesized KV cache differs from the real one" in err and len(err.strip().splitlines()) == 1


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
    assert "RuntimeError: planted failure in step 4" in capsys.readouterr().err


def test_codec_round_trip(tiny_v2_config):
    from tracer.count import count_graph
    from tracer.trace import trace

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
