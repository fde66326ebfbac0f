"""The report document's schema name and its encoding, torch-free (a run served from the trace cache writes it
without importing torch). `tracer.count.records` builds the document from a trace; `tracer.compare` adds the diff."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mapping.engine import flop_bearing

SCHEMA = "flopdiff.report/1"
# one encoder for every node: json.dumps with non-default arguments builds a new one per call (15% of the encoding)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


NODES_PER_PIECE = 4096


def dumps(report: dict[str, Any], only_flops: bool = False) -> str:
    """Compact JSON, one node per line: small, diffable, and fast (the C encoder needs indent=None).
    `only_flops` keeps the nodes with FLOPs or without a formula (the ones coverage refers to), and the layers' node
    lists name only those (the layers' sums still count every node)."""
    return "".join(encoded(report, only_flops))


def encoded(report: dict[str, Any], only_flops: bool = False) -> Iterator[str]:
    """dumps() in pieces, to be written as they come: a long decode traced step by step has millions of nodes
    (DeepSeek-OCR's page at 2,000 steps: 4.4 M, a 3.5 GB document), which a whole string held three times over."""
    head = {k: v for k, v in report.items() if k != "nodes"}
    kept = [n for n in report["nodes"] if not only_flops or flop_bearing(n)]
    if only_flops:
        head["nodes_written"] = "flops"
        ids = {n["id"] for n in kept}
        head["layers"] = [{**r, "nodes": [i for i in r["nodes"] if i in ids]} for r in head.get("layers", [])]
    yield _ENCODER.encode(head)[:-1] + ',"nodes":[\n'
    for start in range(0, len(kept), NODES_PER_PIECE):
        yield (",\n" if start else "") + ",\n".join(_ENCODER.encode(n) for n in kept[start:start + NODES_PER_PIECE])
    yield "\n]}\n"



