"""Decode steps in closed form: the analytic side of a long decode (tracer.capture.series is the trace's).

A decode step is the decoder over one new token against a KV length that grows by one per step, so every layer's
six columns are affine in the step (dense attention's pairs, the cache's positions; the rest constant). `Steps`
stands for steps `first..last` of one decoder: its leaves are the last step's layers, each costing the sum over the
steps, `count * (first + last) / 2` per column (exact for an affine series), the KV cache the last step's (a state,
not a sum). Affine is checked, never assumed: per policy, every leaf's columns at a third step in between must lie
on the line through the first and the last; where one does not, that policy's costs are the exact sum over every
step, built one by one. Why: a 2,000-step page built 2,000 blocks of ~300 layers (5.4 s for `python -m analytic`);
three blocks are enough to know them all.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from analytic.layers import Block, Cost, Layer, Policy

COLUMNS = ("tc_flops", "cuda_flops", "io_bytes", "weight_bytes", "act_bytes", "kv_bytes")


@dataclass
class Steps(Block):
    """Decode steps `first..last` (`build(k)`: step k's decoder block), as one block of summed leaves."""

    build: Callable[[int], Block] = None  # type: ignore[assignment]
    first: int = 0
    last: int = 0
    _sums: dict = field(default_factory=dict, repr=False, compare=False)
    _leaves: list = field(default_factory=list, repr=False, compare=False)

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def leaves(self) -> Iterator[Layer]:
        if not self._leaves:
            template = list(self.build(self.last).leaves())
            self._leaves = [_summed(leaf, self, i) for i, leaf in enumerate(template)]
        yield from self._leaves

    def cost(self, policy: Policy) -> Cost:
        return Cost.total(leaf.cost(policy) for leaf in self.leaves())

    def sums(self, policy: Policy) -> tuple[list[Cost], list[list[int]], bool]:
        """Per leaf: its cost over the steps, its per-step affine form per column ([a, b]: a + b * step), and
        whether the closed form held (else the costs are the exact sum over every step)."""
        if policy not in self._sums:
            ends = [[leaf.cost(policy) for leaf in self.build(k).leaves()] for k in (self.first, self.last)]
            middle = (self.first + self.last) // 2
            mid = [leaf.cost(policy) for leaf in self.build(middle).leaves()]
            affine = len(ends[0]) == len(ends[1]) == len(mid) and all(
                _on_line(a, m, b, self.first, middle, self.last) for a, m, b in zip(ends[0], mid, ends[1]))
            if affine:
                costs = [Cost(*[self.count * (x + y) // 2 for x, y in zip(a.astuple()[:5], b.astuple()[:5])],
                              b.kv_bytes) for a, b in zip(*ends)]
                forms = [_form(a, b, self.first, self.last) for a, b in zip(*ends)]
            else:  # not one line: every step built and added up (exact, slow)
                per = [[leaf.cost(policy) for leaf in self.build(k).leaves()] for k in range(self.first, self.last + 1)]
                costs = [Cost(*[sum(c[i].astuple()[j] for c in per) for j in range(5)], per[-1][i].kv_bytes)
                         for i in range(len(per[-1]))]
                forms = [[] for _ in costs]
            self._sums[policy] = (costs, forms, affine)
        return self._sums[policy]


def _on_line(a: Cost, m: Cost, b: Cost, x0: int, xm: int, x1: int) -> bool:
    """Whether every column of the middle step lies on the line through the first and the last (integers)."""
    return all((vm - va) * (x1 - x0) == (vb - va) * (xm - x0) for va, vm, vb in zip(a.astuple(), m.astuple(), b.astuple()))


def _form(a: Cost, b: Cost, x0: int, x1: int) -> list[list[int]]:
    """Per column [a, b] with the column at step k = a + b * k (slopes are whole: one position per step)."""
    out = []
    for va, vb in zip(a.astuple(), b.astuple()):
        slope, rest = divmod(vb - va, x1 - x0) if x1 != x0 else (0, 0)
        out.append([va - slope * x0, slope] if not rest else [])  # a fractional slope: the sums stand, no form
    return out


@functools.cache
def _summed_class(cls: type) -> type:
    """`cls` whose cost is its place in a `Steps` (`_steps`, `_index`); a copy made without them (dataclasses.replace,
    a formula's symbol tried) costs as the one step it describes."""

    def cost(self, policy: Policy) -> Cost:
        steps = self.__dict__.get("_steps")
        return cls.cost(self, policy) if steps is None else steps.sums(policy)[0][self._index]

    def distinct_weight_bytes(self, policy: Policy) -> int:
        steps = self.__dict__.get("_steps")
        return cls.distinct_weight_bytes(self, policy) * (1 if steps is None else steps.count)

    def explain(self, policy: Policy) -> str:
        steps = self.__dict__.get("_steps")
        if steps is None:
            return cls.explain(self, policy)
        one = cls.explain(self, policy).rsplit(" = ", 1)[0]
        total = self.cost(policy).tc_flops
        _, forms, affine = steps.sums(policy)
        if not affine:
            return f"sum over decode steps {steps.first}-{steps.last} of {one} (each step built: not affine) = {total:,}"
        if not forms[self._index][0]:
            return f"sum over decode steps {steps.first}-{steps.last} of {one} = {total:,}"
        a, b = forms[self._index][0]
        return (f"sum over decode steps k = {steps.first}..{steps.last} of {one} at step {steps.last}; per step "
                f"{a:,} + {b:,} * k = {total:,}")

    return type(f"Summed{cls.__name__}", (cls,), {"cost": cost, "distinct_weight_bytes": distinct_weight_bytes,
                                                   "explain": explain, "__module__": __name__})


def _summed(leaf: Layer, steps: Steps, index: int) -> Layer:
    out = copy.copy(leaf)
    out.__class__ = _summed_class(type(leaf))
    out._steps, out._index = steps, index
    return out


def steps_of(layer: Layer) -> int:
    """How many decode steps a leaf stands for (1, or its Steps' count)."""
    steps = layer.__dict__.get("_steps")
    return 1 if steps is None else steps.count
