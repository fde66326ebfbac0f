"""DeepSeek-OCR-2, native in transformers (>= 5): `DeepseekOcr2ForConditionalGeneration`.

Preprocessing is the vendor's own: `DeepseekOcr2ImageProcessorPil` (no torchvision needed) makes the
views, and `DeepseekOcr2Processor.replace_image_token` (the processor's token layout) gives the number of
image tokens for the views the image processor actually produced.

Shims (applied only while capturing, see `SHIMS`):
  * TRANSFORMERS_DISABLE_TORCH_CHECK=1: `get_placeholder_mask` checks `n_image_tokens * hidden ==
    features.numel()` with a data-dependent `.item()`, which fake tensors cannot answer. We check the same
    equality ourselves from the projector's output shapes (`_check_image_tokens`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from analytic.api import model_text_tokens
from tracer.core.configfile import check_config, read_json
from tracer.core.errors import FlopdiffError
from tracer.core.models import model
from tracer.core.workload import Derived, Workload, load_image
from tracer.vendors.base import Prepared, cache_of, environment, to_meta
from tracer.vendors.options import BuildOptions, attention_parts, implementations

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "data" / "deepseek-ocr-2" / "config.json"

# Keys the model and the analytic overlay read, with the kind of value each must hold (tracer.core.configfile), and
# the relations between them the model assumes: a config breaking one is refused up front, by key and value.
CONFIG_KINDS = {
    "image_token_id": "count",
    **{f"text_config.{k}": "positive" for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "moe_intermediate_size", "vocab_size", "n_routed_experts", "num_experts_per_tok", "max_position_embeddings")},
    "text_config.n_shared_experts": "count",
    "text_config.mlp_layer_types": "list",
    "vision_config.sam_config.hidden_size": "positive",
    "vision_config.sam_config.num_hidden_layers": "positive",
    "vision_config.sam_config.global_attn_indexes": "list",
    "vision_config.sam_config.downsample_channels": "list",
    "vision_config.encoder_config.hidden_size": "positive",
    "vision_config.encoder_config.num_hidden_layers": "positive",
    "vision_config.encoder_config.intermediate_size": "positive",
}
CONFIG_RELATIONS = (
    ("text_config.num_experts_per_tok", "<=", "text_config.n_routed_experts"),
    ("len(text_config.mlp_layer_types)", "==", "text_config.num_hidden_layers"),
    ("text_config.num_attention_heads", "divides", "text_config.hidden_size"),
    ("text_config.num_key_value_heads", "divides", "text_config.num_attention_heads"),
    ("image_token_id", "<", "text_config.vocab_size"),
)

SHIMS = {"TRANSFORMERS_DISABLE_TORCH_CHECK": "1"}

DEFAULT_EXPERTS = model("deepseek-ocr-2").default_experts
EXPERTS = ("grouped_mm", "batched_mm", "eager")  # transformers' experts implementations (eager: --mode real only)
META_ATTN, META_EXPERTS = {"sdpa", "eager"}, {"grouped_mm", "batched_mm"}  # what fake mode runs on meta tensors
TEXT_PLACEHOLDER_ID = 1  # any non-image id: embeddings and FLOPs do not depend on the token value


def _transformers_classes():
    try:
        from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration
        from transformers.models.deepseek_ocr2 import image_processing_pil_deepseek_ocr2 as pil
        from transformers.models.deepseek_ocr2.processing_deepseek_ocr2 import DeepseekOcr2Processor
    except ImportError:
        import transformers

        raise FlopdiffError(
            f"--model deepseek-ocr-2 needs transformers with DeepSeek-OCR-2 (5.x); installed is "
            f"{transformers.__version__}: run `pip install -U 'transformers>=5'` (DeepSeek-OCR v1 users: "
            f"keep v1 in its own virtual environment, see README)") from None
    return DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration, pil, DeepseekOcr2Processor


class DeepseekOcr2Vendor:
    name = "deepseek-ocr-2"
    vision_modules = ("model.vision_tower", "model.multi_modal_projector")
    default_experts = DEFAULT_EXPERTS

    def load_config(self, path: str | None, options: BuildOptions) -> Any:
        config_cls = _transformers_classes()[0]
        file = Path(path) if path else DEFAULT_CONFIG
        raw = read_json(file)
        check_config(raw, CONFIG_KINDS, CONFIG_RELATIONS, f"--config {file}")
        return config_cls(**raw)

    def limits(self, config: Any) -> tuple[int, int]:
        return config.text_config.max_position_embeddings, config.text_config.num_hidden_layers

    def prepare(self, workload: Workload, config: Any) -> Prepared:
        _, _, pil, processor_cls = _transformers_classes()
        image = load_image(workload)
        ip = pil.DeepseekOcr2ImageProcessorPil()
        base = workload.base_size or ip.size["height"]
        tile = workload.tile_size or ip.tile_size
        batch = ip(image, return_tensors="pt", crop_to_patches=workload.crop_mode, tile_size=tile,
                   size={"height": base, "width": base})
        n_local = int(batch["num_local_patches"][0])
        w, h = image.size
        grid = (pil.get_optimal_tiled_canvas((h, w), (tile, tile), ip.min_patches, ip.max_patches)
                if n_local else (1, 1))
        image_tokens = self._image_tokens(processor_cls, ip, batch, int(batch["pixel_values"].shape[-1]), tile)
        bos, image_id = config.text_config.bos_token_id, config.image_token_id
        if workload.tokenizer:
            before, after = _tokenize_prompt(workload)
        else:
            n = model_text_tokens(self.name, workload.text_tokens)
            before, after = [], [TEXT_PLACEHOLDER_ID] * n
        ids = [bos] + before + [image_id] * image_tokens + after
        inputs = {
            "input_ids": torch.tensor([ids]),
            "pixel_values": batch["pixel_values"],
            "num_local_patches": batch["num_local_patches"],
            "image_tokens": image_tokens,
        }
        if "pixel_values_local" in batch:
            inputs["pixel_values_local"] = batch["pixel_values_local"]
        derived = Derived(image_wh=(w, h), base_size=base, tile_size=tile, views=1 + n_local, crop_grid_wh=tuple(grid),
                          image_tokens=image_tokens, prompt_len=len(ids),
                          extra={"global_view_px": int(batch["pixel_values"].shape[-1])})
        return Prepared(inputs, derived)

    @staticmethod
    def _image_tokens(processor_cls, ip, batch, global_px: int, tile: int) -> int:
        """The processor's own token layout, for the global view size the image processor produced."""
        defaults = inspect.signature(processor_cls.__init__).parameters
        # an instance without __init__ (which wants a tokenizer): the methods stay the class's own, whichever of
        # them replace_image_token calls (transformers 5.25 moved the count into _get_num_image_tokens)
        processor = processor_cls.__new__(processor_cls)
        vars(processor).update(image_processor=ip, image_token="<image>", patch_size=defaults["patch_size"].default,
                               downsample_ratio=defaults["downsample_ratio"].default)
        text = processor.replace_image_token(dict(batch), 0, size={"height": global_px}, tile_size=tile)
        return len(text) // len("<image>")

    def build(self, config: Any, options: BuildOptions) -> torch.nn.Module:
        _, model_cls, _, _ = _transformers_classes()
        _check_implementations(config, options)
        config._attn_implementation = options.attn or "sdpa"
        config._experts_implementation = options.experts or DEFAULT_EXPERTS
        for c in (config, *(getattr(config, name) for name in getattr(config, "sub_configs", {}))):
            c.dtype = getattr(torch, options.dtype)  # the weights' (transformers' FA2 check warns when unset)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, options.dtype))
        try:
            model = model_cls(config)
        except (ValueError, ImportError, KeyError) as exc:
            raise FlopdiffError(f"--attn {_spec(options.attn or 'sdpa')} / --experts {_spec(options.experts)}: the "
                                f"model refused it: "
                                f"{str(exc).splitlines()[0]}") from None
        finally:
            torch.set_default_dtype(previous)
        return model.eval()

    def shims(self) -> AbstractContextManager[None]:
        return environment(SHIMS)

    def prefill(self, model: torch.nn.Module, prepared: Prepared) -> Callable[[], Any]:
        inputs = dict(prepared.inputs)
        expected = inputs.pop("image_tokens")
        dtype = next(model.parameters()).dtype
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        if "pixel_values_local" in inputs:
            inputs["pixel_values_local"] = inputs["pixel_values_local"].to(dtype)

        def run():
            rows: list[int] = []
            hook = model.model.multi_modal_projector.register_forward_hook(
                lambda m, i, o: rows.append(o.shape[0] * o.shape[1]))
            try:
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            finally:
                hook.remove()
            _check_image_tokens(expected, sum(rows) + len(inputs["num_local_patches"]))
            return out

        return run

    def decode(self, model: torch.nn.Module, previous: Any, step: int) -> Callable[[], Any]:
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = cache_of(previous)
        ids = torch.tensor([[TEXT_PLACEHOLDER_ID]])
        return lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: cache})

    def onnx_prefill(self, model: torch.nn.Module, prepared: Prepared) -> tuple[torch.nn.Module, tuple]:
        """The prefill as a module of positional tensors for torch.onnx.export (wrapped as `m`)."""
        inputs = dict(prepared.inputs)
        dtype = next(model.parameters()).dtype
        local = inputs.get("pixel_values_local")
        args = (inputs["input_ids"], inputs["pixel_values"].to(dtype),
                local.to(dtype) if local is not None else None, inputs["num_local_patches"])
        return _Prefill(model), args

    def meta_inputs(self, prepared: Prepared, options: BuildOptions) -> Prepared | None:
        """sdpa and eager attention with the grouped_mm and batched_mm experts run on meta tensors (tested node for
        node against FakeTensorMode: tests/test_meta_capture.py); flex attention compiles kernels for real tensors,
        FlashAttention-2's stand-in reads its host mask, a plugin is the user's code: FakeTensorMode for those.
        `num_local_patches` stays on the host: `get_image_features` reads its values (`.tolist()`)."""
        attn, experts = implementations(options.attn or "sdpa"), implementations(options.experts or DEFAULT_EXPERTS)
        if options.attn_plugins or not attn <= META_ATTN or not experts <= META_EXPERTS:
            return None
        inputs = {k: v if k == "num_local_patches" else to_meta(v) for k, v in prepared.inputs.items()}
        return dataclasses.replace(prepared, inputs=inputs)

    def source_roots(self) -> list[str]:
        return [os.path.dirname(inspect.getfile(_transformers_classes()[1]))]

    def attention(self, options: BuildOptions) -> dict[str, str]:
        return attention_parts(self.name, options)


class _Prefill(torch.nn.Module):
    def __init__(self, m: torch.nn.Module):
        super().__init__()
        self.m = m

    def forward(self, input_ids, pixel_values, pixel_values_local, num_local_patches):
        return self.m(input_ids=input_ids, pixel_values=pixel_values, pixel_values_local=pixel_values_local,
                      num_local_patches=num_local_patches, use_cache=False, logits_to_keep=1).logits


def _check_image_tokens(expected: int, produced: int) -> None:
    if expected != produced:
        raise FlopdiffError(
            f"image tokens: the processor's layout gives {expected} but the vision tower produced {produced} "
            f"features; this --base-size/--tile-size/--crop-mode combination is not one the vendor supports")


def _spec(value: str | dict[str, str] | None) -> str:
    """An --attn/--experts value as the user writes it."""
    return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def _check_implementations(config: Any, options: BuildOptions) -> None:
    """Sub-config names in --attn/--experts must be the config's own (transformers ignores an unknown one silently,
    and the report would record it as used); `eager` experts only in real mode (their per-expert loop reads the
    routing through `nonzero`, whose output size fake tensors cannot know)."""
    names = ["", *getattr(config, "sub_configs", {})]
    for flag, value in (("--attn", options.attn), ("--experts", options.experts)):
        if isinstance(value, dict) and (unknown := sorted(set(value) - set(names))):
            raise FlopdiffError(f"{flag} {_spec(value)}: no sub-config "
                                f"{', '.join(unknown)} in DeepSeek-OCR-2; its sub-configs are {', '.join(names[1:])}")
    experts = options.experts or DEFAULT_EXPERTS
    chosen = set(experts.values()) if isinstance(experts, dict) else {experts}
    if unknown := sorted(chosen - set(EXPERTS)):
        raise FlopdiffError(f"--experts {', '.join(unknown)}: choose one of {', '.join(EXPERTS)}")
    if "eager" in chosen and options.mode == "fake":
        raise FlopdiffError("--experts eager: its per-expert loop reads the routing (nonzero), which fake mode cannot "
                            "see; use grouped_mm or batched_mm (the same FLOPs per layer), or --mode real")


def _tokenize_prompt(workload: Workload) -> tuple[list[int], list[int]]:
    """Token ids before and after `<image>` in the prompt, with the user's tokenizer (no special tokens)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(workload.tokenizer)
    try:
        tok = (PreTrainedTokenizerFast(tokenizer_file=str(path)) if path.is_file()
               else AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except Exception as exc:  # tokenizers raise many types; the user needs the path and the reason
        raise FlopdiffError(f"--tokenizer {path}: cannot load it ({exc.__class__.__name__}: {exc})") from None
    prompt = workload.prompt if workload.prompt is not None else "<image>\nFree OCR."
    if prompt.count("<image>") != 1:
        raise FlopdiffError(f"--prompt {prompt!r}: must contain exactly one <image>")
    head, tail = prompt.split("<image>")
    return (tok.encode(head, add_special_tokens=False) if head else [],
            tok.encode(tail, add_special_tokens=False) if tail else [])


VENDOR = DeepseekOcr2Vendor()
