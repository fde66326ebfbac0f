"""Mapping tables: load `tables/<model>.yaml`, compile its patterns, check its layer ids.

A table has `rules`, `call_names`, `scopes` and `kv_cache`:

    call_names:
      view:                                   # placeholder {view}
        modules: [model.vision_tower]         # ... named by the call index of these modules
        order: [global, tiles]                # vendor call order; names the workload lacks are skipped
    kv_cache: decoder.layers.{i}.kv_cache     # optional: the layer of decoder layer i's KV cache
    rules:
      - module: model.vision_tower.sam_encoder.layers.{i}.attn     # path, call indices stripped
        ops: ["aten::bmm"]                                          # optional op globs
        function: [get_decomposed_rel_pos, ""]                      # optional: vendor function globs ("": none recorded)
        source: ["*/cache_utils.py:*"]                              # optional: globs over the op's innermost source line
        layer: vision.{view}.sam.blocks.{i}.rel_pos                 # analytic layer id template

Module patterns are dotted globs: a component is a literal, `*` (any one component), `**` (one or
more), `{name}` (one component, captured) or `{name:a|b}` (one of the alternatives, captured); `<root>` is the
model's own forward. `source` tells apart ops one vendor function issues through library code: transformers 4.46's
LlamaAttention applies RoPE (a `cat` in rotate_half) and grows the cache (a `cat` in cache_utils) in one forward.
Every `{name}` of a layer template must be captured by the pattern or be a call name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tracer.core.errors import FlopdiffError
from tracer.core.models import family_of, is_hf, model, model_type

TABLES = Path(__file__).resolve().parent / "tables"
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rule:
    index: int
    module: str
    layer: str
    ops: tuple[str, ...] = ()
    # globs over the vendor function that issued the op (node `vendor_function`); "" stands for a node that does
    # not record one (ONNX nodes, reports from before the field); no globs: any function
    functions: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()  # globs over the node's `source` (its innermost non-torch frame, file:line)
    regex: re.Pattern = field(compare=False, default=None)

    def name(self) -> str:
        ops = f" ops={list(self.ops)}" if self.ops else ""
        function = f" function={list(self.functions)}" if self.functions else ""
        source = f" source={list(self.sources)}" if self.sources else ""
        return f"rule {self.index} ({self.module}{ops}{function}{source} -> {self.layer})"

    def match(self, path: str, op: str, function: str = "", source: str = "") -> dict[str, str] | None:
        if self.ops and not any(fnmatch.fnmatchcase(op, g) for g in self.ops):
            return None
        if self.functions and not any(fnmatch.fnmatchcase(function, g) if g else not function
                                      for g in self.functions):
            return None
        if self.sources and not any(fnmatch.fnmatchcase(source, g) for g in self.sources):
            return None
        m = self.regex.fullmatch(path)
        return m.groupdict() if m else None


@dataclass(frozen=True)
class CallName:
    placeholder: str
    modules: tuple[str, ...]
    order: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    model: str
    source: str
    rules: tuple[Rule, ...]
    call_names: tuple[CallName, ...]
    scopes: tuple[Rule, ...] = ()  # module -> enclosing analytic block, for work no rule maps (CUDA kernels)
    kv_cache: str | None = None    # the layer id of decoder layer {i}'s KV cache (what the vendor returns per layer)
    generic: bool = False          # one table for many models: a rule naming a layer the model lacks is skipped


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    parts = []
    for comp in pattern.split("."):
        if comp == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif comp == "*":
            parts.append(r"[^.]+")
        elif m := re.fullmatch(r"\{(\w+)(?::([\w|]+))?\}", comp):
            alts = "|".join(re.escape(a) for a in m.group(2).split("|")) if m.group(2) else r"[^.]+"
            parts.append(f"(?P<{m.group(1)}>{alts})")
        elif re.fullmatch(r"[\w\-]+|<root>", comp):
            parts.append(re.escape(comp))
        else:
            raise FlopdiffError(f"{where}: module pattern {pattern!r}: bad component {comp!r} "
                                "(use a name, *, **, {name} or {name:a|b})")
    try:
        return re.compile(r"\.".join(parts))
    except re.error as exc:
        raise FlopdiffError(f"{where}: module pattern {pattern!r}: {exc}") from None


def template_regex(template: str) -> re.Pattern:
    """A layer-id template as a regex over concrete ids: each {field} stands for one component."""
    return re.compile(_FIELD.sub(r"[^.]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")))


def _path(model_or_path: str) -> Path:
    p = Path(model_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    try:  # a model name: its row's table (the generic one for an hf: model), else a table of that name
        return TABLES / f"{model(model_or_path).table or model_or_path}.yaml"
    except KeyError:
        return TABLES / f"{model_or_path}.yaml"


def _prefixes(model_or_path: str) -> dict[str, str]:
    """An `hf:` model's module paths for the generic table's `${text}` and `${vision}` (its family's row)."""
    if not is_hf(model_or_path):
        return {}
    family = family_of(model_type(model_or_path))
    return {"text": family.text if family else "model", "vision": (family and family.vision) or "no_vision"}


@lru_cache(maxsize=16)
def load_table(model_or_path: str) -> Table:
    """The table of a model (`deepseek-ocr-2`) or a user's YAML file. Structural errors raise FlopdiffError."""
    path = _path(model_or_path)
    where = f"mapping table {path}"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TABLES.glob("*.yaml")))
        raise FlopdiffError(f"{where}: no such file (built-in tables: {known})")
    try:
        raw: Any = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), _prefixes(model_or_path)),
                                          resolve=True)
    except Exception as exc:  # OmegaConf wraps the YAML parser's several error types
        raise FlopdiffError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("rules"), list) or "model" not in raw:
        raise FlopdiffError(f"{where}: expected keys 'model' and 'rules' (a list)")
    calls = tuple(CallName(name, tuple(spec["modules"]), tuple(spec["order"]))
                  for name, spec in (raw.get("call_names") or {}).items())
    call_fields = {c.placeholder for c in calls}
    rules = tuple(_rule(i, r, where, call_fields) for i, r in enumerate(raw["rules"]))
    scopes = tuple(_rule(i, r, f"{where}: scopes", call_fields, ops=False) for i, r in enumerate(raw.get("scopes") or []))
    kv_cache = raw.get("kv_cache")
    if kv_cache is not None and (not isinstance(kv_cache, str) or set(_FIELD.findall(kv_cache)) != {"i"}):
        raise FlopdiffError(f"{where}: kv_cache: expected a layer id template with {{i}} (the decoder layer's index), "
                            f"got {kv_cache!r}")
    name = model_or_path if raw.get("generic") and is_hf(model_or_path) else str(raw["model"])
    return Table(name, str(path), rules, calls, scopes, kv_cache, generic=bool(raw.get("generic")))


def _rule(i: int, r: Any, where: str, call_fields: set[str], ops: bool = True) -> Rule:
    keys = {"module", "layer", "ops", "function", "source"} if ops else {"module", "layer"}
    if not isinstance(r, dict) or not {"module", "layer"} <= r.keys() or r.keys() - keys:
        raise FlopdiffError(f"{where}: rule {i}: expected keys {', '.join(sorted(keys))} (ops, function, source "
                            f"optional); got {r!r}")
    rule = Rule(i, r["module"], r["layer"], tuple(r.get("ops") or ()), _globs(r, "function"), _globs(r, "source"),
                compile_pattern(r["module"], f"{where}: rule {i}"))
    missing = set(_FIELD.findall(rule.layer)) - set(rule.regex.groupindex) - call_fields
    if missing:
        raise FlopdiffError(f"{where}: {rule.name()}: layer template uses {sorted(missing)}, which the module "
                            "pattern does not capture")
    return rule


def _globs(rule: dict[str, Any], key: str) -> tuple[str, ...]:
    """A rule's glob list (`function: forward` or a list of them)."""
    value = rule.get(key) or ()
    return tuple(str(g) for g in ([value] if isinstance(value, str) else value))


def check_layers(table: Table, catalogue: set[str]) -> Table:
    """Fail at load time when a rule names a layer the analytic model does not have; a generic table (one for many
    models) comes back without those rules instead."""
    kv = (Rule(-1, "kv_cache", table.kv_cache),) if table.kv_cache else ()
    has = lambda rule: any(template_regex(rule.layer).fullmatch(lid) for lid in catalogue)  # noqa: E731
    if table.generic:
        kept = [r for r in table.rules if has(r)]  # numbered anew: Mapping.rule_of indexes the rules by number
        return dataclasses.replace(table, rules=tuple(dataclasses.replace(r, index=i) for i, r in enumerate(kept)),
                                   scopes=tuple(r for r in table.scopes if has(r)),
                                   kv_cache=table.kv_cache if not kv or has(kv[0]) else None)
    for rule in table.rules + table.scopes + kv:
        if not has(rule):
            near = sorted(lid for lid in catalogue if lid.split(".")[0] == rule.layer.split(".")[0])[:3]
            raise FlopdiffError(f"mapping table {table.source}: {rule.name()} names analytic layer {rule.layer!r}, "
                                f"which the analytic model of {table.model} does not have "
                                f"(layer ids look like: {', '.join(near) or '(none)'})")
    return table
