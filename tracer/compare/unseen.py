"""What FlopCounterMode cannot see: per stage and op, the FLOPs only policy `full` counts (each stage's own nodes:
prefill's include vision's)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tracer.core.modulepaths import STAGES


def steps_of_node(node: dict[str, Any]) -> int:
    """How many steps' nodes one report node stands for: a closed-form span's (its `series`, tracer.capture.series:
    the span's counts are its steps' sums), else 1."""
    first, last = node.get("series", {}).get("steps", (0, 0))
    return last - first + 1


def unseen_ops(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage and op, the FLOPs only policy `full` counts (what FlopCounterMode misses), stage order then most."""
    by: Counter = Counter()
    calls: Counter = Counter()
    for n in report["nodes"]:
        gap = n["flops_full"] - n["flops_torch"]
        if gap:
            by[(n["stage"], n["op"])] += gap
            calls[(n["stage"], n["op"])] += steps_of_node(n)
    return [{"stage": stage, "op": op, "nodes": calls[(stage, op)], "flops": flops}
            for (stage, op), flops in sorted(by.items(), key=lambda kv: (STAGES.index(kv[0][0]), -kv[1]))]
