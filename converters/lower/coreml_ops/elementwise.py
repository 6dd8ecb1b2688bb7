"""Elementwise arithmetic, comparisons, logic, unary math, Where and Cast."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, mil_const

_BINARY = {"Add": mb.add, "Sub": mb.sub, "Mul": mb.mul, "Pow": mb.pow, "Max": mb.maximum, "Min": mb.minimum}
_COMPARE = {
    "Equal": mb.equal, "Greater": mb.greater, "Less": mb.less, "GreaterOrEqual": mb.greater_equal, "LessOrEqual": mb.less_equal,
}


@REGISTRY.register(*_BINARY, "Div", *_COMPARE)
def _binary(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x, y = b.operand(node.inputs[0], node.inputs[1]), b.operand(node.inputs[1], node.inputs[0])
    if node.op_type == "Div":
        is_int = all(not types.is_float(v.dtype) if isinstance(v, Var) else v.dtype.kind in "iu" for v in (x, y))
        return [(mb.floor_div if is_int else mb.real_div)(x=x, y=y, name=name)]
    if node.op_type in _COMPARE:
        return [_COMPARE[node.op_type](x=x, y=y, name=name)]
    if node.op_type == "Pow" and not isinstance(y, Var) and np.all(y == 2):
        return [mb.mul(x=x, y=x, name=name)]
    return [_BINARY[node.op_type](x=x, y=y, name=name)]


@REGISTRY.register("Sum")
def _sum(b: Builder, node: ir.Node, name: str) -> list[Value]:
    first = node.inputs[0]
    total = b.value(first)
    for index, other in enumerate(node.inputs[1:], start=1):
        last = index == len(node.inputs) - 1
        total = mb.add(x=total, y=b.operand(other, first), name=name if last else b.fresh(name))
    return [total]


_LOGICAL = {"And": mb.logical_and, "Or": mb.logical_or, "Xor": mb.logical_xor}


@REGISTRY.register(*_LOGICAL)
def _logical(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x, y = (b.var(t) if isinstance(b.value(t), Var) else b.value(t).astype(bool) for t in node.inputs)
    return [_LOGICAL[node.op_type](x=x, y=y, name=name)]


@REGISTRY.register("Not")
def _not(b: Builder, node: ir.Node, name: str) -> list[Value]:
    return [mb.logical_not(x=b.var(node.inputs[0]), name=name)]


_UNARY = {
    "Relu": mb.relu, "Sigmoid": mb.sigmoid, "Tanh": mb.tanh, "Erf": mb.erf, "Sqrt": mb.sqrt,
    "Exp": mb.exp, "Log": mb.log, "Abs": mb.abs, "Reciprocal": mb.inverse,
}


@REGISTRY.register(*_UNARY)
def _unary(b: Builder, node: ir.Node, name: str) -> list[Value]:
    return [_UNARY[node.op_type](x=b.var(node.inputs[0]), name=name)]


@REGISTRY.register("Neg")
def _neg(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    return [mb.mul(x=x, y=mil_const(np.array(-1), x), name=name)]


@REGISTRY.register("Where")
def _where(b: Builder, node: ir.Node, name: str) -> list[Value]:
    a, c = b.value(node.inputs[1]), b.value(node.inputs[2])
    like = a if isinstance(a, Var) else c if isinstance(c, Var) else None
    cond = b.value(node.inputs[0])
    return [
        mb.select(
            cond=cond if isinstance(cond, Var) else cond.astype(bool),
            a=b.const_or_var(node.inputs[1], like),
            b=b.const_or_var(node.inputs[2], like),
            name=name,
        )
    ]


_CAST_DTYPES = {
    ir.DataType.FLOAT: "fp32", ir.DataType.DOUBLE: "fp32", ir.DataType.FLOAT16: "fp16",
    ir.DataType.BOOL: "bool", ir.DataType.INT32: "int32", ir.DataType.INT64: "int32",
    ir.DataType.INT8: "int32", ir.DataType.UINT8: "int32", ir.DataType.INT16: "int32",
}


def _cast_support(node: ir.Node) -> str | None:
    to = ir.DataType(node.attributes.get_int("to"))
    return None if to in _CAST_DTYPES else f"cast to {to.name}"


@REGISTRY.register("Cast", supports=_cast_support)
def _cast(b: Builder, node: ir.Node, name: str) -> list[Value]:
    return [mb.cast(x=b.var(node.inputs[0]), dtype=_CAST_DTYPES[ir.DataType(node.attributes.get_int("to"))], name=name)]
