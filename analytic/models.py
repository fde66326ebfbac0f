"""The analytic model of each vendor model, by the name --model takes: one builder per model (its own module),
registered here; any `hf:<model_type>` model is built by its family's builder (analytic.families), or as a model of
no family (no layers: every node reported without an analytic layer)."""

from __future__ import annotations

from collections.abc import Callable

from analytic.deepseek_ocr import build_v1
from analytic.deepseek_ocr2 import build_v2
from analytic.families import build_hf
from tracer.core.models import is_hf

BUILDERS = {"deepseek-ocr": build_v1, "deepseek-ocr-2": build_v2}


def builder(model: str) -> Callable:
    return build_hf if is_hf(model) else BUILDERS[model]
