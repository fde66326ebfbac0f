"""Exporting without weights: the model is built on the meta device and exported with torch.onnx's dynamo exporter
and `optimize=False` (the optimizer's constant folding would need data); the ONNX file holds the graph with the
weights as typed graph inputs. SDPA is traced with the math backend (with a fused backend's output strides the
exporter's own SDPA decomposition breaks a vendor `.view`), and the MoE experts run as `batched_mm` (no ONNX
translation exists for `aten._grouped_mm`; the FLOPs are the same). The prefill and decode step 0 (its KV cache
built as the step reads it)."""

from __future__ import annotations

import copy
import importlib.util
import types
from typing import Any

import torch

from tracer.core.errors import FlopdiffError
from tracer.vendors.base import EMPTY, cache_of, cache_tensors, synthesized_state


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
