"""The shims that run DeepSeek-OCR (v1)'s remote code weight-free (tracer.vendors.deepseek_ocr applies them only
while capturing or preprocessing), each with its reason:
  * `cuda_identity`: infer() and `DeepseekOCRModel.forward` call `.cuda()` (the image mask before
    `masked_scatter_`); unless the capture runs on the GPU (`--device cuda`), the tensor stays where it is.
    Moves no data that FLOPs depend on. Applied in both modes whenever the capture device is not CUDA,
    whether or not the machine has a GPU: on a GPU machine the real `.cuda()` would put the mask on cuda:0
    beside a model on the CPU (fake mode then stopped with "Unhandled FakeTensor Device Propagation"), so a
    CPU capture gives the same report on machines with and without a GPU. Preprocessing (infer()) always
    runs with it: the prepared inputs stay on the CPU, and the trace moves them to the capture device.
  * `image_gate` (fake mode): the forward decides whether to run the vision encoders with
    `torch.sum(image).item() != 0`, which fake tensors cannot answer; `torch.sum` of one of the prepared
    image tensors is computed on the real tensor, so the decision is the real one.
  * `crop_grid_list` (fake mode): the forward reads the crop grid (`images_spatial_crop`) as integers to
    shape the tile features; it gets the same values as a host list instead of a tensor.
  * `meta_autocast` (fake mode, ONNX): the decoder's rotary embedding (transformers 4.46 Llama code) switches
    autocast off on its input's device, which torch refuses for meta tensors (a meta capture, tracer.capture.meta,
    and the ONNX exporter's); `torch.autocast(device_type="meta")` becomes a no-op. It changes no op.
  * `even_split_moe` (fake mode): `moe_infer` copies per-expert token counts to the host (`.cpu().numpy()`)
    and loops over the experts that got tokens. The shim issues the same per-expert ops for an even split of
    tokens x top-k rows over the experts (the first experts take the remainder). Per-layer FLOPs do not
    depend on routing; which experts appear as nodes does (the report says so).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any
from unittest import mock

import torch
from transformers.utils import logging as hf_logging

EVEN_SPLIT_NOTE = ("experts: fake mode routes tokens x top-k evenly over the experts (moe_infer shim); per-layer "
                   "FLOPs equal the real routing's, the experts listed as nodes may differ")

@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers 4.46 warns about the remote code itself (GenerationMixin, RoPE API migration) on every build and
    forward: advice to the model's authors, nothing about this run's FLOPs. Errors still show."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


@contextmanager
def cuda_identity() -> Iterator[None]:
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        yield


@contextmanager
def meta_autocast() -> Iterator[None]:
    original = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return nullcontext() if device_type == "meta" else original(device_type, *args, **kwargs)

    with mock.patch.object(torch, "autocast", autocast):
        yield


class RealSums:
    """`torch` as the vendor module sees it while capturing, except that `torch.sum` of a prepared image tensor
    answers with its real sum (taken at preprocessing, outside any fake mode): the image gate
    (`torch.sum(image).item() != 0`) gets the real decision."""

    def __init__(self, images: list[torch.Tensor]):
        self._order = [float(t.double().sum()) for t in images]
        self._sums = {id(t): v for t, v in zip(images, self._order)}

    def track(self, images: list[torch.Tensor]) -> None:
        """The same images as other tensor objects (the ONNX exporter's), in the order given at construction."""
        self._sums.update({id(t): v for t, v in zip(images, self._order)})

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def sum(self, t, *args, **kwargs):
        if id(t) not in self._sums:
            return torch.sum(t, *args, **kwargs)
        # a plain number behind .item(): a tensor would go back through the fake mode, which cannot read it
        return types.SimpleNamespace(item=self._sums[id(t)].__float__)


@torch.no_grad()
def even_split_moe_infer(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """`DeepseekV2MoE.moe_infer` without the host copy: rows (token, slot) in slot-major order are cut into
    per-expert runs of an even split; the same gather, per-expert MLPs, cat, scatter and weighting follow."""
    tokens, k = topk_ids.shape
    rows, experts = tokens * k, len(self.experts)
    counts = [rows // experts + (1 if i < rows % experts else 0) for i in range(experts)]
    idxs = torch.arange(rows, device=x.device)
    sorted_tokens = x[idxs // k]
    outputs, start = [], 0
    for i, n in enumerate(counts):
        if n == 0:
            continue
        outputs.append(self.experts[i](sorted_tokens[start:start + n]))
        start += n
    outs = torch.cat(outputs, dim=0)
    new_x = torch.empty_like(outs)
    new_x[idxs] = outs
    return (new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(dim=-1))
            .sum(dim=1).type(new_x.dtype))
