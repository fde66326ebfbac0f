"""Graph identities, in one place and without torch (the mapping engine reads them too):

  * stage names, in report order;
  * node ids: `stage/name`, or `stage/step/name` for a decode step;
  * module-call paths: a module path with `#k` after each module called for the k-th time (k > 0) within its
    parent's call, e.g. `model.vision_tower#1.sam_encoder` for SAM on the tiles; formatted by the capture and the
    ONNX reader, parsed by the mapping engine and the kernel attribution;
  * "under": a path is its prefix's, or below it.
"""

from __future__ import annotations

import re
from typing import Any

STAGES = ("vision", "prefill", "decode")
ROOT = "<root>"  # the module path of work outside every named submodule
_CALL = re.compile(r"#(\d+)$")


def node_id(sg: Any, name: str) -> str:
    """A node's id in reports, from its stage graph (`stage`, `step`, or the `span` of steps it stands for) and its fx
    name."""
    span = getattr(sg, "span", None)
    if span is not None:
        return f"{sg.stage}/{span[0]}-{span[1]}/{name}"
    return f"{sg.stage}/{sg.step}/{name}" if sg.step is not None else f"{sg.stage}/{name}"


def call_path(parent_qualified: str, parent_path: str, path: str, k: int) -> str:
    """The module-call path of the k-th call (from 0) of module `path` inside a call of `parent_path`."""
    local = path[len(parent_path) + 1:] if parent_path and path.startswith(parent_path + ".") else path
    return (parent_qualified + "." if parent_qualified else "") + local + (f"#{k}" if k else "")


def call_path_of(scopes: list[str], calls: dict[str, int]) -> str:
    """The module-call path of the innermost of nested `scopes` (module paths, outermost first), each scope called
    `calls[scope]` times before (the ONNX reader's view of the same calls)."""
    if not scopes:
        return ""
    parts = scopes[-1].split(".")
    for s in scopes:
        if calls.get(s):
            i = len(s.split(".")) - 1
            parts[i] = f"{parts[i]}#{calls[s]}"
    return ".".join(parts)


def split_path(module_call: str) -> tuple[list[str], list[int]]:
    """'model.vision_tower#1.sam_encoder' -> (['model', 'vision_tower', 'sam_encoder'], [0, 1, 0])."""
    names, calls = [], []
    for comp in module_call.split(".") if module_call else []:
        m = _CALL.search(comp)
        names.append(comp[: m.start()] if m else comp)
        calls.append(int(m.group(1)) if m else 0)
    return names, calls


def plain_path(module_call: str) -> str:
    """'model.vision_tower#1.sam_encoder' -> 'model.vision_tower.sam_encoder'."""
    return ".".join(split_path(module_call)[0])


def under(path: str, prefixes: tuple[str, ...] | list[str] | str) -> bool:
    """Whether module path `path` is one of `prefixes` or below one."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(path == p or path.startswith(p + ".") for p in prefixes)
