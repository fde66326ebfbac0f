"""Vendor adapters: one module per model family, registered by the name the CLI takes (`--model`).

An adapter knows how to read the vendor config, build the vendor model without weights, turn a workload
into the exact vendor inputs with the vendor's own preprocessing, and run each stage's forward. Whatever
must be shimmed to run the vendor code weight-free is declared in the adapter with its reason.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from tracer.core.errors import FlopdiffError
from tracer.core.models import MODELS, check_hf, is_hf, model
from tracer.vendors.options import BuildOptions, parse_impl

if TYPE_CHECKING:  # the protocol's module imports torch: the registry stays torch-free (tracer.core.cache)
    from tracer.vendors.base import Vendor

__all__ = ["VENDORS", "BuildOptions", "check_model", "get_vendor", "parse_impl"]


def _adapter(module: str) -> "Vendor":
    return importlib.import_module(module).VENDOR


#: the adapters by model name (tracer.core.models: each model's row names its module), loaded on first use
VENDORS: dict[str, Callable[[], "Vendor"]] = {m.name: functools.partial(_adapter, m.adapter) for m in MODELS.values()}


def check_model(name: str) -> None:
    """An unknown --model, without importing any adapter (they import torch; an `hf:` name asks transformers)."""
    if is_hf(name):
        return check_hf(name)
    if name not in VENDORS:
        raise FlopdiffError(f"--model {name!r}: unknown model; choose one of {', '.join(sorted(VENDORS))}, or "
                            f"hf:MODEL_TYPE for any transformers model (hf:llama, hf:mixtral, hf:llava, ...)")


@functools.cache
def _hf(name: str) -> "Vendor":
    """An `hf:` model's adapter: one per model type (tracer.vendors.hf)."""
    return importlib.import_module(model(name).adapter).HFVendor(name)


def get_vendor(name: str) -> "Vendor":
    check_model(name)
    return _hf(name) if is_hf(name) else VENDORS[name]()
