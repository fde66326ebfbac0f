"""The report document's schema name and its encoding, torch-free (a run served from the trace cache writes it
without importing torch). `tracer.count.records` builds the document from a trace; `tracer.compare` adds the diff."""

from __future__ import annotations

import json
from typing import Any

from mapping.engine import flop_bearing

SCHEMA = "flopdiff.report/1"
# one encoder for every node: json.dumps with non-default arguments builds a new one per call (15% of the encoding)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(report: dict[str, Any], only_flops: bool = False) -> str:
    """Compact JSON, one node per line: small, diffable, and fast (the C encoder needs indent=None).
    `only_flops` keeps the nodes with FLOPs or without a formula (the ones coverage refers to), and the layers' node
    lists name only those (the layers' sums still count every node)."""
    head = {k: v for k, v in report.items() if k != "nodes"}
    kept = [n for n in report["nodes"] if not only_flops or flop_bearing(n)]
    if only_flops:
        head["nodes_written"] = "flops"
        ids = {n["id"] for n in kept}
        head["layers"] = [{**r, "nodes": [i for i in r["nodes"] if i in ids]} for r in head.get("layers", [])]
    body = _ENCODER.encode(head)[:-1]
    nodes = ",\n".join(_ENCODER.encode(n) for n in kept)
    return f'{body},"nodes":[\n{nodes}\n]}}\n'



