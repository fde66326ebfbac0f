"""The terminal tables (rich), one home for all of them: stages, where the gap comes from, what FlopCounterMode cannot
see, unmapped nodes, kernels (CUDA), Nsight Compute, ONNX consistency. Each reads the report document only."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracer.compare.metrics import METRICS, metric_of, unit_word
from tracer.compare.unseen import unseen_ops
from tracer.core.errors import printable


class _Terminal(Console):
    """A reader that stops reading (`flopdiff ... | head -3`) ends the terminal output, not the run: rich's default
    exits with 1 there, which reads as a gap and wrote no report. Later output goes to /dev/null."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def terminal() -> Console:
    """Standard output for the tables: piped, 140 columns (full numbers, no ellipsis); no markup, so that paths and
    vendor strings print as they are (`--out 'o[/bold]'` raised a MarkupError, `o[red]x` printed `ox`); no emoji codes
    (`hf:llama:` printed a llama)."""
    return _Terminal(width=None if sys.stdout.isatty() else 140, markup=False, emoji=False)


COMPACT_BELOW = 140  # columns: a narrower terminal gets compact numbers (the full tables need about 140)
SI = (("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3))


def _fmt(n: int, compact: bool = False) -> str:
    """A count in full (`4,692,268,548,096`), or compact for a narrow terminal (`4.69 T`): never cut or wrapped
    (report.json keeps every digit)."""
    if not compact:
        return f"{n:,}"
    for unit, scale in SI:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _number_column(table: Table, name: str) -> None:
    table.add_column(name, justify="right", no_wrap=True)


def _pinned(table: Table) -> Table:
    """Numbers never cut: each number column at least as wide as its widest cell (a narrow terminal squeezes the
    text columns instead; they fold)."""
    for col in table.columns:
        if col.no_wrap:
            col.min_width = max([len(str(col.header))] + [len(str(cell)) for cell in col.cells])
    return table


def _measured(report: dict[str, Any]) -> str:
    """The count the analytic one is diffed against (--policy): full, or torch."""
    return report["analytic"].get("policy", "full")


def _fitted(build: Callable[[set[str]], Table], droppable: tuple[str, ...], width: int | None) -> Table:
    """The table `build` makes, less the `droppable` columns in that order until it fits `width` (None: all)."""
    dropped: set[str] = set()
    table = build(dropped)
    for col in droppable:
        if width is None or _needed(table) <= width:
            break
        dropped.add(col)
        table = build(dropped)
    return table


MIN_TEXT = 10  # columns: the narrowest a folded text column stays readable at


def _needed(table: Table) -> int:
    """The columns `table` needs: its number columns whole (their pinned widths), its text columns folded to at least
    MIN_TEXT (or their own minimum), plus padding and borders."""
    return 1 + sum((col.min_width or 0) + 3 if col.no_wrap else max(col.min_width or 0, MIN_TEXT) + 3
                   for col in table.columns)


def stage_table(report: dict[str, Any], compact: bool = False, width: int | None = None) -> Table:
    """FLOPs per stage; a narrow terminal drops `unknown ops`, then `mapped nodes` (an unknown op still gets its red
    line below the tables)."""
    return _fitted(lambda drop: _stage_table(report, compact, drop), ("unknown ops", "mapped nodes"), width)


def _stage_table(report: dict[str, Any], compact: bool, drop: set[str]) -> Table:
    preset, measured = report["analytic"]["preset"], _measured(report)
    table = Table(title=f"{report['model']}: FLOPs per stage (analytic: {preset}, policy {measured})",
                  title_justify="left")
    table.caption = ("torch = what FlopCounterMode counts; full = torch + what it cannot see; "
                     f"gap = {measured} - analytic (% of {measured})")
    if compact:
        table.caption += "; k M G T P = 10^3 ... 10^15 FLOPs (report.json has every digit)"
    table.add_column("stage", min_width=7)
    columns = [c for c in ("analytic", "torch", "full", "gap", "gap %", "mapped nodes", "unknown ops") if c not in drop]
    for col in columns:
        _number_column(table, col)
    for s in report["stages"]:
        c = s["coverage"]
        cells = {"analytic": _fmt(s["flops_analytic"], compact), "torch": _fmt(s["flops_torch"], compact),
                 "full": _fmt(s["flops_full"], compact), "gap": _fmt(s["gap"], compact), "gap %": f"{s['gap_pct']:.2f}",
                 "mapped nodes": f"{c['mapped']}/{c['nodes_with_flops']}", "unknown ops": str(s["unknown_ops"])}
        table.add_row(s["name"], *(cells[col] for col in columns))
    return _pinned(table)


def _si(n: int | None, unit: str = "B") -> str:
    if n is None:
        return "-"
    for prefix, scale in SI:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n} {unit}"


#: the metrics beside tensor-core FLOPs (tracer.compare.metrics), in the order the table shows them
SIDE_METRICS = (("cuda_flops", "CUDA-core FLOPs", ""), ("weights", "weights", "B"), ("kv", "KV cache", "B"),
                ("bytes", "I/O fused", "B"), ("unfused", "I/O unfused", "B"), ("activations", "activations", "B"))


def memory_table(report: dict[str, Any], width: int | None = None) -> Table:
    """Per stage the other columns, traced / analytic (tracer.compare.metrics), in SI units (report.json has every
    digit), with the gap % where both sides count one way; I/O and activations are shown, not diffed. A narrow
    terminal drops activations, unfused I/O, fused I/O, then CUDA-core FLOPs (report.json keeps them)."""
    return _fitted(lambda drop: _memory_table(report, drop), ("activations", "I/O unfused", "I/O fused", "CUDA-core FLOPs"),
                   width)


def _memory_table(report: dict[str, Any], drop: set[str]) -> Table:
    shown = [m for m in SIDE_METRICS if m[1] not in drop]
    table = Table(title="the other columns per stage: traced / analytic (gap %); I/O fused (each layer's inputs, "
                        "outputs and weights once), unfused (every op's: traced only); activations traced peak, analytic "
                        "sum of outputs", title_justify="left")
    table.add_column("stage", min_width=7)
    for _, label, _ in shown:
        _number_column(table, label)
    causes = []
    for s in report["stages"]:
        metrics = s.get("metrics") or {}
        cells = []
        for name, _, unit in shown:
            m = metrics.get(name)
            if m is None:
                cells.append("-")
                continue
            gap = f" ({m['gap_pct']:.2f})" if "gap_pct" in m else ""
            other = f" / {_si(m['analytic'], unit)}" if "analytic" in m else ""
            cells.append(f"{_si(m['traced'], unit)}{other}{gap}")
            if m.get("cause"):
                causes.append(f"{s['name']} {name}: {m['cause']}")
        table.add_row(s["name"], *cells)
    uncounted = sum(s.get("cuda_uncounted", 0) for s in report["stages"] if s["name"] != "vision")
    notes = causes + ([f"{uncounted} nodes may compute CUDA-core FLOPs and have no entry (cuda_status uncounted)"]
                      if uncounted else [])
    if notes:
        table.caption = "; ".join(notes)
    return _pinned(table)


def gap_table(report: dict[str, Any], top: int = 12, compact: bool = False, width: int | None = None) -> Table | str:
    """Where each stage's gap comes from: honest groups of layers (tracer.compare.groups.gap_groups), largest first,
    each with the id --explain takes, why, how many analytic layers and the cause when flopdiff can name it. A narrow
    terminal drops `why`, `layers`, then `% of gap` (the cause says more; --explain ID says all)."""
    metric = metric_of(report)
    what = "the gap" if metric == "tc_flops" else f"the {METRICS[metric].label} gap"
    if not report["gap_groups"]:
        side = _measured(report) if metric == "tc_flops" else "traced"
        if unmapped := report.get("coverage", {}).get("unmapped"):  # what no layer holds: the nodes without one
            return (f"where {what} comes from: no analytic layer has a gap; {unmapped} FLOP-bearing nodes have no "
                    f"analytic layer (listed below)")
        return f"where {what} comes from: no gap on any layer ({side} = analytic everywhere)"
    return _fitted(lambda drop: _gap_table(report, top, compact, drop, metric, what), ("why", "layers", "% of gap"),
                   width)


def _gap_table(report: dict[str, Any], top: int, compact: bool, drop: set[str], metric: str, what: str) -> Table:
    side = _measured(report) if metric == "tc_flops" else "traced"
    table = Table(title=f"where {what} comes from ({side} - analytic; vision's groups are part of prefill's "
                        "gap, listed once)",
                  title_justify="left")
    gap_col = f"gap {unit_word(metric)}"
    columns = [c for c in ("stage", "group (--explain ID)", "why", "layers", gap_col, "% of gap", "% of stage",
                           "cause") if c not in drop]
    for col in columns:
        if col in ("layers", gap_col, "% of gap", "% of stage"):
            _number_column(table, col)
            continue
        # group ids fold (every character shown) rather than push the numbers off a narrow terminal
        table.add_column(col, justify="left", min_width={"stage": 7, "group (--explain ID)": 16}.get(col),
                         overflow="fold", no_wrap=col.startswith("group") and not compact)
    stages = {s["name"]: s["metrics"][metric] for s in report["stages"] if metric in s["metrics"]}
    gaps = {name: m["gap"] for name, m in stages.items()}
    counts = {name: m["traced"] for name, m in stages.items()}  # the stage's measured count
    shown: dict[str, int] = {}
    for g in report["gap_groups"]:
        if shown.setdefault(g["stage"], 0) >= top:
            continue
        shown[g["stage"]] += 1
        share = f"{100 * g['gap'] / gaps[g['stage']]:.1f}" if gaps[g["stage"]] else "-"
        of_stage = f"{100 * g['gap'] / counts[g['stage']]:.2f}" if counts[g["stage"]] else "-"
        cells = {"stage": g["stage"], "group (--explain ID)": Text(g["group"]), "why": g["why"],
                 "layers": str(g["layers"]), gap_col: _fmt(g["gap"], compact), "% of gap": share,
                 "% of stage": of_stage, "cause": Text(g["cause"] or "")}
        table.add_row(*(cells[c] for c in columns))
    return _pinned(table)


def unmapped_table(report: dict[str, Any], top: int = 20):
    rows = [n for n in report["nodes"] if n.get("unmapped")]
    table = Table(title=f"FLOP-bearing nodes with no analytic layer ({len(rows)})", title_justify="left")
    for col in ("node", "op", "module", "full", "why"):
        table.add_column(col, justify="right" if col == "full" else "left", overflow="fold")
    for n in sorted(rows, key=lambda n: -n["flops_full"])[:top]:
        table.add_row(Text(n["id"]), Text(n["op"]), Text(n["module"]), _fmt(n["flops_full"]), Text(n["unmapped"]))
    by_class: dict[str, list[int]] = {}  # what the model's modules are, where no analytic layer says it
    for n in rows:
        entry = by_class.setdefault(n.get("module_class") or "(no module)", [0, 0])
        entry[0] += 1
        entry[1] += n["flops_full"]
    table.caption = "by module class: " + ", ".join(f"{cls} {k} nodes ({_fmt(f, True)} FLOPs)" for cls, (k, f) in
                                                    sorted(by_class.items(), key=lambda kv: -kv[1][1]))
    return table


def unseen_table(report: dict[str, Any], compact: bool = False):
    """Per stage and op: the FLOPs only policy `full` counts (what FlopCounterMode misses); vision's rows are inside
    prefill's, and say so."""
    table = Table(title="unseen by FlopCounterMode, by op", title_justify="left")
    table.add_column("stage", min_width=7)
    table.add_column("op", overflow="fold")
    for col in ("nodes", "FLOPs"):
        _number_column(table, col)
    for row in unseen_ops(report):
        stage = "vision (in prefill)" if row["stage"] == "vision" else row["stage"]
        table.add_row(stage, row["op"], str(row["nodes"]), _fmt(row["flops"], compact))
    return _pinned(table)


def kernel_table(report: dict[str, Any], top: int = 15):
    dev = report.get("device") or {}
    t = Table(title=f"kernels on {dev.get('name', 'CUDA')} (sorted by FLOPs FlopCounterMode misses)", title_justify="left")
    t.caption = (f"{len(report['kernels'])} kernel names, {report['kernel_time']['total_us'] / 1e3:.1f} ms of kernel time, "
                 f"{report['kernel_time']['outside_model_us'] / 1e3:.2f} ms outside the model")
    numeric = ("calls", "time ms", "FLOPs prefill", "FLOPs decode")
    for col in ("kernel", *numeric, "counted by FlopCounterMode", "ops", "layers"):
        t.add_column(col, overflow="fold", justify="right" if col in numeric else "left")
    for k in report["kernels"][:top]:
        layers, stage = k["layers"], k["flops_full_by_stage"]
        t.add_row(Text(k["kernel"][:80]), str(k["calls"]), f"{k['time_us'] / 1e3:.3f}", f"{stage.get('prefill', 0):,}",
                  f"{stage.get('decode', 0):,}",
                  k["counted_by_flopcountermode"], Text(", ".join(k["ops"])[:60]),
                  Text(f"{layers[0]} (+{len(layers) - 1})" if len(layers) > 1 else layers[0]))
    return t


def ncu_table(report: dict[str, Any]):
    n = report["ncu"]
    t = Table(title=f"Nsight Compute inside {n['module']}: hardware FLOPs beside the formula", title_justify="left")
    t.caption = (f"ratio = tensor-core FLOPs counted by the hardware / formula FLOPs (tile padding, whole diagonal "
                 f"tiles); {n['paired']} launches paired of {n['profiled']} profiled / {n['recorded']} recorded")
    for col in ("kernel", "launches", "formula (full)", "hardware tensor", "hardware CUDA-core", "ratio"):
        t.add_column(col, overflow="fold", justify="left" if col == "kernel" else "right")
    for k in n["kernels"]:
        t.add_row(Text(k["kernel"][:90]), str(k["launches"]), f"{k['flops_full']:,}", f"{k['tensor_flops']:,}",
                  f"{k['cuda_core_flops']:,}", "-" if k["ratio"] is None else f"{k['ratio']:.4f}")
    return t


def ncu_layer_table(report: dict[str, Any]):
    """Per layer inside the --ncu module: the hardware's DRAM bytes and CUDA-core FLOPs beside the trace's and the
    analytic model's (tracer.cuda.ncu)."""
    n = report["ncu"]
    t = Table(title=f"Nsight Compute inside {n['module']}, per layer: hardware bytes and CUDA-core FLOPs beside "
                    f"the trace's and the analytic model's", title_justify="left")
    t.caption = ("DRAM bytes with caches flushed before each kernel (ncu's default): every kernel reads its inputs "
                 "from DRAM; ratios = hardware / traced or analytic, '-' where ncu saw only part of the layer")
    for col in ("stage", "layer", "launches", "DRAM bytes", "L2 bytes", "/ fused", "/ unfused", "/ analytic",
                "CUDA-core FLOPs", "/ traced", "/ analytic "):
        t.add_column(col, overflow="fold", justify="left" if col in ("stage", "layer") else "right")
    ratio = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in n.get("layers", []):
        t.add_row(r["stage"], Text(r["layer"]), f"{r['paired']}/{r['launches']}", f"{r['dram_bytes']:,}",
                  f"{r['l2_bytes']:,}", ratio(r["dram_vs_fused"]), ratio(r["dram_vs_unfused"]),
                  ratio(r["dram_vs_analytic"]), f"{r['cuda_core_flops'] + r['fp16_flops']:,}",
                  ratio(r["cuda_core_vs_traced"]), ratio(r["cuda_core_vs_analytic"]))
    return t


def consistency_table(rep: dict[str, Any]):
    t = Table(title="ONNX graph vs fx graph (full FLOPs)", title_justify="left")
    t.caption = (f"{len(rep['consistency']['layers_differing'])} analytic layers differ; ONNX nodes with FLOPs mapped: "
                 f"{rep['coverage']['mapped']}/{rep['coverage']['nodes_with_flops']}, unknown ops: "
                 f"{sum(u['count'] for u in rep['unknown_ops'])}")
    for col in ("stage", "ONNX", "fx", "difference"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in rep["consistency"]["stages"]:
        t.add_row(s["name"], f"{s['flops_onnx']:,}", f"{s['flops_fx']:,}", f"{s['difference']:,}")
    return t


def roofline_table(roof: dict[str, Any], top: int = 10):
    """The layers that lose the most time against their roofline bound (tracer.cuda.roofline), and each stage's."""
    c = roof["ceilings"]
    t = Table(title=f"where the time goes: the {top} layers losing the most against their bound on {c['name']}",
              title_justify="left")
    sheet = c.get("datasheet")
    beside = (f"; datasheet {sheet['bf16_tflops']} / {sheet['fp32_tflops']} TFLOP/s, {sheet['hbm_gbps']:.0f} GB/s"
              if c["used"] == "measured" and sheet else "")
    launch = f", {c['launch_us']} us per launch on the host" if c.get("launch_us") else ""
    t.caption = (f"bound = max(tensor-core FLOPs / {c['bf16_tflops']} TFLOP/s, CUDA-core FLOPs / {c['fp32_tflops']} "
                 f"TFLOP/s, fused bytes / {c['hbm_gbps']:.0f} GB/s) ({c['used']}{launch}{beside}); efficiency = bound "
                 f"/ kernel time; stages: " + "; ".join(f"{s['stage']} {s['time_us'] / 1e3:.2f} ms, bound "
                                                        f"{s['bound_us']['traced'] / 1e3:.2f} ms "
                                                        f"({100 * (s['efficiency'] or 0):.1f}%)" for s in roof["stages"])
                 + "".join(f"; decode step {s['step']}: {s['time_us'] / 1e3:.2f} ms over {s['launches']} launches, "
                           f"bound {s['bound_us'] / 1e3:.3f} ms ({100 * s['efficiency']:.1f}%)"
                           + (f", {s['limit']} (launch floor {s['launch_floor_us'] / 1e3:.2f} ms)" if s.get("limit")
                              else "") for s in roof.get("steps", [])[:3]))
    for col in ("stage", "layer", "kernel ms", "bound ms", "roof", "FLOP/B", "efficiency %", "lost ms"):
        t.add_column(col, overflow="fold", justify="left" if col in ("stage", "layer", "roof") else "right")
    for r in roof["layers"][:top]:
        t.add_row(r["stage"], Text(r["layer"]), f"{r['time_us'] / 1e3:.3f}", f"{r['bound_us']['traced'] / 1e3:.3f}",
                  r["roof"], "-" if r["intensity"] is None else f"{r['intensity']:.1f}", f"{100 * r['efficiency']:.1f}",
                  f"{r['lost_us'] / 1e3:.3f}")
    return t


def terminal_tables(report: dict[str, Any], onnx_report: dict[str, Any] | None = None, detail: Any = None,
                    width: int | None = None) -> list[Any]:
    """Every table of a run's report, in the order the command line prints them (`detail`: an --explain answer;
    `width`: the terminal's columns: under COMPACT_BELOW numbers in SI units, and the tables drop columns by
    priority until they fit; None: every column, every digit)."""
    compact = width is not None and width < COMPACT_BELOW
    out: list[Any] = [stage_table(report, compact, width), memory_table(report, width),
                      gap_table(report, compact=compact, width=width), unseen_table(report, compact)]
    if report.get("kernels"):
        out.append(kernel_table(report))
    if report.get("roofline"):
        out.append(roofline_table(report["roofline"]))
    if report.get("ncu"):
        out.append(ncu_table(report))
        if report["ncu"].get("layers"):
            out.append(ncu_layer_table(report))
    if onnx_report is not None:
        out.append(consistency_table(onnx_report))
    if report["coverage"]["unmapped"]:
        out.append(unmapped_table(report))
    if report["unknown_ops"]:
        out.append(Text.assemble(("ops that may carry FLOPs and have no formula: ", "bold red"),
                                 ", ".join(f"{u['op']} x{u['count']}" for u in report["unknown_ops"])))
    if detail is not None:
        out.append(detail)
    return out


SWEEP_STAGES = ("vision", "prefill", "decode")


def sweep_tables(summary: dict[str, Any], worst: list[dict[str, Any]], top: int = 5) -> list[Table | str]:
    """A sweep in the terminal: per stage the spread of the measured count over the pages (min, median, max) and how
    many pages have a gap; then the pages with the largest gap (or a line saying no page has one). Counts are
    compact (`4.69 T`): sweep.csv and sweep.json keep every digit."""
    rows, measured = summary["rows"], summary["analytic"]["policy"]
    stages = Table(title=f"{summary['model']}: {summary['pages']} pages, {summary['keys']} workload keys; analytic "
                         f"{summary['analytic']['preset']}", title_justify="left")
    stages.add_column("stage", min_width=7)
    for col in (f"min {measured}", "median", "max", "pages with a gap", "worst |gap %|"):
        _number_column(stages, col)
    for s in SWEEP_STAGES:
        counts = sorted(r[f"{s}_{measured}"] for r in rows)
        gaps = [abs(r[f"{s}_gap_pct"]) for r in rows]
        stages.add_row(s, _fmt(counts[0], True), _fmt(counts[len(counts) // 2], True), _fmt(counts[-1], True),
                       f"{sum(1 for r in rows if r[f'{s}_gap']):,}", f"{max(gaps):.2f}")
    gapped = [r for r in worst if any(r[f"{s}_gap"] for s in SWEEP_STAGES)][:top]
    if not gapped:
        return [_pinned(stages), f"no page has a gap: {measured} = analytic on every page, every stage"]
    pages = Table(title=f"pages with the largest gap (sweep.html lists {len(worst)}; sweep.csv has every page)",
                  title_justify="left")
    pages.add_column("page", overflow="fold")
    pages.add_column("size", no_wrap=True)
    pages.add_column("crop grid", no_wrap=True)
    for s in SWEEP_STAGES:
        _number_column(pages, f"{s} gap %")
    for r in gapped:
        pages.add_row(Text(printable(r["path"])), f"{r['width']}x{r['height']}", r["crop_grid"],
                      *(f"{r[f'{s}_gap_pct']:.2f}" for s in SWEEP_STAGES))
    return [_pinned(stages), _pinned(pages)]
