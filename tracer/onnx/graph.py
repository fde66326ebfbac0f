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
ops, quantized GEMMs) are reported as unknown.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
import types
from collections import Counter
from typing import Any

import torch

from tracer.compare.analytic import analytic_for, map_report
from tracer.compare.diff import with_diff
from tracer.core.errors import FlopdiffError
from tracer.core.modulepaths import call_path_of, plain_path, under
from tracer.core.registry import FormulaTable
from tracer.count.document import SCHEMA
from tracer.vendors import get_vendor
from tracer.vendors.base import EMPTY, cache_of, cache_tensors, synthesized_state

ONNX_FORMULAS = FormulaTable("ONNX")  # ONNX op type -> fn(input shapes, output shape, attributes) -> int
register = ONNX_FORMULAS.register
MAY_CARRY = {"ConvTranspose", "Attention", "MultiHeadAttention", "GroupQueryAttention", "MatMulInteger",
             "QLinearMatMul", "ConvInteger", "QLinearConv", "MatMulNBits", "FusedMatMul"}
_TARGET = re.compile(r"target=torch\.ops\.(\w+)\.(\w+)")


@register("MatMul")
def matmul_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    """numpy matmul: every output element is one K-long dot product, whatever the ranks (a 1-D operand gains and
    then loses a unit dimension; batch dimensions broadcast), so 2 * numel(out) * K."""
    return 2 * math.prod(out) * shapes[0][-1]


@register("Gemm")
def gemm_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    a = shapes[0]
    k = a[0] if attrs.get("transA") else a[1]
    return 2 * out[0] * out[1] * k


@register("Conv")
def conv_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    w = shapes[1]
    return 2 * math.prod(out) * w[1] * math.prod(w[2:])


@register("Einsum")
def einsum_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    """2 * the product of every index's size (one multiply-add per point of the joint index space). `...` stands
    for the leading dimensions an operand has beyond its letters, aligned from the right across operands; a size-1
    dimension broadcasts, so an index (or ellipsis position) takes its largest size over the operands."""
    lhs = attrs["equation"].replace(" ", "").split("->")[0].split(",")
    size: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        letters = term.replace("...", "")
        if "..." in term:
            head, tail = term.split("...")
            covered = len(shape) - len(letters)
            names = list(head) + [f"...{covered - i}" for i in range(covered)] + list(tail)
        else:
            names = list(term)
        for name, dim in zip(names, shape):
            size[name] = max(size.get(name, 1), dim)
    return 2 * math.prod(size.values())


def export_prefill(vendor: Any, model: Any, prepared: Any) -> Any:
    """The vendor's prefill as an ONNX ModelProto (raises FlopdiffError with the exporter's message)."""
    module, args = vendor.onnx_prefill(model, prepared)
    device = next(iter(module.parameters()), torch.empty(0)).device
    return _export(vendor, module, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), "the prefill")


def export_decode(vendor: Any, model: Any, prepared: Any) -> Any:
    """Decode step 0 (KV length = the prompt's) as an ONNX ModelProto, the KV cache tensors as graph inputs. The
    cache is built as the decode worker builds it (tracer.capture.decode_worker): a one-token forward's, widened."""
    with torch.no_grad(), _shims(vendor)():
        template = vendor.decode(model, EMPTY, 0)()
    cache = cache_of(synthesized_state(template, prepared.derived.prompt_len))
    kv = cache_tensors(cache)
    return _export(vendor, _Decode(vendor, model, cache, kv), tuple(kv), "decode step 0")


def _shims(vendor: Any):
    return getattr(vendor, "onnx_shims", vendor.shims)


def _export(vendor: Any, module: Any, args: tuple, what: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with torch.no_grad(), _shims(vendor)(), sdpa_kernel(SDPBackend.MATH):
            program = torch.onnx.export(module.eval(), args, dynamo=True, optimize=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; the user needs the stage and its message
        first = next((line for line in str(exc).splitlines() if line.strip()), exc.__class__.__name__)
        raise FlopdiffError(f"--graph onnx: exporting {what} failed: {first}") from None
    return _weightless(program.model)


class _Decode(torch.nn.Module):
    """One decode step of the vendor model (wrapped as `m`) with its KV cache as positional tensors."""

    def __init__(self, vendor: Any, model: torch.nn.Module, cache: Any, kv: list[torch.Tensor]):
        super().__init__()
        self.m = model
        self._vendor, self._cache, self._ids = vendor, cache, [id(t) for t in kv]
        self._device = kv[0].device

    def forward(self, *kv: torch.Tensor) -> torch.Tensor:
        cache = copy.deepcopy(self._cache, dict(zip(self._ids, kv)))  # the template's structure, these tensors
        with torch.device(self._device):  # the step's own constants (its token id) beside the weights
            return self._vendor.decode(self.m, types.SimpleNamespace(cache=cache, past_key_values=cache), 0)().logits


def _weightless(model: Any) -> Any:
    """The exported IR as a ModelProto whose weights are typed graph inputs (meta weights carry no data)."""
    import onnx_ir

    graph = model.graph
    for name, value in list(graph.initializers.items()):
        graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
    return onnx_ir.serde.serialize_model(model)


def _origin(meta: dict[str, str]) -> str:
    m = _TARGET.search(meta.get("pkg.torch.onnx.fx_node", ""))
    return f"{m.group(1)}::{m.group(2)}" if m else "onnx::unknown"


def onnx_nodes(proto: Any, wrapper: str = "m", stage: str = "prefill", step: int | None = None) -> list[dict[str, Any]]:
    """Report-style records of every ONNX node of one exported stage: op (originating aten op), onnx_op, module
    (with call indices, as the fx capture writes them), shapes, FLOPs and status."""
    prefix = "onnx" if step is None else f"onnx-{stage}/{step}"
    import onnx

    proto = _inlined(proto)
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    g = proto.graph
    dims: dict[str, list[int] | None] = {i.name: list(i.dims) for i in g.initializer}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):  # rank unknown
            dims.setdefault(v.name, None)
            continue
        dims[v.name] = [x.dim_value if x.HasField("dim_value") else None for x in t.shape.dim]
    calls: dict[str, int] = {}
    previous: set[str] = set()
    records = []
    for node in g.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = _scopes(meta.get("pkg.torch.onnx.name_scopes", ""), wrapper)
        if scopes:  # nodes without scopes (hoisted constants) say nothing about calls
            for s in scopes:  # a module whose nodes come back after others ran is called again; its
                if s not in previous:  # children count their calls afresh within the new call
                    calls[s] = calls.get(s, -1) + 1
                    for child in [k for k in calls if k.startswith(s + ".")]:
                        del calls[child]
            previous = set(scopes)
        module = call_path_of(scopes, calls)
        # None: rank or a dimension unknown to shape inference (then a formula cannot be applied: unknown)
        shapes = [dims.get(i) for i in node.input if i]
        out = dims.get(node.output[0]) if node.output else []
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                 if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        formula = ONNX_FORMULAS.get(node.op_type)
        flops, status = 0, "free"
        if formula is not None:
            known = [s for s in [*shapes[:2], out] if s is not None and None not in s]
            if len(known) < len(shapes[:2]) + 1:
                status = "unknown"
            else:
                try:
                    flops, status = int(formula(shapes, out, attrs)), "formula"
                except (IndexError, KeyError, ValueError):  # shapes the op cannot have: say so, never guess
                    status = "unknown"
        elif node.op_type in MAY_CARRY or _carries_in_subgraph(node):
            status = "unknown"  # control flow: how often its body runs is data; never a silent 0
        elif node.domain not in ("", "ai.onnx", "ai.onnx.ml") and node.op_type not in ONNX_FORMULAS:
            status = "unknown"  # a custom-domain op (or a local function inlining could not resolve)
        records.append({"id": f"{prefix}/{node.name}", "stage": stage, "step": step, "op": _origin(meta),
                        "onnx_op": node.op_type, "module": module, "input_shapes": shapes, "output_shapes": [out],
                        "flops_torch": 0, "flops_full": flops, "status": status,
                        "source": meta.get("pkg.torch.onnx.stack_trace", "").strip().splitlines()[0:1]})
    return records


def _inlined(proto: Any) -> Any:
    """Local ONNX functions inlined into the graph, so that their nodes are counted like any other (onnx >= 1.16
    has the inliner; without it a call of a local function stays one custom-domain node, reported unknown)."""
    if not proto.functions:
        return proto
    try:
        from onnx import inliner
    except ImportError:
        return proto
    return inliner.inline_local_functions(proto)


def _carries_in_subgraph(node: Any) -> bool:
    """Whether a control-flow node (If, Loop, Scan) holds, in any nested graph, an op that may carry FLOPs."""
    import onnx

    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for inner in g.node:
                if inner.op_type in ONNX_FORMULAS or inner.op_type in MAY_CARRY or _carries_in_subgraph(inner):
                    return True
    return False


def _scopes(text: str, wrapper: str) -> list[str]:
    """"['', 'm', 'm.model', 'm.model.vision_tower', ..., 'addmm']" -> the module paths below the wrapper."""
    parts = [p.strip().strip("'\"") for p in text.strip("[]").split(",")] if text else []
    mods = [p for p in parts[:-1] if p.startswith(wrapper + ".")]
    return [p[len(wrapper) + 1:] for p in mods]


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


def check_onnx(vendor: Any, options: Any) -> None:
    """Refuse --graph onnx up front when the model, the options or the environment cannot do it."""
    impls = set(options.attn.values()) if isinstance(options.attn, dict) else {options.attn}
    if "flash_attention_2" in impls or options.attn_plugins:
        raise FlopdiffError("--graph onnx: the export runs the model outside flopdiff's capture, where neither "
                            "flash-attn's stand-in nor an --attn-plugin is in place; export with sdpa or eager "
                            "attention (the fx graph counts flash_attention_2 and plugins)")
    if not hasattr(vendor, "onnx_prefill"):
        raise FlopdiffError(f"--graph onnx: not available for --model {vendor.name} (its adapter has no onnx_prefill)")
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise FlopdiffError(f"--graph onnx: needs {' and '.join(missing)}: pip install 'flopdiff[onnx]'")


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
