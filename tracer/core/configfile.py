"""Reading vendor config.json files: one place for the errors a user sees about them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tracer.core.errors import FlopdiffError


def read_json(path: Path) -> dict:
    """The parsed file, or a FlopdiffError naming `--config PATH` and what is wrong with it."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise FlopdiffError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise FlopdiffError(f"--config {path}: not valid JSON ({exc})") from None


def dig(d: dict, dotted: str) -> Any:
    """`dig(cfg, "text_config.hidden_size")`; KeyError(dotted) when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            raise KeyError(dotted)
        d = d[part]
    return d


# ---- the values a vendor config must hold: declarative rules per key, checked before any vendor code runs ----

def _positive_int(v: Any) -> bool:
    return type(v) is int and v > 0


def _count(v: Any) -> bool:
    return type(v) is int and v >= 0


KINDS = {  # rule name -> (test, what the value must be)
    "positive": (_positive_int, "a positive integer"),
    "count": (_count, "an integer >= 0"),
    "list": (lambda v: isinstance(v, list), "a list"),
}

RELATIONS = {  # relation name -> (test, how to say it)
    "<": (lambda a, b: a < b, "less than"),
    "<=": (lambda a, b: a <= b, "at most"),
    "==": (lambda a, b: a == b, "equal to"),
    "divides": (lambda a, b: b % a == 0, "a divisor of"),
}


def _operand(raw: dict, term: str) -> Any:
    """`key` or `len(key)` (a list's length)."""
    if term.startswith("len(") and term.endswith(")"):
        return len(dig(raw, term[4:-1]))
    return dig(raw, term)


def check_config(raw: dict, kinds: dict[str, str], relations: tuple[tuple[str, str, str], ...], where: str) -> None:
    """Every key of `kinds` present with a value of its kind, then every (left, relation, right) true; the first
    failure is a FlopdiffError naming `where`, the key and its value (the vendor code would raise a long traceback
    or build a nonsense model from it)."""
    for key, kind in kinds.items():
        try:
            value = dig(raw, key)
        except KeyError:
            raise FlopdiffError(f"{where}: missing key {key!r}") from None
        test, what = KINDS[kind]
        if not test(value):
            raise FlopdiffError(f"{where}: {key} = {json.dumps(value)} must be {what}")
    for left, relation, right in relations:
        try:
            a, b = _operand(raw, left), _operand(raw, right)
        except KeyError:  # an optional key absent: nothing to relate
            continue
        test, words = RELATIONS[relation]
        if not test(a, b):
            raise FlopdiffError(f"{where}: {left} = {a} must be {words} {right} = {b}")
