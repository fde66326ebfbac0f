"""Trace a workload: build the vendor model without weights and capture every stage as an fx graph.

Stages: `prefill` (the first forward, vision included, logits for the last position as `generate`
does), `vision` (the prefill nodes under the vendor's vision modules: vision tower + projector) and
`decode` (one graph per one-token step on the KV cache, KV length growing; in fake mode with 2+ CPUs the
later steps come from a forked worker, `tracer.capture.decode_worker`; from CLOSED_FORM_STEPS steps on, in fake mode,
step 0 and then steps 1..n-1 in closed form from four probes, `tracer.capture.series`, unless `closed_form` is off or
the proof fails: then every step, with one note line saying why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tracer.capture.attention import runtime as attention_runtime
from tracer.capture.decode_worker import DecodeWorker, fallback_note, signature, worker_allowed
from tracer.capture.instruments import Instrument, ProfilerRanges
from tracer.capture.meta import MetaCapture
from tracer.capture.recorder import StageGraph, capture, collect_steps, subgraph
from tracer.capture.series import NotAffine, probe_steps, prove
from tracer.core.conventions import CLOSED_FORM_STEPS
from tracer.core.errors import FlopdiffError
from tracer.core.modulepaths import STAGES, under
from tracer.core.workload import Workload, validate
from tracer.vendors import BuildOptions, get_vendor
from tracer.vendors.base import EMPTY, Prepared, cache_of, synthesized_state


@dataclass
class Trace:
    workload: Workload
    prepared: Prepared
    options: BuildOptions
    stages: dict[str, list[StageGraph]] = field(default_factory=dict)
    config: Any = None
    worker_steps: list[int] = field(default_factory=list)  # decode steps the forked worker captured
    notes: list[str] = field(default_factory=list)  # how this capture went, for the user (not the document's)

    def graphs(self):
        for name in STAGES:
            yield from self.stages.get(name, [])


def _under(prefixes: tuple[str, ...]) -> Callable:
    def keep(node) -> bool:
        return any(under(p, prefixes) for p in node.meta.get("nn_module_stack", {}))
    return keep


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_init():
    """Fake weights are never read: skip torch.nn.init's random fills and transformers' per-module initialization
    (`PreTrainedModel._initialize_weights`, which `post_init` applies to every module: its normal_/zero_ fills were
    40% of building v1 under fake tensors) while building. Shapes, dtypes and tied weights are unchanged."""
    from transformers.modeling_utils import PreTrainedModel

    with contextlib.ExitStack() as stack:
        for name in _INIT_FUNCTIONS:
            if hasattr(torch.nn.init, name):
                stack.enter_context(mock.patch.object(torch.nn.init, name, lambda tensor, *a, **k: tensor))
        stack.enter_context(mock.patch.object(PreTrainedModel, "_initialize_weights", lambda self, *a, **k: None))
        yield


@contextlib.contextmanager
def _capturing(fake, device, vendor):
    with fake, device, torch.no_grad(), vendor.shims():
        yield


def _to_device(x: Any, device: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


# Capturing one decoder layer for one token costs about 12.5 ms on a 2-core machine (v2, 0.15 s per 12-layer
# decode step); the prefill costs about as much as PREFILL_STEPS decode steps. Past MAX_LAYER_STEPS (about five
# minutes) a run needs `allow_long` (--allow-long): a typo such as --decode-steps 100000 must not run for hours.
SECONDS_PER_LAYER_STEP = 0.0125
PREFILL_STEPS = 10
MAX_LAYER_STEPS = 24_000


def check_size(workload: Workload, max_positions: int, layers: int, allow_long: bool,
               prompt_len: int | None = None, closed_form: bool = False, why: str = "") -> None:
    """The model's position limit (a hard one) and the capture's cost (a soft one), before any capture; a decode in
    closed form costs a few steps whatever its length (`closed_form`: only the positions are checked; `why`: the
    reason a closed form planned did not hold, told with the refusal)."""
    steps = workload.decode_steps
    known = prompt_len if prompt_len is not None else (workload.text_tokens or 0) + 1
    if known + steps > max_positions:
        what = f"a prompt of {prompt_len} tokens" if prompt_len is not None else f"at least {known} prompt tokens"
        raise FlopdiffError(f"--text-tokens/--decode-steps: {what} plus {steps} decode steps exceed the model's "
                            f"{max_positions} positions (max_position_embeddings)")
    work = layers * (steps + PREFILL_STEPS)
    if work > MAX_LAYER_STEPS and not allow_long and not closed_form:
        minutes = work * SECONDS_PER_LAYER_STEP / 60
        raise FlopdiffError(f"--decode-steps {steps}: {why + '; ' if why else ''}capturing {steps} steps of a "
                            f"{layers}-layer decoder takes about {minutes:.0f} min on 2 cores; pass --allow-long to "
                            f"run it anyway")


def trace(workload: Workload, options: BuildOptions = BuildOptions(), config_path: str | None = None,
          progress: Callable[[str], None] = lambda msg: None, mode: str = "fake", parallel: bool = True,
          allow_long: bool = False, instrument: Instrument | None = None,
          rows: Callable[[list[StageGraph]], list[StageGraph]] | None = None, meta: bool = True,
          closed_form: bool = True) -> Trace:
    """`mode="fake"`: no weights, no compute (meta tensors where the vendor allows, tracer.capture.meta; else, and
    when a meta capture fails, with one note line, FakeTensorMode; `meta=False`: FakeTensorMode always, the tests'
    reference). `mode="real"`: random weights, real compute (slow at full size; the tests use it on reduced configs to
    check fake against real). `parallel` (fake mode, CPU, 2+ CPUs): a forked worker captures decode steps from the
    last one down (tracer.capture.decode_worker).
    `allow_long`: capture workloads estimated to take more than about five minutes (`check_size`). `closed_form`
    (fake mode, `rows` given, CLOSED_FORM_STEPS steps or more): steps 1..n-1 from probes (tracer.capture.series).
    `instrument` (real mode; tracer.capture.instruments): told of every module call and op; on CUDA the default is
    ProfilerRanges (every kernel recorded with its node). `rows` (tracer.count.records.as_rows): graphs counted and turned into
    report rows where they were captured: each decode step (the decode worker's, this process's once captured)."""
    workload = validate(workload)
    vendor = get_vendor(workload.model)
    options = dataclasses.replace(options, mode=mode, experts=options.experts or vendor.default_experts)
    config = vendor.load_config(config_path, options)
    max_positions, layers = vendor.limits(config)
    cuda = options.device == "cuda"
    closed_form = (closed_form and mode == "fake" and not cuda and rows is not None
                   and workload.decode_steps >= CLOSED_FORM_STEPS)
    check_size(workload, max_positions, layers, allow_long, closed_form=closed_form)
    progress("preprocessing")
    prepared = vendor.prepare(workload, config)
    check_size(workload, max_positions, layers, allow_long, prepared.derived.prompt_len, closed_form)
    roots = vendor.source_roots()
    if cuda:
        if mode != "real":
            raise FlopdiffError("--device cuda: needs --mode real (fake tensors run no kernels to attribute)")
        if not torch.cuda.is_available():
            raise FlopdiffError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        prepared.inputs = _to_device(prepared.inputs, "cuda")
    if instrument is None and cuda:
        instrument = ProfilerRanges()
    if instrument is not None and mode != "real":
        raise FlopdiffError("profiling needs --mode real (fake tensors run no kernels)")
    new_trace = functools.partial(Trace, workload, prepared, options, config=config)  # each attempt starts anew
    # a closed form whose proof fails traces every step: the cost check then applies, with the reason
    plan = Plan(closed_form, functools.partial(check_size, workload, max_positions, layers, allow_long,
                                               prepared.derived.prompt_len))
    run = functools.partial(_build_and_capture, new_trace, vendor, roots, parallel, instrument, progress, rows, plan)
    # fake mode runs on meta tensors where the vendor allows it (tracer.capture.meta: the same graph, faster)
    captured = vendor.meta_inputs(prepared, options) if mode == "fake" and not cuda and meta else None
    if captured is not None:
        try:
            return run(MetaCapture(), captured)
        except FlopdiffError:
            raise
        except Exception as exc:  # a vendor path meta tensors cannot take: FakeTensorMode records the same graph
            fallback = (f"the capture on meta tensors failed ({exc.__class__.__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); capturing under FakeTensorMode instead")
            tr = run(FakeTensorMode(allow_non_fake_inputs=True), prepared)
            tr.notes.insert(0, fallback)
            return tr
    return run(FakeTensorMode(allow_non_fake_inputs=True) if mode == "fake" else contextlib.nullcontext(), prepared)


@dataclass(frozen=True)
class Plan:
    """How the decode is captured: `closed_form` (tracer.capture.series), and the cost check a failed proof
    falls back to (`check`: check_size's remaining arguments, given `why`)."""

    closed_form: bool = False
    check: Callable[..., None] = lambda **kw: None


def _build_and_capture(new_trace: Callable[[], Trace], vendor: Any, roots: list[str], parallel: bool,
                       instrument: Instrument | None, progress: Callable[[str], None],
                       rows: Callable[[list[StageGraph]], list[StageGraph]] | None, plan: Plan, fake: Any,
                       inputs: Prepared) -> Trace:
    """Build the model under `fake` (a meta capture, FakeTensorMode, or nothing in real mode) and capture every stage
    from `inputs` into a new trace."""
    result = new_trace()
    mode, cuda = result.options.mode, result.options.device == "cuda"
    device = torch.device("cuda") if cuda else contextlib.nullcontext()
    progress(f"building the model ({mode} weights)")
    if mode == "real":
        # seeded random weights: the same MoE routing on every run, so that --ncu's second run under Nsight
        # Compute launches the kernels the recorded run launched, and real-mode reports are reproducible
        torch.manual_seed(0)
    with attention_runtime(result.options):  # flash-attn or its stand-in, plugins, attention boundary nodes
        with fake, device, (_no_init() if mode == "fake" else contextlib.nullcontext()):
            model = vendor.build(result.config, result.options)
        if result.options.attn is None and getattr(vendor, "attn_used", None):  # what the model chose for itself
            result.options = dataclasses.replace(result.options, attn=vendor.attn_used)
        _capture_stages(result, inputs, vendor, model, roots, fake, device, parallel, instrument, progress, rows,
                        plan)
    return result


def _capture_stages(result: Trace, inputs: Prepared, vendor: Any, model: torch.nn.Module, roots: list[str], fake: Any,
                    device: Any, parallel: bool, instrument: Instrument | None, progress: Callable[[str], None],
                    rows: Callable[[list[StageGraph]], list[StageGraph]] | None = None, plan: Plan = Plan()) -> None:
    """The prefill (from `inputs`: the prepared inputs as the capture needs them), then the decode steps (the later
    ones in a forked worker when it may; from probes in closed form as `plan` says), into `result.stages`."""
    mode, cuda = result.options.mode, result.options.device == "cuda"
    steps, prompt_len = result.workload.decode_steps, result.prepared.derived.prompt_len
    worker = None
    try:
        with _capturing(fake, device, vendor):
            if parallel and mode == "fake" and not cuda and steps >= 1 and worker_allowed(result.options.attn):
                # a closed form's worker captures its probes while this process captures the prefill
                only = probe_steps(steps) if plan.closed_form else ()
                worker = DecodeWorker.fork(vendor, model, roots, prompt_len, steps, rows, only=only)
            progress("prefill")
            prefill, out = capture(vendor.prefill(model, inputs), model, "prefill", vendor_roots=roots,
                                   instrument=instrument)
            if plan.closed_form:
                decode, note = _closed_form(vendor, model, out, steps, prompt_len, roots, progress, rows, plan,
                                            worker)
                for text in ([fallback_note(worker)] if worker is not None and worker.failure else []) + [note]:
                    if text:
                        result.notes.append(text)
                result.stages = {"vision": [subgraph(prefill, "vision", _under(vendor.vision_modules))],
                                 "prefill": [prefill], "decode": decode}
                return
            started = time.perf_counter()
            decode, out, k = capture_decode(vendor, model, out, steps, prompt_len, roots, worker, progress,
                                            instrument, rows=rows)
            if k == 0 and steps and worker is not None and not worker.step0_taken(out, model):
                # the worker took every step, but its step 0 did not read the prefill's cache: step 0 here
                progress(f"decode step 1/{steps}")
                sg, out = capture(vendor.decode(model, out, 0), model, "decode", vendor_roots=roots, step=0,
                                  kv_len=prompt_len, instrument=instrument)
                decode, k = rows([sg]) if rows is not None else [sg], 1
                if not worker.failure:
                    worker.check(out, model)
            per_step = (time.perf_counter() - started) / max(k, 1)
        vision = subgraph(prefill, "vision", _under(vendor.vision_modules))
        if k < steps:  # the worker's share: from its files, or captured here when it could not deliver
            waiting = f"decode steps {k + 1}-{steps}/{steps} (worker process)"
            if rows is not None and not worker.failure:  # while the worker finishes: the prefill as rows
                progress(f"{waiting}, counting the prefill meanwhile")
                vision, prefill = rows([vision, prefill])
            progress(waiting)
            got = worker.collect(k, timeout=60 + 20 * per_step)
            if got is None:
                with _capturing(fake, device, vendor):
                    got, _, _ = capture_decode(vendor, model, out, steps, prompt_len, roots, None, progress, first=k,
                                               rows=rows)
            else:
                result.worker_steps = [sg.step for sg in got]
            decode += got
        if worker is not None and worker.failure:
            result.notes.append(fallback_note(worker))
    finally:
        if worker is not None:
            worker.close()
    result.stages = {"vision": [vision], "prefill": [prefill], "decode": decode}


def _closed_form(vendor: Any, model: torch.nn.Module, previous: Any, steps: int, prompt_len: int, roots: list[str],
                 progress: Callable[[str], None], rows: Callable[[list[StageGraph]], list[StageGraph]],
                 plan: Plan, worker: DecodeWorker | None) -> tuple[list[StageGraph], str | None]:
    """Step 0, then steps 1..n-1 as one span proven from probes (tracer.capture.series): the worker's (checked
    against the real cache after step 0), else captured here (steps 1 and 2 from the real cache, the later ones from
    synthesized states once step 3's real cache is found equal to its synthesized one). Where the proof fails, every
    step from 1 on captured here from the real cache (the cost check applies then), and one note line saying why."""
    progress(f"decode step 1/{steps}")
    step0, out = capture(vendor.decode(model, previous, 0), model, "decode", vendor_roots=roots, step=0,
                         kv_len=prompt_len)
    probes: dict[int, StageGraph] = {}
    if worker is not None and worker.check(out, model):
        progress(f"decode steps {', '.join(str(k + 1) for k in worker.only)}/{steps} (probes, worker process): "
                 f"steps 2-{steps} in closed form")
        got = worker.collect(1, timeout=120)
        if got is not None:
            probes = dict(zip(worker.only, got))
    graphs = [step0]  # the real chain: steps 0.. from the prefill's cache (a cache object the steps grow in place)
    try:
        if not probes:
            more, out, _ = capture_decode(vendor, model, out, 3, prompt_len, roots, None, progress, first=1)
            graphs += more
            template = vendor.decode(model, EMPTY, 0)()
            if signature(cache_of(out)) != signature(cache_of(synthesized_state(template, prompt_len + 3))):
                raise NotAffine("the cache step 3 reads is not the synthesized one")
            graphs[1:3] = rows(graphs[1:3])  # their graphs consumed: the chain holds the rows
            probes = dict(zip(probe_steps(steps), graphs[1:3]))
            for k in probe_steps(steps)[2:]:
                progress(f"decode step {k + 1}/{steps} (a probe: steps 2-{steps} in closed form)")
                sg, _ = capture(vendor.decode(model, synthesized_state(template, prompt_len + k), k), model,
                                "decode", vendor_roots=roots, step=k, kv_len=prompt_len + k)
                probes[k] = rows([sg])[0]
        return [graphs[0], prove(probes)], None
    except NotAffine as exc:
        why = f"the decode steps are not in closed form ({exc})"
        plan.check(closed_form=False, why=why)
        more, _, _ = capture_decode(vendor, model, out, steps, prompt_len, roots, None, progress,
                                    first=len(graphs), rows=rows)
        return graphs + more, f"{why}: every step traced"


def capture_decode(vendor: Any, model: torch.nn.Module, previous: Any, steps: int, prompt_len: int,
                   roots: list[str], worker: DecodeWorker | None, progress: Callable[[str], None],
                   instrument: Instrument | None = None, first: int = 0,
                   rows: Callable[[list[StageGraph]], list[StageGraph]] | None = None,
                   ) -> tuple[list[StageGraph], Any, int]:
    """This process's share of the decode steps, from the real cache: every step from `first` without a
    worker, else steps from 0 until the worker's claims meet them. Returns the graphs (each step as its rows once
    captured, `rows` given: a step's graph is 3.7 MB on DeepSeek-OCR-2, its rows half that), the last output and the
    next step (where the worker's steps begin)."""
    graphs = []
    k = first
    while k < steps:
        if worker is not None and not worker.failure:
            claimed = worker.claims.low()
            if claimed is None:
                break
            assert claimed == k
        progress(f"decode step {k + 1}/{steps}")
        sg, previous = capture(vendor.decode(model, previous, k), model, "decode", vendor_roots=roots, step=k,
                               kv_len=prompt_len + k, instrument=instrument)
        graphs += rows([sg]) if rows is not None else [sg]
        if k == 0 and worker is not None and not worker.failure:
            worker.check(previous, model)
        if rows is not None:  # its graph is garbage now
            del sg
            collect_steps(k)
        k += 1
    return graphs, previous, k
