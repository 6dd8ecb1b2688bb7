"""Elementwise arithmetic, comparison and logic (numpy broadcasting, as ONNX and torch both do)."""

from __future__ import annotations

import torch

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec

_BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}
_UNARY = {
    "Sqrt": torch.sqrt,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Identity": lambda x: x,
}


@REGISTRY.register(*_BINARY)
def binary(node: NodeSpec, inputs: list, graph) -> tuple:
    return (_BINARY[node.op_type](inputs[0], inputs[1]),)


@REGISTRY.register(*_UNARY)
def unary(node: NodeSpec, inputs: list, graph) -> tuple:
    return (_UNARY[node.op_type](inputs[0]),)


@REGISTRY.register("Div")
def div(node: NodeSpec, inputs: list, graph) -> tuple:
    a, b = inputs
    if a.is_floating_point():
        return (torch.div(a, b),)
    return (torch.div(a, b, rounding_mode="trunc"),)  # ONNX Runtime's integer Div truncates (C++ `/`)


@REGISTRY.register("Mod")
def mod(node: NodeSpec, inputs: list, graph) -> tuple:
    a, b = inputs
    if node.attr("fmod", 0):
        return (torch.fmod(a, b),)
    return (torch.remainder(a, b),)  # integer Mod takes the divisor's sign, as Python's %


@REGISTRY.register("Pow")
def power(node: NodeSpec, inputs: list, graph) -> tuple:
    base, exponent = inputs
    return (torch.pow(base, exponent.to(base.dtype)),)


@REGISTRY.register("Max", "Min", "Sum", "Mean")
def variadic(node: NodeSpec, inputs: list, graph) -> tuple:
    result = inputs[0]
    step = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]
    for value in inputs[1:]:
        result = step(result, value)
    return (result / len(inputs) if node.op_type == "Mean" else result,)


@REGISTRY.register("Where")
def where(node: NodeSpec, inputs: list, graph) -> tuple:
    condition, a, b = inputs
    return (torch.where(condition.bool(), a, b),)


def _dropout_support(node: NodeSpec) -> str | None:
    return "Dropout's mask output" if len(node.outputs) > 1 and node.outputs[1] else None


@REGISTRY.register("Dropout", supports=_dropout_support)
def dropout(node: NodeSpec, inputs: list, graph) -> tuple:
    return (inputs[0],)  # inference semantics, as ONNX Runtime runs it: fine-tuning adds no noise of its own
