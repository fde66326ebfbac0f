"""Bring your own analytic model: a function of the vendor config, the workload and the counting policy that returns
the layer tree flopdiff diffs against the trace, in place of its own (`--analytic module:function`, an installed
package's entry point in the group `flopdiff.analytic`, or a declarative YAML model: analytic.declarative).

The contract (stable; README "Bring your own analytic model"):

    def my_model(config: dict, workload: analytic.plugin.Workload, policy: analytic.layers.Policy)
            -> dict[str, list[layer]]     # {"vision": [...], "prefill": [...], "decode": [one per step]}

A layer is one of `analytic.layers`' primitives (Linear, Conv2d, Attention, Experts, Elementwise, Embedding, Buffer,
KVCache, Layout, Block...) or an object of the user's with `id` (unique in its stage), `cost(policy)` returning the six
columns (an `analytic.layers.Cost`, or any object or mapping with `tc_flops, cuda_flops, io_bytes, weight_bytes,
act_bytes, kv_bytes`), and optionally `explain(policy) -> str`, `formula` and `children` (a block). The stages' layer
ids are the user's: a mapping table (`--mapping`) points graph nodes at them; flopdiff's own table's ids work as they
are. Whatever the function does wrong (cannot be imported, raises, returns something else, a layer without an id or
six columns) is one line naming the plug-in and the layer, exit 2; never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from analytic.layers import Block, Cost, Layer, Policy
from analytic.request import ModelTree, Shape
from analytic.shapes import Views
from tracer.core.errors import FlopdiffError

ENTRY_POINTS = "flopdiff.analytic"
STAGES = ("vision", "prefill", "decode")


@dataclass(frozen=True)
class Workload:
    """What a plug-in is told of the workload, derived from the page exactly as the vendor preprocessing does."""

    model: str
    image_wh: tuple[int, int]
    base_size: int
    tile_size: int
    crop_mode: bool
    views: int                     # 1 global view + the tiles
    tiles: int
    crop_grid_wh: tuple[int, int]  # (columns, rows) of tiles; (1, 1) without
    global_px: int                 # the global view's side (padded, square)
    tile_px: int
    global_tokens: int             # vision tokens of the global view after the encoder's downsampling (16 px x 4)
    tile_tokens: int               # of one tile
    image_tokens: int              # in the prompt (the vendor's newlines and separator included)
    text_tokens: int
    prompt_len: int                # BOS + image tokens + text tokens
    decode_steps: int


def workload_of(model: str, shape: Shape, views: Views, prompt_len: int, patch: int, downsample: int) -> Workload:
    return Workload(model, (shape.width, shape.height), shape.base_size, shape.tile_size, shape.crop_mode,
                    1 + views.tiles, views.tiles, views.crop_grid_wh, views.global_px, views.tile_px,
                    (views.global_px // patch // downsample) ** 2, (views.tile_px // patch // downsample) ** 2,
                    views.image_tokens, shape.text_tokens, prompt_len, shape.decode_steps)


ModelFn = Callable[[dict, Workload, Policy], Any]


def is_plugin(spec: str) -> bool:
    """`module:function`, a declarative YAML model (a file with `stages:`), or an installed entry point's name."""
    if spec.endswith((".yaml", ".yml")):
        from analytic.declarative import is_model_file

        return is_model_file(Path(spec))
    return ":" in spec or spec in _entry_points()


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}


@lru_cache(maxsize=32)
def load(spec: str) -> ModelFn:
    """The plug-in's function (checked callable); FlopdiffError naming it when it cannot be had."""
    where = f"--analytic {spec}"
    if spec.endswith((".yaml", ".yml")):
        from analytic.declarative import model_function

        return model_function(Path(spec))
    if spec in _entry_points():
        try:
            fn = _entry_points()[spec].load()
        except Exception as exc:  # any import-time failure of the user's package: say which and why
            raise FlopdiffError(f"{where}: entry point {spec!r} ({ENTRY_POINTS}) cannot be loaded: "
                                f"{type(exc).__name__}: {exc}") from None
    else:
        module, _, name = spec.rpartition(":")
        if not module or not name:
            raise FlopdiffError(f"{where}: expected module:function or file.py:function (e.g. "
                                f"examples.naive_model:build)")
        try:
            fn = getattr(_module(module), name)
        except ModuleNotFoundError as exc:
            raise FlopdiffError(f"{where}: cannot import {exc.name} (is it on PYTHONPATH, or installed?)") from None
        except FileNotFoundError:
            raise FlopdiffError(f"{where}: no such file {module}") from None
        except AttributeError:
            raise FlopdiffError(f"{where}: {module} has no {name!r}") from None
        except Exception as exc:  # the user's module failed while importing
            raise FlopdiffError(f"{where}: importing {module} raised {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise FlopdiffError(f"{where}: {spec} is not callable; it must be a function (config, workload, policy)")
    return fn


def _module(module: str) -> Any:
    """A file (`path/to/model.py`) or a module importable from the current directory, as `python -m` would."""
    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise FileNotFoundError(module)
        spec = importlib.util.spec_from_file_location(f"flopdiff_plugin_{path.stem}", path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(module)


def plugin_tree(spec: str, model: str, config: dict, workload: Workload, views: Views, policy: Policy) -> ModelTree:
    """Run the plug-in and check what it returned: every stage a list of layers (ours, or the user's, adapted)."""
    where = f"--analytic {spec}"
    try:
        result = load(spec)(config, workload, policy)
    except FlopdiffError as exc:
        raise FlopdiffError(f"{where}: {exc}") from None
    except Exception as exc:  # the user's code failed: one line, its type and message
        raise FlopdiffError(f"{where}: the plug-in raised {type(exc).__name__}: {exc}") from None
    if isinstance(result, ModelTree):
        stages = result.stages
    elif isinstance(result, Mapping):
        stages = result
    else:
        raise FlopdiffError(f"{where}: the plug-in returned {type(result).__name__}; expected a mapping of stage "
                            f"({', '.join(STAGES)}) -> list of layers")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or "prefill" not in stages:
        raise FlopdiffError(f"{where}: the plug-in returned the stages {sorted(stages)}; expected "
                            f"{', '.join(STAGES)} (prefill at least; decode: one entry per step)")
    tree = ModelTree(model, views, workload.prompt_len)
    for stage in STAGES:
        items = stages.get(stage, [])
        if not isinstance(items, (list, tuple)):
            raise FlopdiffError(f"{where}: stage {stage}: expected a list of layers, got {type(items).__name__}")
        tree.stages[stage] = [adapt(item, f"{where}: stage {stage}", policy) for item in items]
    return tree


def adapt(item: Any, where: str, policy: Policy) -> Layer:
    """One of ours as it is; the user's as a `Foreign` layer (its children adapted), checked once here."""
    if isinstance(item, Block):  # ours, holding the user's layers perhaps
        item.children = [adapt(c, where, policy) for c in item.children]
        return item
    if isinstance(item, Layer):
        return item
    lid = getattr(item, "id", None)
    if not isinstance(lid, str) or not lid:
        raise FlopdiffError(f"{where}: {type(item).__name__} {item!r:.80}: a layer needs an `id` (a non-empty str)")
    children = getattr(item, "children", None)
    if children is not None:
        return Block(lid, children=[adapt(c, where, policy) for c in children])
    if not callable(getattr(item, "cost", None)):
        raise FlopdiffError(f"{where}: layer {lid}: {type(item).__name__} has no cost(policy)")
    layer = Foreign(lid, obj=item, where=where)
    layer.work(policy)  # the six columns checked now, not in the middle of a report
    return layer


@dataclass
class Foreign(Layer):
    """A user's layer: its own cost and explanation, in flopdiff's Layer shape."""

    obj: Any = None
    where: str = ""
    op: str = "python"

    formula: ClassVar[str] = ""

    def work(self, policy: Policy) -> Cost:
        try:
            c = self.obj.cost(policy)
        except Exception as exc:  # the user's formula failed
            raise FlopdiffError(f"{self.where}: layer {self.id}: cost() raised {type(exc).__name__}: {exc}") from None
        get = c.get if isinstance(c, Mapping) else lambda k, d=None: getattr(c, k, d)
        values = [get(f.name) for f in fields(Cost)]
        if not all(type(v) is int and v >= 0 for v in values):
            raise FlopdiffError(f"{self.where}: layer {self.id}: cost() returned {c!r:.120}; expected the six columns "
                                f"{', '.join(f.name for f in fields(Cost))}, each an int >= 0")
        return Cost(*values)

    def explain(self, policy: Policy) -> str:
        own = getattr(self.obj, "explain", None)
        if callable(own):
            return str(own(policy))
        formula = getattr(self.obj, "formula", "") or "(the plug-in gives no formula)"
        return f"{type(self.obj).__name__}: {formula} = {self.cost(policy).tc_flops:,}"
