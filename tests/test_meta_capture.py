"""Meta capture's CPU semantics (tracer.capture.meta), against the CPU kernels and FakeTensorMode themselves: the
output dtypes of CPU_OUTPUT_DTYPES, and each call of CPU_CHOICES (scaled_dot_product_attention's backend and
boolean mask, `t[i] = number`, `torch.tensor`, the device Python code reads); the memoized meta kernels against the
kernels; the fallback to FakeTensorMode. Whole models node for node: tests/test_v1.py (DeepSeek-OCR) and below
(DeepSeek-OCR-2)."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from tracer.capture.recorder import capture
from tracer.capture.meta import CPU_OUTPUT_DTYPES, MetaCapture, MetaKernels
from tracer.vendors.base import to_meta


def _inputs(op):
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    if op is torch.ops.aten.native_layer_norm.default:
        return (x, [8], torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16), 1e-5)
    raise AssertionError(f"no inputs for {op}")


@pytest.mark.parametrize("op", list(CPU_OUTPUT_DTYPES))
def test_output_dtypes_are_the_cpu_kernel_s(op):
    """Recorded on meta tensors, the op's outputs have the CPU kernel's dtypes (the meta kernel's differ)."""
    args = _inputs(op)
    on_cpu = op(*args)
    with MetaCapture():
        assert [t.dtype for t in op(*to_meta(args))] != [t.dtype for t in on_cpu]  # what the recorder corrects
        sg, on_meta = capture(lambda: op(*to_meta(args)), torch.nn.Module(), "prefill")
    assert [(t.dtype, t.shape, t.stride()) for t in on_meta] == [(t.dtype, t.shape, t.stride()) for t in on_cpu]
    assert all(t.device.type == "meta" for t in on_meta)
    [node] = [n for n in sg.op_nodes() if n.meta["op"] == f"aten::{op._opname}"]
    assert [t.dtype for t in node.meta["val"]] == [t.dtype for t in on_cpu]


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _described(val):
    vals = val if isinstance(val, (tuple, list)) else [val]
    return [(tuple(v.shape), v.dtype) for v in vals if isinstance(v, torch.Tensor)]


def _ops(fn, mode, x):
    model = _Call(fn)
    with mode, torch.no_grad():
        sg, _ = capture(lambda: model(x), model, "prefill")
    return [(n.meta["op"], _described(n.meta["val"])) for n in sg.op_nodes()]


def _same_ops_as_fake_tensors(fn, x):
    """The ops, with their output shapes and dtypes, recorded from `fn(x)` on meta tensors and under FakeTensorMode
    (whose tensors report the CPU device)."""
    on_fake = _ops(fn, FakeTensorMode(allow_non_fake_inputs=True), x)
    on_meta = _ops(fn, MetaCapture(), to_meta(x))
    assert on_meta == on_fake and on_fake
    return on_meta


def _sdpa(causal, mask_dtype):
    def fn(q):
        n = q.shape[-2]
        mask = None
        if mask_dtype is torch.bool:
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        elif mask_dtype is not None:
            mask = torch.zeros(n, n, dtype=mask_dtype)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=causal and mask is None)
    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal, mask", [(False, None), (True, None), (False, "float"), (False, torch.bool)])
def test_sdpa_takes_the_cpu_s_backend_and_records_its_ops(dtype, causal, mask):
    """The recorder sees the ops the CPU's SDPA issues: flash attention for CPU (after converting a boolean mask:
    scalar_tensor, scalar_tensor, where) or the math path's ops, and nothing of the backend question itself."""
    ops = _same_ops_as_fake_tensors(_sdpa(causal, dtype if mask == "float" else mask), torch.randn(1, 4, 64, 32,
                                                                                                  dtype=dtype))
    names = [op for op, _ in ops]
    if mask is torch.bool:
        assert names[-4:] == ["aten::scalar_tensor", "aten::scalar_tensor", "aten::where",
                              "aten::_scaled_dot_product_flash_attention_for_cpu"]


def _fill_prefix(x):
    ids = torch.full((1, x.shape[-1]), -1, dtype=torch.long, device=x.device)
    ids[:, :3] = 0  # DeepSeek-OCR-2's vision encoder marks its image tokens so
    return ids + x.long()


def _empty_then_cat(x):
    start = torch.tensor([], dtype=x.dtype, device=x.device)  # transformers' DynamicLayer starts so
    return torch.cat([start, x.flatten()])


def _device_branch(x):
    ids = torch.arange(x.shape[-1], device=x.device)
    # transformers' MoE: histc on floats on the CPU, on ints elsewhere
    counts = torch.histc(ids.float() if x.device.type == "cpu" else ids.int(), bins=4, min=0, max=3)
    return counts.to(x.device).cpu() + x.sum()


@pytest.mark.parametrize("fn, expected", [
    (_fill_prefix, ["aten::full", "aten::lift_fresh", "aten::slice", "aten::fill_", "aten::_to_copy", "aten::add"]),
    (_empty_then_cat, ["aten::lift_fresh", "aten::view", "aten::cat"]),
    (_device_branch, ["aten::arange", "aten::_to_copy", "aten::histc", "aten::sum", "aten::add"]),
])
def test_calls_that_depend_on_the_device_record_the_cpu_s_ops(fn, expected):
    """`t[i] = number` (lift_fresh, fill_; on meta itself: scalar_tensor, view, expand, copy_), `torch.tensor(data)`
    (lift_fresh; on meta itself: no op) and Python reading `.device` (the CPU's branch; `.to(device)` and `.cpu()`
    keep the tensor where it is)."""
    ops = _same_ops_as_fake_tensors(fn, torch.randn(2, 8))
    assert [op for op, _ in ops if op != "aten::detach"] == expected


@pytest.mark.v2
@pytest.mark.parametrize("shape, options", [
    ("1000x1400", {}),                                                   # the default: sdpa, grouped_mm, 6 tiles
    ("600x500", {}),                                                     # the global view alone
    ("640x640", {"attn": "eager", "experts": "batched_mm"}),
    ("640x640", {"attn": {"text_config": "sdpa", "vision_config": "eager"}}),
])
def test_v2_meta_capture_records_the_fake_tensor_graph_node_for_node(shape, options, capsys):
    """Fake mode runs DeepSeek-OCR-2 on meta tensors; FakeTensorMode (`meta=False`) is the reference: the same
    report rows, every field (name, op, module call, source lines, input and output shapes and dtypes, FLOPs,
    status), for the prefill, vision and each decode step."""
    from tracer.count.counter import count_graph
    from tracer.count.records import build_report
    from tracer.capture.trace import trace
    from tracer.vendors import BuildOptions, get_vendor
    from tracer.core.workload import Workload, parse_image_shape

    workload = Workload(image_wh=parse_image_shape(shape), text_tokens=4, decode_steps=2)
    build = BuildOptions(**options)

    def rows(meta):
        tr = trace(workload, build, parallel=False, meta=meta)
        for sg in tr.graphs():
            if sg.selection is None:
                count_graph(sg)
        return build_report(tr), tr

    (on_meta, tr), (on_fake, _) = rows(True), rows(False)
    # it ran on meta tensors, and did not fall back to FakeTensorMode
    assert get_vendor(workload.model).meta_inputs(tr.prepared, tr.options) is not None
    assert "meta tensors failed" not in capsys.readouterr().err
    assert len(on_meta["nodes"]) == len(on_fake["nodes"]) > 10_000
    assert on_meta == on_fake


@pytest.mark.v2
@pytest.mark.parametrize("options", [{"attn": "flex_attention"}, {"attn": {"text_config": "flash_attention_2"}},
                                     {"experts": "eager"}, {"attn_plugins": ("mine=tracer.capture.attention:sdpa",)}])
def test_v2_stays_on_fake_tensors_where_meta_is_not_checked(options):
    from tracer.vendors import BuildOptions, get_vendor
    from tracer.vendors.base import Prepared
    from tracer.core.workload import Derived

    prepared = Prepared({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, Derived.__new__(Derived))
    assert get_vendor("deepseek-ocr-2").meta_inputs(prepared, BuildOptions(**options)) is None
    assert get_vendor("deepseek-ocr-2").meta_inputs(prepared, BuildOptions()) is not None


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _signature(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return type(out), [(t.shape, t.stride(), t.dtype, t.storage_offset()) for t in outs]


aten = torch.ops.aten


@pytest.mark.parametrize("func, args", [
    (aten.mul.Tensor, lambda: (_meta(2, 5, 8), _meta(2, 1, 8, dtype=torch.float32))),  # broadcast, promotion
    (aten.mul.Tensor, lambda: (_meta(4, dtype=torch.int64), 1.0)),
    (aten.mm.default, lambda: (_meta(5, 8), _meta(8, 3))),
    (aten.addmm.default, lambda: (_meta(3), _meta(5, 8), _meta(3, 8).t())),  # a transposed argument
    (aten.native_layer_norm.default, lambda: (_meta(2, 5, 8), [8], _meta(8), _meta(8), 1e-5)),  # a tuple
    (aten.cat.default, lambda: ([_meta(2, 3), _meta(4, 3)],)),  # a list argument
    (aten.add.Tensor, lambda: (_meta(1, 3, 4, 4).to(memory_format=torch.channels_last), 1)),  # channels last
])
@torch.no_grad()  # as a capture runs (with autograd on, nothing is memoized)
def test_memoized_meta_kernels_answer_as_the_kernels(func, args):
    """A memoized op (tracer.capture.meta.MetaKernels) returns what its meta kernel returns: the first call runs the
    kernel, the next ones make the outputs from the memo; the same shapes, strides, dtypes and container."""
    kernels = MetaKernels()
    expected = _signature(func(*args()))
    for _ in range(3):
        assert _signature(kernels(func, args(), {})) == expected
    assert len(kernels._outputs) == 1


@torch.no_grad()
def test_int_float_and_bool_scalars_are_distinct_memo_keys():
    kernels = MetaKernels()
    x = _meta(4, dtype=torch.int64)
    dtypes = [kernels(aten.mul.Tensor, (x, s), {}).dtype for s in (1, 1.0, True, 1, 1.0)]
    assert dtypes == [torch.int64, torch.float32, torch.int64, torch.int64, torch.float32]
    assert len(kernels._outputs) == 3


@torch.no_grad()
def test_a_factory_s_memo_follows_the_default_dtype():
    kernels = MetaKernels()
    previous = torch.get_default_dtype()
    try:
        dtypes = []
        for default in (torch.float32, torch.bfloat16, torch.float32):
            torch.set_default_dtype(default)
            dtypes.append(kernels(aten.arange.default, (5.0,), {"device": torch.device("meta")}).dtype)
    finally:
        torch.set_default_dtype(previous)
    assert dtypes == [torch.float32, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("func, args", [
    (aten.add_.Tensor, (1,)),           # in place: returns its argument
    (aten.view.default, ([8, 5],)),     # views alias their argument
    (aten.transpose.int, (0, 1)),
    (aten.split.Tensor, (2,)),          # views, in a list
])
@torch.no_grad()
def test_mutating_and_aliasing_ops_are_not_memoized(func, args):
    kernels = MetaKernels()
    x = _meta(5, 8)
    for _ in range(2):
        out = kernels(func, (x, *args), {})
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert all(o is x or o._base is x for o in outs)
    assert not kernels._outputs


@pytest.mark.v2
def test_a_failed_meta_capture_falls_back_to_fake_tensors(tiny_v2_config, monkeypatch, capsys):
    """A vendor path meta tensors cannot take (here: every `torch.tensor` call raises, as a future vendor's value
    read would) costs a second capture, never the run: one note line, and the FakeTensorMode report."""
    from tracer.capture import meta as meta_capture
    from tracer.count.counter import count_graph
    from tracer.count.records import build_report
    from tracer.capture.trace import trace
    from tracer.core.workload import Workload

    def refused(func, args, kwargs):
        raise RuntimeError("Cannot copy out of meta tensor; no data!")

    workload = Workload(image_wh=(640, 640), text_tokens=4, decode_steps=3)

    def report(**kw):
        tr = trace(workload, config_path=tiny_v2_config, **kw)
        for sg in tr.graphs():
            if sg.selection is None and sg.rows is None:
                count_graph(sg)
        return build_report(tr), tr.notes

    expected, notes = report(parallel=False, meta=False)
    assert notes == []
    monkeypatch.setitem(meta_capture.CPU_CHOICES, torch.tensor, refused)
    for parallel in (False, True):
        doc, notes = report(parallel=parallel)
        assert doc == expected
        assert notes == ["the capture on meta tensors failed (RuntimeError: Cannot copy out of meta tensor; no "
                         "data!); capturing under FakeTensorMode instead"]
        assert capsys.readouterr().err == ""  # the library prints nothing
