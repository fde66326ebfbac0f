"""report.html: one self-contained page (no network) rendered from report.json's content.

The data travels as JSON inside a `<script type="application/json">` block with `<`, `>` and `&` written as
JSON escapes, so no vendor string can close the block; the page's script puts every vendor string into the
DOM with `textContent`, never as markup. Only FLOP-bearing nodes travel (the others carry no number to diff),
and node rows are built when their layer is opened, so a page with tens of thousands of nodes stays quick.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from tracer.gaps import REASONS, flop_nodes

_ENV = Environment(loader=PackageLoader("tracer", "templates"), autoescape=select_autoescape(["j2", "html"]))


def _script_safe(obj: Any) -> Markup:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _shapes(shapes: list[list[int]], dtypes: list[str]) -> str:
    return ", ".join(f"{dt}{list(s)}" for s, dt in zip(shapes, dtypes))


def page_data(report: dict[str, Any]) -> dict[str, Any]:
    nodes = flop_nodes(report)
    index = {n["id"]: i for i, n in enumerate(nodes)}
    w = report["workload"]
    return {
        "model": report["model"],
        "preset": report["analytic"]["preset"],
        "workload": (f"{w['image_wh'][0]}x{w['image_wh'][1]} px, base {w['base_size']}, tile {w['tile_size']}, "
                     f"crop mode {'on' if w['crop_mode'] else 'off'}, {w['views']} views, {w['image_tokens']} image "
                     f"tokens, prompt {w['prompt_len']} tokens, {w['decode_steps']} decode steps"),
        "notes": report["notes"],
        "stages": [{"name": s["name"], "analytic": s["flops_analytic"], "torch": s["flops_torch"],
                    "full": s["flops_full"], "gap": s["gap"], "gap_pct": s["gap_pct"], "coverage": s["coverage"],
                    "unknown_ops": s["unknown_ops"]} for s in report["stages"]],
        "layers": [{"id": r["id"], "stage": r["stage"], "analytic": r["flops_analytic"], "torch": r["flops_torch"],
                    "full": r["flops_full"], "gap": r["gap"], "gap_pct": r["gap_pct"],
                    "reason": r["reason"] or "", "why": REASONS.get(r["reason"], ""),
                    "nodes": [index[i] for i in r["nodes"]]} for r in report["layers"]],
        "nodes": [[n["id"], n["op"], n["module"], n["module_class"], _shapes(n["input_shapes"], n["input_dtypes"]),
                   _shapes(n["output_shapes"], n["output_dtypes"]), n["flops_torch"], n["flops_full"], n["status"],
                   n["vendor_source"] or n["source"] or "", n.get("layer") or "", n.get("unmapped", "")]
                  for n in nodes],
        "unmapped": [index[n["id"]] for n in nodes if not n.get("layer")],
        "unknown_ops": report["unknown_ops"],
        **({"kernels": report["kernels"], "kernel_layers": report["kernel_layers"], "device": report["device"],
            "kernel_time": report["kernel_time"]} if report.get("kernels") else {}),
    }


def render_html(report: dict[str, Any]) -> str:
    data = page_data(report)
    return _ENV.get_template("report.html.j2").render(model=data["model"], workload=data["workload"],
                                                      data_json=_script_safe(data))
