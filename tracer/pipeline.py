"""flopdiff as a library: one call runs the pipeline, top to bottom, and returns a typed result. The command line
(tracer.cli), the tests and the benchmarks use it; so can a notebook:

    from tracer.pipeline import Options, run
    from tracer.core.workload import Workload

    result = run(Workload(image_wh=(1000, 1400), text_tokens=9, decode_steps=2), Options(analytic="seed-naive"))
    for stage in result.stages:
        print(stage.name, stage.flops_analytic, stage.flops_full, stage.gap_pct)
    worst = max(result.layers, key=lambda layer: abs(layer.gap))
    rows = result.records("nodes")          # list of dicts; result.dataframe("nodes") with pandas installed
    html = result.to_html()                 # the self-contained page; result.to_json() is report.json

The pipeline: check the inputs (before any trace) -> trace every stage weight-free (tracer.capture.trace) -> count FLOPs
per node under both policies (tracer.count.counter) -> the report document (tracer.count.records) -> the analytic model for the
same workload (analytic) -> map every FLOP-bearing node to an analytic layer (mapping) -> gaps per stage and layer
(tracer.compare) -> on CUDA, kernels (tracer.cuda.kernels) and Nsight Compute (tracer.cuda.ncu) -> optionally the ONNX graph
(tracer.onnx) -> optionally one layer or node explained (tracer.compare.explain).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

from analytic.api import build, counting_policy, request_shape, variant
from analytic.plugin import is_plugin
from mapping.table import load_table
from tracer.compare.analytic import analytic_for, catalogue, map_report, report_shape
from tracer.compare.diff import with_diff
from tracer.compare.explain import check_id, explain
from tracer.compare.metrics import check_metric, parse_max_gap
from tracer.core import cache
from tracer.core.errors import FlopdiffError
from tracer.core.inputs import Pinned
from tracer.core.models import model
from tracer.core.workload import Workload, validate
from tracer.result import Result
from tracer.vendors import BuildOptions, check_model
from tracer.vendors.options import attention_parts, implementations, resolve_vendor_dir

# The modules that import torch (tracing, counting, kernels, ONNX, attention plugins) are imported where a run needs
# them, not here: a run served from the trace cache (tracer.core.cache) never imports torch or transformers.


@dataclass(frozen=True)
class Options:
    """Everything besides the workload: how to build and run the vendor model, what to diff against, extras."""

    build: BuildOptions = field(default_factory=BuildOptions)
    config: str | None = None           # vendor config.json (None: the model's default)
    mode: str = "fake"                  # fake (no weights, no compute) or real (random weights)
    analytic: str = "aligned"           # analytic preset name or YAML file
    mapping: str | None = None          # mapping table YAML (None: the model's built-in one)
    causal_halving: bool = False
    policy: str = "full"                # what the gap compares: full counts, or torch (FlopCounterMode's)
    graph: str = "fx"                   # "onnx": also export and count the ONNX graph
    ncu: str | None = None              # a module path: Nsight Compute on its kernels (CUDA)
    ncu_argv: tuple[str, ...] = ()      # the command line --ncu runs again under Nsight Compute
    nvtx_module: str | None = None      # --ncu's own child run: NVTX ranges around this module's calls
    explain: str | None = None          # a gap group, an analytic layer or a node id
    sequential: bool = False            # no decode worker process
    allow_long: bool = False            # run captures estimated at more than about five minutes
    every_step: bool = False            # trace every decode step, however many (no closed form: tracer.capture.series)
    max_gap: float | str | None = None  # the gate Result.over applies (PCT or METRIC=PCT,...; checked up front)
    metric: str = "tc_flops"            # the column gap groups and --explain follow (tracer.compare.metrics)
    # serve and keep counted traces (tracer.core.cache); the one switch, its default from the environment
    cache: bool = field(default_factory=cache.wanted_by_default)
    keep_graphs: bool = False           # keep the traced fx graphs (Model Explorer files); else a stage counted
    #                                     where it was captured holds its report rows (`StageGraph.rows`), no graph


# the values an option may take, checked at the API's edge (the command line's choices say the same): a bogus mode
# ran 47 s of real compute, a bogus device failed deep in torch
CHOICES = {"mode": ("fake", "real"), "graph": ("fx", "onnx"), "build.device": ("cpu", "cuda"),
           "build.mode": ("fake", "real"),
           "build.dtype": ("bfloat16", "float32")}
FLAGS = {"build.dtype": "BuildOptions.dtype", "build.mode": "BuildOptions.mode"}  # an option with no flag of its own is named by its field


def _check_options(options: Options) -> None:
    """Every enumerated option among its values, every switch a bool (FlopdiffError naming the option)."""
    for dotted, allowed in CHOICES.items():
        value = options
        for part in dotted.split("."):
            value = getattr(value, part)
        if value not in allowed:
            name = FLAGS.get(dotted, "--" + dotted.split(".")[-1])
            raise FlopdiffError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
    for holder in (options, options.build):
        for f in fields(holder):
            if f.type in ("bool", bool) and type(getattr(holder, f.name)) is not bool:
                raise FlopdiffError(f"{type(holder).__name__}.{f.name} = {getattr(holder, f.name)!r}: must be True "
                                    f"or False")


def check(workload: Workload, options: Options) -> Workload:
    """The checks that need no trace (a bad model, preset, table, graph or workload fails in a second)."""
    _check_options(options)
    if options.ncu and options.build.device != "cuda":
        raise FlopdiffError(f"--ncu {options.ncu}: needs --device cuda --mode real")
    check_model(workload.model)
    if options.graph == "onnx":
        from tracer.onnx.export import check_onnx
        from tracer.vendors import get_vendor

        check_onnx(get_vendor(workload.model), options.build)
    parse_max_gap(options.max_gap)
    check_metric(options.metric)
    variant(options.analytic, "--analytic")
    counting_policy(options.policy)
    if options.build.attn_plugins or "flash_attention_2" in implementations(options.build.attn):
        from tracer.capture.attention import check as attention_check

        attention_check(replace(options.build, mode=options.mode))  # plugins import, real FA2 has its package
    load_table(options.mapping or workload.model)
    workload = validate(workload)
    if is_plugin(options.analytic):  # run a plug-in model once now: what it does wrong is said before the trace
        build(workload.model, request_shape(workload), options.analytic, _analytic_config(options))
    if options.explain:
        check_id(options.explain, _layer_ids(workload, options))
    return workload


def _analytic_config(options: Options) -> str | None:
    """The config the analytic model reads: the traced model's, always: --config, else the vendor folder's (a
    `hub:` folder resolved to its snapshot), else the model's published one."""
    vendor_dir = resolve_vendor_dir(options.build.vendor_dir, options.build.trust_remote_code)
    return options.config or (str(Path(vendor_dir) / "config.json") if vendor_dir else None)


@contextmanager
def pinned(workload: Workload, options: Options) -> Iterator[tuple[Workload, Options]]:
    """The workload and options with every input that can be read once only (a pipe, a FIFO) copied, so that the
    checks, the trace cache's key and the vendor all read the same bytes (tracer.core.inputs); the copies go on exit.
    Idempotent: a copy is a regular file, pinned again as itself."""
    pins = Pinned()
    try:
        given = None if workload.image_path is None else os.fspath(workload.image_path)
        image = pins.path(given, "--image")
        label = workload.image_label or (given if image != given else None)
        yield (replace(workload, image_path=image, image_label=label,
                       tokenizer=pins.path(workload.tokenizer, "--tokenizer")),
               replace(options, config=pins.path(options.config, "--config")))
    finally:
        pins.close()


def _layer_ids(workload: Workload, options: Options) -> set[str]:
    """Every layer and block id of the aligned and the chosen analytic model of this workload, in any stage."""
    shape = request_shape(workload)
    ids: set[str] = set()
    for preset in {"aligned", options.analytic}:
        ids.update(*catalogue(build(workload.model, shape, preset, _analytic_config(options))).values())
    return ids


def real_run_warning(workload: Workload, options: Options) -> str | None:
    """What `--mode real` on the CPU is about to cost (an upper bound, tracer.capture.estimate.real_run_estimate); None else."""
    if options.mode != "real" or options.build.device != "cpu":
        return None
    from tracer.capture.estimate import real_run_estimate

    return real_run_estimate(workload, _analytic_config(options))


# what a cached document that passed the cache's checks may still raise when diffed (a field's value of the wrong
# shape): the entry is dropped and the workload traced, so that a damaged cache never fails a run
DAMAGED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def run(workload: Workload, options: Options = Options(), progress: Callable[[str], None] = lambda msg: None,
        note: Callable[[str], None] = lambda msg: None) -> Result:
    """Trace, count, diff and (as asked) attribute kernels, run Nsight Compute, export ONNX, explain. `progress`: the
    phase starting; `note`: one line the user should read about this run (a damaged cache entry, a fallback), as it
    happens; both are also `Result.notes`. Nothing here prints."""
    notes: list[str] = []

    def noted(text: str) -> None:
        notes.append(text)
        note(text)

    with pinned(workload, options) as (workload, options):
        result = _run(workload, options, progress, noted)
    result.notes = notes
    return result


def _run(workload: Workload, options: Options, progress: Callable[[str], None],
         note: Callable[[str], None]) -> Result:
    """run() inside its pinned inputs."""
    workload = check(workload, options)
    vendor_dir = resolve_vendor_dir(options.build.vendor_dir, options.build.trust_remote_code)
    options = replace(options, build=replace(options.build, vendor_dir=vendor_dir))
    build = replace(options.build, mode=options.mode,
                    experts=options.build.experts or model(workload.model).default_experts)
    entry = None
    if cache.usable(options.mode, build.device, options.graph, build.attn_plugins, options.keep_graphs,
                    bool(options.ncu or options.nvtx_module), options.cache):
        entry = cache.key(workload, build, options.config, options.causal_halving, options.every_step)
    report = cache.load(entry, note) if entry else None
    if report is not None:
        progress("served from the trace cache (--no-cache traces again)")
        # the entry is keyed by the image's bytes: this run names the image as it was given
        report = {**report, "workload": {**report["workload"], "image_path": workload.image_name}}
        try:
            return _diffed(workload, options, build, report, None, progress)
        except DAMAGED as exc:
            cache.discard(entry, f"{exc.__class__.__name__}: {exc}", note)
    report, tr = _traced(workload, options, progress)
    for text in tr.notes:
        note(text)
    if entry:
        cache.store(entry, report, note)
    return _diffed(workload, options, build, report, tr, progress)


def _diffed(workload: Workload, options: Options, build: BuildOptions, report: dict[str, Any], tr: Any,
            progress: Callable[[str], None]) -> Result:
    """The counted document diffed against the analytic model, mapped, and (as asked) kernels, Nsight Compute,
    ONNX and one id explained: the run's result."""
    progress(f"analytic model ({options.analytic}) and mapping")
    analytic = analytic_for(workload.model, report_shape(report["workload"]), options.analytic, options.causal_halving,
                            _analytic_config(options), report["workload"]["image_tokens"], options.policy,
                            options.build.device,
                            # the implementation that ran: --attn, else the one a model without sdpa chose itself
                            attention_parts(workload.model, replace(build, attn=build.attn or report["options"]["attn"])))
    mapping = map_report(report, analytic, options.mapping)
    report = with_diff(report, analytic, mapping, options.metric, in_place=True)  # its own document: traced or loaded
    ncu_csv = None
    if options.build.device == "cuda":
        from tracer.cuda.kernels import attribute_kernels

        progress("attributing kernels")
        report = {**report, **attribute_kernels(tr, report, mapping.matcher, options.cache)}
    if options.ncu:
        from tracer.cuda.ncu import join as ncu_join
        from tracer.cuda.ncu import run_ncu

        progress(f"Nsight Compute on the kernels inside {options.ncu} (runs flopdiff again)")
        rows, ncu_csv = run_ncu(list(options.ncu_argv), options.ncu)
        report = {**report, "ncu": ncu_join(report, options.ncu, rows)}
    result = Result(report, tr, analytic, mapping, ncu_csv=ncu_csv, cached=tr is None)
    if options.graph == "onnx":
        from tracer.onnx.report import run_onnx

        progress("exporting the prefill and decode step 0 to ONNX (no weights) and counting their nodes")
        result.onnx_report, result.onnx_protos = run_onnx(tr, report, analytic, options.mapping)
    if options.explain:
        result.detail = explain(report, analytic, mapping, options.explain)
    return result


def _traced(workload: Workload, options: Options, progress: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    """Trace every stage and count every node: the report document before the diff, and the trace."""
    from tracer.capture.instruments import NvtxRanges
    from tracer.capture.trace import trace
    from tracer.core.conventions import Conventions
    from tracer.count.counter import count_graph
    from tracer.count.records import Shared, as_rows, build_report

    conventions = Conventions(causal_halving=options.causal_halving)
    # graphs are counted where they are captured, as report rows (the decode worker's steps, and this process's own
    # decode steps once captured), unless the graphs themselves are kept or read later (CUDA: kernels by node)
    keep = options.keep_graphs or options.build.device == "cuda"
    rows = None if keep else partial(as_rows, conventions=conventions, shared=Shared())
    tr = trace(workload, options.build, options.config, progress=lambda msg: progress(f"tracing: {msg}"),
               mode=options.mode, parallel=not options.sequential, allow_long=options.allow_long,
               instrument=NvtxRanges(options.nvtx_module) if options.nvtx_module else None, rows=rows,
               closed_form=not options.every_step)
    progress("counting FLOPs per node")
    for sg in tr.graphs():
        if sg.selection is None and sg.rows is None:  # a selection (vision) is counted with its graph
            count_graph(sg, conventions)
    return build_report(tr), tr
