"""Reading vendor config.json files: one place for the errors a user sees about them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tracer.errors import FlopdiffError


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
