"""Gaps: the analytic model beside the traced counts, per stage and per analytic layer.

Inputs are the report's node records (already counted), the node -> layer mapping and the analytic model
evaluated for the same workload. gap = full - analytic (positive: the analytic model undercounts);
gap % is relative to the measured full count (100% when the analytic model misses a layer entirely).
Each layer carries why it differs: the analytic model lacks it, it has no graph node, or the formulas
disagree.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from analytic.api import build, evaluate_tree, policy, variant
from analytic.layers import Policy
from analytic.models import ModelTree, Shape
from mapping.engine import Mapping, coverage, flop_bearing, map_nodes
from mapping.table import check_layers, load_table
from tracer.causes import cause, formula
from tracer.errors import FlopdiffError
from tracer.paths import STAGES

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
    device: str = "cpu"

    def counting(self) -> Policy:
        """The analytic counting policy `doc` was evaluated under."""
        return policy(self.policy, device=self.device, causal_halving=self.causal_halving)

    @property
    def measured(self) -> str:
        """The node count the analytic one is compared with."""
        return "flops_torch" if self.policy == "torch" else "flops_full"


def shape_of(workload: dict[str, Any]) -> Shape:
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
    tree = aligned if preset == "aligned" else build(model, shape, preset, config, attention)
    if image_tokens is not None and aligned.views.image_tokens != image_tokens:
        raise FlopdiffError(f"analytic model of {model}: {aligned.views.image_tokens} image tokens for "
                            f"{shape.width}x{shape.height}, the vendor preprocessing made {image_tokens}; the "
                            f"analytic tiling needs fixing (please report)")
    doc = evaluate_tree(tree, shape, policy(policy_name, device=device, causal_halving=causal_halving))
    return Analytic(preset, shape, tree, aligned, doc, config, causal_halving, policy_name, attention, device)


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
    tiled = build(report["model"], Shape(1000, 1400, an.shape.base_size, an.shape.tile_size, True, 1, 1),
                  config=an.config, attention=an.attention)
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
    stage, `layer` (or `unmapped`) per node, then `analytic`, `layers` (each with its formula and, when flopdiff can
    name it, the cause of its gap), `coverage`, `gap_groups` (per stage, tracer.gaps.gap_groups) and `unseen` (per
    stage and op, what FlopCounterMode cannot see). The gap compares the analytic count with the measured one of
    its policy (full, or torch: FlopCounterMode's)."""
    measured = an.measured
    counting, preset = an.counting(), variant(an.preset)
    leaves: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for stage, blocks in an.tree.stages.items():
        for b in blocks:
            for leaf in b.leaves():
                leaves[(stage, leaf.id)].append(leaf)
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
        row["formula"] = formula(leaves[key], counting)
        row["rules"] = sorted({r for r in map(mapping.rule_of, mapped) if r})
        row["cause"] = cause(stage, lid, row["reason"], preset, leaves[key], mapped, counting, measured)
        layers.append(row)
    stage_analytic = {s["name"]: s["flops"] for s in an.doc["stages"]}
    by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n in nodes:
        by_stage[n["stage"]].append(n)
    stages = [{**s, **_row({}, stage_analytic.get(s["name"], 0), s["flops_torch"], s["flops_full"], measured),
               "coverage": coverage(by_stage[s["name"]], mapping)} for s in report["stages"]]
    doc = {**report, "stages": stages, "nodes": nodes,
           "analytic": {"preset": an.preset, "policy": an.policy, "causal_halving": an.causal_halving,
                        **({"attention": an.attention} if an.attention else {})},
           "layers": layers, "coverage": coverage(nodes, mapping)}
    doc["gap_groups"] = [{"stage": s["name"], **g} for s in stages for g in gap_groups(doc, s["name"])]
    doc["unseen"] = unseen_ops(doc)
    return doc


def _order(tree: ModelTree):
    """Layers in model order (stage, then the aligned tree's leaf order); unknown ids last."""
    stages = list(tree.stages)
    rank = {(s, leaf.id): i for s, blocks in tree.stages.items() for b in blocks for i, leaf in enumerate(b.leaves())}
    return lambda key: (stages.index(key[0]) if key[0] in stages else len(stages), rank.get(key, 1 << 30), key[1])


def gap_groups(report: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """A stage's gap by where it comes from and why, in honest groups of analytic layers, largest first.

    A group is a maximal subtree of layer ids whose every layer has a gap for the same reason (all of
    `vision.tiles.sam`, not just its blocks); subtrees that differ only in one index merge into a range
    (`vision.global.encoder.layers.4-23`, `decoder.layers.*.attn` when every index is there). Its id is what
    `--explain` takes. Each carries the count of layers (the unit), the gap, and the cause named on its layers
    when they all share one."""
    rows = [r for r in report["layers"] if r["stage"] == stage]
    groups = _pure(rows, ())
    indices = _indices(rows)
    for pos in range(max((len(p) for p, _ in groups), default=0)):
        groups = _merge(groups, pos)
    out = []
    for parts, members in groups:
        causes = {m.get("cause") for m in members}
        out.append({"group": _label(parts, indices), "reason": members[0]["reason"],
                    "why": REASONS.get(members[0]["reason"], ""), "layers": len(members), "unit": "analytic layers",
                    "gap": sum(m["gap"] for m in members),
                    "cause": causes.pop() if len(causes) == 1 else None})
    return sorted(out, key=lambda g: (-abs(g["gap"]), g["group"]))


@functools.lru_cache(maxsize=65536)
def _components(layer_id: str) -> tuple[str, ...]:
    return tuple(layer_id.split("."))


def _pure(rows: list[dict[str, Any]], prefix: tuple) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """The maximal prefixes under which every layer has a gap, all for one reason."""
    n = len(prefix)
    if prefix and all(r["gap"] for r in rows) and len({r["reason"] for r in rows}) == 1:
        return [(prefix, rows)]
    children: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        parts = _components(r["id"])
        if len(parts) > n:
            children.setdefault(parts[n], []).append(r)
    return [g for comp, members in children.items() for g in _pure(members, prefix + (comp,))]


def _merge(groups: list[tuple[tuple, list]], pos: int) -> list[tuple[tuple, list]]:
    """Groups equal but for an index at `pos` (same reason) as one, that component a set of indices."""
    merged: dict[tuple, tuple[set, list]] = {}  # in first-seen order
    for parts, members in groups:
        comp = parts[pos] if pos < len(parts) else None
        idx = ({int(comp)} if isinstance(comp, str) and comp.isdigit() else comp if isinstance(comp, frozenset)
               else None)
        if idx is None:
            key = (parts, members[0]["reason"], "whole")
            merged[key] = (set(), members)
        else:
            key = (parts[:pos] + (None,) + parts[pos + 1:], members[0]["reason"], "index")
            if key not in merged:
                merged[key] = (set(), [])
            merged[key][0].update(idx)
            merged[key][1].extend(members)
    out = []
    for (parts, _, kind), (idx, members) in merged.items():
        out.append((parts if kind == "whole" else parts[:pos] + (frozenset(idx),) + parts[pos + 1:], members))
    return out


def _indices(rows: list[dict[str, Any]]) -> dict[tuple, set[int]]:
    """Per prefix, every index the stage's layers have right after it (to tell `*` from a range)."""
    seen: dict[tuple, set[int]] = defaultdict(set)
    for r in rows:
        parts = _components(r["id"])
        for i, comp in enumerate(parts):
            if comp.isdigit():
                seen[parts[:i]].add(int(comp))
    return seen


def _label(parts: tuple, indices: dict[tuple, set[int]]) -> str:
    out: list[str] = []
    for comp in parts:
        if isinstance(comp, frozenset):
            every = indices.get(tuple(out), set())  # after a range no id prefix is concrete: ranges then
            out.append("*" if len(comp) > 1 and comp == every else _ranges(sorted(comp)))
        else:
            out.append(comp)
    return ".".join(out)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'."""
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def group_members(label: str, layer_ids: list[str]) -> list[str]:
    """The layer ids a group label covers (`*`: any index; `4-23`, `0-3,7`: those indices)."""
    want = label.split(".")
    out = []
    for lid in layer_ids:
        parts = lid.split(".")
        if len(parts) < len(want):
            continue
        if all(_component_matches(w, p) for w, p in zip(want, parts)):
            out.append(lid)
    return out


def _component_matches(want: str, part: str) -> bool:
    if want == "*":
        return part.isdigit()
    if part.isdigit() and want and all(c.isdigit() or c in "-," for c in want):
        return int(part) in _expand(want)
    return want == part


def _expand(spec: str) -> set[int]:
    out: set[int] = set()
    for chunk in spec.split(","):
        lo, _, hi = chunk.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def unseen_ops(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage and op, the FLOPs only policy `full` counts (what FlopCounterMode misses), stage order then most."""
    by: Counter = Counter()
    calls: Counter = Counter()
    for n in report["nodes"]:
        gap = n["flops_full"] - n["flops_torch"]
        if gap:
            by[(n["stage"], n["op"])] += gap
            calls[(n["stage"], n["op"])] += 1
    return [{"stage": stage, "op": op, "nodes": calls[(stage, op)], "flops": flops}
            for (stage, op), flops in sorted(by.items(), key=lambda kv: (STAGES.index(kv[0][0]), -kv[1]))]



def flop_nodes(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in report["nodes"] if flop_bearing(n)]
