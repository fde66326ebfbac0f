"""Any transformers model, by its `model_type` (`--model hf:llama`, or a `--config` whose `model_type` transformers
knows): the generic adapter. Built weight-free from the config alone (transformers' own class for it, chosen by the
auto classes), its inputs from the config (tokens; for a vision-language model an image as its processor makes it),
its stages as the model has them: `vision` (the vision tower and the projector, where the model has them), `prefill`
(one forward over the prompt), `decode` (one-token forwards on the cache the forward before returned).

What is generic and what is each family's (analytic.families): this adapter knows nothing of a family; the analytic
model and the mapping of the families flopdiff describes live there, and a model of any other family is traced and
counted the same, its nodes left without an analytic layer (the coverage table says so).

Shims: TRANSFORMERS_DISABLE_TORCH_CHECK=1 while capturing, as for DeepSeek-OCR-2 (a vision-language model's
placeholder check asks fake tensors for a value with `.item()`); the image-token count is checked from the shapes
instead (`_check_image_tokens`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from analytic.api import model_text_tokens
from tracer.core.configfile import read_json
from tracer.core.errors import FlopdiffError
from tracer.core.models import family_of, hf_config, model_type
from tracer.core.workload import Derived, Workload, load_image
from tracer.vendors.base import Prepared, cache_of, environment, to_meta
from tracer.vendors.options import BuildOptions, attention_parts, implementations

SHIMS = {"TRANSFORMERS_DISABLE_TORCH_CHECK": "1"}
TEXT_PLACEHOLDER_ID = 1  # any non-image id below the vocabulary: embeddings and FLOPs do not depend on the value
META_ATTN, META_EXPERTS = {"sdpa", "eager"}, {"grouped_mm", "batched_mm"}  # what fake mode runs on meta tensors


class HFVendor:
    """One model type of transformers (`hf:<model_type>`); an instance per model type (tracer.vendors' registry)."""

    default_experts = None  # transformers' own default (grouped_mm where the model has experts)
    attn_used: str | None = None  # the attention transformers chose where the model has no sdpa and --attn is not given

    def __init__(self, name: str):
        self.name = name
        self.model_type = model_type(name)
        self.vision_modules: tuple[str, ...] = ()

    def load_config(self, path: str | None, options: BuildOptions) -> Any:
        """--config (its model_type must be this one) or transformers' defaults for the model type (the published
        shapes its configuration class documents); the keys a file omits take those defaults, as the model does."""
        raw = read_json(Path(path)) if path else {}
        config = hf_config(self.model_type, raw, f"--config {path}" if path else f"--model {self.name}")
        self.vision_modules = _vision_modules(config)
        return config

    def limits(self, config: Any) -> tuple[int, int]:
        text = config.get_text_config()
        return (getattr(text, "max_position_embeddings", None) or 1 << 20,
                getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None) or 1)

    def prepare(self, workload: Workload, config: Any) -> Prepared:
        if workload.tokenizer:  # never a count the user did not ask for in place of the prompt they gave
            raise FlopdiffError(f"--tokenizer/--prompt: not read for --model {self.name} (the generic adapter lays out "
                                f"BOS + image tokens + placeholder text); give the prompt's length as --text-tokens N")
        text = config.get_text_config()
        n = model_text_tokens(self.name, workload.text_tokens)
        bos = getattr(text, "bos_token_id", None)
        bos = bos if isinstance(bos, int) and bos < text.vocab_size else TEXT_PLACEHOLDER_ID
        inputs: dict[str, Any] = {}
        w, h = workload.image_wh
        px, image_tokens = 0, 0
        if self.vision_modules:
            px, image_tokens, inputs["pixel_values"] = _image(workload, config)
            ids = [bos] + [_image_token_id(config)] * image_tokens + [TEXT_PLACEHOLDER_ID] * n
        else:
            ids = [bos] + [TEXT_PLACEHOLDER_ID] * n
        if getattr(config, "is_encoder_decoder", False):  # the decoder starts from its own start token
            inputs["decoder_input_ids"] = torch.tensor([[getattr(config, "decoder_start_token_id", None) or 0]])
        inputs["input_ids"] = torch.tensor([ids])
        # the processor sizes the one view itself (base and tile sizes are DeepSeek-OCR's knobs): its side in `extra`
        derived = Derived(image_wh=(w, h), base_size=None, tile_size=None, views=1 if px else 0, crop_grid_wh=(1, 1),
                          image_tokens=image_tokens, prompt_len=len(ids), extra={"view_px": px} if px else {})
        return Prepared(inputs, derived, notes=[] if self.vision_modules else
                        [f"{self.name}: a text model; the image ({w}x{h}) is not an input"])

    def build(self, config: Any, options: BuildOptions) -> torch.nn.Module:
        """The auto classes' model for the config (image-text-to-text, causal LM, seq2seq, base), in the options'
        dtype; attention sdpa unless --attn says (NAME, or SUBCONFIG=NAME per sub-config), and where the model has
        no sdpa and --attn is not given, transformers' own choice (a state-space model has no attention at all)."""
        if options.experts:
            config._experts_implementation = options.experts
        dtype = getattr(torch, options.dtype)
        for c in (config, *(getattr(config, name) for name in getattr(config, "sub_configs", {}))):
            if c is not None:
                c.dtype = dtype
        chosen = options.attn or "sdpa"
        self.attn_used = None
        try:
            return self._instantiate(config, chosen, dtype)
        except ValueError as exc:
            if options.attn is None:  # the implementation it chose is the run's (tracer.capture.trace records it)
                try:
                    built = self._instantiate(config, None, dtype)
                    self.attn_used = built.config._attn_implementation
                    return built
                except ValueError:
                    pass
            raise FlopdiffError(f"--model {self.name} --attn {chosen}: transformers refused it: "
                                f"{str(exc).splitlines()[0]}") from None

    def _instantiate(self, config: Any, attn: str | dict[str, str] | None, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

        for sub, impl in (attn.items() if isinstance(attn, dict) else [("", attn)]):
            target = getattr(config, sub) if sub else config
            target._attn_implementation = impl
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            for auto in (AutoModelForImageTextToText, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel):
                if type(config) in auto._model_mapping:
                    return auto.from_config(config).eval()
        except (ImportError, KeyError) as exc:
            raise FlopdiffError(f"--model {self.name}: transformers could not build it: "
                                f"{str(exc).splitlines()[0]}") from None
        finally:
            torch.set_default_dtype(previous)
        raise FlopdiffError(f"--model {self.name}: transformers has no model class for {type(config).__name__}")

    def shims(self) -> AbstractContextManager[None]:
        return environment(SHIMS)

    def prefill(self, model: torch.nn.Module, prepared: Prepared) -> Callable[[], Any]:
        inputs = dict(prepared.inputs)
        dtype = next(model.parameters()).dtype
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        kwargs = _accepted(model, use_cache=True, logits_to_keep=1, num_logits_to_keep=1)
        expected = prepared.derived.image_tokens

        def run():
            rows: list[int] = []
            projector = _module(model, self.vision_modules[-1]) if self.vision_modules else None
            hook = projector.register_forward_hook(lambda m, i, o: rows.append(o.shape[0] * o.shape[1])) \
                if projector is not None else None
            try:
                out = _seen(self.name, lambda: model(**inputs, **kwargs))
            finally:
                if hook is not None:
                    hook.remove()
            if hook is not None:
                _check_image_tokens(self.name, expected, sum(rows))
            return out

        return run

    def decode(self, model: torch.nn.Module, previous: Any, step: int) -> Callable[[], Any]:
        cache = cache_of(previous)
        ids = torch.tensor([[TEXT_PLACEHOLDER_ID]])
        names = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in names else "past_key_values"
        kwargs = _accepted(model, use_cache=True, logits_to_keep=1, num_logits_to_keep=1)
        if "decoder_input_ids" in names:  # encoder-decoder: the encoder's states from the prefill, the new token
            encoder = getattr(previous, "encoder_last_hidden_state", None)
            if encoder is None:  # the decode worker's template (no forward before): nothing to attend to
                raise FlopdiffError(f"--model {self.name}: an encoder-decoder decode step reads the prefill's encoder "
                                    f"states")
            return lambda: _seen(self.name, lambda: model(decoder_input_ids=ids, encoder_outputs=(encoder,),
                                                          **{cache_arg: cache}, **kwargs))
        return lambda: _seen(self.name, lambda: model(input_ids=ids, **{cache_arg: cache}, **kwargs))

    def meta_inputs(self, prepared: Prepared, options: BuildOptions) -> Prepared | None:
        """sdpa and eager attention with the grouped_mm and batched_mm experts run on meta tensors; anything else
        (flex, a stand-in, a plugin, an unknown family's own kernels) on FakeTensorMode, and a meta capture that
        fails falls back to it with one note line (tracer.capture.trace)."""
        attn, experts = implementations(options.attn or "sdpa"), implementations(options.experts or "grouped_mm")
        if options.attn_plugins or not attn <= META_ATTN or not experts <= META_EXPERTS:
            return None
        return dataclasses.replace(prepared, inputs={k: to_meta(v) for k, v in prepared.inputs.items()})

    def source_roots(self) -> list[str]:
        import transformers

        return [str(Path(transformers.__file__).parent / "models")]

    def attention(self, options: BuildOptions) -> dict[str, str]:
        return attention_parts(self.name, options)


def _seen(name: str, forward: Callable[[], Any]) -> Any:
    """A forward whose code reads tensor values (a per-expert loop's `nonzero`, a check's `.item()`) cannot run on
    fake tensors: said as such, with what to do (transformers 4.x's Mixtral and LLaVA do; 5's run)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    try:
        return forward()
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:
        import transformers

        raise FlopdiffError(f"--model {name}: this model's code reads tensor values ({exc.func}) under transformers "
                            f"{transformers.__version__}, which fake mode cannot see; use transformers >= 5 (its "
                            f"experts and checks run weight-free) or --mode real on a reduced --config") from None


def _accepted(model: torch.nn.Module, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments the model's forward takes (logits_to_keep is not every model's; transformers 4.x
    names it num_logits_to_keep)."""
    names = inspect.signature(model.forward).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _vision_modules(config: Any) -> tuple[str, ...]:
    """The vision tower and the projector of a vision-language family flopdiff describes (analytic.families), as
    module paths: the nodes of the `vision` stage."""
    family = family_of(config.model_type)
    return (family.vision, "model.multi_modal_projector") if family and family.vision else ()


def _image_token_id(config: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise FlopdiffError(f"--model hf:{config.model_type}: its config names no image token (image_token_id)")


def _image(workload: Workload, config: Any) -> tuple[int, int, torch.Tensor]:
    """The image as the model's processor makes it: LLaVA's CLIP processor resizes the shorter side to the tower's
    image size and crops the center square (its defaults for that size), whatever the page; the tokens are the
    tower's patches, less the class token unless the strategy is `full` (LlavaProcessor's count)."""
    try:  # transformers 5: the PIL backend (no torchvision needed); 4.x: the one class
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    vision = config.vision_config
    px = vision.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    pixels = processor(load_image(workload), return_tensors="pt")["pixel_values"]
    tokens = (px // vision.patch_size) ** 2 + (1 if getattr(config, "vision_feature_select_strategy", "default")
                                               == "full" else 0)
    return px, tokens, pixels


def _check_image_tokens(model: str, expected: int, produced: int) -> None:
    if expected != produced:
        raise FlopdiffError(f"--model {model}: the processor's layout gives {expected} image tokens but the vision "
                            f"tower produced {produced} features (please report)")

