"""Meta capture's CPU semantics (tracer.meta_capture), against the CPU kernels and FakeTensorMode themselves: the
output dtypes of CPU_OUTPUT_DTYPES, and scaled_dot_product_attention's backend and ops. Whole models node for node:
tests/test_v1.py."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from tracer.capture import capture
from tracer.meta_capture import CPU_OUTPUT_DTYPES, MetaCapture, to_meta


def _inputs(op):
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    if op is torch.ops.aten.native_layer_norm.default:
        return (x, [8], torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16), 1e-5)
    raise AssertionError(f"no inputs for {op}")


@pytest.mark.parametrize("op", list(CPU_OUTPUT_DTYPES))
def test_output_dtypes_are_the_cpu_kernel_s(op):
    args = _inputs(op)
    on_cpu = op(*args)
    with MetaCapture():
        on_meta = op(*to_meta(args))
    assert [(t.dtype, t.shape, t.stride()) for t in on_meta] == [(t.dtype, t.shape, t.stride()) for t in on_cpu]
    assert all(t.device.type == "meta" for t in on_meta)


class _Attention(torch.nn.Module):
    def __init__(self, causal, masked, dtype):
        super().__init__()
        self.causal, self.masked, self.dtype = causal, masked, dtype

    def forward(self, q):
        mask = torch.zeros(q.shape[-2], q.shape[-2], dtype=self.dtype) if self.masked else None
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=self.causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal, masked", [(False, False), (True, False), (False, True)])
def test_sdpa_takes_the_cpu_s_backend_and_records_its_ops(dtype, causal, masked):
    """The recorder sees the ops the CPU's SDPA issues (FakeTensorMode reports the CPU device): flash attention for
    CPU, or the math path's ops, with the same shapes and dtypes, and nothing of the backend question itself."""
    model = _Attention(causal and not masked, masked, dtype)
    q = torch.randn(1, 4, 64, 32, dtype=dtype)

    def described(val):
        vals = val if isinstance(val, (tuple, list)) else [val]
        return [(tuple(v.shape), v.dtype) for v in vals if isinstance(v, torch.Tensor)]

    def ops(mode, x):
        with mode, torch.no_grad():
            sg, _ = capture(lambda: model(x), model, "prefill")
        return [(n.meta["op"], described(n.meta["val"])) for n in sg.op_nodes()]

    on_fake = ops(FakeTensorMode(allow_non_fake_inputs=True), q)
    on_meta = ops(MetaCapture(), to_meta(q))
    assert on_meta == on_fake and on_fake
