"""A long decode in closed form (tracer.capture.series, analytic.series) against tracing every step: the same
stages, layers and steps in every column, every node of the span the sum of its steps, on both models at 64 steps;
the proof's reasons, one line each; a step that is not affine makes the run trace every step and say why."""

import json

import pytest
import torch

from analytic.api import build, counting_policy, evaluate_tree, shape_for
from analytic.layers import Block, Linear
from analytic.series import Steps
from tracer.capture.recorder import StageGraph
from tracer.capture.series import SUMMED, NotAffine, probe_steps, prove
from tracer.core.conventions import CLOSED_FORM_STEPS
from tracer.core.errors import FlopdiffError
from tracer.core.workload import Workload
from tracer.pipeline import Options, run
from tracer.vendors import BuildOptions

STEPS = 64
SKIPPED_STAGE_KEYS = ("coverage", "outputs", "act_peak_node", "series")  # node counts and ids: the span is one set
SKIPPED_LAYER_KEYS = ("nodes", "rules")


def _pair(workload: Workload, build_options: BuildOptions = BuildOptions(), **options) -> tuple[dict, dict]:
    """The reports in closed form and step by step, each with the run's own notes (the capture's, not the
    document's) as `run_notes`."""
    out = []
    for every_step in (False, True):
        result = run(workload, Options(build=build_options, every_step=every_step, **options))
        out.append({**result.report, "run_notes": result.notes})
    return out[0], out[1]


@pytest.fixture(scope="module", params=[pytest.param("v2", marks=pytest.mark.v2),
                                        pytest.param("v1", marks=pytest.mark.v1)])
def reports(request):
    if request.param == "v2":  # the default page (1000x1400, 4 text tokens)
        return _pair(Workload(decode_steps=STEPS))
    v1_dir = request.getfixturevalue("v1_dir")
    return _pair(Workload(model="deepseek-ocr", image_wh=(1000, 1400), text_tokens=9, decode_steps=STEPS),
                 BuildOptions(vendor_dir=v1_dir, trust_remote_code=True))


def test_closed_form_equals_every_step_in_every_column(reports):
    closed, every = reports
    assert closed["notes"] == every["notes"] and closed["run_notes"] == every["run_notes"]  # no fallback note
    decode = next(s for s in closed["stages"] if s["name"] == "decode")
    assert decode["series"][0]["steps"] == [1, STEPS - 1]
    for a, b in zip(closed["stages"], every["stages"]):
        assert {k: v for k, v in a.items() if k not in SKIPPED_STAGE_KEYS} == \
            {k: v for k, v in b.items() if k not in SKIPPED_STAGE_KEYS}
    assert len(decode["steps"]) == STEPS
    rows = lambda doc: {(r["stage"], r["id"]): {k: v for k, v in r.items() if k not in SKIPPED_LAYER_KEYS}  # noqa: E731
                        for r in doc["layers"]}
    assert rows(closed) == rows(every)
    assert closed["gap_groups_by_metric"] == every["gap_groups_by_metric"] and closed["unseen"] == every["unseen"]


def test_every_node_of_the_span_is_the_sum_of_its_steps(reports):
    """Per node of the span: each count the sum of the traced steps' (its storage records too), its shapes the last
    step's, and its affine form a + b * k giving every traced step's count; step 0's nodes as traced."""
    closed, every = reports
    by_step: dict = {}
    for n in every["nodes"]:
        if n["stage"] == "decode":
            by_step.setdefault(n["step"], {})[n["id"].rsplit("/", 1)[1]] = n
    span = [n for n in closed["nodes"] if n["id"].startswith(f"decode/1-{STEPS - 1}/")]
    assert len(span) == len(by_step[1]) and len(by_step) == STEPS
    for n in span:
        name = n["id"].rsplit("/", 1)[1]
        steps = [by_step[k][name] for k in range(1, STEPS)]
        for key in SUMMED:
            assert n[key] == sum(s[key] for s in steps), (n["id"], key)
            a, b = n["series"][key]
            assert [a + b * k for k in range(1, STEPS)] == [s[key] for s in steps], (n["id"], key)
        for key in ("reads", "writes"):
            if key in n:
                assert n[key] == [[sid, sum(s[key][j][1] for s in steps)] for j, (sid, _) in enumerate(n[key])]
        assert (n["input_shapes"], n["output_shapes"], n["op"], n["module"], n["layer"]) == \
            (steps[-1]["input_shapes"], steps[-1]["output_shapes"], steps[-1]["op"], steps[-1]["module"],
             steps[-1]["layer"])
    step0 = {n["id"]: n for n in closed["nodes"] if n["id"].startswith("decode/0/")}
    assert step0 == {n["id"]: n for n in every["nodes"] if n["id"].startswith("decode/0/")}


@pytest.mark.v2
def test_causal_halving_and_the_torch_policy_in_closed_form(tiny_v2_config):
    """The counting convention (causal halving) and the analytic policy (torch: what FlopCounterMode counts) both
    hold through the closed form, on the reduced config, with no decode worker (steps 1 and 2 from the real cache
    here, the later probes from synthesized ones)."""
    closed, every = _pair(Workload(image_wh=(640, 640), text_tokens=3, decode_steps=40), config=tiny_v2_config,
                          causal_halving=True, policy="torch", sequential=True)  # the probes captured here
    assert closed["analytic"]["policy"] == "torch" and closed["analytic"]["causal_halving"] is True
    for a, b in zip(closed["stages"], every["stages"]):
        assert {k: v for k, v in a.items() if k not in SKIPPED_STAGE_KEYS} == \
            {k: v for k, v in b.items() if k not in SKIPPED_STAGE_KEYS}


@pytest.mark.v2
@pytest.mark.parametrize("sequential", [False, True])  # the probes from the worker, or captured here
def test_a_step_that_is_not_affine_traces_every_step_and_says_why(tiny_v2_config, monkeypatch, sequential):
    """A decode step that also sums k^2 + 1 numbers (a fake, deliberately non-affine step): the proof fails on
    its bytes, the run traces every step, one note line says why, and the counts are the step-by-step ones."""
    from tracer.vendors import get_vendor

    cls = type(get_vendor("deepseek-ocr-2"))
    original = cls.decode

    def decode(self, model, previous, k):
        step = original(self, model, previous, k)

        def forward():
            out = step()
            torch.ones(k * k + 1).sum()
            return out
        return forward

    monkeypatch.setattr(cls, "decode", decode)
    workload = Workload(image_wh=(640, 640), text_tokens=3, decode_steps=CLOSED_FORM_STEPS)
    closed, every = _pair(workload, config=tiny_v2_config, sequential=sequential)
    (note,) = [n for n in closed["run_notes"] if "closed form" in n]
    assert note.startswith("the decode steps are not in closed form (") and note.endswith("): every step traced")
    assert "is not affine in the step" in note and "\n" not in note
    assert "series" not in closed["stages"][2] and len({n["step"] for n in closed["nodes"]
                                                        if n["stage"] == "decode"}) == CLOSED_FORM_STEPS
    assert closed["stages"] == every["stages"] and not [n for n in every["run_notes"] if "closed form" in n]


def _graph(step: int, rows: list[dict], weights: int = 100, peak: int = 10) -> StageGraph:
    for r in rows:
        r.setdefault("id", f"decode/{step}/{r.pop('name', 'mm')}")
        for key in SUMMED:
            r.setdefault(key, 0)
    return StageGraph("decode", None, step=step, kv_len=10 + step, rows=rows, kv_layers=[10 + step],
                      memory={"weight_bytes": weights, "act_peak_bytes": peak + step, "act_peak_node": "mm",
                              "outputs": [0]})


def _probes(make) -> dict[int, StageGraph]:
    return {k: make(k) for k in probe_steps(40)}


def test_the_span_by_hand():
    """Two nodes over steps 1..39: an attention-like one whose FLOPs and reads grow by 64 and 2 per step, a
    projection that stays; sums by hand (39 steps, the steps add up to 780)."""
    def make(k):
        return _graph(k, [{"name": "bmm", "op": "aten::bmm", "flops_full": 1000 + 64 * k, "bytes_read": 50 + 2 * k,
                           "reads": [[0, 50 + 2 * k]], "input_shapes": [[1, 8, 10 + k]]},
                          {"name": "mm", "op": "aten::mm", "flops_full": 512, "reads": [[1, 256]]}])
    sg = prove(_probes(make))
    bmm, mm = sg.rows
    assert bmm["id"] == "decode/1-39/bmm" and sg.span == (1, 39)
    assert bmm["flops_full"] == 39 * 1000 + 64 * 780 and bmm["series"]["flops_full"] == [1000, 64]
    assert bmm["reads"] == [[0, 39 * 50 + 2 * 780]] and bmm["input_shapes"] == [[1, 8, 49]]
    assert mm["flops_full"] == 39 * 512 and mm["reads"] == [[1, 39 * 256]]
    assert sg.memory["weight_bytes"] == 39 * 100 and sg.memory["act_peak_bytes"] == 10 + 39
    assert sg.series["kv_len"] == [10, 1] and sg.kv_layers == [49]


@pytest.mark.parametrize("make, reason", [
    (lambda k: _graph(k, [{"op": "aten::mm"}] * (2 if k < 20 else 3)),
     "the steps are not one program: step 1 runs 2 ops, step 20 3"),
    (lambda k: _graph(k, [{"op": "aten::mm" if k != 2 else "aten::bmm"}]),
     "the steps are not one program: op 0 (mm) differs in op between steps"),
    (lambda k: _graph(k, [{"op": "aten::mm", "flops_full": k * k}]),
     "mm: flops_full is not affine in the step (1, 4, 400, 1,521 at steps 1, 2, 20, 39)"),
    (lambda k: _graph(k, [{"op": "aten::mm", "input_shapes": [[k * k]]}]),
     "mm: input_shapes is not affine in the step (1, 4, 400, 1,521 at steps 1, 2, 20, 39)"),
    (lambda k: _graph(k, [{"name": "a", "op": "aten::mm", "reads": [[0, 10 * k]]},
                          {"name": "b", "op": "aten::mm", "reads": [[0, 100]]}]),
     "two ops' reads of one storage cross between the steps (ops 0 and 1)"),
    (lambda k: _graph(k, [{"op": "aten::mm"}], weights=100 + (k == 20)), "the steps read different weights"),
    (lambda k: _graph(k, [{"op": "aten::mm", "reads": [[k % 2, 8]]}]), "mm: reads: the steps touch different storages"),
])
def test_each_reason_the_closed_form_fails_is_one_line(make, reason):
    with pytest.raises(NotAffine) as exc:
        prove(_probes(make))
    assert str(exc.value) == reason and "\n" not in reason


def test_the_refusal_is_the_position_limit_in_closed_form():
    """In closed form a decode of any length is refused only past the model's positions; traced step by step, past
    the cost check (unless --allow-long), with the reason a planned closed form did not hold."""
    from tracer.capture.trace import check_size

    long = Workload(decode_steps=100_000)
    check_size(long, max_positions=1_000_000, layers=12, allow_long=False, closed_form=True)
    with pytest.raises(FlopdiffError, match="pass --allow-long"):
        check_size(long, max_positions=1_000_000, layers=12, allow_long=False)
    with pytest.raises(FlopdiffError, match=r"the decode steps are not in closed form \(x\); capturing 100000"):
        check_size(long, max_positions=1_000_000, layers=12, allow_long=False, why="the decode steps are not in "
                                                                                    "closed form (x)")
    with pytest.raises(FlopdiffError, match="exceed the model's 8192 positions"):
        check_size(long, max_positions=8192, layers=12, allow_long=False, closed_form=True)


@pytest.mark.parametrize("model", ["deepseek-ocr", "deepseek-ocr-2"])
def test_analytic_steps_in_closed_form_equal_every_step(model, monkeypatch):
    """analytic.series.Steps against a block per step: both presets, both policies, with and without causal
    halving, every stage and layer column."""
    import analytic.blocks

    shape = shape_for(model, (1000, 1400), decode_steps=STEPS)
    for preset in ("aligned", "seed-naive"):
        for policy in ("full", "torch"):
            for halving in (False, True):
                pol = counting_policy(policy, causal_halving=halving)
                monkeypatch.setattr(analytic.blocks, "CLOSED_FORM_STEPS", CLOSED_FORM_STEPS)
                tree = build(model, shape, preset)
                assert [type(b).__name__ for b in tree.stages["decode"]] == ["Block", "Steps"]
                closed = evaluate_tree(tree, shape, pol)
                monkeypatch.setattr(analytic.blocks, "CLOSED_FORM_STEPS", 10**9)
                every = build(model, shape, preset)
                assert len(every.stages["decode"]) == STEPS
                assert closed == evaluate_tree(every, shape, pol), (preset, policy, halving)


def test_analytic_steps_not_affine_are_summed_step_by_step():
    """A block whose tokens grow as k^2: not on a line, so the sum is built step by step (exact) and the layer's
    explanation says so; an affine one gives its per-step form."""
    pol = counting_policy("full")
    square = Steps("decode", build=lambda k: Block("s", children=[Linear("x", tokens=k * k, d_in=2, d_out=3)]),
                   first=1, last=9)
    (leaf,) = square.leaves()
    assert leaf.cost(pol).tc_flops == sum(2 * k * k * 2 * 3 for k in range(1, 10))
    assert "each step built: not affine" in leaf.explain(pol)
    line = Steps("decode", build=lambda k: Block("s", children=[Linear("x", tokens=k, d_in=2, d_out=3)]),
                 first=1, last=9)
    (leaf,) = line.leaves()
    assert leaf.cost(pol).tc_flops == sum(12 * k for k in range(1, 10))
    assert leaf.explain(pol).endswith(f"per step 0 + 12 * k = {sum(12 * k for k in range(1, 10)):,}")
    assert json.dumps(line.sums(pol)[1][0][0]) == "[0, 12]"
