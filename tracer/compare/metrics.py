"""The other columns, diffed per stage: each metric's traced count beside the analytic one, the gap and, when a preset
setting explains it, the cause.

A metric is diffed where both sides count the same thing under one convention, and shown side by side where they
do not (a gap there would be the conventions' difference, not a finding):

  tc_flops     tensor-core FLOPs: the stage table's gap (policy full or torch)
  cuda_flops   CUDA-core FLOPs: the trace per aten op (tracer.core.conventions.CUDA_CORE_OPS), the analytic model per
               layer kind (CUDA_CORE_PER_ELEMENT): diffed; the trace also counts what the layers leave out (RoPE,
               routing, casts), so a gap names that
  weights      bytes of parameters and buffers, each once per stage (a decode step's per step): diffed
  kv           the KV cache after the stage: diffed
  bytes        I/O, fused: a layer's inputs, outputs and weights once (tracer.compare.io from the trace's storage
               records; the analytic layers' io_bytes): diffed
  unfused      I/O, unfused: every op reads its inputs and writes its outputs, the trace's alone (an analytic model
               that counted it would restate the trace op by op): shown
  activations  the trace's liveness peak; the analytic model's sum of layer outputs: shown, not diffed
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from analytic.request import VARIANT_EFFECTS, Variant
from tracer.core.errors import FlopdiffError


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    traced: tuple[str, ...]  # the stage keys that add up to the traced count
    analytic: str | None     # the stage key of the analytic count (None: the trace's alone)
    diffed: bool = True
    unit: str = "B"


METRICS = {m.name: m for m in (
    Metric("tc_flops", "tensor-core FLOPs", ("flops_full",), "flops_analytic", unit=""),
    Metric("cuda_flops", "CUDA-core FLOPs", ("cuda_flops",), "analytic_cuda_flops", unit=""),
    Metric("weights", "weights", ("weight_bytes",), "analytic_weight_bytes"),
    Metric("kv", "KV cache", ("kv_bytes",), "analytic_kv_bytes"),
    Metric("bytes", "I/O bytes (fused)", ("io_fused",), "analytic_io_bytes"),
    Metric("unfused", "I/O bytes unfused (traced)", ("bytes_read", "bytes_written"), None, diffed=False),
    Metric("activations", "activations (traced peak, analytic sum of outputs)", ("act_peak_bytes",),
           "analytic_act_bytes", diffed=False),
)}

#: what a preset setting does to a metric beside the FLOPs (analytic.request.VARIANT_EFFECTS says which layers)
METRIC_EFFECTS = {("kv", "decode_kv_growth"): "decode"}
DIFFED = tuple(m for m, v in METRICS.items() if v.diffed)


#: a metric's count per node (report.json's node columns); the KV cache is a stage's and its layers', no node's
NODE_COLUMN = {"tc_flops": "flops_full", "cuda_flops": "cuda_flops", "weights": "weight_bytes"}


def metric_of(report: dict[str, Any]) -> str:
    """The metric a report's gap groups follow (reports from before --metric: tensor-core FLOPs)."""
    return report.get("analytic", {}).get("metric") or "tc_flops"


def unit_word(metric: str) -> str:
    return "bytes" if METRICS[metric].unit == "B" else "FLOPs"


def check_metric(name: str) -> str:
    """`--metric`: one of the diffed metrics (the shown ones have no gap to group)."""
    if name not in DIFFED:
        shown = [m for m in METRICS if m not in DIFFED]
        raise FlopdiffError(f"--metric {name}: expected one of {', '.join(DIFFED)}"
                            + (f" ({', '.join(shown)} are shown, not diffed)" if name in shown else ""))
    return name


def row_metrics(row: dict[str, Any], policy: str, preset: Variant, layer: bool | None = None) -> dict[str, dict[str, Any]]:
    """Per metric of a stage or layer row: traced, analytic, and for the diffed ones gap, gap % (of the traced count)
    and the cause; a layer's (`layer`: whether the analytic model has it) also the reason, as its FLOPs' (groups)."""
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS.values():
        keys = ("flops_torch",) if m.name == "tc_flops" and policy == "torch" else m.traced
        if any(row.get(k) is None for k in keys):
            continue  # the row has no such count (vision returns no KV cache; a layer has no activation peak)
        traced, analytic = sum(row[k] for k in keys), row.get(m.analytic, 0) if m.analytic else None
        entry: dict[str, Any] = {"traced": traced, **({"analytic": analytic} if m.analytic else {})}
        if m.diffed:
            gap = traced - analytic
            entry["gap"] = gap
            entry["gap_pct"] = round(100.0 * gap / traced if traced else (0.0 if gap == 0 else -100.0), 4)
            if m.name == "tc_flops" and layer is not None:
                entry["cause"] = row.get("cause")
            else:
                entry["cause"] = _cause(m.name, row["stage"] if layer is not None else row["name"], preset) if gap else None
            if layer is not None:
                entry["reason"] = row.get("reason") if m.name == "tc_flops" else reason(layer, bool(traced), gap)
        out[m.name] = entry
    return out


def reason(modelled: bool, present: bool, gap: int) -> str | None:
    """Why a layer's count differs (tracer.compare.groups.REASONS): the analytic model lacks the layer, the trace has
    nothing for it (`present`: its nodes, or its count), or the formula; None without a gap."""
    if not gap:
        return None
    return "missing" if not modelled else "no_nodes" if not present else "formula"


def metric_rows(layers: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The layer rows as one metric sees them (gap, reason, cause, the analytic count as `analytic`): what the gap
    groups and --explain read; tensor-core FLOPs are the rows themselves."""
    if metric == "tc_flops":
        return [{**r, "analytic": r["flops_analytic"]} for r in layers]
    out = []
    for r in layers:
        m = r["metrics"].get(metric)
        if m is None:
            continue
        out.append({"id": r["id"], "stage": r["stage"], "gap": m["gap"], "reason": m["reason"], "cause": m["cause"],
                    "analytic": m["analytic"], "traced": m["traced"]})
    return out


def _cause(metric: str, stage: str, preset: Variant) -> str | None:
    for effect in VARIANT_EFFECTS:
        if METRIC_EFFECTS.get((metric, effect.setting)) == stage:
            value = getattr(preset, effect.setting)
            if value != getattr(Variant(), effect.setting):
                return f"preset {effect.setting}: {str(value).lower()} ({effect.says})"
    return None


GATE = re.compile(r"^(?:(?P<metric>[a-z_]+)=)?(?P<pct>[^=,]+)$")


def parse_max_gap(text: str | float | None) -> dict[str, float] | None:
    """`--max-gap`: a percentage for tensor-core FLOPs (`1`), or per metric (`kv=0.5`, `tc_flops=0,weights=1`)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        text = str(text)
    gates: dict[str, float] = {}
    for part in text.split(","):
        match = GATE.match(part.strip())
        metric = (match and match["metric"]) or "tc_flops"
        if match is None or metric not in METRICS:
            raise FlopdiffError(f"--max-gap {text}: expected PCT or METRIC=PCT[,METRIC=PCT] with METRIC one of "
                                f"{', '.join(m for m, v in METRICS.items() if v.diffed)}")
        if not METRICS[metric].diffed:
            raise FlopdiffError(f"--max-gap {text}: {metric} is shown, not diffed (its two sides count under different "
                                f"conventions); gate on {', '.join(m for m, v in METRICS.items() if v.diffed)}")
        try:
            pct = float(match["pct"])
        except ValueError:
            pct = math.nan
        if not (math.isfinite(pct) and pct >= 0):
            raise FlopdiffError(f"--max-gap {text}: {match['pct']!r} must be a number, 0 or more (percent of the "
                                "traced count)")
        gates[metric] = pct
    return gates
