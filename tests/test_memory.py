"""Bytes, weights, the KV cache, the activation peak and CUDA-core FLOPs (tracer.count.memory), each against a count
made independently of it: hand counts on small modules, the nn.Module's own parameters, the closed form of the KV
cache from the config and the positions."""

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tracer.capture.recorder import capture
from tracer.core.conventions import Conventions
from tracer.count.counter import count_graph
from tracer.count.records import graph_rows

F32 = 4


def _rows(fn, model=None):
    model = model or torch.nn.Module()
    sg, _ = capture(fn, model, "prefill")
    count_graph(sg, Conventions())
    return graph_rows(sg), sg


def _one(rows, op):
    (row,) = [r for r in rows if r["op"] == op]
    return row


def test_a_linear_reads_its_input_weight_and_bias_and_writes_its_output():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8)
    rows, _ = _rows(lambda: lin(x), lin)
    addmm = _one(rows, "aten::addmm")
    assert addmm["bytes_read"] == (4 * 8 + 8 * 16 + 16) * F32
    assert addmm["weight_bytes"] == (8 * 16 + 16) * F32
    assert addmm["bytes_written"] == 4 * 16 * F32
    assert _one(rows, "aten::t")["bytes_read"] == 0  # the transposed weight is a view: nothing moves


def test_a_convolution():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3)
    x = torch.randn(1, 3, 10, 10)
    rows, _ = _rows(lambda: conv(x), conv)
    row = _one(rows, "aten::convolution")
    assert row["bytes_read"] == (3 * 10 * 10 + 8 * 3 * 3 * 3 + 8) * F32
    assert row["bytes_written"] == 8 * 8 * 8 * F32 and row["weight_bytes"] == (8 * 3 * 3 * 3 + 8) * F32


def test_a_strided_view_is_read_over_the_bytes_it_spans_and_an_expand_once():
    x = torch.randn(8, 8)
    rows, _ = _rows(lambda: x[:, ::2].clone())
    clone = _one(rows, "aten::clone")
    assert clone["bytes_read"] == (7 * 8 + 3 * 2 + 1) * F32  # rows 8 apart, every other column: 63 elements spanned
    assert clone["bytes_written"] == 8 * 4 * F32
    assert _one(rows, "aten::slice")["bytes_written"] == 0
    y = torch.randn(1, 8)
    rows, _ = _rows(lambda: y.expand(4, 8) + 1)
    add = _one(rows, "aten::add")
    assert add["bytes_read"] == 8 * F32 and add["bytes_written"] == 4 * 8 * F32  # the stride-0 rows once


def test_an_in_place_add_reads_and_writes_its_target():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    rows, _ = _rows(lambda: a.add_(b))
    row = _one(rows, "aten::add_")
    assert row["bytes_read"] == 2 * 16 * F32 and row["bytes_written"] == 16 * F32


def test_cuda_core_flops_per_element_as_the_analytic_conventions_say():
    x = torch.randn(4, 16)
    norm = torch.nn.LayerNorm(16)
    rows, _ = _rows(lambda: norm(x), norm)
    assert _one(rows, "aten::native_layer_norm")["cuda_flops"] == 4 * 64  # a norm: 4 per element
    rows, _ = _rows(lambda: torch.softmax(x, -1))
    assert _one(rows, "aten::_softmax")["cuda_flops"] == 3 * 64  # softmax: 3
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    rows, _ = _rows(lambda: torch.nn.functional.silu(a) * b)
    assert sum(r["cuda_flops"] for r in rows) == 4 * 32  # a SiLU-gated product: 4
    rows, _ = _rows(lambda: torch.nn.functional.gelu(a) + b)
    assert [(r["op"], r["cuda_flops"]) for r in rows] == [("aten::gelu", 8 * 32), ("aten::add", 32)]
    lin = torch.nn.Linear(8, 8)
    rows, _ = _rows(lambda: lin(a), lin)
    assert _one(rows, "aten::addmm")["cuda_flops"] == 0 and _one(rows, "aten::addmm")["cuda_status"] == "free"


def test_an_op_that_computes_with_no_entry_is_uncounted_not_zero_in_silence():
    x = torch.randn(4, 4)
    rows, _ = _rows(lambda: torch.special.bessel_j0(x))
    (row,) = rows
    assert row["cuda_status"] == "uncounted" and row["cuda_flops"] == 0


def test_fused_io_reads_a_layers_inputs_and_weights_once_and_writes_what_leaves_it():
    """Two layers by hand: A = x @ w (a matmul), B = relu(A) * 2 + 1 (three ops, two temporaries). Fused, A reads x
    and w and writes its product (B reads it); B reads the product and writes only its result (the graph's output):
    its temporaries never reach memory. Unfused, B's three ops read and write every temporary."""
    from tracer.compare.io import fused_io
    from tracer.count.records import stage_record

    w = torch.nn.Parameter(torch.randn(8, 16))
    model = torch.nn.Module()
    model.w = w
    x = torch.randn(4, 8)
    rows, sg = _rows(lambda: SimpleNamespace(logits=torch.relu(x @ w) * 2 + 1), model)  # a forward's result
    for r in rows:
        r["layer"] = "A" if r["op"] == "aten::mm" else "B"
    fused = fused_io(rows, [stage_record("prefill", [sg], rows)])
    act, out = 4 * 8 * F32, 4 * 16 * F32
    assert fused[("prefill", "A")] == act + 8 * 16 * F32 + out
    assert fused[("prefill", "B")] == out + out
    unfused_b = sum(r["bytes_read"] + r["bytes_written"] for r in rows if r["layer"] == "B")
    assert unfused_b == 3 * (out + out)  # relu, mul, add: each reads and writes a 4 x 16 tensor


def test_the_activation_peak_follows_liveness():
    """x, a and b (4 KiB each) live while b is made (12 KiB at mul_1, x's last use); at the add x is dead and c is
    made beside a and b (12 KiB again): the peak is 12 KiB, first reached at mul_1. A liveness that kept x (an input)
    to the end would say 16 KiB, one that freed nothing 16 KiB and more."""
    x = torch.randn(32, 32)

    def fn():
        a = x * 2
        b = x * 3
        c = a + b
        return c.sum()

    rows, sg = _rows(fn)
    mem = sg.memory
    kib = 32 * 32 * F32
    assert mem["act_peak_bytes"] == 3 * kib and mem["act_peak_node"] == "mul_1"
    assert mem["weight_bytes"] == 0


# ---- a whole model: DeepSeek-OCR-2 at reduced size, against its nn.Module and its config ---------------------------

@pytest.fixture(scope="module")
def tiny_run(tiny_v2_config):
    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run

    result = run(Workload(image_wh=(1000, 800), text_tokens=3, decode_steps=3), Options(config=tiny_v2_config))
    return result.report, tiny_v2_config


def _module(config_path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as the adapter builds it: bf16 weights (buffers keep their own dtype)
    try:
        with torch.device("meta"):
            return transformers.DeepseekOcr2ForConditionalGeneration(config), config
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.v2
def test_kv_cache_bytes_are_the_closed_form_of_the_config_and_positions(tiny_run):
    doc, path = tiny_run
    _, config = _module(path)
    text = config.text_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_position = text.num_hidden_layers * 2 * heads * head_dim * 2  # keys and values, bf16
    stages = {s["name"]: s for s in doc["stages"]}
    prompt = doc["workload"]["prompt_len"]
    assert stages["prefill"]["kv_bytes"] == per_position * prompt
    assert [s["kv_bytes"] for s in stages["decode"]["steps"]] == [per_position * (prompt + k + 1) for k in range(3)]
    assert stages["decode"]["kv_bytes"] == per_position * (prompt + 3)
    assert stages["prefill"]["kv_layers"] == [per_position * prompt // text.num_hidden_layers] * text.num_hidden_layers
    # per node: what each writes of the cache its forward returns (the cache's concatenations): a forward's nodes sum
    # to the cache after it
    per_forward = Counter()
    for n in doc["nodes"]:
        if n["stage"] in ("prefill", "decode"):
            per_forward[(n["stage"], n["step"])] += n["kv_bytes"]
    assert per_forward[("prefill", None)] == per_position * prompt
    assert [per_forward[("decode", k)] for k in range(3)] == [per_position * (prompt + k + 1) for k in range(3)]
    assert {n["op"] for n in doc["nodes"] if n["kv_bytes"]} == {"aten::cat"}


@pytest.mark.v2
def test_weight_bytes_per_stage_are_the_modules_own_parameters(tiny_run):
    """Prefill reads every parameter and buffer once; a decode step every parameter of the language model but the experts no
    token reaches: of each MoE layer's routed experts, min(tokens x top-k, experts) (one token: top-k), and of the
    embedding table the row of its token."""
    doc, path = tiny_run
    model, config = _module(path)
    text = config.text_config
    stages = {s["name"]: s for s in doc["stages"]}
    # transformers keeps a copy of RoPE's inverse frequencies (`original_inv_freq`, for dynamic RoPE) that no forward
    # reads here: not a weight any stage runs
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
               if not n.endswith("original_inv_freq")]
    every = sum(p.numel() * p.element_size() for _, p in tensors)
    assert stages["prefill"]["weight_bytes"] == every
    language = vision = experts = 0
    for name, p in tensors:
        if "vision" in name or "projector" in name or "view_separator" in name or "image_newline" in name:
            vision += p.numel() * p.element_size()
        elif name.endswith("embed_tokens.weight"):  # a gather: the one token's row
            language += p.shape[1] * p.element_size()
        elif ".experts." in name and p.dim() == 3:
            experts += (p.numel() * p.element_size() * min(text.num_experts_per_tok, text.n_routed_experts)
                        // text.n_routed_experts)
        else:
            language += p.numel() * p.element_size()
    assert stages["decode"]["weight_bytes"] == 3 * (language + experts)


# ---- the metrics diffed per stage (tracer.compare.metrics) ----------------------------------------------------------

@pytest.mark.v2
def test_the_seed_models_frozen_kv_cache_is_a_kv_gap_with_its_cause(tiny_run, tmp_path, capsys):
    """seed-naive's `decode_kv_growth: false` keeps the analytic cache at the prompt: after 3 steps the traced cache
    holds 3 positions more, the gap is those 3 positions' keys and values, named by the preset setting; `--max-gap
    kv=0` exits 1 on it and holds (exit 0) on the aligned model."""
    from tracer.diff import main

    doc, path = tiny_run
    _, config = _module(path)
    text = config.text_config
    per_position = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * 2 if getattr(
        text, "head_dim", None) else text.num_hidden_layers * 2 * text.hidden_size * 2
    base = ["--config", path, "--image-shape", "1000x800", "--text-tokens", "3", "--decode-steps", "3", "--quiet"]
    assert main([*base, "--analytic", "seed-naive", "--max-gap", "kv=0", "--out", str(tmp_path / "n")]) == 1
    err = capsys.readouterr().err
    assert "stage decode: kv gap " in err and "exceeds --max-gap kv=0" in err
    naive = {s["name"]: s for s in json.loads((tmp_path / "n" / "report.json").read_text())["stages"]}
    kv = naive["decode"]["metrics"]["kv"]
    assert kv["gap"] == 3 * per_position
    assert kv["cause"] == "preset decode_kv_growth: false (KV cache not grown per decode step)"
    assert naive["prefill"]["metrics"]["kv"]["gap"] == 0
    assert main([*base, "--max-gap", "kv=0,tc_flops=0", "--out", str(tmp_path / "a")]) == 0
    aligned = {s["name"]: s for s in json.loads((tmp_path / "a" / "report.json").read_text())["stages"]}
    assert aligned["decode"]["metrics"]["kv"] == {"traced": kv["traced"], "analytic": kv["traced"], "gap": 0,
                                                   "gap_pct": 0.0, "cause": None}
    assert "gap_pct" not in aligned["prefill"]["metrics"]["unfused"]  # the trace's alone: shown, not diffed


@pytest.mark.parametrize("gate, says", [
    ("unfused=1", "unfused is shown, not diffed"),
    ("foo=1", "expected PCT or METRIC=PCT"),
    ("kv=-1", "must be a number, 0 or more"),
    ("kv=x", "must be a number, 0 or more"),
])
def test_a_bad_gate_is_one_line_before_anything_runs(gate, says, capsys):
    from tracer.diff import main

    assert main(["--max-gap", gate, "--image-shape", "640x640"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


# ---- the activation peak against torch's own MemTracker (an independent CPU measurement) -----------------------------

class _Attention(torch.nn.Module):
    """Attention written out (q k^T, softmax, p v), with a residual and a norm: no fused fast path."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.qkv, self.out, self.norm, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), torch.nn.LayerNorm(d), heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return x + self.out((p @ v).transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("name, input_live_at_peak", [("mlp", False), ("convolutions", False), ("attention", True)])
def test_the_activation_peak_is_what_torchs_mem_tracker_measures(name, input_live_at_peak):
    """torch.distributed._tools.mem_tracker.MemTracker follows every tensor the dispatcher allocates and frees in an
    eager run: its activation peak (activations and temporaries) equals the liveness peak over the recorded graph,
    plus the stage's input where the input is still to be read at the peak (the attention block's residual): the
    trace counts an input while the stage uses it, MemTracker files it under `Other`. (A module with a fused fast
    path, nn.TransformerEncoderLayer's, runs one op where the recorder, decomposing it as FlopCounterMode does,
    records several: there the two programs differ, and so do their peaks.)"""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    model, args = {
        "mlp": (torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)),
                (torch.randn(64, 256),)),
        "convolutions": (torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3)),
                         (torch.randn(1, 3, 32, 32),)),
        "attention": (_Attention(), (torch.randn(2, 32, 64),)),
    }[name]
    with torch.no_grad():
        tracker = mem_tracker.MemTracker()
        tracker.track_external(model, *args)
        with tracker:
            model(*args)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        _, sg = _rows(lambda: model(*args), model)
    kinds = mem_tracker._MemRefType
    held = args[0].numel() * args[0].element_size() if input_live_at_peak else 0
    assert sg.memory["act_peak_bytes"] == peak[kinds.ACT] + peak[kinds.TEMP] + held > held
    assert sg.memory["weight_bytes"] == peak[kinds.PARAM] + peak[kinds.BUFFER]


# ---- the activation peak against the GPU's allocator (a recording: tests/data/cuda/act-peak-v2-h100.json) ----------

#: what the allocator's peak may hold above the liveness peak, measured 1.10-1.14 on the H100 (2026-12-07): blocks
#: rounded up to 512 B, cuBLAS / attention workspaces, and tensors the vendor code keeps in Python variables past their
#: last use (liveness frees at the last use: a lower bound of what eager PyTorch holds)
ALLOCATOR_SLACK = 1.15
RECORDING = Path(__file__).resolve().parent / "data" / "cuda" / "act-peak-v2-h100.json"


@pytest.mark.v2
def test_the_activation_peak_is_what_the_gpu_allocator_measured_less_its_slack():
    """benchmarks/gpu_act_peak.py ran DeepSeek-OCR-2 in real mode on the GPU: max_memory_allocated less the weights.
    The CPU fake trace of the same workload today must sit below that and within the allocator's slack of it (and
    equal what the GPU run's own trace said: liveness does not depend on the device for these kernels)."""
    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run

    runs = json.loads(RECORDING.read_text())["runs"]
    assert len(runs) == 4
    for r in runs:  # the recorded relation, every workload
        assert r["traced_act_peak"] < r["measured_act_peak"] <= ALLOCATOR_SLACK * r["traced_act_peak"]
    (small,) = [r for r in runs if r["workload"]["image_wh"] == [640, 640]]
    result = run(Workload(image_wh=(640, 640), text_tokens=4, decode_steps=1), Options())
    peak = {s["name"]: s["act_peak_bytes"] for s in result.report["stages"]}
    assert peak == small["traced_per_stage"]
    assert small["measured_act_peak"] / ALLOCATOR_SLACK <= peak["prefill"] < small["measured_act_peak"]
