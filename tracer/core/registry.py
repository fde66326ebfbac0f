"""One way to keep FLOP formulas: a table from an op's name to a small pure function, filled by a decorator, as
`torch.utils.flop_counter` keeps its own. The fx counter (`tracer.count.formulas`, keyed by qualified aten/custom op name)
and the ONNX counter (`tracer.onnx.formulas`, keyed by ONNX op type) each hold one; a second formula for a name is a
mistake caught at import."""

from __future__ import annotations

from collections.abc import Callable

Formula = Callable[..., int]


class FormulaTable(dict[str, Formula]):
    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, *names: str) -> Callable[[Formula], Formula]:
        """Decorator: the function is the formula of each of `names`."""
        def deco(fn: Formula) -> Formula:
            for name in names:
                if name in self:
                    raise RuntimeError(f"duplicate {self.what} FLOP formula for {name}")
                self[name] = fn
            return fn
        return deco
