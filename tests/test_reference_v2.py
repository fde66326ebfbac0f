"""Full-size DeepSeek-OCR-2 (published config, fake weights) against shared/reference/deepseek-ocr-2."""

import json

import pytest

from tracer.count.counter import count_graph, totals
from tracer.capture.trace import trace
from tracer.core.workload import Workload

pytestmark = pytest.mark.v2


@pytest.fixture(scope="module")
def page_640(shared_reference):
    ref = json.loads((shared_reference / "deepseek-ocr-2" / "flops-reference.json").read_text())["workloads"]["640x640"]
    tr = trace(Workload(image_wh=(640, 640), text_tokens=4, decode_steps=1))
    for g in tr.graphs():
        count_graph(g)
    return tr, ref


def test_prefill_640_matches_reference(page_640):
    tr, ref = page_640
    t = totals(tr.stages["prefill"])
    assert tr.prepared.derived.prompt_len == ref["tokens"] == 262
    assert tr.prepared.derived.image_tokens == ref["image_tokens"] == 257
    assert t.flops_full == ref["prefill"]["flops"] == 1_584_821_092_352
    assert t.flops_torch == ref["prefill"]["flops_torch_registry_only"] == 1_209_302_712_320


def test_prefill_640_by_op(page_640):
    tr, ref = page_640
    by_op = {}
    for n in tr.stages["prefill"][0].op_nodes():
        if n.meta["flops_full"]:
            key = "aten." + n.meta["op"].split("::")[1]
            by_op[key] = by_op.get(key, 0) + n.meta["flops_full"]
    assert by_op == ref["prefill"]["by_op"]


def test_first_decode_step_matches_reference(page_640):
    tr, ref = page_640
    (step,) = tr.stages["decode"]
    t = totals([step])
    assert step.kv_len == 262
    assert t.flops_full == ref["decode_step_kv262"]["flops"] == 1_164_349_440
    assert t.flops_torch == ref["decode_step_kv262"]["flops_torch_registry_only"] == 694_026_240


def test_vision_640_per_module(page_640):
    tr, ref = page_640
    parts = {"sam": "model.vision_tower.sam_encoder", "encoder": "model.vision_tower.vision_encoder",
             "projector": "model.multi_modal_projector"}
    got = {k: sum(n.meta["flops_full"] for n in tr.stages["vision"][0].op_nodes() if p in n.meta["nn_module_stack"])
           for k, p in parts.items()}
    assert got == {k: ref["vision"][k] for k in parts}
    assert totals(tr.stages["vision"]).flops_full == sum(got.values())
