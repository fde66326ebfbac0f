"""`flopdiff sweep PATH...`: a corpus of pages, traced once per distinct workload key, with plots.

FLOPs depend on a page only through its workload key: the views the vendor's tiling makes of it (crop grid, tile
count, view sizes, image tokens; analytic.shapes reproduces the vendors' tiling exactly) and the run's token counts,
decode steps and model options. So the pages are grouped by key, each key is traced once (a white page of its
first page's size, in fake mode) in a process pool over the cores, and every page gets its key's traced counts
beside its own analytic model (cheap). Outputs, replaced as a whole: `sweep.csv` (a row per page), `sweep.json`,
`sweep.html` (self-contained: the distribution of FLOPs per stage, FLOPs against aspect ratio by crop grid, the gap
per key, the worst pages) and `keys/<key>/report.html|json`, each key's node-level report.
PATH: image files, folders of images (recursively; an unreadable file is listed, never fatal for the rest), or WxH.
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from analytic.api import build
from tracer import flags
from tracer.errors import FlopdiffError
from tracer.gaps import analytic_for, request_shape
from tracer.html import script_safe
from tracer.lifecycle import OutputSet, die_with_parent
from tracer.pipeline import Options, check, run
from tracer.vendors import BuildOptions, parse_impl
from tracer.vendors.options import attention_parts
from tracer.workload import IMAGE_SUFFIXES, Workload, image_size, parse_image_shape

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


@dataclass(frozen=True)
class Page:
    path: str          # the file, or the WxH shape as given
    width: int
    height: int


def collect(paths: list[str]) -> tuple[list[Page], list[dict[str, str]]]:
    """The pages to measure and the files that could not be read (path, why). A PATH that does not exist is bad
    input (one line, exit 2); an unreadable image inside a folder is listed and the rest goes on."""
    pages: list[Page] = []
    unreadable: list[dict[str, str]] = []
    for given in paths:
        if SHAPE.match(given):
            pages.append(Page(given, *parse_image_shape(given)))
            continue
        p = Path(given)
        if not p.exists():
            raise FlopdiffError(f"sweep {given}: no such file or folder (give image files, folders of images or WxH)")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) \
            if p.is_dir() else [p]
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
    v = build(workload.model, shape).views
    opts = "".join(f"-{k}{_slug(str(val))}" for k, val in (("attn", options.attn), ("experts", options.experts)) if val)
    return (f"grid{v.crop_grid_wh[0]}x{v.crop_grid_wh[1]}-tiles{v.tiles}-global{v.global_px}-tile{v.tile_px}"
            f"-img{v.image_tokens}-t{shape.text_tokens}-d{shape.decode_steps}{opts}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _trace_key(key: str, page: Page, workload: Workload, options: Options) -> dict[str, Any]:
    """In a pool process: one key's full run (a white page of `page`'s size), as the files and stage counts."""
    gc.disable()  # as the command line does: millions of long-lived graph objects
    result = run(Workload(**{**asdict(workload), "image_wh": (page.width, page.height), "image_path": None}), options)
    return {"key": key, "stages": [{"name": s.name, "flops_torch": s.flops_torch, "flops_full": s.flops_full}
                                   for s in result.stages],
            "crop_grid_wh": result.report["workload"]["crop_grid_wh"],
            "image_tokens": result.report["workload"]["image_tokens"],
            "json": result.to_json(only_flops=True), "html": result.to_html()}


def _on(workload: Workload, page: Page) -> Workload:
    return replace(workload, image_wh=(page.width, page.height))


def page_rows(pages: list[Page], keys: dict[str, list[Page]], traced: dict[str, dict[str, Any]],
              workload: Workload, options: Options, attention: dict[str, str]) -> list[dict[str, Any]]:
    """A row per page: its key's traced counts beside its own analytic model, per stage."""
    key_of = {id(p): k for k, ps in keys.items() for p in ps}
    rows = []
    for page in pages:
        key = key_of[id(page)]
        an = analytic_for(workload.model, request_shape(_on(workload, page)), options.analytic,
                          options.causal_halving, options.config, None, options.policy, options.build.device, attention)
        analytic = {s["name"]: s["flops"] for s in an.doc["stages"]}
        t = traced[key]
        row: dict[str, Any] = {"path": page.path, "width": page.width, "height": page.height, "key": key,
                               "crop_grid": "x".join(map(str, t["crop_grid_wh"])), "image_tokens": t["image_tokens"]}
        for s in t["stages"]:
            measured = s["flops_torch"] if options.policy == "torch" else s["flops_full"]
            gap = measured - analytic.get(s["name"], 0)
            row.update({f"{s['name']}_analytic": analytic.get(s["name"], 0), f"{s['name']}_torch": s["flops_torch"],
                        f"{s['name']}_full": s["flops_full"], f"{s['name']}_gap": gap,
                        f"{s['name']}_gap_pct": round(100 * gap / measured, 4) if measured else 0.0})
        rows.append(row)
    return rows


def worst(rows: list[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: -max(abs(r[f"{s}_gap_pct"]) for s in STAGES))[:n]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    return flags.parser("flopdiff sweep", __doc__.splitlines()[0], SWEEP, flags.WORKLOAD, flags.ANALYTIC, image=False)


def main(argv: list[str]) -> int:
    """The `flopdiff sweep` command (tracer.cli hands it the arguments after `sweep`)."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    model = args.model
    text_tokens = flags.text_tokens(model, args.text_tokens)
    knobs = {**flags.view_knobs(args), "text_tokens": text_tokens, "decode_steps": args.decode_steps}
    build_options = BuildOptions(attn=parse_impl(args.attn, "--attn") if args.attn else None,
                                 experts=parse_impl(args.experts, "--experts") if args.experts else None,
                                 vendor_dir=args.vendor_dir, trust_remote_code=args.trust_remote_code)
    options = Options(build=build_options, config=args.config, analytic=args.analytic, policy=args.policy,
                      sequential=True, max_gap=args.max_gap)
    workload = Workload(model=model, base_size=knobs["base_size"], tile_size=knobs["tile_size"],
                        crop_mode=True if knobs["crop_mode"] is None else knobs["crop_mode"],
                        text_tokens=text_tokens, decode_steps=args.decode_steps)
    check(workload, options)  # bad model, preset, knobs, max-gap: before anything is read or traced
    if args.jobs is not None and args.jobs < 1:
        raise FlopdiffError(f"--jobs {args.jobs}: must be 1 or more")
    pages, unreadable = collect(args.paths)
    keys: dict[str, list[Page]] = {}
    for page in pages:
        keys.setdefault(workload_key(workload, page, build_options), []).append(page)
    attention = attention_parts(model, build_options)
    with OutputSet(args.out) as outputs:
        traced = _trace_all(keys, workload, options, args)
        rows = page_rows(pages, keys, traced, workload, options, attention)
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
    out = Console(width=None if sys.stdout.isatty() else 140)
    out.print(f"sweep: {len(pages)} pages, {len(keys)} workload keys traced, {len(unreadable)} unreadable, "
              f"{time.perf_counter() - started:.1f} s; wrote {Path(args.out)}/sweep.csv, sweep.json, sweep.html, keys/")
    for u in unreadable:
        print(f"flopdiff sweep: unreadable: {u['path']}: {u['why']}", file=sys.stderr)
    if args.max_gap is not None:
        over = [r for r in worst(rows, len(rows)) if any(abs(r[f"{s}_gap_pct"]) > args.max_gap for s in STAGES)]
        if over:
            named = ", ".join(f"{r['path']} ({max(abs(r[f'{s}_gap_pct']) for s in STAGES):.2f}%)" for r in over[:5])
            print(f"flopdiff sweep: {len(over)} pages exceed --max-gap {args.max_gap:g}: {named}", file=sys.stderr)
            return 1
    return 0


def _trace_all(keys: dict[str, list[Page]], workload: Workload, options: Options,
               args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every key's run, in a pool of processes that die with this one; a progress bar of keys and pages."""
    jobs = min(args.jobs or os.cpu_count() or 1, len(keys))
    traced: dict[str, dict[str, Any]] = {}
    columns = (TextColumn("tracing workload keys"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeRemainingColumn())
    # forkserver, not fork: this process has threads (the progress bar's; a browser's in tests), and a child forked
    # from a threaded process can deadlock on a lock one of them held; the server imports the pipeline once
    context = get_context("forkserver")
    context.set_forkserver_preload(["tracer.pipeline"])
    with Progress(*columns, console=Console(stderr=True, quiet=args.quiet)) as bar, \
            ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=die_with_parent) as pool:
        task = bar.add_task("", total=len(keys))
        pending = {pool.submit(_trace_key, k, ps[0], workload, options): k for k, ps in keys.items()}
        done_pages = 0
        for future in as_completed(pending):
            k = pending[future]
            traced[k] = future.result()
            done_pages += len(keys[k])
            bar.update(task, advance=1, description=f"{done_pages}/{sum(map(len, keys.values()))} pages")
    return traced
