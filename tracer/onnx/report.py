"""The ONNX path (`--graph onnx`): the prefill (vision included) exported with torch.onnx's dynamo exporter, FLOPs
counted per ONNX node from its shapes, each node carrying its module path and originating aten op from the
exporter's metadata, so that the mapping tables and the diff apply unchanged; then checked against the fx graph.

Export without weights: the model is built on the meta device and exported with `optimize=False` (the optimizer's
constant folding would need data); the ONNX file holds the graph with the weights as typed graph inputs. SDPA is
traced with the math backend (with a fused backend's output strides the exporter's own SDPA decomposition breaks a
vendor `.view`), and the MoE experts run as `batched_mm` (no ONNX translation exists for `aten._grouped_mm`; the
FLOPs are the same).

Per-node FLOPs (1 multiply-add = 2): MatMul 2*batch*M*N*K, Gemm 2*M*N*K, Conv 2*numel(out)*C_in/groups*prod(kernel),
Einsum 2*prod(every index size). Ops that may carry FLOPs without a formula here (ConvTranspose, contrib attention
ops, quantized GEMMs) are reported as unknown."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch

from tracer.compare.analytic import analytic_for, map_report
from tracer.compare.diff import with_diff
from tracer.core.modulepaths import plain_path, under
from tracer.count.document import SCHEMA
from tracer.onnx.export import export_decode, export_prefill
from tracer.onnx.nodes import onnx_nodes
from tracer.vendors import get_vendor


def onnx_report(fx: dict[str, Any], nodes: list[dict[str, Any]], an: Any, vision_modules: tuple[str, ...],
                table: str | None = None, decode: list[dict[str, Any]] = (), an_step: Any = None) -> dict[str, Any]:
    """The ONNX graphs' own report (same schema; stages vision, prefill and, when exported, decode = decode step 0),
    diffed against the same analytic model (for decode: `an_step`, the same workload with one decode step) through
    the same mapping table, with `consistency`: per stage and per analytic layer, ONNX full vs fx full (decode: fx
    step 0)."""
    vision = [dict(n, id="onnx-vision/" + n["id"].split("/", 1)[1], stage="vision") for n in nodes
              if under(plain_path(n["module"]), vision_modules)]
    names = ("vision", "prefill", "decode") if decode else ("vision", "prefill")
    rep = _onnx_doc(fx, vision + nodes, names, SCHEMA)
    rep = with_diff(rep, an, map_report(rep, an, table))
    if decode:  # its analytic counterpart is one step: diffed on its own, then merged in
        step = _onnx_doc(fx, list(decode), ("decode",), SCHEMA)
        step = with_diff(step, an_step, map_report(step, an_step, table))
        rep["stages"] = [s for s in rep["stages"] if s["name"] != "decode"] + step["stages"]
        rep["layers"] = [r for r in rep["layers"] if r["stage"] != "decode"] + step["layers"]
        rep["coverage"] = {k: v + step["coverage"][k] for k, v in rep["coverage"].items()}
        rep["nodes"] += step["nodes"]
        rep["unknown_ops"] = _unknown(rep["nodes"])
    fx_layers: Counter = Counter()
    for n in fx["nodes"]:
        if n.get("layer") and (n["stage"] != "decode" or n["step"] == 0):
            fx_layers[(n["stage"], n["layer"])] += n["flops_full"]
    differing = [{"stage": r["stage"], "layer": r["id"], "flops_onnx": r["flops_full"],
                  "flops_fx": fx_layers.get((r["stage"], r["id"]), 0),
                  "onnx_ops": sorted({n["onnx_op"] for n in rep["nodes"] if n["id"] in set(r["nodes"])})}
                 for r in rep["layers"] if r["flops_full"] != fx_layers.get((r["stage"], r["id"]), 0)]
    fx_stage = {s["name"]: s["steps"][0]["flops_full"] if s["name"] == "decode" else s["flops_full"]
                for s in fx["stages"] if s["name"] != "decode" or s.get("steps")}
    rep["consistency"] = {
        "stages": [{"name": s["name"], "flops_onnx": s["flops_full"], "flops_fx": fx_stage.get(s["name"], 0),
                    "difference": s["flops_full"] - fx_stage.get(s["name"], 0)} for s in rep["stages"]],
        "layers_differing": differing,
    }
    return rep


def _unknown(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    unknown = Counter(n["onnx_op"] for n in nodes if n["status"] == "unknown" and n["stage"] != "vision")
    return [{"op": op, "count": c} for op, c in sorted(unknown.items())]


def _onnx_doc(fx: dict[str, Any], nodes: list[dict[str, Any]], stages: tuple[str, ...], schema: str) -> dict[str, Any]:
    return {
        "schema": schema, "model": fx["model"], "graph": "onnx", "workload": fx["workload"],
        "notes": ["ONNX export: no weights (meta device), SDPA traced with the math backend, experts as batched_mm"
                  + ("; decode = decode step 0, its KV cache as graph inputs" if "decode" in stages else "")],
        "stages": [{"name": s, "flops_torch": 0, "flops_full": sum(n["flops_full"] for n in nodes if n["stage"] == s),
                    "unknown_ops": sum(1 for n in nodes if n["stage"] == s and n["status"] == "unknown")}
                   for s in stages],
        "nodes": nodes,
        "unknown_ops": _unknown(nodes),
    }


def run_onnx(tr: Any, fx: dict[str, Any], an: Any, table: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline step: a weightless (meta) model of the same config; its prefill and, when the workload decodes,
    its decode step 0 exported, counted and diffed. Returns the ONNX report and {file name: ModelProto}."""
    vendor = get_vendor(tr.workload.model)
    # the experts as batched_mm where the model has the choice (no ONNX translation of aten._grouped_mm)
    experts = "batched_mm" if tr.options.experts is not None else None
    options = dataclasses.replace(tr.options, experts=experts, mode="real", device="cpu")
    with torch.device("meta"):
        model = vendor.build(tr.config, options)
    protos = {"prefill.onnx": export_prefill(vendor, model, tr.prepared)}
    decode, an_step = [], None
    if tr.workload.decode_steps:
        protos["decode.onnx"] = export_decode(vendor, model, tr.prepared)
        decode = onnx_nodes(protos["decode.onnx"], stage="decode", step=0)
        an_step = analytic_for(fx["model"], dataclasses.replace(an.shape, decode_steps=1), an.preset,
                               an.causal_halving, an.config)
    rep = onnx_report(fx, onnx_nodes(protos["prefill.onnx"]), an, vendor.vision_modules, table, decode, an_step)
    return rep, protos


def save(protos: dict[str, Any], outputs: Any) -> None:
    """prefill.onnx and decode.onnx (the graphs; weights and KV cache are inputs) into the run's output set."""
    for name, proto in protos.items():
        outputs.write(name, proto.SerializeToString())
