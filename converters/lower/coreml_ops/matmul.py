"""MatMul and Gemm: `linear` where the weight is a constant matrix, `matmul` otherwise."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at, mil_const


@REGISTRY.register("MatMul")
def _matmul(b: Builder, node: ir.Node, name: str) -> list[Value]:
    a, w = b.value(node.inputs[0]), b.value(node.inputs[1])
    if isinstance(a, Var) and isinstance(w, np.ndarray) and w.ndim == 2:
        return [mb.linear(x=a, weight=mil_const(w.T, a), name=name)]
    x = a if isinstance(a, Var) else b.var(node.inputs[0], w)
    return [mb.matmul(x=x, y=b.var(node.inputs[1], x), name=name)]


@REGISTRY.register("Gemm")
def _gemm(b: Builder, node: ir.Node, name: str) -> list[Value]:
    alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
    trans_a, trans_b = bool(node.attributes.get_int("transA", 0)), bool(node.attributes.get_int("transB", 0))
    a = b.var(node.inputs[0])
    if trans_a:
        a = mb.transpose(x=a, perm=[1, 0], name=b.fresh(name + "_at"))
    w = b.value(node.inputs[1])
    bias_input = input_at(node, 2)
    bias = None if bias_input is None else b.value(bias_input)
    out_features = b.shape(node.inputs[1])[0 if trans_b else 1]
    if isinstance(w, np.ndarray) and (bias is None or isinstance(bias, np.ndarray) and bias.size in (1, out_features)):
        weight = (w if trans_b else w.T) * alpha
        linear_bias = None if bias is None else np.broadcast_to(beta * bias.reshape(-1), (out_features,))
        return [mb.linear(x=a, weight=mil_const(weight, a), bias=None if linear_bias is None else mil_const(linear_bias, a), name=name)]
    product = mb.matmul(
        x=a, y=b.var(node.inputs[1], a), transpose_y=trans_b, name=b.fresh(name + "_mm") if bias is not None or alpha != 1 else name
    )
    if alpha != 1.0:
        product = mb.mul(x=product, y=mil_const(np.array(alpha), a), name=b.fresh(name + "_alpha") if bias is not None else name)
    if bias is None:
        return [product]
    if isinstance(bias, np.ndarray):
        bias = mil_const(bias * beta, a)
    elif beta != 1.0:
        bias = mb.mul(x=bias, y=mil_const(np.array(beta), a), name=b.fresh(name + "_beta"))
    return [mb.add(x=product, y=bias, name=name)]
