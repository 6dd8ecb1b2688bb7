"""MatMul (numpy semantics, batched), Gemm (alpha, beta, transA, transB) and Einsum."""

from __future__ import annotations

import torch

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec


@REGISTRY.register("MatMul")
def matmul(node: NodeSpec, inputs: list, graph) -> tuple:
    return (torch.matmul(inputs[0], inputs[1]),)


@REGISTRY.register("Gemm")
def gemm(node: NodeSpec, inputs: list, graph) -> tuple:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if node.attr("transA", 0):
        a = a.transpose(0, 1)
    if node.attr("transB", 0):
        b = b.transpose(0, 1)
    y = torch.matmul(a, b)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return (y,)


@REGISTRY.register("Einsum")
def einsum(node: NodeSpec, inputs: list, graph) -> tuple:
    return (torch.einsum(node.attr("equation").replace(" ", ""), *inputs),)
