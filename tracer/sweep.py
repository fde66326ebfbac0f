"""`flopdiff sweep PATH...`: a corpus of pages, traced once per distinct workload key, with plots.

FLOPs depend on a page only through its workload key: the views the vendor's tiling makes of it (crop grid, tile
count, view sizes, image tokens; analytic.shapes reproduces the vendors' tiling exactly) and the run's token counts,
decode steps and model options. So the pages are grouped by key, each key is traced once (a white page of its
first page's size, in fake mode) in a process pool over the cores, and every page gets its key's traced counts
beside its own analytic model (cheap). Outputs, replaced as a whole: `sweep.csv` (a row per page), `sweep.json`,
`sweep.html` (self-contained: the distribution of FLOPs per stage, FLOPs against aspect ratio by crop grid, the gap
per key, the worst pages) and `keys/<key>/report.html|json`, each key's node-level report.
PATH: image files, folders of images (recursively; an unreadable file or sub-folder is listed, never fatal for the
rest), or WxH. `--decode-steps 10,100,1000`: a row per page and decode length, every length from one trace per key
(at the longest; a shorter decode's counts are its first steps', from the trace's per-step totals: a long decode in
closed form, tracer.capture.series, lists every step's).

Processes: the pool's workers are spawned children of this process that die with it (Linux `PR_SET_PDEATHSIG`), so
a `kill -9` of the sweep leaves no process (a forkserver, as before, outlived it with its workers: they were its
children, not ours); SIGINT or SIGTERM stop the workers at once instead of waiting for every pending key; a worker
that dies (the OOM killer) is one line and exit 3, the output folder untouched. Text from file names reaches the
terminal with control characters escaped and `sweep.csv` quoted for spreadsheets (a cell that starts with = + - @
is prefixed with ', OWASP's rule against formula injection).
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from analytic.api import build, model_text_tokens, request_shape, resolution_knobs
from tracer.compare.analytic import analytic_for
from tracer.compare.diff import gap_pct
from tracer.compare.metrics import parse_max_gap
from tracer.core import flags
from tracer.core.errors import Aborted, FlopdiffError, printable
from tracer.core.lifecycle import OutputSet, die_with_parent
from tracer.core.workload import IMAGE_SUFFIXES, Workload, image_size, parse_image_shape
from tracer.pipeline import Options, check, pinned, run
from tracer.render.html import script_safe
from tracer.render.tables import sweep_tables, terminal
from tracer.vendors import BuildOptions, parse_impl
from tracer.vendors.options import attention_parts

SHAPE = re.compile(r"^\d+[xX]\d+$")
STAGES = ("vision", "prefill", "decode")
_ENV = Environment(loader=PackageLoader("tracer", "templates"), autoescape=select_autoescape(["j2", "html"]))

SWEEP: list[flags.Row] = [
    (("paths",), dict(nargs="+", metavar="PATH", help="image files, folders of images (recursively) or WxH shapes")),
    (("--max-gap",), dict(type=float, metavar="PCT", help="exit 1 when a page's stage |gap| exceeds PCT%% of its "
                                                          "count (the worst pages named)")),
    (("--jobs",), dict(type=int, metavar="N", help="keys traced at once (default: the CPUs, at most the keys)")),
    (("--out",), dict(default="flopdiff-sweep", metavar="DIR", help="output folder, replaced as a whole")),
    *flags.pick(flags.FLOPDIFF, "--vendor-dir", "--trust-remote-code", "--attn", "--experts", "--quiet"),
]


def decode_lengths(text: str) -> tuple[int, ...]:
    """`--decode-steps N` or `N,N,...` (a sweep's decode lengths), each 0 or more, sorted, each once."""
    try:
        lengths = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or N,N,... (decode lengths, e.g. 10,100,1000)") from None
    if lengths[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: decode lengths are 0 or more")
    return tuple(lengths)


# the sweep's --decode-steps: a list of lengths, where the other commands take one
WORKLOAD = [((names, {**kw, "type": decode_lengths, "default": (kw["default"],), "metavar": "N[,N...]",
                      "help": kw["help"] + " (several: 10,100,1000, one trace per key serving every length)"})
             if names == ("--decode-steps",) else (names, kw)) for names, kw in flags.WORKLOAD]


@dataclass(frozen=True)
class Page:
    path: str          # the file, or the WxH shape as given
    width: int
    height: int


FORMULA = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting with these as a formula


def _images(folder: Path, unreadable: list[dict[str, str]]) -> list[Path]:
    """The image files under `folder`, recursively; a sub-folder that cannot be listed goes to `unreadable`."""
    def refused(exc: OSError) -> None:
        unreadable.append({"path": exc.filename or str(folder), "why": f"cannot list it ({exc.strerror})"})

    found = []
    for root, _, names in os.walk(folder, onerror=refused):
        found += [Path(root) / n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(f for f in found if f.is_file())


def collect(paths: list[str]) -> tuple[list[Page], list[dict[str, str]]]:
    """The pages to measure and the files that could not be read (path, why). A PATH that does not exist is bad
    input (one line, exit 2); an unreadable image or sub-folder inside a folder is listed and the rest goes on."""
    pages: list[Page] = []
    unreadable: list[dict[str, str]] = []
    for given in paths:
        if SHAPE.match(given):
            pages.append(Page(given, *parse_image_shape(given)))
            continue
        p = Path(given)
        if not p.exists():
            raise FlopdiffError(f"sweep {given}: no such file or folder (give image files, folders of images or WxH)")
        files = _images(p, unreadable) if p.is_dir() else [p]
        for f in files:
            try:
                pages.append(Page(str(f), *image_size(f, str(f))))
            except FlopdiffError as exc:
                unreadable.append({"path": str(f), "why": str(exc).removeprefix(f"{f}: ")})
    if not pages:
        raise FlopdiffError(f"sweep {' '.join(paths)}: no readable page (image files: {', '.join(IMAGE_SUFFIXES)})")
    return pages, unreadable


def workload_key(workload: Workload, page: Page, options: BuildOptions) -> str:
    """What shapes the traced graph besides the model: the views the vendor tiling makes of the page, the token
    counts and decode steps, the model options. Readable: `grid2x3-tiles6-global1024-tile768-img1121-t4-d1`."""
    shape = request_shape(_on(workload, page))
    v = _views(workload.model, shape)
    opts = "".join(f"-{k}{_slug(str(val))}" for k, val in (("attn", options.attn), ("experts", options.experts)) if val)
    return (f"grid{v.crop_grid_wh[0]}x{v.crop_grid_wh[1]}-tiles{v.tiles}-global{v.global_px}-tile{v.tile_px}"
            f"-img{v.image_tokens}-t{shape.text_tokens}-d{shape.decode_steps}{opts}")


@lru_cache(maxsize=4096)
def _views(model: str, shape: Any) -> Any:
    """The vendor tiling of one page shape (a corpus has thousands of pages of a few dozen shapes)."""
    return build(model, shape).views


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _trace_key(key: str, page: Page, workload: Workload, options: Options) -> dict[str, Any]:
    """In a pool process: one key's full run (a white page of `page`'s size), as the files and stage counts."""
    gc.disable()  # as the command line does: millions of long-lived graph objects
    result = run(Workload(**{**asdict(workload), "image_wh": (page.width, page.height), "image_path": None}), options)
    return {"key": key, "stages": [{"name": s.name, "flops_torch": s.flops_torch, "flops_full": s.flops_full,
                                    **{c: getattr(s, c) for c in TRACED_PER_PAGE}} for s in result.stages],
            "crop_grid_wh": result.report["workload"]["crop_grid_wh"],
            "image_tokens": result.report["workload"]["image_tokens"],
            "steps": next(s.get("steps", []) for s in result.report["stages"] if s["name"] == "decode"),
            "json": result.to_json(only_flops=True), "html": result.to_html(), "notes": result.notes}


def _on(workload: Workload, page: Page) -> Workload:
    return replace(workload, image_wh=(page.width, page.height))


def page_rows(pages: list[Page], keys: dict[str, list[Page]], traced: dict[str, dict[str, Any]],
              workload: Workload, options: Options, attention: dict[str, str],
              advance: Callable[[], None] = lambda: None, lengths: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """A row per page and decode length (`lengths`, default the workload's): its key's traced counts beside its own
    analytic model, per stage (`advance`: once a page)."""
    key_of = {id(p): k for k, ps in keys.items() for p in ps}
    per_shape: dict[Any, dict[str, int]] = {}  # the analytic model is a function of the page's shape: once per shape
    rows = []
    for page, n in ((page, n) for page in pages for n in lengths or (workload.decode_steps,)):
        key = key_of[id(page)]
        shape = request_shape(_on(replace(workload, decode_steps=n), page))
        if shape not in per_shape:
            an = analytic_for(workload.model, shape, options.analytic, options.causal_halving, options.config, None,
                              options.policy, options.build.device, attention)
            per_shape[shape] = {s["name"]: s for s in an.doc["stages"]}
        analytic = {name: s["flops"] for name, s in per_shape[shape].items()}
        t = traced[key]
        row: dict[str, Any] = {"path": page.path, "width": page.width, "height": page.height, "key": key,
                               "crop_grid": "x".join(map(str, t["crop_grid_wh"])), "image_tokens": t["image_tokens"],
                               "decode_steps": n}
        for s in (_first_steps(s, t["steps"], n) if s["name"] == "decode" else s for s in t["stages"]):
            measured = s["flops_torch"] if options.policy == "torch" else s["flops_full"]
            gap = measured - analytic.get(s["name"], 0)
            row.update({f"{s['name']}_analytic": analytic.get(s["name"], 0), f"{s['name']}_torch": s["flops_torch"],
                        f"{s['name']}_full": s["flops_full"], f"{s['name']}_gap": gap,
                        f"{s['name']}_gap_pct": round(gap_pct(gap, measured), 4)})
            row.update(_columns(s, per_shape[shape].get(s["name"], {})))
        rows.append(row)
        if n == (lengths or (workload.decode_steps,))[-1]:
            advance()
    return rows


def _first_steps(decode: dict[str, Any], steps: list[dict[str, int]], n: int) -> dict[str, Any]:
    """The decode stage of a trace cut to its first `n` steps, from its per-step totals (tracer.count.records):
    the counts summed, the activation peak the largest, the KV cache the last step's."""
    if n == len(steps):
        return decode
    first = steps[:n]
    out = {**decode, **{k: sum(s[k] for s in first) for k in ("flops_torch", "flops_full", "bytes_read",
                                                               "bytes_written", "weight_bytes", "cuda_flops")}}
    out["act_peak_bytes"] = max((s["act_peak_bytes"] for s in first), default=0)
    if "kv_bytes" in decode:
        out["kv_bytes"] = first[-1].get("kv_bytes", 0) if first else 0
    return out


#: the other columns a page's row carries per stage (tracer.count.memory; None where a stage has none: vision's KV)
TRACED_PER_PAGE = ("bytes_read", "bytes_written", "weight_bytes", "cuda_flops", "act_peak_bytes", "kv_bytes")
ANALYTIC_PER_PAGE = ("io_bytes", "weight_bytes", "cuda_flops", "act_bytes", "kv_bytes")


def _columns(traced: dict[str, Any], analytic: dict[str, Any]) -> dict[str, Any]:
    """A stage's other columns for a page's row: traced, analytic, and the arithmetic intensity (tensor-core FLOPs
    per byte of I/O: traced unfused, analytic fused)."""
    name = traced["name"]
    io = traced["bytes_read"] + traced["bytes_written"]
    out: dict[str, Any] = {f"{name}_{c}": traced[c] for c in TRACED_PER_PAGE}
    out.update({f"{name}_analytic_{c}": analytic.get(c, 0) for c in ANALYTIC_PER_PAGE})
    out[f"{name}_intensity"] = round(traced["flops_full"] / io, 3) if io else None
    out[f"{name}_analytic_intensity"] = (round(analytic["flops"] / analytic["io_bytes"], 3)
                                         if analytic.get("io_bytes") else None)
    return out


def worst(rows: list[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: -max(abs(r[f"{s}_gap_pct"]) for s in STAGES))[:n]


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet will not run as a formula (numbers stay numbers)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA) else value


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV; every text cell quoted (a name with a carriage return or a newline stays one cell when read
    back: unquoted, `\r` split the row) and guarded against formula injection."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    w.writeheader()
    w.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    return flags.parser("flopdiff sweep", "A corpus of pages (image files, folders, WxH), each workload key traced once, "
                        "with plots and one row per page.", SWEEP, WORKLOAD, flags.ANALYTIC, image=False)


def main(argv: list[str]) -> int:
    """The `flopdiff sweep` command (tracer.cli hands it the arguments after `sweep`)."""
    args = build_parser().parse_args(argv)
    with pinned(Workload(), Options(config=args.config)) as (_, pins):  # a piped --config read once
        args.config = pins.config
        return _sweep(args)


def _sweep(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model = args.model = flags.model_of(args)
    text_tokens = model_text_tokens(model, args.text_tokens)
    given = {"base_size": args.base_size, "tile_size": args.tile_size, "crop_mode": args.crop_mode}
    lengths = args.decode_steps  # the decode lengths: each key is traced at the longest, which serves them all
    knobs = {**resolution_knobs(model, args.resolution, given), "text_tokens": text_tokens,
             "decode_steps": lengths[0] if len(lengths) == 1 else list(lengths)}
    build_options = BuildOptions(attn=parse_impl(args.attn, "--attn") if args.attn else None,
                                 experts=parse_impl(args.experts, "--experts") if args.experts else None,
                                 vendor_dir=args.vendor_dir, trust_remote_code=args.trust_remote_code)
    options = Options(build=build_options, config=args.config, analytic=args.analytic, policy=args.policy,
                      sequential=True, max_gap=args.max_gap)
    workload = Workload(model=model, base_size=knobs["base_size"], tile_size=knobs["tile_size"],
                        crop_mode=True if knobs["crop_mode"] is None else knobs["crop_mode"],
                        text_tokens=text_tokens, decode_steps=lengths[-1])
    check(workload, options)  # bad model, preset, knobs, max-gap: before anything is read or traced
    gates = parse_max_gap(args.max_gap) or {}
    if set(gates) - {"tc_flops"}:
        raise FlopdiffError(f"--max-gap {args.max_gap}: a sweep gates on tensor-core FLOPs (its rows carry them); "
                            "gate the other metrics on one page")
    gate = gates.get("tc_flops")
    if args.jobs is not None and args.jobs < 1:
        raise FlopdiffError(f"--jobs {args.jobs}: must be 1 or more")
    pages, unreadable = collect(args.paths)
    keys: dict[str, list[Page]] = {}
    for page in pages:
        keys.setdefault(workload_key(workload, page, build_options), []).append(page)
    attention = attention_parts(model, build_options)
    with OutputSet(args.out) as outputs, _progress(args.quiet) as bar:
        traced = _trace_all(keys, workload, options, args.jobs, bar)
        task = bar.add_task("", total=len(pages), what="analytic model per page")
        rows = page_rows(pages, keys, traced, workload, options, attention, lambda: bar.advance(task), lengths)
        summary = {"model": model, "analytic": {"preset": options.analytic, "policy": options.policy},
                   "workload": knobs, "pages": len(pages), "keys": len(keys), "unreadable": unreadable,
                   "per_key": [{"key": k, "pages": len(ps), "first": ps[0].path, "stages": traced[k]["stages"]}
                               for k, ps in keys.items()], "rows": rows}
        outputs.write("sweep.csv", to_csv(rows))
        outputs.write("sweep.json", json.dumps(summary, separators=(",", ":")))
        outputs.write("sweep.html", _ENV.get_template("sweep.html.j2").render(
            model=model, data_json=script_safe({**summary, "worst": worst(rows)})))
        for k, t in traced.items():
            outputs.write(f"keys/{k}/report.json", t["json"])
            outputs.write(f"keys/{k}/report.html", t["html"])
    console = terminal()
    for table in sweep_tables(summary, worst(rows)):
        console.print(table)
    console.print(f"sweep: {len(pages)} pages, {len(keys)} workload keys traced, {len(unreadable)} unreadable, "
              f"{time.perf_counter() - started:.1f} s; wrote {Path(args.out)}/sweep.csv, sweep.json, sweep.html, keys/")
    for u in unreadable:
        print(f"flopdiff sweep: unreadable: {printable(u['path'])}: {printable(u['why'])}", file=sys.stderr)
    if gate is not None:
        over = [r for r in worst(rows, len(rows)) if any(abs(r[f"{s}_gap_pct"]) > gate for s in STAGES)]
        if over:
            named = ", ".join(f"{printable(r['path'])} ({max(abs(r[f'{s}_gap_pct']) for s in STAGES):.2f}%)" for r in over[:5])
            print(f"flopdiff sweep: {len(over)} pages exceed --max-gap {gate:g}: {named}", file=sys.stderr)
            return 1
    return 0


def _progress(quiet: bool) -> Progress:
    columns = (TextColumn("{task.fields[what]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True, quiet=quiet))


def _trace_all(keys: dict[str, list[Page]], workload: Workload, options: Options, jobs: int | None,
               bar: Progress) -> dict[str, dict[str, Any]]:
    """Every key's run, in a pool of spawned processes that die with this one; a progress bar of keys and pages."""
    jobs = min(jobs or os.cpu_count() or 1, len(keys))
    traced: dict[str, dict[str, Any]] = {}
    task = bar.add_task("", total=len(keys), what="tracing workload keys")
    # spawn: the workers are this process's own children, so that the parent-death signal reaches them (a
    # forkserver's workers are the server's children and outlived a killed sweep), and no fork of a threaded
    # process (the progress bar's thread; a browser's in tests) can deadlock on a lock one of them held
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=die_with_parent)
    try:
        pending = {pool.submit(_trace_key, k, ps[0], workload, options): k for k, ps in keys.items()}
        done_pages = 0
        for future in as_completed(pending):
            k = pending[future]
            traced[k] = future.result()
            for text in traced[k]["notes"]:
                print(f"flopdiff: note: {k}: {printable(text)}", file=sys.stderr)  # above the bar (rich redirects)
            done_pages += len(keys[k])
            bar.update(task, advance=1, description=f"{done_pages}/{sum(map(len, keys.values()))} pages")
    except BrokenProcessPool:
        _stop(pool)
        raise Aborted("flopdiff sweep: a worker process died (killed by a signal, or the out-of-memory killer: try "
                      "--jobs 1); nothing was written") from None
    except BaseException:  # SIGINT, SIGTERM, a key's error: the keys still pending are not waited for
        _stop(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return traced


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and kill the workers now (ProcessPoolExecutor.kill_workers from Python 3.14;
    before it, its process table)."""
    kill = getattr(pool, "kill_workers", None)
    if kill is not None:
        kill()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
