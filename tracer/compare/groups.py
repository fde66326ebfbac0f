"""Gap groups: a stage's gap by where it comes from and why, in honest groups of analytic layers (layers of one
reason and cause merged under one id, `decoder.layers.1-11.mlp.experts`), with the labels --explain takes and the
layer ids a label stands for."""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

from tracer.compare.metrics import metric_rows

REASONS = {
    "missing": "not in the analytic model",
    "no_nodes": "no graph node maps to it",
    "formula": "analytic formula differs",
}


def gap_groups(report: dict[str, Any], stage: str, leave_out: frozenset[str] = frozenset(),
               metric: str = "tc_flops") -> list[dict[str, Any]]:
    """A stage's gap by where it comes from and why, in honest groups of analytic layers, largest first; the layers
    `leave_out` names are not grouped (prefill's vision layers, grouped once as vision's).

    A group is a maximal subtree of layer ids whose every layer has a gap for the same reason (all of
    `vision.tiles.sam`, not just its blocks); subtrees that differ only in one index merge into a range
    (`vision.global.encoder.layers.4-23`, `decoder.layers.*.attn` when every index is there). Its id is what
    `--explain` takes. Each carries the count of layers (the unit), the gap, and the cause named on its layers
    when they all share one. A layer with nothing to count on either side does not break a group (`_empty`).
    `metric`: whose gap (tracer.compare.metrics: tensor-core FLOPs, CUDA-core FLOPs, weights, KV cache)."""
    rows = [r for r in metric_rows(report["layers"], metric) if r["stage"] == stage and r["id"] not in leave_out]
    groups = _pure(rows, ())
    indices = _indices(rows)
    for pos in range(max((len(p) for p, _ in groups), default=0)):
        groups = _merge(groups, pos)
    out = []
    for parts, members in groups:
        causes = {m.get("cause") for m in members}
        out.append({"group": _label(parts, indices), "reason": members[0]["reason"],
                    "why": REASONS.get(members[0]["reason"], ""), "layers": len(members), "unit": "analytic layers", "metric": metric,
                    "gap": sum(m["gap"] for m in members),
                    "cause": causes.pop() if len(causes) == 1 else None})
    return sorted(out, key=lambda g: (-abs(g["gap"]), g["group"]))


@functools.lru_cache(maxsize=65536)
def _components(layer_id: str) -> tuple[str, ...]:
    return tuple(layer_id.split("."))


def _empty(row: dict[str, Any]) -> bool:
    """A layer with nothing to count on either side (an attention under policy torch on CPU: FlopCounterMode and the
    analytic model both say 0): it neither has a gap nor breaks a group of its neighbours' one."""
    return not row["gap"] and not row["analytic"]


def _pure(rows: list[dict[str, Any]], prefix: tuple) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """The maximal prefixes under which every layer has a gap, all for one reason (empty layers aside)."""
    n = len(prefix)
    gapped = [r for r in rows if not _empty(r)]
    if prefix and gapped and all(r["gap"] for r in gapped) and len({r["reason"] for r in gapped}) == 1:
        return [(prefix, gapped)]
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
