"""The README's Python API example runs as written (DeepSeek-OCR-2, published config, fake weights), and the typed
result agrees with the document it wraps."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from tracer.result import Node

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.v2
def test_readme_python_api_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    out = capsys.readouterr().out
    assert "vision" in out and "largest gap:" in out
    result = namespace["result"]
    assert [s.name for s in result.stages] == ["vision", "prefill", "decode"]
    assert [(s.name, s.flops_full, s.gap) for s in result.stages] == \
        [(s["name"], s["flops_full"], s["gap"]) for s in result.report["stages"]]
    assert len(result.layers) == len(result.report["layers"]) and result.layers[0].id == result.report["layers"][0]["id"]
    assert namespace["doc"] == result.to_json() and namespace["html"].startswith("<!DOCTYPE html>")


@pytest.mark.v2
def test_typed_views_agree_with_the_tables(tiny_v2_config):
    """gap_groups, unseen and coverage are the rows the terminal prints, typed; a seed-naive run has named groups."""
    from tracer.pipeline import Options, run
    from tracer.core.workload import Workload

    result = run(Workload(image_wh=(1000, 800), text_tokens=3, decode_steps=1),
                 Options(config=tiny_v2_config, analytic="seed-naive"))
    stages = {s.name: s for s in result.stages}
    for name, stage in stages.items():
        # prefill's groups leave out the vision layers, grouped once as vision's
        within = ("vision", "prefill") if name == "prefill" else (name,)
        assert sum(g.gap for g in result.gap_groups if g.stage in within) == stage.gap
    assert {g.reason for g in result.gap_groups} >= {"missing"}
    unseen = {(u.stage, u.op): u.flops for u in result.unseen}
    assert unseen[("prefill", "aten::_grouped_mm")] == sum(
        n["flops_full"] for n in result.records("nodes") if n["stage"] == "prefill" and n["op"] == "aten::_grouped_mm")
    for name, stage in stages.items():
        assert sum(f for (s, _), f in unseen.items() if s == name) == stage.flops_full - stage.flops_torch
    assert result.coverage.unmapped == 0 and result.coverage.mapped == result.coverage.nodes_with_flops > 0
    assert result.kernels == [] and result.ncu is None
    nodes = result.nodes  # typed: every field report.json's nodes carry, nothing dropped
    assert {f.name for f in fields(Node)} >= set().union(*(n.keys() for n in result.report["nodes"]))
    assert len(nodes) == len(result.report["nodes"])
    for name, stage in stages.items():
        assert sum(n.flops_full for n in nodes if n.stage == name) == stage.flops_full
    assert all(n.layer for n in nodes if n.flops_full and n.stage != "vision")


@pytest.mark.parametrize("analytic, policy", [("aligned", "full"), ("seed-naive", "torch")])
def test_every_row_of_a_report_is_in_the_one_schema(analytic, policy, tiny_v2_config):
    """The writers (records, compare, kernels) and the typed views (tracer.result) share tracer.core.schema: a key
    a writer adds or renames shows here, not as a silent None in a view."""
    from tracer.core.schema import drift
    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run

    result = run(Workload(image_wh=(1000, 800), text_tokens=3, decode_steps=2),
                 Options(config=tiny_v2_config, analytic=analytic, policy=policy))
    assert drift(result.report) == []
    assert all(result.report[key] for key in ("stages", "layers", "nodes", "unseen"))
    assert bool(result.report["gap_groups"]) == (analytic == "seed-naive")  # aligned: no gap, no group


def test_a_renamed_key_is_drift_and_the_view_says_which(tiny_v2_config):
    from tracer.core.schema import drift
    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run
    from tracer.result import Result

    report = run(Workload(image_wh=(640, 640), text_tokens=3, decode_steps=0),
                 Options(config=tiny_v2_config)).report
    stage = report["stages"][0]
    renamed = {**report, "stages": [{("flops_fulll" if k == "flops_full" else k): v for k, v in stage.items()}]}
    assert drift(renamed) == ["stages[0].flops_fulll: not in the schema (Stage)",
                              "stages[0]: no flops_full (Stage requires it)"]
    with pytest.raises(KeyError, match="Stage row without flops_full"):
        Result(renamed, None, None, None).stages
