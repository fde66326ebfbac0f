"""FLOPs per ONNX node, by op type, from its input and output shapes (1 multiply-add = 2): MatMul
2*batch*M*N*K, Gemm 2*M*N*K, Conv 2*numel(out)*C_in/groups*prod(kernel), Einsum 2*prod(every index size). Ops
that may carry FLOPs without a formula here (`MAY_CARRY`: ConvTranspose, contrib attention ops, quantized GEMMs)
are reported as unknown."""

from __future__ import annotations

import math
from typing import Any

from tracer.core.registry import FormulaTable

ONNX_FORMULAS = FormulaTable("ONNX")  # ONNX op type -> fn(input shapes, output shape, attributes) -> int


register = ONNX_FORMULAS.register


MAY_CARRY = {"ConvTranspose", "Attention", "MultiHeadAttention", "GroupQueryAttention", "MatMulInteger",
             "QLinearMatMul", "ConvInteger", "QLinearConv", "MatMulNBits", "FusedMatMul"}


@register("MatMul")
def matmul_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    """numpy matmul: every output element is one K-long dot product, whatever the ranks (a 1-D operand gains and
    then loses a unit dimension; batch dimensions broadcast), so 2 * numel(out) * K."""
    return 2 * math.prod(out) * shapes[0][-1]


@register("Gemm")
def gemm_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    a = shapes[0]
    k = a[0] if attrs.get("transA") else a[1]
    return 2 * out[0] * out[1] * k


@register("Conv")
def conv_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    w = shapes[1]
    return 2 * math.prod(out) * w[1] * math.prod(w[2:])


@register("Einsum")
def einsum_flop(shapes: list[list[int]], out: list[int], attrs: dict[str, Any]) -> int:
    """2 * the product of every index's size (one multiply-add per point of the joint index space). `...` stands
    for the leading dimensions an operand has beyond its letters, aligned from the right across operands; a size-1
    dimension broadcasts, so an index (or ellipsis position) takes its largest size over the operands."""
    lhs = attrs["equation"].replace(" ", "").split("->")[0].split(",")
    size: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        letters = term.replace("...", "")
        if "..." in term:
            head, tail = term.split("...")
            covered = len(shape) - len(letters)
            names = list(head) + [f"...{covered - i}" for i in range(covered)] + list(tail)
        else:
            names = list(term)
        for name, dim in zip(names, shape):
            size[name] = max(size.get(name, 1), dim)
    return 2 * math.prod(size.values())
