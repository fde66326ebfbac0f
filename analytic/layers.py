"""Analytic layers: one small class per kind, each a pure function of its shapes.

Conventions (shared with `tracer.count.formulas`):
  * tensor-core FLOPs: 1 multiply-add = 2 FLOPs; attention = Q K^T + P V over the (query, key) pairs
    kept (dense unless `Policy.causal_halving`); relative-position and RoPE matmuls are real matmuls;
  * CUDA-core FLOPs (a separate column, never mixed in): per element, LayerNorm/RMSNorm 4 (mean,
    variance, normalize, scale), softmax 3 (max-subtract, exp, divide), SiLU-gated product 4, GELU 8,
    residual add 1;
  * bytes: activations and weights at `dtype_bytes`; I/O = inputs + outputs + weights read once;
    KV cache = keys and values of every cached position.

`Policy.ignore_torch_unsupported_flops` (CLI `--policy torch`) counts what FlopCounterMode counts on the
workload's device: a layer says which op carries its matmul (`op`, `tracer.core.conventions.CARRIERS`), and the
policy drops those torch's registry has no formula for (SDPA on CPU, grouped GEMM, flash-attn, flex).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import ClassVar

from tracer.core.conventions import attention_pairs, torch_counts


@dataclass(frozen=True)
class Policy:
    """`ignore_torch_unsupported_flops=True` reproduces FlopCounterMode (policy "torch"); False is the
    full algorithmic count (policy "full"). `causal_halving` counts only the pairs a causal mask keeps."""

    ignore_torch_unsupported_flops: bool = False
    device: str = "cpu"
    causal_halving: bool = False

    def counts(self, op: str) -> bool:
        return not self.ignore_torch_unsupported_flops or torch_counts(op, self.device)


@dataclass
class Cost:
    tc_flops: int = 0
    cuda_flops: int = 0
    io_bytes: int = 0
    weight_bytes: int = 0
    act_bytes: int = 0
    kv_bytes: int = 0

    @staticmethod
    def total(costs: "Iterable[Cost]") -> "Cost":
        """Field-wise sum, without a Cost per partial sum (a sweep adds millions)."""
        t = [0, 0, 0, 0, 0, 0]
        for c in costs:
            t[0] += c.tc_flops
            t[1] += c.cuda_flops
            t[2] += c.io_bytes
            t[3] += c.weight_bytes
            t[4] += c.act_bytes
            t[5] += c.kv_bytes
        return Cost(*t)

    def astuple(self) -> tuple[int, ...]:
        return (self.tc_flops, self.cuda_flops, self.io_bytes, self.weight_bytes, self.act_bytes, self.kv_bytes)


@dataclass
class Layer:
    """A leaf: `id` is unique per stage, `op` names the aten op that carries its tensor-core work."""

    id: str
    op: str = "mm"
    dtype_bytes: int = 2

    formula: ClassVar[str] = ""

    #: CUDA-core work the vendor code does inside this layer's modules beside what its formula counts (a router's
    #: softmax, the experts' routing bookkeeping, RoPE's angles): (what, FLOPs) pairs, named where they are built
    glue: tuple[tuple[str, int], ...] = ()
    #: what the layer reads and writes besides its weights, fused (once each), where the vendor's tensors differ from
    #: its formula's inputs and output (a residual pair reads three tensors, a gated product two): (what, bytes) pairs
    #: that replace the formula's I/O; empty: the formula's own
    traffic: tuple[tuple[str, int], ...] = ()

    def work(self, policy: Policy) -> Cost:
        """The layer's own formula: each kind's one pure function of its shapes."""
        raise NotImplementedError

    def cost(self, policy: Policy) -> Cost:
        c = self.work(policy)
        if self.glue:
            c.cuda_flops += sum(flops for _, flops in self.glue)
        if self.traffic:  # fused: each weight read once, however often its ops read it
            c.io_bytes = self.distinct_weight_bytes(policy) + sum(b for _, b in self.traffic)
        return c

    def distinct_weight_bytes(self, policy: Policy) -> int:
        """Its weights counted once however often a forward reads them (a stage's weights are distinct)."""
        return self.work(policy).weight_bytes

    def explain(self, policy: Policy) -> str:
        """'Linear: 2 * tokens * d_in * d_out with tokens=913, d_in=1280, d_out=1536 = 3,590,225,920'."""
        knobs = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                          if f.name not in ("id", "dtype_bytes", "children", "glue", "traffic"))
        note = "" if policy.counts(self.op) else f" (policy torch: op {self.op} is invisible to FlopCounterMode)"
        glue = ("; CUDA-core beside it: " + ", ".join(f"{what} {flops:,}" for what, flops in self.glue)
                if self.glue else "") + ("; I/O besides weights: " + ", ".join(f"{what} {b:,} B" for what, b in self.traffic)
                                         if self.traffic else "")
        return f"{type(self).__name__}: {self.formula} with {knobs} = {self.cost(policy).tc_flops:,}{note}{glue}"

    def leaves(self) -> Iterator["Layer"]:
        yield self


@dataclass
class Linear(Layer):
    formula: ClassVar[str] = "2 * tokens * d_in * d_out"
    tokens: int = 0
    d_in: int = 0
    d_out: int = 0
    bias: bool = False  # its d_out bias: weights read, no tensor-core FLOPs (FlopCounterMode's addmm counts none)

    def work(self, policy: Policy) -> Cost:
        tc = 2 * self.tokens * self.d_in * self.d_out if policy.counts(self.op) else 0
        w = (self.d_in + self.bias) * self.d_out * self.dtype_bytes
        act = self.tokens * (self.d_in + self.d_out) * self.dtype_bytes
        return Cost(tc, 0, act + w, w, self.tokens * self.d_out * self.dtype_bytes)


@dataclass
class Experts(Layer):
    """Routed experts (SwiGLU): gate+up (d -> 2I) and down (I -> d) over tokens x top-k routed rows."""
    formula: ClassVar[str] = "2 * routed_rows * d * 2 * inter + 2 * routed_rows * inter * d"

    routed_rows: int = 0
    d: int = 0
    inter: int = 0
    n_experts: int = 0
    op: str = "grouped_mm"

    def work(self, policy: Policy) -> Cost:
        tc = 2 * self.routed_rows * self.d * 2 * self.inter + 2 * self.routed_rows * self.inter * self.d
        # the experts a step touches: at most one per routed row (a one-token decode step reads its top-k, not all)
        w = min(self.routed_rows, self.n_experts) * 3 * self.d * self.inter * self.dtype_bytes
        act = self.routed_rows * (self.d + 2 * self.inter) * self.dtype_bytes
        return Cost(tc if policy.counts(self.op) else 0, 4 * self.routed_rows * self.inter, act + w, w, act)


@dataclass
class Conv2d(Layer):
    formula: ClassVar[str] = "2 * batch * c_out * out_h * out_w * c_in * kernel^2"
    batch: int = 1
    c_in: int = 0
    c_out: int = 0
    kernel: int = 1
    out_hw: tuple[int, int] = (0, 0)
    bias: bool = False
    stride: int = 1  # its input is out_hw x stride a side (padded to keep the size at stride 1)
    op: str = "convolution"

    def work(self, policy: Policy) -> Cost:
        out = self.batch * self.c_out * self.out_hw[0] * self.out_hw[1]
        tc = 2 * out * self.c_in * self.kernel * self.kernel
        w = self.c_out * (self.c_in * self.kernel ** 2 + self.bias) * self.dtype_bytes
        x = self.batch * self.c_in * self.out_hw[0] * self.out_hw[1] * self.stride ** 2
        return Cost(tc, 0, w + (x + out) * self.dtype_bytes, w, out * self.dtype_bytes)


@dataclass
class Attention(Layer):
    """Attention core: `batch` (windows x images), `heads` query heads; `causal` only matters with halving."""
    formula: ClassVar[str] = "2 * batch * heads * pairs * (d + d_v), pairs = s_q * s_k (dense) or the causal pairs kept"

    batch: int = 1
    heads: int = 1
    s_q: int = 0
    s_k: int = 0
    d: int = 0
    d_v: int = 0
    causal: bool = False
    op: str = "sdpa"

    def pairs(self, policy: Policy) -> int:
        if not policy.causal_halving:
            return self.s_q * self.s_k
        # KV cache: the new queries are the last ones, so the causal mask is bottom-right aligned
        return attention_pairs(self.s_q, self.s_k, self.causal, align="bottom_right")

    def work(self, policy: Policy) -> Cost:
        p = self.pairs(policy)
        tc = 2 * self.batch * self.heads * p * (self.d + self.d_v) if policy.counts(self.op) else 0
        scores = self.batch * self.heads * self.s_q * self.s_k  # the softmax runs over every score (the trace's kernels' count)
        act = self.batch * self.heads * (self.s_q * (self.d + self.d_v) + self.s_k * (self.d + self.d_v))
        return Cost(tc, 3 * scores, act * self.dtype_bytes, 0, self.batch * self.heads * self.s_q * self.d_v * self.dtype_bytes)


@dataclass
class RelPos(Layer):
    """SAM's decomposed relative positions: two einsums (bmm) of q with R_h and R_w."""
    formula: ClassVar[str] = "2 * batch_heads * h * w * (h + w) * d"

    batch_heads: int = 0
    h: int = 0
    w: int = 0
    d: int = 0
    table: int = 0  # rows of each learned table (R_h, R_w): 2 * trained side - 1, interpolated to the grid when it differs
    op: str = "bmm"

    def work(self, policy: Policy) -> Cost:
        tc = 2 * self.batch_heads * self.h * self.w * (self.h + self.w) * self.d
        w = 2 * self.table * self.d * self.dtype_bytes
        return Cost(tc, self.batch_heads * (self.h * self.w) ** 2, w, w, 0)


@dataclass
class Rope(Layer):
    """RoPE angles as transformers computes them: inv_freq (d/2, 1) @ positions (1, L), a small bmm."""
    formula: ClassVar[str] = "2 * half_dim * positions"

    positions: int = 0
    half_dim: int = 0
    op: str = "bmm"

    def work(self, policy: Policy) -> Cost:
        w = self.half_dim * 4  # its inverse frequencies, a float32 buffer
        return Cost(2 * self.half_dim * self.positions, 0, w, w, 0)


@dataclass
class Elementwise(Layer):
    """CUDA-core only work (norms, activations, residuals): `per_element` FLOPs per element."""
    formula: ClassVar[str] = "0 tensor-core; per_element * elements CUDA-core"

    elements: int = 0
    per_element: int = 1
    weights: int = 0  # elements of its weights (a norm's scale, and shift), at dtype_bytes
    op: str = "elementwise"

    def work(self, policy: Policy) -> Cost:
        b = self.elements * self.dtype_bytes
        w = self.weights * self.dtype_bytes
        return Cost(0, self.per_element * self.elements, 2 * b + w, w, b)


@dataclass
class Embedding(Layer):
    """A token embedding lookup: it reads the rows of its tokens (at most the whole table), no FLOPs."""
    formula: ClassVar[str] = "0 (a lookup: min(tokens, vocab) rows of d read)"

    tokens: int = 0
    d: int = 0
    vocab: int = 0
    op: str = "none"

    def work(self, policy: Policy) -> Cost:
        w = min(self.tokens, self.vocab) * self.d * self.dtype_bytes
        out = self.tokens * self.d * self.dtype_bytes
        return Cost(0, 0, w + out + 8 * self.tokens, w, out)  # the token ids (int64) read too


@dataclass
class Buffer(Layer):
    """A buffer a forward reads whole (RoPE's inverse frequencies): memory only."""
    formula: ClassVar[str] = "0 (memory only)"

    elements: int = 0
    op: str = "none"
    param: str = ""  # the parameter's own name where views share the layer id but not the weights (v2's queries)
    reads: int = 0   # elements a forward reads when some are read more than once (0: each once)

    def work(self, policy: Policy) -> Cost:
        w = (self.reads or self.elements) * self.dtype_bytes
        return Cost(0, 0, w, w, 0)

    def distinct_weight_bytes(self, policy: Policy) -> int:
        return self.elements * self.dtype_bytes


@dataclass
class Layout(Layer):
    """The copies the vendor code makes to lay tensors out for the next op (a window partition, q, k and v split per
    head, a bias reshaped): no FLOPs, only the bytes of its `traffic`."""
    formula: ClassVar[str] = "0 (copies: the bytes they read and write)"

    op: str = "none"

    def work(self, policy: Policy) -> Cost:
        return Cost()


@dataclass
class KVCache(Layer):
    """Keys and values of `positions` cached tokens: memory, and the traffic of growing it."""
    formula: ClassVar[str] = "0 (memory only)"

    positions: int = 0
    kv_heads: int = 0
    d: int = 0
    op: str = "none"
    #: grown by concatenation in this forward (transformers' DynamicCache: the old cache and the new keys and values
    #: read, the grown cache written: the whole cache twice); False: the first forward's keys and values kept as
    #: they are (transformers 4.46 appends them to an empty cache: no copy)
    concatenated: bool = True

    def work(self, policy: Policy) -> Cost:
        kv = 2 * self.positions * self.kv_heads * self.d * self.dtype_bytes
        return Cost(io_bytes=2 * kv if self.concatenated else 0, kv_bytes=kv)


@dataclass
class Block(Layer):
    """A composite: its cost is the sum of its children's, nothing else."""
    formula: ClassVar[str] = "sum of the children"

    children: list[Layer] = field(default_factory=list)
    op: str = "none"
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def cost(self, policy: Policy) -> Cost:
        # memoized per policy: builders share blocks between workloads (analytic.models caches them)
        if policy not in self._memo:
            self._memo[policy] = Cost.total(c.cost(policy) for c in self.children)
        return self._memo[policy]

    def distinct_weight_bytes(self, policy: Policy) -> int:
        return self.cost(policy).weight_bytes

    def leaves(self) -> Iterator[Layer]:
        for c in self.children:
            yield from c.leaves()
