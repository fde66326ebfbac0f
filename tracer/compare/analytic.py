"""The run's analytic model beside its trace: the preset's tree and the vendor-exact (aligned) one for the workload
the vendor preprocessing derived, evaluated under the run's policy, and the mapping of the report's nodes onto its
layers (the mapping table checked against every layer id the model can have)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from analytic.api import build, counting_policy, evaluate_tree
from analytic.layers import Policy
from analytic.request import ModelTree, Shape
from mapping.engine import Mapping, map_nodes
from mapping.table import check_layers, load_table
from tracer.core.errors import FlopdiffError
from tracer.core.models import FAMILIES, family_of, is_hf, model_type


@dataclass
class Analytic:
    """The preset's tree and the vendor-exact (aligned) tree whose layer ids the mapping must name; `doc` evaluated
    under `policy`: full (compared with the traced full count) or torch (with what FlopCounterMode counts)."""

    preset: str
    shape: Shape
    tree: ModelTree
    aligned: ModelTree
    doc: dict[str, Any]
    config: str | None = None
    causal_halving: bool = False
    policy: str = "full"
    attention: dict[str, str] | None = None
    device: str = "cpu"

    def counting(self) -> Policy:
        """The analytic counting policy `doc` was evaluated under."""
        return counting_policy(self.policy, device=self.device, causal_halving=self.causal_halving)

    @property
    def measured(self) -> str:
        """The node count the analytic one is compared with."""
        return "flops_torch" if self.policy == "torch" else "flops_full"


def report_shape(workload: dict[str, Any]) -> Shape:
    """The analytic model's view of a report's `workload` (what the vendor preprocessing derived)."""
    w = workload
    text = w["prompt_len"] - 1 - w["image_tokens"]  # BOS + image tokens + text, as the vendor lays them out
    return Shape(w["image_wh"][0], w["image_wh"][1], w["base_size"], w["tile_size"], w["crop_mode"], text,
                 w["decode_steps"])


def analytic_for(model: str, shape: Shape, preset: str, causal_halving: bool = False, config: str | None = None,
                 image_tokens: int | None = None, policy_name: str = "full", device: str = "cpu",
                 attention: dict[str, str] | None = None) -> Analytic:
    """The preset's analytic model for a workload; `image_tokens`: what the vendor preprocessing made, which the
    analytic tiling must reproduce (checked); `policy_name` and `device`: what it counts (policy torch: what
    FlopCounterMode counts on that device); `attention`: the implementations the run used (Vendor.attention)."""
    aligned = build(model, shape, "aligned", config, attention)
    counting = counting_policy(policy_name, device=device, causal_halving=causal_halving)
    tree = aligned if preset == "aligned" else build(model, shape, preset, config, attention, policy=counting)
    if image_tokens is not None and aligned.views.image_tokens != image_tokens:
        raise FlopdiffError(f"analytic model of {model}: {aligned.views.image_tokens} image tokens for "
                            f"{shape.width}x{shape.height}, the vendor preprocessing made {image_tokens}; the "
                            f"analytic tiling needs fixing (please report)")
    doc = evaluate_tree(tree, shape, counting)
    return Analytic(preset, shape, tree, aligned, doc, config, causal_halving, policy_name, attention, device)


def analytic_of_report(report: dict[str, Any], preset: str, causal_halving: bool = False,
                config: str | None = None, policy_name: str = "full") -> Analytic:
    """analytic_for a report document's model, workload, device and attention (recorded reports, the tests)."""
    return analytic_for(report["model"], report_shape(report["workload"]), preset, causal_halving, config,
                        report["workload"]["image_tokens"], policy_name, report.get("options", {}).get("device", "cpu"),
                        report.get("analytic", {}).get("attention"))


def catalogue(tree: ModelTree) -> dict[str, set[str]]:
    """Per stage, every layer id of the tree: leaves and the blocks that hold them (scopes name blocks)."""
    def ids(layer) -> Iterator[str]:
        yield layer.id
        for child in getattr(layer, "children", ()):
            yield from ids(child)

    return {stage: {i for b in blocks for i in ids(b)} for stage, blocks in tree.stages.items()}


def present_views(report: dict[str, Any]) -> set[str]:
    return {"global", "tiles"} if report["workload"]["views"] > 1 else {"global"}


def map_report(report: dict[str, Any], an: Analytic, table: str | None = None) -> Mapping:
    tab = load_table(table or report["model"])
    if tab.model != report["model"]:
        raise FlopdiffError(f"mapping table {tab.source} is for {tab.model}, not {report['model']}")
    # the vendor-exact model's layer ids, and a plug-in model's own (a user's table points nodes at them)
    own = catalogue(an.tree)
    cat = {stage: ids | own.get(stage, set()) for stage, ids in catalogue(an.aligned).items()}
    # tile layers must validate even on a page without tiles, and the layers of another attention implementation
    # (eager's causal mask, SDPA's layout copies) under any: check against a tiled workload with the run's attention,
    # eager's and the default's
    tiled = Shape(1000, 1400, an.shape.base_size, an.shape.tile_size, True, 1, 1)
    every = [catalogue(build(report["model"], tiled, config=an.config, attention=attention))
             for attention in (an.attention, {"decoder": "eager", "vision": "eager"}, None)]
    tab = check_layers(tab, set().union(*cat.values(), *(ids for c in every for ids in c.values())))
    mapping = map_nodes(tab, report["nodes"], present_views(report), cat)
    if is_hf(report["model"]) and family_of(model_type(report["model"])) is None:  # say why, not "no rule"
        kinds = ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
        mapping.unmapped = {nid: f"{report['model']}: no analytic family describes this model type (the families: "
                                 f"{kinds}; analytic/families.py)" for nid in mapping.unmapped}
    return mapping
