"""The model names --model takes: DeepSeek-OCR's two adapters by their own names, and any transformers model type as
`hf:<model_type>` (tracer.vendors.hf). What a name resolves to is decided here once: the row of defaults.yaml a model
reads (`defaults_key`), the model a `--config` file names (`model_for_config`), and the config transformers builds
for a model type (`hf_config`: the analytic model and the adapter read the same numbers). transformers is imported
only for an `hf:` name: the DeepSeek paths stay as light as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tracer.core.errors import FlopdiffError

HF = "hf:"
#: DeepSeek-OCR's adapters, by the model_type their config.json carries
OWN = {"deepseek-ocr": "deepseek_vl_v2", "deepseek-ocr-2": "deepseek_ocr2"}
DEFAULT_MODEL = "deepseek-ocr-2"


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
    own = {v: k for k, v in OWN.items()}
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
