"""Python API of the analytic overlay: presets composed with OmegaConf, then evaluated per stage.

    from analytic.api import evaluate
    doc = evaluate("deepseek-ocr", image_wh=(1000, 1400), preset="aligned", policy="full")

`doc` has the JSON shape `python -m analytic --json` prints: workload, stages [{name, flops}],
layers [{id, stage, flops}] (prefill includes vision, decode sums the steps).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from analytic.blocks import VENDOR_CONSTANTS
from analytic.layers import Block, Cost, Policy
from analytic.models import builder
from analytic.plugin import is_plugin, load, plugin_tree, workload_of
from analytic.request import ModelTree, Shape, Variant
from tracer.core.configfile import read_json
from tracer.core.errors import FlopdiffError
from tracer.core.models import defaults_key, hf_config_dict, is_hf
from tracer.core.workload import Workload

PRESETS = Path(__file__).resolve().parent / "presets"
DATA = Path(__file__).resolve().parent.parent / "tracer" / "data"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml") if p.stem != "defaults")


POLICY_KEYS = {"policy.causal_halving": "causal_halving"}  # the override keys that set the counting policy


def split_overrides(overrides: list[str] | None) -> tuple[tuple[str, ...], dict[str, Any], dict[str, Any]]:
    """`key=value` overrides in three parts, by what each key sets: defaults.yaml (a dotted path into it: checked
    when composed), the preset (a Variant field: `clip_layers=2`), the counting policy (`policy.causal_halving`).
    Values are YAML (`true`, `2`, `null`)."""
    yaml, preset, pol = [], {}, {}
    for item in overrides or ():
        key, eq, _ = item.partition("=")
        if not eq or not key:
            raise FlopdiffError(f"override {item!r}: expected key=value (e.g. workload.decode_steps=5, clip_layers=2)")
        if key in Variant.__dataclass_fields__ or key in POLICY_KEYS:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={item.split('=', 1)[1]}"]))["v"]
            (preset if key in Variant.__dataclass_fields__ else pol)[POLICY_KEYS.get(key, key)] = value
        else:
            yaml.append(item)
    return tuple(yaml), preset, pol


def compose(model: str, overrides: list[str] | tuple[str, ...] | None = None) -> Any:
    """defaults.yaml + its `key=value` overrides (OmegaConf dotlist; an unknown key is refused), read-only."""
    cfg = _composed(tuple(overrides or ()))
    if defaults_key(model) not in cfg.models:
        raise FlopdiffError(f"--model {model!r}: unknown model; choose one of {', '.join(cfg.models)}")
    return cfg


@lru_cache(maxsize=64)
def _composed(overrides: tuple[str, ...]) -> Any:
    """Parsed and merged once per process and overrides: a sweep of 2,000 pages composed it 8,000 times, 96% of a
    warm sweep's 63 s. Read-only, since every caller shares it."""
    base = OmegaConf.load(PRESETS / "defaults.yaml")
    OmegaConf.set_struct(base, True)  # an override must name a key the file has
    for item in overrides:
        try:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        except Exception as exc:  # OmegaConf raises several types: unknown key, wrong type, malformed
            reason = str(exc).splitlines()[0]
            raise FlopdiffError(f"override {item}: {reason}; the keys are those of analytic/presets/defaults.yaml "
                                f"(workload.decode_steps, workload.text_tokens, models.MODEL.modes.MODE.base_size, "
                                f"...), a preset key ({', '.join(Variant.__dataclass_fields__)}) or "
                                f"{', '.join(POLICY_KEYS)}") from None
    cfg = base
    OmegaConf.set_readonly(cfg, True)
    return cfg


@lru_cache(maxsize=64)
def variant(preset: str, flag: str = "preset") -> Variant:
    """A preset by name (analytic/presets) or YAML file; `flag` names the input in errors (the CLI's flag). A plug-in
    model (analytic.plugin: module:function, an entry point, a declarative YAML model) is loaded (its errors are
    the input's) and deviates from nothing of ours: no preset setting is the cause of its gaps."""
    if is_plugin(preset):
        load(preset)
        return Variant()
    path = Path(preset)
    if not path.suffix:
        path = PRESETS / f"{preset}.yaml"
    if not path.is_file() or path.stem == "defaults":
        raise FlopdiffError(f"{flag} {preset!r}: unknown preset; choose one of {', '.join(presets())} or a YAML file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # yaml and OmegaConf raise many types for a malformed file; say where and what
        raise FlopdiffError(f"{flag} {preset}: not a valid YAML preset ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise FlopdiffError(f"{flag} {preset}: expected a mapping of preset keys "
                            f"({', '.join(Variant.__dataclass_fields__)})")
    try:
        return Variant(**raw)
    except TypeError as exc:
        raise FlopdiffError(f"{flag} {preset}: {exc}; the keys are {', '.join(Variant.__dataclass_fields__)}") from None
    except FlopdiffError as exc:
        raise FlopdiffError(f"{flag} {preset}: {exc}") from None


def counting_policy(name: str, device: str = "cpu", causal_halving: bool = False) -> Policy:
    if name not in ("torch", "full"):
        raise FlopdiffError(f"--policy {name!r}: choose torch or full")
    return Policy(ignore_torch_unsupported_flops=name == "torch", device=device, causal_halving=causal_halving)


def build(model: str, shape: Shape, preset: str = "aligned", config: str | None = None,
          attention: dict[str, str] | None = None, changes: dict[str, Any] | None = None,
          policy: Policy | None = None) -> ModelTree:
    """`attention`: the implementation per part ({"decoder": ..., "vision": ...}; None: the vendor defaults), which
    says which op carries each attention's matmuls (what policy torch counts); `changes`: preset fields overridden
    (`clip_layers=2`); `policy`: what a plug-in model is told it is counted under (default full)."""
    if is_hf(model):  # transformers' config for the model type: the file's keys over its class's defaults
        path, cfg = config or model, _hf_config(model, config)
    else:
        path = Path(config) if config else DATA / model / "config.json"
        cfg = _config(str(path))
    if is_plugin(preset):  # the workload it is told of: the vendor-exact model's views and prompt
        if is_hf(model):
            raise FlopdiffError(f"--analytic {preset}: a plug-in model is for DeepSeek-OCR's adapters; for {model} "
                                f"use the generic families (aligned) or a preset")
        base = builder(model)(cfg, shape, where=f"--config {path}", attention=attention)
        c = VENDOR_CONSTANTS[model]
        return plugin_tree(preset, model, cfg,
                           workload_of(model, shape, base.views, base.prompt_len, c["patch"], c["downsample"]),
                           base.views, policy or counting_policy("full"))
    chosen = variant(preset)
    if changes:
        try:
            chosen = dataclasses.replace(chosen, **changes)
        except FlopdiffError as exc:
            raise FlopdiffError(f"override {exc}") from None
    return builder(model)(cfg, shape, where=f"--config {path}", variant=chosen, attention=attention)


def model_text_tokens(model: str, given: int | None = None, overrides: tuple[str, ...] = ()) -> int:
    """`given`, else the workload's default text tokens for the model (defaults.yaml: `workload.text_tokens`, else
    `models.MODEL.text_tokens`): flopdiff's --text-tokens default too."""
    if given is not None:
        return given
    cfg = compose(model, overrides)
    return cfg.workload.text_tokens if cfg.workload.text_tokens is not None else cfg.models[defaults_key(model)].text_tokens


@lru_cache(maxsize=16)
def _hf_config(model: str, path: str | None) -> dict:
    """An `hf:` model's config as transformers builds it (tracer.core.models.hf_config_dict), once per process."""
    return hf_config_dict(model, path)


@lru_cache(maxsize=16)
def _config(path: str) -> dict:
    """Parsed once per process: a sweep evaluates thousands of workloads on one config (never mutated)."""
    return read_json(Path(path))


def mode_knobs(model: str, mode: str | None = None, overrides: list[str] | None = None,
               flag: str = "--mode") -> Any:
    """A vendor resolution mode's base_size, tile_size and crop_mode (defaults.yaml; None: the model's default)."""
    m = compose(model, overrides).models[defaults_key(model)]
    mode = mode or m.default_mode
    if mode not in m.modes:
        raise FlopdiffError(f"{flag} {mode!r}: {model} has the modes {', '.join(m.modes)}")
    return m.modes[mode]


def resolution_knobs(model: str, resolution: str | None, given: dict[str, Any], flag: str = "--resolution") -> dict[str, Any]:
    """base_size, tile_size and crop_mode as given (`given`, None where not), else the `resolution` mode's (None: the
    vendor's default stays None)."""
    if not resolution:
        return given
    mode = mode_knobs(model, resolution, flag=flag)
    return {k: getattr(mode, k) if v is None else v for k, v in given.items()}


def request_shape(workload: Workload) -> Shape:
    """The analytic model's view of a request before any preprocessing (its knobs; the vendor defaults for the rest):
    what the checks before a trace, the real-mode estimate and the sweep's pages read."""
    return shape_for(workload.model, workload.image_wh, base_size=workload.base_size, tile_size=workload.tile_size,
                     crop_mode=workload.crop_mode, text_tokens=model_text_tokens(workload.model, workload.text_tokens),
                     decode_steps=workload.decode_steps)


def shape_for(model: str, image_wh: tuple[int, int], mode: str | None = None, base_size: int | None = None,
              tile_size: int | None = None, crop_mode: bool | None = None, text_tokens: int | None = None,
              decode_steps: int | None = None, overrides: list[str] | None = None) -> Shape:
    if not (isinstance(image_wh, (tuple, list)) and len(image_wh) == 2):
        raise FlopdiffError(f"image_wh {image_wh!r}: must be (width, height)")
    yaml = split_overrides(overrides)[0]
    knobs = mode_knobs(model, mode, list(yaml))
    w = compose(model, yaml).workload
    return Shape(image_wh[0], image_wh[1], knobs.base_size if base_size is None else base_size,
                 knobs.tile_size if tile_size is None else tile_size,
                 knobs.crop_mode if crop_mode is None else crop_mode,
                 model_text_tokens(model, text_tokens, yaml),
                 w.decode_steps if decode_steps is None else decode_steps)


#: the six columns of an analytic layer (analytic.layers.Cost), as report.json and `--json` name them
COLUMNS = ("flops", "cuda_flops", "io_bytes", "weight_bytes", "act_bytes", "kv_bytes")


def _columns(cost: Cost) -> dict[str, int]:
    return dict(zip(COLUMNS, cost.astuple()))


def evaluate_tree(tree: ModelTree, shape: Shape, pol: Policy) -> dict[str, Any]:
    """Per stage and layer every column (`flops` is the tensor-core count; I/O the fused convention: a layer's
    inputs, outputs and weights once; a stage's `weight_bytes` each weight once; `kv_bytes` the cache after the stage)."""
    layers = []
    stages = []
    for name, blocks in tree.stages.items():
        by_id: dict[str, list[Cost]] = {}
        for block in blocks:
            for leaf in block.leaves():
                by_id.setdefault(leaf.id, []).append(leaf.cost(pol))
        # the KV cache is a state, not a sum: the stage's (and a layer's) is the one after its last forward (decode:
        # the last step's block; another stage is one forward, however many blocks), the other columns add up
        last = blocks[-1:] if name == "decode" else blocks
        stages.append({"name": name, **_columns(Cost.total(b.cost(pol) for b in blocks)),
                       "kv_bytes": sum(b.cost(pol).kv_bytes for b in last),
                       "weight_bytes": sum(_distinct_weights(b, pol) for b in blocks)})
        layers += [{"id": k, "stage": name, **_columns(Cost.total(v)), "kv_bytes": v[-1].kv_bytes}
                   for k, v in by_id.items()]
    v = tree.views
    return {
        "workload": {"image_wh": [shape.width, shape.height], "base_size": shape.base_size, "tile_size": shape.tile_size,
                     "crop_mode": shape.crop_mode, "views": 1 + v.tiles, "crop_grid_wh": list(v.crop_grid_wh),
                     "image_tokens": v.image_tokens, "prompt_len": tree.prompt_len, "decode_steps": shape.decode_steps},
        "stages": stages,
        "layers": layers,
    }


def _distinct_weights(block: Block, pol: Policy) -> int:
    """A block's weights, each once: a layer run on several kinds of view (tiles, global) has one set of weights (a
    stage's weights are what it reads, each parameter once: a decode step's block reads its own); a layer whose views
    read different parameters under one id says so by its `param`."""
    distinct: dict[str, int] = {}
    for leaf in block.leaves():
        key = getattr(leaf, "param", "") or leaf.id.replace(".tiles.", ".").replace(".global.", ".")
        distinct[key] = leaf.distinct_weight_bytes(pol)
    return sum(distinct.values())


def weight_bytes(tree: ModelTree) -> int:
    """Bytes of the distinct weights the prefill reads (the rows of the token embedding its prompt looks up)."""
    return sum(_distinct_weights(block, counting_policy("full")) for block in tree.stages["prefill"])


def evaluate(model: str, image_wh: tuple[int, int], preset: str = "aligned", policy_name: str = "full",
             config: str | None = None, **knobs: Any) -> dict[str, Any]:
    """The analytic model of one workload as a document; `knobs`: shape_for's, `overrides` included (each acts:
    defaults.yaml keys on the workload, preset keys on the preset, policy keys on the counting)."""
    shape = shape_for(model, image_wh, **knobs)
    _, preset_changes, policy_changes = split_overrides(knobs.get("overrides"))
    return evaluate_tree(build(model, shape, preset, config, changes=preset_changes), shape,
                         counting_policy(policy_name, **policy_changes))
