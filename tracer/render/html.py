"""report.html: one self-contained page (no network) rendered from report.json's content, built to explain a gap:
a picture first (per stage, the analytic layer tree as an icicle chart: width = FLOPs, colour = gap, hatching =
FLOPs FlopCounterMode cannot see; a click zooms in and filters the tables), then where the gap comes from and what
FlopCounterMode cannot see (the terminal's groups, with their causes), then every layer with its formula and cause
and, on demand, its nodes.

The data travels as JSON inside a `<script type="application/json">` block with `<`, `>` and `&` written as
JSON escapes, so no vendor string can close the block; the page's script puts every vendor string into the
DOM with `textContent`, never as markup. Only FLOP-bearing nodes travel (the others carry no number to diff), the
vision stage's are not sent twice (vision is the part of prefill under the vision tower: the page shows it there),
repeated strings (ops, modules, classes, shapes, sources) travel once in a string table, and node rows are built
when their layer is opened, so a page with tens of thousands of nodes stays small and quick.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from tracer.compare.diff import flop_nodes
from tracer.compare.groups import REASONS
from tracer.compare.metrics import DIFFED, METRICS, metric_of, unit_word
from tracer.render.model_explorer import GAP_COLORS, OVERCOUNT

_ENV = Environment(loader=PackageLoader("tracer", "templates"), autoescape=select_autoescape(["j2", "html"]))
SHOWN_STAGES = ("prefill", "decode")  # vision is the part of prefill under the vision tower


def script_safe(obj: Any) -> Markup:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _shapes(shapes: list[list[int]], dtypes: list[str]) -> str:
    return ", ".join(f"{dt}{list(s)}" for s, dt in zip(shapes, dtypes))


class _Strings:
    """A string table: each distinct string once, referred to by index."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, text: str | None) -> int:
        text = text or ""
        if text not in self._index:
            self._index[text] = len(self.items)
            self.items.append(text)
        return self._index[text]


def _views(w: dict[str, Any]) -> str:
    """The page and its views: DeepSeek-OCR's knobs, or (an hf: model, base_size null) the processor's one view, or
    no image input at all (a text model)."""
    page = f"{w['image_wh'][0]}x{w['image_wh'][1]} px"
    if w["base_size"] is not None:
        return (f"{page}, base {w['base_size']}, tile {w['tile_size']}, crop mode {'on' if w['crop_mode'] else 'off'}, "
                f"{_plural(w['views'], 'view')}")
    return f"{page}, one view as the model's processor makes it" if w["views"] else "a text model: no image input"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def page_data(report: dict[str, Any]) -> dict[str, Any]:
    s = _Strings()
    nodes = [n for n in flop_nodes(report) if n["stage"] in SHOWN_STAGES]
    index = {n["id"]: i for i, n in enumerate(nodes)}
    w = report["workload"]
    policy = report["analytic"].get("policy", "full")
    return {
        "model": report["model"],
        "preset": report["analytic"]["preset"],
        "policy": policy,
        "workload": (f"{_views(w)}, {w['image_tokens']} image tokens, prompt {w['prompt_len']} tokens, "
                     f"{_plural(w['decode_steps'], 'decode step')}"),
        "notes": report["notes"],
        "colors": {"bounds": [b for b, _ in GAP_COLORS], "colors": [c for _, c in GAP_COLORS], "over": OVERCOUNT},
        "stages": [{"name": st["name"], "analytic": st["flops_analytic"], "torch": st["flops_torch"],
                    "full": st["flops_full"], "gap": st["gap"], "gap_pct": st["gap_pct"], "coverage": st["coverage"],
                    "unknown_ops": st["unknown_ops"], "metrics": st.get("metrics") or {},
                    "act_peak_node": st.get("act_peak_node")} for st in report["stages"]],
        "groups": report["gap_groups"],  # vision's too: prefill's leave its layers out
        "metric": metric_of(report),
        "metrics": {m: {"label": METRICS[m].label, "unit": unit_word(m)} for m in DIFFED},
        "groups_by_metric": report.get("gap_groups_by_metric") or {metric_of(report): report["gap_groups"]},
        "unseen": [u for u in report["unseen"] if u["stage"] in SHOWN_STAGES],
        "layers": [{"id": r["id"], "stage": r["stage"], "analytic": r["flops_analytic"], "torch": r["flops_torch"],
                    "full": r["flops_full"], "gap": r["gap"], "gap_pct": r["gap_pct"],
                    "why": REASONS.get(r["reason"], ""), "formula": r.get("formula") or "",
                    "cause": r.get("cause") or "", "rules": r.get("rules", []),
                    # the intensity's denominator: fused I/O (unfused for a report from before it)
                    "bytes": r["io_fused"] if r.get("io_fused") is not None else r.get("bytes_read", 0) + r.get("bytes_written", 0),
                    # the other diffed metrics: [traced, analytic, gap %, why, cause] where either side counts any
                    "v": {m: [x["traced"], x["analytic"], x["gap_pct"], REASONS.get(x.get("reason"), ""), x.get("cause") or ""]
                          for m, x in (r.get("metrics") or {}).items()
                          if m in DIFFED and m != "tc_flops" and (x["traced"] or x["analytic"])},
                    "nodes": [index[i] for i in r["nodes"] if i in index]}  # the page holds the FLOP-bearing ones
                   for r in report["layers"] if r["stage"] in SHOWN_STAGES],
        # [id, op, module, class, inputs, outputs, torch, full, status, source, why unmapped]; strings by index
        "nodes": [[n["id"], s(n["op"]), s(n["module"]), s(n["module_class"]),
                   s(_shapes(n["input_shapes"], n["input_dtypes"])), s(_shapes(n["output_shapes"], n["output_dtypes"])),
                   n["flops_torch"], n["flops_full"], s(n["status"]), s(n["vendor_source"] or n["source"]),
                   s(n.get("unmapped"))] for n in nodes],
        "strings": s.items,
        "unmapped": [index[n["id"]] for n in nodes if not n.get("layer")],
        "unknown_ops": report["unknown_ops"],
        # the decode's per-step totals (tracer.count.records.stage_record) and its closed-form spans
        "decode_steps": next((st.get("steps", []) for st in report["stages"] if st["name"] == "decode"), []),
        "decode_series": next((st.get("series", []) for st in report["stages"] if st["name"] == "decode"), []),
        **({"kernels": report["kernels"], "kernel_layers": report["kernel_layers"], "device": report["device"],
            "kernel_time": report["kernel_time"], "roofline": report.get("roofline")} if report.get("kernels") else {}),
    }


def render_html(report: dict[str, Any]) -> str:
    data = page_data(report)
    return _ENV.get_template("report.html.j2").render(model=data["model"], workload=data["workload"],
                                                      data_json=script_safe(data))
