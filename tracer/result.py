"""The typed result of one run (tracer.pipeline.run): views over the report document (report.json's schema) as
dataclasses, its rows for a notebook, its encodings (JSON, HTML, terminal tables) and its files.

The document stays the one source of truth (what report.json holds, byte for byte); the dataclasses are read-only
views built on demand, so the two can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tracer.compare.metrics import parse_max_gap
from tracer.core.errors import FlopdiffError
from tracer.core.forking import forked
from tracer.core.lifecycle import OutputSet
from tracer.core.schema import Coverage, GapGroup, Kernel, LayerDiff, Node, Stage, Unseen, typed
from tracer.count.document import dumps, encoded
from tracer.render.html import render_html
from tracer.render.model_explorer import ME_GRAPH, ME_OVERLAY, graph_collection, overlay
from tracer.render.tables import terminal_tables


def _view(cls: type, key: str, doc: str | None = None) -> property:
    """A read-only typed view of one list of the report document: `cls` per row, built on demand."""
    return property(lambda self: [typed(cls, row) for row in self.report.get(key, [])], doc=doc or cls.__doc__)


@dataclass
class Result:
    """One run: typed views (`stages`, `layers`, `nodes`, `gap_groups`, `unseen`, `coverage`; `kernels` and `ncu` on CUDA,
    `onnx_report` with --graph onnx) over `report`, the JSON document (report.json's schema)."""

    report: dict[str, Any]
    trace: Any
    analytic: Any
    mapping: Any
    onnx_report: dict[str, Any] | None = None
    onnx_protos: dict[str, Any] | None = None
    ncu_csv: str | None = None
    detail: Any = None  # the --explain text (a rich renderable)
    cached: bool = False  # the counted trace came from the cache (tracer.core.cache); `trace` is None then
    notes: list[str] = field(default_factory=list)  # what the user should read about this run (pipeline.run's note)

    stages = _view(Stage, "stages")
    layers = _view(LayerDiff, "layers")
    nodes = _view(Node, "nodes")
    gap_groups = _view(GapGroup, "gap_groups")
    unseen = _view(Unseen, "unseen")
    kernels = _view(Kernel, "kernels", "CUDA runs: per kernel name, calls, time, FLOPs and whether FlopCounterMode "
                                       "counts them ([] elsewhere)")

    @property
    def coverage(self) -> Coverage:
        return typed(Coverage, self.report["coverage"])

    @property
    def ncu(self) -> dict[str, Any] | None:
        return self.report.get("ncu")

    def records(self, what: str) -> list[dict[str, Any]]:
        """Rows of `stages`, `layers`, `nodes` or `kernels` as plain dicts (report.json's fields)."""
        if what not in ("stages", "layers", "nodes", "kernels", "unknown_ops"):
            raise FlopdiffError(f"records({what!r}): choose stages, layers, nodes, kernels or unknown_ops")
        return [dict(r) for r in self.report.get(what, [])]

    def dataframe(self, what: str) -> Any:
        """The same rows as a pandas DataFrame (pandas is not a dependency of flopdiff: install it to use this)."""
        try:
            import pandas
        except ImportError:
            raise FlopdiffError("dataframe(): needs pandas (pip install pandas); records() gives the same rows") from None
        return pandas.DataFrame.from_records(self.records(what))

    def over(self, max_gap: float | str | None) -> list[tuple[Stage, str, float]]:
        """(stage, metric, gap %) wherever a stage's |gap| exceeds its gate (`--max-gap`: PCT for tensor-core FLOPs,
        or METRIC=PCT,...; None: no gate, none)."""
        gates = parse_max_gap(max_gap) or {}
        out = []
        for s in self.stages:
            for metric, pct in gates.items():
                row = (s.metrics or {}).get(metric)
                gap = s.gap_pct if metric == "tc_flops" else None if row is None else row["gap_pct"]
                if gap is not None and abs(gap) > pct:
                    out.append((s, metric, gap))
        return out

    def to_json(self, only_flops: bool = False) -> str:
        return dumps(self.report, only_flops=only_flops)

    def to_html(self) -> str:
        return render_html(self.report)

    def tables(self, width: int | None = None) -> list[Any]:
        """The terminal tables (rich renderables), in the order the command line prints them (`width`: a terminal's
        columns: a narrow one gets compact numbers and fewer columns, never a cut number)."""
        return terminal_tables(self.report, self.onnx_report, self.detail, width)

    def write(self, outputs: OutputSet, only_flops: bool = False, model_explorer: bool = False) -> list[str]:
        """The output files into `outputs` (staged: the caller commits or discards); the names written. What a user
        reads (report.json, report.html), and as asked the Model Explorer graph and overlay, ncu.csv, the ONNX set."""
        # the largest file, independent of the others: built and encoded in a forked child meanwhile
        graph_written = forked(lambda: outputs.write(ME_GRAPH, json.dumps(
            graph_collection(self.trace, self.report), separators=(",", ":")))) if model_explorer else (lambda: None)
        outputs.write("report.json", encoded(self.report, only_flops))
        outputs.write("report.html", self.to_html())
        names = ["report.json", "report.html"]
        if model_explorer:
            outputs.write(ME_OVERLAY, json.dumps(overlay(self.report), separators=(",", ":")))
            names += [ME_GRAPH, ME_OVERLAY]
        if self.ncu_csv is not None:
            outputs.write("ncu.csv", self.ncu_csv)
            names.append("ncu.csv")
        if self.onnx_report is not None:
            from tracer.onnx.report import save as save_onnx  # torch and onnx: only a run that exported has them

            save_onnx(self.onnx_protos, outputs)
            outputs.write("report-onnx.json", dumps(self.onnx_report))
            names += ["report-onnx.json", *self.onnx_protos]
        graph_written()
        return names


