"""The model names --model takes: DeepSeek-OCR's two adapters by their own names, and any transformers model type as
`hf:<model_type>` (tracer.vendors.hf). What a name resolves to is decided here once: the row of defaults.yaml a model
reads (`defaults_key`), the model a `--config` file names (`model_for_config`), and the config transformers builds
for a model type (`hf_config`: the analytic model and the adapter read the same numbers). transformers is imported
only for an `hf:` name: the DeepSeek paths stay as light as before."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tracer.core.errors import FlopdiffError

HF = "hf:"
DEFAULT_MODEL = "deepseek-ocr-2"


@dataclass(frozen=True)
class Model:
    """A model's facts that need no vendor code: one row per model (`MODELS`; an `hf:` model's is `HF_MODEL`'s with its
    type). The rest of a model lives in its adapter (tracer.vendors.<adapter>), its analytic builder, its mapping table
    (mapping/tables/<table>.yaml) and its workload defaults (analytic/presets/defaults.yaml, row `defaults_key`)."""

    name: str
    model_type: str               # the `model_type` its config.json carries
    adapter: str                  # the module whose VENDOR is its adapter
    analytic: str                 # its analytic builder, module:function
    code: str                     # where the code that runs lives: "vendor-dir" (remote code) or "transformers:<package>"
    decoder_attn: str = "sdpa"    # the decoder's attention implementation when --attn is not given
    vision_attn: str | None = None  # fixed by the vendor code (None: what --attn gives the vision tower, else sdpa)
    default_experts: str | None = None  # the experts implementation when --experts is not given (None: the model's)
    experts_choice: bool = True   # whether --experts means anything (v1's remote code has its own loop)
    table: str = ""               # its mapping table's name (default: the model's)


MODELS = {m.name: m for m in (
    # v1's SAM and CLIP call scaled_dot_product_attention themselves: --attn is the decoder's (transformers 4.46, eager)
    Model("deepseek-ocr", "deepseek_vl_v2", "tracer.vendors.deepseek_ocr", "analytic.deepseek_ocr:build_v1",
          "vendor-dir", decoder_attn="eager", vision_attn="sdpa", experts_choice=False),
    Model("deepseek-ocr-2", "deepseek_ocr2", "tracer.vendors.deepseek_ocr2", "analytic.deepseek_ocr2:build_v2",
          "transformers:deepseek_ocr2", default_experts="grouped_mm"),
)}
HF_MODEL = Model(HF, "", "tracer.vendors.hf", "analytic.families:build_hf", "transformers:", table="hf")


@dataclass(frozen=True)
class Family:
    """A family of transformers models analytic.families describes: its model types, and where its modules sit in
    the traced model (the generic mapping table's `${text}` and `${vision}`, the adapter's vision stage)."""

    name: str
    model_types: tuple[str, ...]
    text: str                  # the decoder's module path (the base model's)
    vision: str | None = None  # the vision tower's (vision-language families); its projector: model.multi_modal_projector


FAMILIES = (
    Family("dense decoder", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), text="model"),
    Family("MoE decoder", ("mixtral", "qwen2_moe", "qwen3_moe"), text="model"),
    Family("DeepSeek-V3", ("deepseek_v3",), text="model"),
    Family("LLaVA", ("llava",), text="model.language_model", vision="model.vision_tower"),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_of(kind: str) -> Family | None:
    """The family of a transformers model type (None: no family describes it)."""
    return _BY_TYPE.get(kind)


def model(name: str) -> Model:
    """The row of a model name (an `hf:` name: the generic row, with its type; an unknown name: KeyError)."""
    if is_hf(name):
        kind = model_type(name)
        return replace(HF_MODEL, name=name, model_type=kind, code=f"transformers:{kind.replace('-', '_')}")
    return MODELS[name]


def is_hf(model: str) -> bool:
    return model.startswith(HF)


def model_type(model: str) -> str:
    return model[len(HF):]


def defaults_key(model: str) -> str:
    """The row of analytic/presets/defaults.yaml (modes, text tokens) a model reads: its own, or `hf`'s."""
    return "hf" if is_hf(model) else model


def check_hf(model: str) -> None:
    """An `hf:` name must be a model type transformers knows."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    kind = model_type(model)
    if kind not in CONFIG_MAPPING_NAMES:
        near = sorted(k for k in CONFIG_MAPPING_NAMES if k.startswith(kind[:3]))[:6]
        raise FlopdiffError(f"--model {model}: transformers has no model type {kind!r}"
                            f"{' (close: ' + ', '.join(near) + ')' if near else ''}; the model types are the "
                            f"`model_type` of a config.json")


def model_for_config(path: str | None) -> str:
    """The model a --config file is for, when --model is not given: DeepSeek-OCR's own adapters for their model
    types, `hf:<model_type>` for any other, the default model without a file."""
    if not path or not Path(path).is_file():  # a pipe is read once, later (tracer.core.inputs): no peeking
        return DEFAULT_MODEL
    try:
        kind = json.loads(Path(path).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_MODEL  # the adapter reads the file again and says what is wrong with it
    if not isinstance(kind, str):
        raise FlopdiffError(f"--config {path}: no `model_type`; give --model (deepseek-ocr, deepseek-ocr-2 or "
                            f"hf:MODEL_TYPE)")
    own = {m.model_type: m.name for m in MODELS.values()}
    return own.get(kind, f"{HF}{kind}")


def hf_config(kind: str, raw: dict[str, Any], where: str) -> Any:
    """transformers' configuration for a model type: `raw` (a config.json's keys; `model_type` must be `kind`) over
    the configuration class's defaults."""
    from transformers import AutoConfig

    if raw.get("model_type", kind) != kind:
        raise FlopdiffError(f"{where}: its model_type is {raw['model_type']!r}, not {kind!r}; pass --model "
                            f"hf:{raw['model_type']} or the matching config")
    try:
        return AutoConfig.for_model(kind, **{k: v for k, v in raw.items() if k != "model_type"})
    except (ValueError, TypeError, KeyError) as exc:
        raise FlopdiffError(f"{where}: transformers refused the config ({str(exc).splitlines()[0]})") from None


def hf_config_dict(model: str, path: str | None) -> dict[str, Any]:
    """The config of an `hf:` model as the analytic model reads it: the file's keys over the defaults, nested
    configs as dicts (what the adapter builds the model from)."""
    raw = json.loads(Path(path).read_text()) if path else {}
    return hf_config(model_type(model), raw, f"--config {path}" if path else f"--model {model}").to_dict()
