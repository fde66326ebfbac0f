"""What every vendor adapter is and makes (tracer.vendors lists the adapters): the build options, the prepared inputs
and the adapter protocol, in a module of their own so that the adapters import it and not the registry."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tracer.workload import Derived, Workload


@dataclass(frozen=True)
class BuildOptions:
    """How to load and instantiate the vendor model. `attn` / `experts` take one value or {sub_config: value}
    (None: the vendor's default). `mode`: "fake" (no weights, no compute) or "real" (random weights)."""

    attn: str | dict[str, str] | None = None
    experts: str | dict[str, str] | None = None
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    mode: str = "fake"
    vendor_dir: str | None = None
    trust_remote_code: bool = False


@dataclass
class Prepared:
    """The vendor inputs for one workload (real tensors) and what the preprocessing derived."""

    inputs: dict[str, Any]
    derived: Derived
    notes: list[str] = field(default_factory=list)


class Vendor(Protocol):
    name: str
    #: module paths whose nodes form the `vision` stage (vision tower + projector)
    vision_modules: tuple[str, ...]
    #: the experts implementation when --experts is not given (None: the model has no such choice)
    default_experts: str | None

    def load_config(self, path: str | None, options: BuildOptions) -> Any: ...
    # (positions the decoder takes, decoder layers): the workload's hard limit and its capture cost
    def limits(self, config: Any) -> tuple[int, int]: ...
    def prepare(self, workload: Workload, config: Any) -> Prepared: ...
    def build(self, config: Any, options: BuildOptions) -> torch.nn.Module: ...
    def shims(self) -> AbstractContextManager[None]: ...
    def prefill(self, model: torch.nn.Module, prepared: Prepared) -> Callable[[], Any]: ...
    # `previous`: the forward output before, read through its `cache` or `past_key_values`; with both None it
    # is a one-token forward without cache (the decode worker's template, tracer.parallel)
    def decode(self, model: torch.nn.Module, previous: Any, step: int) -> Callable[[], Any]: ...
    def source_roots(self) -> list[str]: ...
