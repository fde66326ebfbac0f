"""The analytic model of each model, by the name --model takes: the builder its row names (tracer.core.models; one
module per DeepSeek-OCR model, analytic.families for any `hf:<model_type>`, whose model of no family has no layers:
every node reported without an analytic layer)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tracer.core.models import model


def builder(name: str) -> Callable:
    module, function = model(name).analytic.split(":")
    return getattr(importlib.import_module(module), function)
