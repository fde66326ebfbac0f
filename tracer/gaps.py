"""Gaps: the analytic model beside the traced counts, per stage and per analytic layer.

Inputs are the report's node records (already counted), the node -> layer mapping and the analytic model
evaluated for the same workload. gap = full - analytic (positive: the analytic model undercounts);
gap % is relative to the measured full count (100% when the analytic model misses a layer entirely).
Each layer carries why it differs: the analytic model lacks it, it has no graph node, or the formulas
disagree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from analytic.api import build, evaluate_tree, policy
from analytic.models import ModelTree, Shape
from mapping.engine import Mapping, coverage, flop_bearing, map_nodes
from mapping.table import check_layers, load_table
from tracer.errors import FlopdiffError

REASONS = {
    "missing": "not in the analytic model",
    "no_nodes": "no graph node maps to it",
    "formula": "analytic formula differs",
}


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

    @property
    def measured(self) -> str:
        """The node count the analytic one is compared with."""
        return "flops_torch" if self.policy == "torch" else "flops_full"


def shape_of(workload: dict[str, Any]) -> Shape:
    """The analytic model's view of a report's `workload` (what the vendor preprocessing derived)."""
    return _shape(workload["image_wh"], workload["base_size"], workload["tile_size"], workload["crop_mode"],
                  workload["prompt_len"], workload["image_tokens"], workload["decode_steps"])


def shape_of_trace(tr: Any) -> Shape:
    """The same from a trace: its workload and what the vendor preprocessing derived."""
    d = tr.prepared.derived
    return _shape(d.image_wh, d.base_size, d.tile_size, tr.workload.crop_mode, d.prompt_len, d.image_tokens,
                  tr.workload.decode_steps)


def _shape(image_wh, base_size: int, tile_size: int, crop_mode: bool, prompt_len: int, image_tokens: int,
           decode_steps: int) -> Shape:
    text = prompt_len - 1 - image_tokens  # BOS + image tokens + text, as the vendor lays them out
    return Shape(image_wh[0], image_wh[1], base_size, tile_size, crop_mode, text, decode_steps)


def analytic_for(model: str, shape: Shape, preset: str, causal_halving: bool = False, config: str | None = None,
                 image_tokens: int | None = None, policy_name: str = "full", device: str = "cpu",
                 attention: dict[str, str] | None = None) -> Analytic:
    """The preset's analytic model for a workload; `image_tokens`: what the vendor preprocessing made, which the
    analytic tiling must reproduce (checked); `policy_name` and `device`: what it counts (policy torch: what
    FlopCounterMode counts on that device); `attention`: the implementations the run used (Vendor.attention)."""
    aligned = build(model, shape, "aligned", config, attention)
    tree = aligned if preset == "aligned" else build(model, shape, preset, config, attention)
    if image_tokens is not None and aligned.views.image_tokens != image_tokens:
        raise FlopdiffError(f"analytic model of {model}: {aligned.views.image_tokens} image tokens for "
                            f"{shape.width}x{shape.height}, the vendor preprocessing made {image_tokens}; the "
                            f"analytic tiling needs fixing (please report)")
    doc = evaluate_tree(tree, shape, policy(policy_name, device=device, causal_halving=causal_halving))
    return Analytic(preset, shape, tree, aligned, doc, config, causal_halving, policy_name, attention)


def analytic_of(report: dict[str, Any], preset: str, causal_halving: bool = False,
                config: str | None = None, policy_name: str = "full") -> Analytic:
    """analytic_for a report document's model, workload, device and attention (recorded reports, the tests)."""
    return analytic_for(report["model"], shape_of(report["workload"]), preset, causal_halving, config,
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
    cat = catalogue(an.aligned)
    # tile layers must validate even on a page without tiles: check against a tiled workload too
    tiled = build(report["model"], Shape(1000, 1400, an.shape.base_size, an.shape.tile_size, True, 1, 1), config=an.config,
                  attention=an.attention)
    check_layers(tab, set().union(*cat.values(), *catalogue(tiled).values()))
    return map_nodes(tab, report["nodes"], present_views(report), cat)


def _pct(gap: int, full: int) -> float:
    if full:
        return 100.0 * gap / full
    return 0.0 if gap == 0 else -100.0


def _row(base: dict[str, Any], analytic: int, torch_: int, full: int, measured: str = "flops_full") -> dict[str, Any]:
    counts = {"flops_torch": torch_, "flops_full": full}
    gap = counts[measured] - analytic
    return {**base, "flops_analytic": analytic, **counts, "gap": gap, "gap_pct": round(_pct(gap, counts[measured]), 4)}


def with_diff(report: dict[str, Any], an: Analytic, mapping: Mapping) -> dict[str, Any]:
    """The report composed with its diff (the input is left as it was): `flops_analytic`, gap and coverage per
    stage, `layer` (or `unmapped`) per node, then `analytic`, `layers` and `coverage`. The gap compares the
    analytic count with the measured one of its policy (full, or torch: FlopCounterMode's)."""
    measured = an.measured
    nodes = []
    per_layer: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for n in report["nodes"]:
        n = {**n, "layer": mapping.layer_of.get(n["id"])}
        if n["layer"] is not None:
            per_layer[(n["stage"], n["layer"])].append(n)
        elif n["id"] in mapping.unmapped:
            n["unmapped"] = mapping.unmapped[n["id"]]
        nodes.append(n)
    present = {s["name"] for s in report["stages"]}
    analytic = {(row["stage"], row["id"]): row["flops"] for row in an.doc["layers"] if row["stage"] in present}
    layers = []
    for key in sorted(set(per_layer) | {k for k, v in analytic.items() if v}, key=_order(an.aligned)):
        stage, lid = key
        mapped = per_layer.get(key, [])
        row = _row({"id": lid, "stage": stage}, analytic.get(key, 0), sum(n["flops_torch"] for n in mapped),
                   sum(n["flops_full"] for n in mapped), measured)
        row["reason"] = ("missing" if key not in analytic else "no_nodes" if not mapped
                         else "formula" if row["gap"] else None)
        row["nodes"] = [n["id"] for n in mapped]
        layers.append(row)
    stage_analytic = {s["name"]: s["flops"] for s in an.doc["stages"]}
    by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n in nodes:
        by_stage[n["stage"]].append(n)
    stages = [{**s, **_row({}, stage_analytic.get(s["name"], 0), s["flops_torch"], s["flops_full"], measured),
               "coverage": coverage(by_stage[s["name"]], mapping)} for s in report["stages"]]
    return {**report, "stages": stages, "nodes": nodes,
            "analytic": {"preset": an.preset, "policy": an.policy, "causal_halving": an.causal_halving,
                         **({"attention": an.attention} if an.attention else {})},
            "layers": layers, "coverage": coverage(nodes, mapping)}


def _order(tree: ModelTree):
    """Layers in model order (stage, then the aligned tree's leaf order); unknown ids last."""
    stages = list(tree.stages)
    rank = {(s, leaf.id): i for s, blocks in tree.stages.items() for b in blocks for i, leaf in enumerate(b.leaves())}
    return lambda key: (stages.index(key[0]) if key[0] in stages else len(stages), rank.get(key, 1 << 30), key[1])


def gap_groups(report: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """A stage's gap by where it comes from and why: the layer id up to its first index, at most three
    components (`vision.tiles.sam`, `decoder.layers.*`), and the reason."""
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    for row in report["layers"]:
        if row["stage"] != stage or not row["gap"]:
            continue
        prefix = []
        for comp in row["id"].split("."):
            if comp.isdigit():
                prefix.append("*")
                break
            prefix.append(comp)
        prefix = prefix[:3]
        key = (".".join(prefix), row["reason"])
        g = groups.setdefault(key, {"group": key[0], "reason": key[1], "layers": 0, "gap": 0})
        g["layers"] += 1
        g["gap"] += row["gap"]
    return sorted(groups.values(), key=lambda g: -abs(g["gap"]))


def flop_nodes(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in report["nodes"] if flop_bearing(n)]
