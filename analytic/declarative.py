"""A declarative analytic model: the layer tree of a plug-in (analytic.plugin) written as data, so that a model like
"num_views = 1 + w_crop * h_crop; projector tokens = global + per-tile tokens x tiles" is a file, not code.

    model: deepseek-ocr                       # the vendor model it describes (checked against --model)
    vars:                                     # names for the expressions below, evaluated in order
      width: ${config.vision_config.width.sam_vit_b.width}     # OmegaConf interpolation: config and workload values
      views: 1 + workload.tiles               # then arithmetic over vars, workload.<field> and loop variables
    stages:
      vision:
        - repeat: {i: 12}                     # the entries under `layers`, once per i = 0..11 (a count expression)
          layers:
            - {Linear: "vision.global.sam.blocks.{i}.qkv", tokens: views * 4096, d_in: width, d_out: 3 * width}
        - {block: vision.global.clip, layers: [...]}           # a Block of its entries
      prefill:
        - include: vision                     # another stage's (or a part's) entries, evaluated again
        - {include: decoder, let: {new: workload.prompt_len}}  # `let`: names for the included entries
      decode:
        - repeat: {k: workload.decode_steps}  # decode: one entry per step (a block per step)
          layers: [{block: decoder, layers: [...]}]

`parts` holds named entry lists that stages include (not stages themselves). A leaf names its primitive (`analytic.layers`: Linear, Conv2d, Attention, Experts, Elementwise, Embedding, Buffer,
KVCache, Layout, RelPos, Rope) as its key, with its id as the value (`{i}`-style fields of the loop variables are
filled in) and the primitive's fields beside it; `glue` and `traffic` are lists of [what, expression]. Expressions:
integers, + - * / // % **, comparisons (`in` a list var: `i in global_attn`), `a if c else b`, and, or, not, min,
max, ceil, floor; names are vars, loop variables and `workload.<field>` (analytic.plugin.Workload). Anything else (an unknown key, primitive or field, a name
no var defines, a bad expression) is one line naming the file and the entry, exit 2.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from analytic import layers as primitives
from analytic.layers import Block, Layer, Policy
from tracer.core.errors import FlopdiffError

PRIMITIVES = {cls.__name__: cls for cls in (primitives.Linear, primitives.Conv2d, primitives.Attention,
                                            primitives.Experts, primitives.Elementwise, primitives.Embedding,
                                            primitives.Buffer, primitives.KVCache, primitives.Layout,
                                            primitives.RelPos, primitives.Rope)}
_STRUCTURE = {"block", "layers", "repeat", "include"}


def is_model_file(path: Path) -> bool:
    """A YAML file with `stages:` is a model; without, a preset (analytic.api.variant)."""
    return _is_model_file(str(path))


@lru_cache(maxsize=64)
def _is_model_file(path: str) -> bool:
    """Read once per process: a sweep asks it for every page."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # unreadable or malformed: not a model; the preset loader says what is wrong with it
        return False
    return isinstance(raw, dict) and "stages" in raw


def model_function(path: Path):
    """The file as a plug-in function (config, workload, policy) -> {stage: [layers]}."""
    spec = _load(str(path))

    def build(config: dict, workload: Any, policy: Policy) -> dict[str, list[Layer]]:
        if spec["model"] != workload.model:
            raise FlopdiffError(f"{path}: describes model {spec['model']!r}, the run traces {workload.model!r}")
        return Model(path, spec, config, workload).stages()

    return build


@lru_cache(maxsize=16)
def _load(path: str) -> dict[str, Any]:
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # OmegaConf and the YAML parser raise several types
        raise FlopdiffError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or "model" not in raw:
        raise FlopdiffError(f"{path}: expected keys model, stages (a mapping of stage -> entries), vars and parts "
                            f"(optional)")
    extra = set(raw) - {"model", "vars", "parts", "stages"}
    if extra:
        raise FlopdiffError(f"{path}: unknown top-level keys {sorted(extra)}; the keys are model, vars, parts, stages")
    return raw


class Model:
    """One evaluation of the file for a config and a workload."""

    def __init__(self, path: Path, spec: dict[str, Any], config: dict, workload: Any) -> None:
        self.path = path
        try:  # the OmegaConf interpolations (${config...}, ${workload...}) resolved over the whole file at once
            resolved = OmegaConf.to_container(OmegaConf.create(
                {"config": config, "workload": dataclasses.asdict(workload), "vars": spec.get("vars") or {},
                 "parts": spec.get("parts") or {}, "stages": spec["stages"]}), resolve=True)
        except Exception as exc:  # an interpolation naming a key the config or the workload lacks
            raise FlopdiffError(f"{path}: {' '.join(str(exc).split())[:200]}") from None
        self.stages_spec, self.parts = resolved["stages"], resolved["parts"]
        self.names: dict[str, Any] = {"workload": workload}
        for name, value in (resolved["vars"] or {}).items():
            self.names[name] = self.value(value, f"vars.{name}", self.names)

    def stages(self) -> dict[str, list[Layer]]:
        return {stage: self.entries(entries, stage, {}, ()) for stage, entries in self.stages_spec.items()}

    def entries(self, entries: Any, where: str, loop: dict[str, int], including: tuple[str, ...]) -> list[Layer]:
        if not isinstance(entries, list):
            raise FlopdiffError(f"{self.path}: {where}: expected a list of entries, got {type(entries).__name__}")
        out: list[Layer] = []
        for k, entry in enumerate(entries):
            out += self.entry(entry, f"{where}[{k}]", loop, including)
        return out

    def entry(self, entry: Any, where: str, loop: dict[str, int], including: tuple[str, ...]) -> list[Layer]:
        if not isinstance(entry, dict):
            raise FlopdiffError(f"{self.path}: {where}: expected a mapping, got {entry!r:.60}")
        if "let" in entry:  # names for the entry's expressions, evaluated here (a part's parameters)
            if not isinstance(entry["let"], dict):
                raise FlopdiffError(f"{self.path}: {where}: let takes a mapping of name -> expression")
            loop = {**loop, **{k: self.value(v, f"{where} let {k}", {**self.names, **loop})
                               for k, v in entry["let"].items()}}
            entry = {k: v for k, v in entry.items() if k != "let"}
        if "include" in entry:
            name = entry["include"]
            body = self.parts.get(name, self.stages_spec.get(name))
            if body is None or name in including or set(entry) != {"include"}:
                raise FlopdiffError(f"{self.path}: {where}: include {name!r}: no such part or stage, it includes "
                                    f"itself, or the entry has other keys than let")
            return self.entries(body, f"{where} (include {name})", loop, (*including, name))
        if "repeat" in entry:
            spec = entry["repeat"]
            if not (isinstance(spec, dict) and len(spec) == 1) or set(entry) - {"repeat", "layers"}:
                raise FlopdiffError(f"{self.path}: {where}: repeat takes one {{name: count}} and `layers`")
            (var, count), = spec.items()
            n = self.value(count, f"{where} repeat", {**self.names, **loop})
            return [layer for i in range(n)
                    for layer in self.entries(entry.get("layers"), f"{where} ({var}={i})", {**loop, var: i}, including)]
        if "block" in entry:
            if set(entry) - {"block", "layers"}:
                raise FlopdiffError(f"{self.path}: {where}: a block takes `layers` only, got {sorted(set(entry) - {'block', 'layers'})}")
            return [Block(self.ident(entry["block"], where, loop),
                          children=self.entries(entry.get("layers"), where, loop, including))]
        return [self.leaf(entry, where, loop)]

    def leaf(self, entry: dict[str, Any], where: str, loop: dict[str, int]) -> Layer:
        kinds = [k for k in entry if k in PRIMITIVES]
        if len(kinds) != 1:
            raise FlopdiffError(f"{self.path}: {where}: a leaf names one primitive ({', '.join(PRIMITIVES)}) with its "
                                f"id, or is a block, repeat or include; got keys {sorted(entry)}")
        cls = PRIMITIVES[kinds[0]]
        lid = self.ident(entry[kinds[0]], where, loop)
        allowed = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in ("id", "children")}
        kwargs: dict[str, Any] = {}
        for key, value in entry.items():
            if key == kinds[0]:
                continue
            if key not in allowed:
                raise FlopdiffError(f"{self.path}: {where} ({lid}): {cls.__name__} has no field {key!r}; its fields: "
                                    f"{', '.join(sorted(allowed))}")
            kwargs[key] = self.field(allowed[key], value, f"{where} ({lid}).{key}", loop)
        return cls(lid, **kwargs)

    def field(self, f: dataclasses.Field, value: Any, where: str, loop: dict[str, int]) -> Any:
        names = {**self.names, **loop}
        kind = str(f.type)
        if kind == "str":
            return str(value)
        if kind.startswith("tuple[tuple[str"):  # glue, traffic: [what, expression] pairs
            if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
                raise FlopdiffError(f"{self.path}: {where}: expected a list of [what, expression] pairs")
            return tuple((str(what), self.value(e, f"{where} {what}", names)) for what, e in value)
        if kind.startswith("tuple"):
            if not isinstance(value, list):
                raise FlopdiffError(f"{self.path}: {where}: expected a list")
            return tuple(self.value(v, where, names) for v in value)
        if kind == "bool":
            result = self.value(value, where, names)
            if not isinstance(result, bool):
                raise FlopdiffError(f"{self.path}: {where}: expected true or false, got {result!r}")
            return result
        if value is None and "None" in kind:
            return None
        return self.value(value, where, names)

    def ident(self, template: Any, where: str, loop: dict[str, int]) -> str:
        try:
            return str(template).format(**loop)
        except (KeyError, IndexError, ValueError) as exc:
            raise FlopdiffError(f"{self.path}: {where}: id {template!r}: {exc!r} is no loop variable here") from None

    def value(self, value: Any, where: str, names: dict[str, Any]) -> Any:
        if isinstance(value, (bool, int)):
            return value
        if isinstance(value, list):  # a list of the config's (global_attn_indexes): for `in`
            return tuple(self.value(v, where, names) for v in value)
        if not isinstance(value, str):
            raise FlopdiffError(f"{self.path}: {where}: expected a number or an expression, got {value!r:.60}")
        try:
            result = _eval(ast.parse(value, mode="eval").body, names)
        except FlopdiffError as exc:
            raise FlopdiffError(f"{self.path}: {where}: {value!r}: {exc}") from None
        except (SyntaxError, ZeroDivisionError, TypeError, ValueError, OverflowError) as exc:
            raise FlopdiffError(f"{self.path}: {where}: {value!r}: {type(exc).__name__}: {exc}") from None
        if isinstance(result, float):
            if not result.is_integer():
                raise FlopdiffError(f"{self.path}: {where}: {value!r} = {result}: not a whole number (use // or ceil)")
            result = int(result)
        return result


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_CALLS = {"min": min, "max": max, "ceil": math.ceil, "floor": math.floor}


def _eval(node: ast.AST, names: dict[str, Any]) -> Any:
    """Arithmetic over names, nothing else (no attribute but workload's fields, no call but _CALLS)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):  # str: a view's name
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names or node.id == "workload":
            raise FlopdiffError(f"{node.id!r} is no var, loop variable or workload.<field> "
                                f"(known: {', '.join(sorted(k for k in names if k != 'workload'))})")
        return names[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "workload":
        if not hasattr(names["workload"], node.attr):
            raise FlopdiffError(f"workload has no field {node.attr!r}")
        return getattr(names["workload"], node.attr)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, names), _eval(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        v = _eval(node.operand, names)
        return -v if isinstance(node.op, ast.USub) else not v
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        return _COMPARE[type(node.ops[0])](_eval(node.left, names), _eval(node.comparators[0], names))
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, names) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.IfExp):
        return _eval(node.body, names) if _eval(node.test, names) else _eval(node.orelse, names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS and not node.keywords:
        return _CALLS[node.func.id](*(_eval(a, names) for a in node.args))
    raise FlopdiffError(f"{ast.unparse(node)!r} is not arithmetic flopdiff evaluates (numbers, names, + - * / // % **, "
                        f"comparisons, if-else, and/or/not, {', '.join(_CALLS)})")
