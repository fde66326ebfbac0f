"""DeepSeek-OCR (v1), from its own Hugging Face remote code (`modeling_deepseekocr.py` and friends), loaded
from a local folder (`--vendor-dir`) only with `--trust-remote-code`: importing it executes that folder.

The remote code was written for transformers 4.46.x (it imports `LlamaFlashAttention2`, gone from later
releases); flopdiff itself runs on 4.46 and 5.x, so v1 runs in its own virtual environment (README).

Preprocessing is the vendor's own: `DeepseekOCRForCausalLM.infer()` runs unchanged on a stand-in `self`
whose `generate` records the exact tensors infer() would hand to the model (input ids with the vendor token
layout, the padded global view, the `dynamic_preprocess` tiles, the image mask, the crop grid), then stops.

The shims that run the vendor code weight-free, each with its reason: `tracer.vendors.deepseek_ocr_shims`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from tracer.core.configfile import check_config, dig, read_json
from tracer.core.errors import FlopdiffError
from tracer.core.lifecycle import scratch
from tracer.core.models import model
from tracer.core.workload import Derived, Workload, load_image
from tracer.vendors.base import Prepared, to_meta
from tracer.vendors.deepseek_ocr_shims import (EVEN_SPLIT_NOTE, RealSums, cuda_identity, even_split_moe_infer,
                                               meta_autocast, quiet_transformers)
from tracer.vendors.options import BuildOptions, attention_parts, resolve_vendor_dir

VENDOR_FILES = ("modeling_deepseekocr.py", "modeling_deepseekv2.py", "deepencoder.py",
                "configuration_deepseek_v2.py", "conversation.py")
REQUIRED_KEYS = ("language_config.hidden_size", "language_config.num_hidden_layers", "language_config.vocab_size",
                 "language_config.n_routed_experts", "language_config.num_experts_per_tok",
                 "vision_config.width.sam_vit_b", "vision_config.width.clip-l-14-224", "projector_config.n_embed")
# The kinds of value those keys (and the others the decoder reads) must hold, and the relations the vendor code
# assumes (tracer.core.configfile): a config breaking one is refused before the vendor code runs, by key and value.
CONFIG_KINDS = {
    **{f"language_config.{k}": "positive" for k in (
        "hidden_size", "num_hidden_layers", "vocab_size", "n_routed_experts", "num_experts_per_tok",
        "num_attention_heads", "intermediate_size", "moe_intermediate_size", "max_position_embeddings")},
    "language_config.first_k_dense_replace": "count",
    "language_config.n_shared_experts": "count",
    **{f"vision_config.width.{tower}.{k}": "positive" for tower in ("sam_vit_b", "clip-l-14-224")
       for k in ("width", "heads", "layers")},
    "projector_config.n_embed": "positive",
}
CONFIG_RELATIONS = (
    ("language_config.num_experts_per_tok", "<=", "language_config.n_routed_experts"),
    ("language_config.num_attention_heads", "divides", "language_config.hidden_size"),
    ("language_config.first_k_dense_replace", "<=", "language_config.num_hidden_layers"),
)
DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown. "  # the model card's document prompt
TEXT_PLACEHOLDER_ID = 1  # any non-image id: embeddings and FLOPs do not depend on the token value
def _fix(msg: str) -> str:
    return (f"{msg}; run DeepSeek-OCR in its own environment: python3 -m venv .venv-v1 && .venv-v1/bin/pip install "
            f"'transformers==4.46.3' 'tokenizers==0.20.3' torchvision addict easydict einops -e . (see README)")


class _Tokens:
    """Stand-in tokenizer for folders without one: any non-empty text is `--text-tokens` placeholders."""

    def __init__(self, n: int):
        self.n = n
        self.eos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [TEXT_PLACEHOLDER_ID] * self.n if text else []


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("generate() reached")
        self.args, self.kwargs = args, kwargs


class DeepseekOcrVendor:
    name = "deepseek-ocr"
    vision_modules = ("model.sam_model", "model.vision_model", "model.projector")
    default_experts = model("deepseek-ocr").default_experts

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.package: str | None = None
        self.options = BuildOptions()
        self.gate: RealSums | None = None

    # ---- loading --------------------------------------------------------------------------------------

    def load_config(self, path: str | None, options: BuildOptions) -> Any:
        if not options.vendor_dir:
            raise FlopdiffError("--model deepseek-ocr needs --vendor-dir DIR: a local copy of the Hugging Face repo "
                                "deepseek-ai/DeepSeek-OCR (its *.py and *.json files; no weights needed)")
        if not options.trust_remote_code:  # before anything else: no import, no download without the opt-in
            raise FlopdiffError(f"--vendor-dir {options.vendor_dir}: loading DeepSeek-OCR imports and runs the Python "
                                f"files in that folder (Hugging Face remote code); pass --trust-remote-code to allow it")
        _check_options(options)  # before the vendor code is imported or the page preprocessed
        folder = Path(resolve_vendor_dir(options.vendor_dir, options.trust_remote_code))
        file = Path(path) if path else folder / "config.json"
        if not file.is_file():
            raise FlopdiffError(f"--vendor-dir {folder}: no config.json there (expected a copy of the Hugging Face "
                                f"repo deepseek-ai/DeepSeek-OCR: its *.py and *.json files)")
        raw = read_json(file)
        if "DeepseekOCRForCausalLM" not in raw.get("architectures", []) or any(_missing(raw, k) for k in REQUIRED_KEYS):
            raise FlopdiffError(f"{file}: not a DeepSeek-OCR config (architectures {raw.get('architectures')}; "
                                f"it needs DeepseekOCRForCausalLM and the keys {', '.join(REQUIRED_KEYS)})")
        check_config(raw, CONFIG_KINDS, CONFIG_RELATIONS, f"--config {file}")
        absent = [f for f in VENDOR_FILES if not (folder / f).is_file()]
        if absent:
            raise FlopdiffError(f"--vendor-dir {folder}: missing vendor files {', '.join(absent)}")
        self.folder, self.options = folder, options
        self.package = _import_package(folder)
        modeling = self._module("modeling_deepseekocr")
        config = modeling.DeepseekOCRConfig.from_dict(raw)
        return config

    def limits(self, config: Any) -> tuple[int, int]:
        language = config.language_config
        return language["max_position_embeddings"], language["num_hidden_layers"]

    def _module(self, name: str) -> types.ModuleType:
        return sys.modules[f"{self.package}.{name}"]

    # ---- preprocessing ----------------------------------------------------------------------------------

    def prepare(self, workload: Workload, config: Any) -> Prepared:
        """Run the vendor's infer() up to generate() and keep what it would pass."""
        modeling = self._module("modeling_deepseekocr")
        tokenizer, prompt, notes = self._tokenizer(workload)
        base = workload.base_size or 1024
        # without crops the vendor's global view is `image_size`: a lone --base-size sets it (Tiny: 512, ...)
        tile = workload.tile_size or (workload.base_size if workload.base_size and not workload.crop_mode else 640)
        image = load_image(workload)  # checked and upright before the vendor sees it
        captured = _run_infer(modeling, tokenizer, prompt, image, workload.crop_mode, base, tile)
        ids = captured.args[0]
        crop, ori = captured.kwargs["images"][0]
        mask = captured.kwargs["images_seq_mask"]
        grid = tuple(int(x) for x in captured.kwargs["images_spatial_crop"][0])
        tiles = grid[0] * grid[1] if grid != (1, 1) else 0
        inputs = {"input_ids": ids, "images": [(crop, ori)], "images_seq_mask": mask,
                  "images_spatial_crop": captured.kwargs["images_spatial_crop"]}
        self.gate = RealSums([crop, ori])
        w, h = image.size
        derived = Derived(image_wh=(w, h), base_size=base if workload.crop_mode else tile, tile_size=tile,
                          views=1 + tiles, crop_grid_wh=grid, image_tokens=int(mask.sum()), prompt_len=ids.shape[1],
                          extra={"global_view_px": int(ori.shape[-1])})
        if self.options.mode == "fake":
            notes.append(EVEN_SPLIT_NOTE)
        return Prepared(inputs, derived, notes)

    def _tokenizer(self, workload: Workload) -> tuple[Any, str, list[str]]:
        assert self.folder is not None
        tok_file = Path(workload.tokenizer) if workload.tokenizer else self.folder / "tokenizer.json"
        if tok_file.exists():
            from transformers import AutoTokenizer

            src = tok_file if tok_file.is_dir() else tok_file.parent
            try:
                tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
            except Exception as exc:  # tokenizers raise many types; name the path and the reason
                raise FlopdiffError(f"tokenizer {src}: cannot load it ({exc.__class__.__name__}: {exc})") from None
            prompt = workload.prompt if workload.prompt is not None else DEFAULT_PROMPT
            if prompt.count("<image>") != 1:
                raise FlopdiffError(f"--prompt {prompt!r}: must contain exactly one <image>")
            return tok, prompt, [f"prompt tokenized with {src}"]
        if workload.text_tokens is None:
            raise FlopdiffError(f"--text-tokens: required for --model deepseek-ocr when the vendor folder has no "
                                f"tokenizer.json ({self.folder}); the model card's document prompt is 9 tokens")
        return _Tokens(workload.text_tokens), "<image>x", []

    # ---- model ------------------------------------------------------------------------------------------

    def build(self, config: Any, options: BuildOptions) -> torch.nn.Module:
        modeling = self._module("modeling_deepseekocr")
        _check_options(options)
        attn = options.attn or "eager"
        config._attn_implementation = attn
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, options.dtype))
        try:
            with quiet_transformers():
                model = modeling.DeepseekOCRForCausalLM(config)
        except ImportError as exc:  # flash_attention_2 without the flash_attn package: transformers says so
            raise FlopdiffError(f"--attn {attn}: the model refused it: {str(exc).splitlines()[0]}") from None
        finally:
            torch.set_default_dtype(previous)
        return model.eval()

    @contextmanager
    def shims(self) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(quiet_transformers())
            if self.options.device != "cuda":
                stack.enter_context(cuda_identity())
            if self.options.mode == "fake":
                self._weight_free(stack)
            yield

    def _weight_free(self, stack: ExitStack) -> None:
        """The shims a forward without values needs (fake mode, and the ONNX exporter's meta tensors in any mode):
        moe_infer without its host copy, the rotary embedding's autocast switch on the meta device."""
        v2 = self._module("modeling_deepseekv2")
        stack.enter_context(mock.patch.object(v2.DeepseekV2MoE, "moe_infer", even_split_moe_infer))
        stack.enter_context(meta_autocast())

    def prefill(self, model: torch.nn.Module, prepared: Prepared) -> Callable[[], Any]:
        inputs = dict(prepared.inputs)
        modeling = self._module("modeling_deepseekocr")

        def run():
            if self.options.mode == "real":
                return model(**inputs, use_cache=True)
            # fake: the crop grid sizes views; as host ints the forward reads the values fake tensors hide
            grid = inputs["images_spatial_crop"].tolist()
            with mock.patch.object(modeling, "torch", self.gate):
                return model(**{**inputs, "images_spatial_crop": grid}, use_cache=True)

        return run

    def decode(self, model: torch.nn.Module, previous: Any, step: int) -> Callable[[], Any]:
        ids = torch.tensor([[TEXT_PLACEHOLDER_ID]])
        return lambda: model(input_ids=ids, past_key_values=previous.past_key_values, use_cache=True)

    def onnx_prefill(self, model: torch.nn.Module, prepared: Prepared) -> tuple[torch.nn.Module, tuple]:
        """The prefill as a module of positional tensors for torch.onnx.export (wrapped as `m`), with the fake-mode
        shims: the exporter's meta tensors can answer neither the image gate nor moe_infer's host copy."""
        inputs = prepared.inputs
        crop, ori = inputs["images"][0]
        dtype = next(model.parameters()).dtype
        return (_Prefill(model, self._module("modeling_deepseekocr"), self.gate,
                         inputs["images_spatial_crop"].tolist()),
                (inputs["input_ids"], crop.to(dtype), ori.to(dtype), inputs["images_seq_mask"]))

    @contextmanager
    def onnx_shims(self) -> Iterator[None]:
        """The fake-mode shims (in any --mode): the exporter's meta tensors can answer neither the image gate nor
        moe_infer's host copy, and the rotary embedding's autocast switch must accept the meta device."""
        with ExitStack() as stack:
            stack.enter_context(self.shims())
            if self.options.mode != "fake":  # fake mode's shims have them already
                self._weight_free(stack)
            yield

    def source_roots(self) -> list[str]:
        return [str(self.folder)] if self.folder else []

    def meta_inputs(self, prepared: Prepared, options: BuildOptions) -> Prepared | None:
        """The eager decoder runs on meta tensors (FlashAttention-2's stand-in reads its host mask: fake tensors
        there). The crop grid stays on the host (the forward gets it as a list); the image gate answers for the
        images' meta copies as for the originals."""
        if (options.attn or "eager") != "eager":
            return None
        inputs = {k: v if k == "images_spatial_crop" else to_meta(v) for k, v in prepared.inputs.items()}
        assert self.gate is not None
        self.gate.track(list(inputs["images"][0]))
        return dataclasses.replace(prepared, inputs=inputs)

    def attention(self, options: BuildOptions) -> dict[str, str]:
        return attention_parts(self.name, options)


class _Prefill(torch.nn.Module):
    def __init__(self, m: torch.nn.Module, modeling: types.ModuleType, gate: "RealSums", grid: list[list[int]]):
        super().__init__()
        self.m, self._modeling, self._gate, self._grid = m, modeling, gate, grid

    def forward(self, input_ids, crop, ori, images_seq_mask):
        self._gate.track([crop, ori])
        with mock.patch.object(self._modeling, "torch", self._gate):
            return self.m(input_ids=input_ids, images=[(crop, ori)], images_seq_mask=images_seq_mask,
                          images_spatial_crop=self._grid, use_cache=False).logits


# ---- helpers ------------------------------------------------------------------------------------------------

def _missing(raw: dict, key: str) -> bool:
    try:
        dig(raw, key)
    except KeyError:
        return True
    return False


def _check_options(options: BuildOptions) -> None:
    if options.experts is not None:
        raise FlopdiffError(f"--experts {options.experts}: DeepSeek-OCR (v1) runs its experts with its own moe_infer "
                            f"loop; the flag chooses transformers' implementation for deepseek-ocr-2")
    attn = options.attn or "eager"
    if not isinstance(attn, str) or attn not in ("eager", "flash_attention_2"):
        raise FlopdiffError(f"--attn {attn}: DeepSeek-OCR's decoder has eager and flash_attention_2 "
                            f"(its SAM and CLIP always call scaled_dot_product_attention)")


def _import_package(folder: Path) -> str:
    """Import the folder as a package of its own (its files use relative imports), once per folder."""
    name = "flopdiff_vendor_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg
        try:
            with warnings.catch_warnings():  # deprecations the old transformers raises at import under a new torch
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                importlib.import_module(f"{name}.modeling_deepseekocr")
        except ImportError as exc:
            del sys.modules[name]
            import transformers

            missing = getattr(exc, "name", None)
            if missing and not missing.startswith(("transformers", name)):
                raise FlopdiffError(_fix(f"--vendor-dir {folder}: the vendor code needs the package {missing!r}, "
                                         f"which is not installed")) from None
            raise FlopdiffError(_fix(f"--vendor-dir {folder}: the vendor code cannot be imported with transformers "
                                     f"{transformers.__version__} ({exc}); it was written for transformers 4.46.x")) from None
    return name


def _run_infer(modeling: types.ModuleType, tokenizer: Any, prompt: str, image: Any, crop_mode: bool, base: int,
               tile: int) -> _Captured:
    """infer() on `image` (flopdiff's own reading of the page: checked, upright, RGB), handed over as a PNG: the
    vendor's loader (open, exif_transpose, convert RGB) gets the same pixels, and never a file that would fail
    inside it with a traceback (a missing, truncated or garbage --image is one error line before this)."""
    def generate(*args, **kwargs):
        raise _Captured(args, kwargs)

    stand_in = types.SimpleNamespace(disable_torch_init=lambda: None, generate=generate)
    with scratch("v1") as tmp, cuda_identity(), warnings.catch_warnings():
        # infer() wraps generate() in torch.autocast("cuda"), which warns on a machine without CUDA; generate()
        # never runs here, so the warning says nothing about this run
        warnings.filterwarnings("ignore", message="CUDA is not available", category=UserWarning)
        image_file = os.path.join(tmp, "page.png")
        image.save(image_file, compress_level=1)
        try:
            modeling.DeepseekOCRForCausalLM.infer(stand_in, tokenizer, prompt=prompt, image_file=image_file,
                                                  output_path=os.path.join(tmp, "out"), base_size=base,
                                                  image_size=tile, crop_mode=crop_mode, eval_mode=True)
        except _Captured as done:
            return done
    raise FlopdiffError("the vendor's infer() returned without calling generate(); its preprocessing changed")


VENDOR = DeepseekOcrVendor()
