"""The analytic model of each vendor model, by the name --model takes: one builder per model (its own module),
registered here."""

from __future__ import annotations

from analytic.deepseek_ocr import build_v1
from analytic.deepseek_ocr2 import build_v2

BUILDERS = {"deepseek-ocr": build_v1, "deepseek-ocr-2": build_v2}
