"""The build options and the facts about each model that need no vendor code, torch-free: the command line, the
sweep and a run served from the trace cache (tracer.cache) read them without importing torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass

from tracer.errors import FlopdiffError


def parse_impl(text: str, flag: str) -> str | dict[str, str]:
    """An --attn/--experts value: 'sdpa', or 'text_config=flex_attention,vision_config=sdpa' (one per sub-config)."""
    if "=" not in text:
        return text
    try:
        return dict(part.split("=", 1) for part in text.split(","))
    except ValueError:
        raise FlopdiffError(f"{flag} {text!r}: expected NAME or SUBCONFIG=NAME[,SUBCONFIG=NAME...]") from None


@dataclass(frozen=True)
class BuildOptions:
    """How to load and instantiate the vendor model. `attn` / `experts` take one value or {sub_config: value}
    (None: the vendor's default). `mode`: "fake" (no weights, no compute) or "real" (random weights).
    `attn_plugins`: user attention functions (tracer.attention), each usable by its name in `attn`."""

    attn: str | dict[str, str] | None = None
    experts: str | dict[str, str] | None = None
    dtype: str = "bfloat16"             # a torch dtype's name: the weights are built in it
    device: str = "cpu"
    mode: str = "fake"
    vendor_dir: str | None = None
    trust_remote_code: bool = False
    attn_plugins: tuple[str, ...] = ()  # [NAME=]module:function, registered as attention implementations


#: the experts implementation when --experts is not given (None: the model has no such choice)
DEFAULT_EXPERTS = {"deepseek-ocr": None, "deepseek-ocr-2": "grouped_mm"}


def implementations(attn: str | dict[str, str] | None) -> set[str]:
    """The attention implementation names an --attn value chooses."""
    return set(attn.values()) if isinstance(attn, dict) else {attn} if attn else set()


def attention_parts(model: str, options: BuildOptions) -> dict[str, str]:
    """The attention implementation of each analytic part the options choose ({"decoder": ..., "vision": ...}).
    deepseek-ocr: --attn is the decoder's (SAM and CLIP call scaled_dot_product_attention themselves);
    deepseek-ocr-2: text_config's runs the decoder, vision_config's SAM and the encoder (one name: both)."""
    if model == "deepseek-ocr":
        return {"decoder": options.attn or "eager", "vision": "sdpa"}
    attn = options.attn or "sdpa"
    if isinstance(attn, str):
        return {"decoder": attn, "vision": attn}
    return {"decoder": attn.get("text_config", attn.get("", "sdpa")),
            "vision": attn.get("vision_config", attn.get("", "sdpa"))}
