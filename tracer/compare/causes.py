"""Why a layer differs, when flopdiff can name it, and the formula behind its analytic count.

Two kinds of cause, each a fact checked against the run, never a guess:
  * a preset setting that leaves the layer out or changes it (`analytic.request.VARIANT_EFFECTS`: single_view,
    clip_layers, projector_tokens, decode_kv_growth), when the preset differs from the vendor-exact one there;
  * a formula symbol that disagrees with the shapes of the nodes mapped to the layer: one symbol of the analytic
    layer, set to a dimension those nodes carry, makes the formula equal to the traced count (`s_k = 1126 in the
    analytic model; 1127 makes it equal the traced count`). Tried per step for decode layers.

`formula` is the analytic layer's formula with its numbers (the first step's for decode, with the step count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from analytic.layers import Layer, Policy
from analytic.request import Variant, variant_cause
from analytic.series import steps_of

SYMBOL_FIELDS_SKIPPED = ("id", "dtype_bytes", "children", "op", "causal")


def formula(leaves: list[Layer], policy: Policy) -> str | None:
    """'Attention: 2 * batch * heads * pairs * (d + d_v) with ... = N' (decode: '; step 0 of 10')."""
    if not leaves:
        return None
    text = leaves[0].explain(policy)
    steps = sum(steps_of(leaf) for leaf in leaves)  # a leaf of analytic.series.Steps stands for many
    return text if steps == 1 else f"{text}; step 0 of {steps}"


def _dims(nodes: Iterable[dict[str, Any]]) -> list[int]:
    """Every dimension the nodes' input and output shapes carry, each once, in order."""
    seen: dict[int, None] = {}
    for n in nodes:
        for shape in (*n["input_shapes"], *n["output_shapes"]):
            for d in shape:
                seen.setdefault(int(d), None)
    return list(seen)


def symbol_cause(leaves: list[Layer], nodes: list[dict[str, Any]], policy: Policy, measured: str) -> str | None:
    """The one formula symbol that, set to a dimension of the nodes, closes the gap (per step), or None."""
    by_step: dict[Any, list[dict[str, Any]]] = {}
    for n in nodes:
        by_step.setdefault(n["step"], []).append(n)
    steps = sorted(by_step, key=lambda s: -1 if s is None else s)
    if len(steps) != len(leaves):
        return None
    for leaf, step in zip(leaves, steps):
        traced = sum(n[measured] for n in by_step[step])
        if leaf.cost(policy).tc_flops == traced:
            continue
        for f in dataclasses.fields(leaf):
            value = getattr(leaf, f.name)
            if f.name in SYMBOL_FIELDS_SKIPPED or type(value) is not int:
                continue
            for dim in _dims(by_step[step]):
                if dim != value and dataclasses.replace(leaf, **{f.name: dim}).cost(policy).tc_flops == traced:
                    where = "" if step is None else f" at decode step {step}"
                    return (f"{f.name} = {value:,} in the analytic formula{where}; {dim:,} (a dimension of the "
                            f"traced node{'s' if len(by_step[step]) > 1 else ''}) makes it equal the traced count")
        return None
    return None


def cause(stage: str, layer_id: str, reason: str | None, variant: Variant, leaves: list[Layer],
          nodes: list[dict[str, Any]], policy: Policy, measured: str) -> str | None:
    """The named cause of one layer row's gap (None when there is no gap or nothing can be named)."""
    if reason is None:
        return None
    found = [variant_cause(variant, stage, layer_id),
             symbol_cause(leaves, nodes, policy, measured) if reason == "formula" else None]
    return "; ".join(c for c in found if c) or None
