"""Activations with parameters (Elu, LeakyRelu, HardSigmoid, HardSwish, Gelu, PRelu, Clip) and Softmax."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at, mil_const


@REGISTRY.register("Elu")
def _elu(b: Builder, node: ir.Node, name: str) -> list[Value]:
    return [mb.elu(x=b.var(node.inputs[0]), alpha=node.attributes.get_float("alpha", 1.0), name=name)]


@REGISTRY.register("LeakyRelu")
def _leaky_relu(b: Builder, node: ir.Node, name: str) -> list[Value]:
    return [mb.leaky_relu(x=b.var(node.inputs[0]), alpha=node.attributes.get_float("alpha", 0.01), name=name)]


@REGISTRY.register("HardSigmoid")
def _hard_sigmoid(b: Builder, node: ir.Node, name: str) -> list[Value]:
    alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
    return [mb.sigmoid_hard(x=b.var(node.inputs[0]), alpha=alpha, beta=beta, name=name)]


@REGISTRY.register("HardSwish")
def _hard_swish(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    gate = mb.sigmoid_hard(x=x, alpha=1.0 / 6.0, beta=0.5, name=b.fresh(name + "_gate"))
    return [mb.mul(x=x, y=gate, name=name)]


@REGISTRY.register("Gelu")
def _gelu(b: Builder, node: ir.Node, name: str) -> list[Value]:
    mode = "TANH_APPROXIMATION" if node.attributes.get_string("approximate", "none") == "tanh" else "EXACT"
    return [mb.gelu(x=b.var(node.inputs[0]), mode=mode, name=name)]


@REGISTRY.register("PRelu")
def _prelu(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    slope = b.known(node.inputs[1]).astype(np.float32)
    rank = len(x.shape)
    if rank >= 3 and slope.size == x.shape[1] and slope.squeeze().ndim <= 1 and (slope.ndim <= 1 or slope.shape[0] == x.shape[1]):
        return [mb.prelu(x=x, alpha=slope.reshape(-1), name=name)]
    positive = mb.relu(x=x, name=b.fresh(name + "_pos"))
    negative = mb.minimum(x=x, y=mil_const(np.array(0.0), x), name=b.fresh(name + "_neg"))
    scaled = mb.mul(x=negative, y=mil_const(slope, x), name=b.fresh(name + "_scaled"))
    return [mb.add(x=positive, y=scaled, name=name)]


@REGISTRY.register("Clip")
def _clip(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    low, high = _clip_bounds(b, node)
    if low == 0.0 and high == 6.0:
        return [mb.relu6(x=x, name=name)]
    if low is not None and high is not None:
        return [mb.clip(x=x, alpha=mil_const(np.array(low), x), beta=mil_const(np.array(high), x), name=name)]
    if low is not None:
        return [mb.maximum(x=x, y=mil_const(np.array(low), x), name=name)]
    if high is not None:
        return [mb.minimum(x=x, y=mil_const(np.array(high), x), name=name)]
    return [mb.identity(x=x, name=name)]


def _clip_bounds(b: Builder, node: ir.Node) -> tuple[float | None, float | None]:
    if b.opset < 11:
        return node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)
    low, high = input_at(node, 1), input_at(node, 2)
    return (None if low is None else float(b.known(low))), (None if high is None else float(b.known(high)))


@REGISTRY.register("Softmax")
def _softmax(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x: Var = b.var(node.inputs[0])
    rank = len(x.shape)
    if b.opset >= 13:
        return [mb.softmax(x=x, axis=node.attributes.get_int("axis", -1), name=name)]
    axis = node.attributes.get_int("axis", 1) % rank
    if axis == rank - 1:
        return [mb.softmax(x=x, axis=-1, name=name)]
    # Before opset 13, Softmax normalizes over everything from `axis` on, flattened.
    shape = tuple(x.shape)
    flat = mb.reshape(x=x, shape=[math.prod(shape[:axis]), math.prod(shape[axis:])], name=b.fresh(name + "_2d"))
    soft = mb.softmax(x=flat, axis=-1, name=b.fresh(name + "_soft"))
    return [mb.reshape(x=soft, shape=list(shape), name=name)]
