"""What the analytic model is asked and what it answers with: the workload's `Shape` (what the vendor
preprocessing derives from a page, checked field by field), the preset's deviations from the vendor (`Variant`) and
the layers each one changes (`VARIANT_EFFECTS`), and the `ModelTree` of Blocks per stage."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from analytic.layers import Block
from analytic.shapes import Views
from tracer.core.errors import FlopdiffError
from tracer.core.workload import MAX_PIXELS, MAX_SIDE


@dataclass(frozen=True)
class Shape:
    """What a builder needs of the workload (the tracer's Workload maps onto it one to one)."""

    width: int
    height: int
    base_size: int | None  # None: a model whose processor sizes the views itself (tracer.vendors.hf)
    tile_size: int | None
    crop_mode: bool
    text_tokens: int
    decode_steps: int

    def __post_init__(self) -> None:
        """API input is checked here, by field name (the command lines check their flags before)."""
        _require(self, {"width": _positive, "height": _positive, "base_size": _sized_view,
                        "tile_size": _sized_view,
                        "crop_mode": _bool, "text_tokens": _count, "decode_steps": _count})

        if max(self.width, self.height) > MAX_SIDE or self.width * self.height > MAX_PIXELS:
            raise FlopdiffError(f"image_wh ({self.width}, {self.height}): over {MAX_SIDE} px on a side or "
                                f"{MAX_PIXELS // 1_000_000} Mpx; give the real page size")


@dataclass(frozen=True)
class Variant:
    """Deviations from the vendor (presets/*.yaml): `aligned` has none; `seed-naive` has all."""

    single_view: bool = False
    clip_layers: int | None = None
    projector_tokens: int | None = None
    decode_kv_growth: bool = True

    def __post_init__(self) -> None:
        _require(self, {"single_view": _bool, "clip_layers": _optional(_count), "projector_tokens": _optional(_positive),
                        "decode_kv_growth": _bool}, where="preset")


@dataclass(frozen=True)
class Effect:
    """What one preset setting does to the model, by the layer ids it touches: the reports name it as the cause of
    those layers' gaps. `pattern` is a regex over layer ids; `index` (a group of the pattern) is compared with the
    setting's value when `from_index` (a layer from that index on is left out)."""

    setting: str
    pattern: str
    says: str
    stages: tuple[str, ...] = ("vision", "prefill", "decode")
    from_index: bool = False


# A setting is active when it differs from the aligned (vendor-exact) default.
VARIANT_EFFECTS = (
    Effect("single_view", r"vision\.tiles\.", "tile views not modelled"),
    Effect("clip_layers", r"vision\.\w+\.(?:clip|encoder)\.layers\.(?P<index>\d+)\.",
           "encoder blocks from this index on not modelled", from_index=True),
    Effect("projector_tokens", r"vision\.\w+\.projector$", "projector on a fixed token count"),
    Effect("decode_kv_growth", r"decoder\.layers\.\d+\.attn$", "KV cache not grown per decode step",
           stages=("decode",)),
)


def variant_cause(variant: Variant, stage: str, layer_id: str) -> str | None:
    """The preset setting behind a layer's gap, as `setting: value (what it does)`, or None."""
    default = Variant()
    for e in VARIANT_EFFECTS:
        value = getattr(variant, e.setting)
        if value == getattr(default, e.setting) or stage not in e.stages:
            continue
        m = re.search(e.pattern, layer_id)
        if m and (not e.from_index or int(m.group("index")) >= value):
            shown = str(value).lower() if isinstance(value, bool) else value
            return f"preset {e.setting}: {shown} ({e.says})"
    return None


_positive = (lambda v: type(v) is int and v > 0, "a positive integer")


_count = (lambda v: type(v) is int and v >= 0, "an integer >= 0")


_bool = (lambda v: type(v) is bool, "true or false")


_view = (lambda v: type(v) is int and v >= 64 and v % 16 == 0, "a multiple of the patch size 16, at least 64")
# None: an `hf:` model, whose processor sizes its one view itself (tracer.vendors.hf)
_sized_view = (lambda v: v is None or _view[0](v), f"{_view[1]} (or null: a model whose processor sizes its views)")


def _optional(rule: tuple) -> tuple:
    test, what = rule
    return (lambda v: v is None or test(v), f"null or {what}")


def _require(obj: Any, rules: dict[str, tuple], where: str = "") -> None:
    for name, (test, what) in rules.items():
        value = getattr(obj, name)
        if not test(value):
            raise FlopdiffError(f"{where + ' ' if where else ''}{name} = {value!r}: must be {what}")


@dataclass
class ModelTree:
    model: str
    views: Views
    prompt_len: int
    stages: dict[str, list[Block]] = field(default_factory=dict)  # decode: one Block per step
