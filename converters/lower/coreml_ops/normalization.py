"""BatchNormalization, LayerNormalization and LRN."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at, mil_const


@REGISTRY.register("BatchNormalization")
def _batch_norm(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    gamma, beta, mean, var = (mil_const(b.known(t), x) for t in node.inputs[1:5])
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    return [mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=epsilon, name=name)]


@REGISTRY.register("LayerNormalization")
def _layer_norm(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    rank = len(x.shape)
    axis = node.attributes.get_int("axis", -1) % rank
    normalized = tuple(x.shape[axis:])
    gamma = np.broadcast_to(b.known(node.inputs[1]), normalized)
    beta_input = input_at(node, 2)
    beta = np.broadcast_to(b.known(beta_input), normalized) if beta_input is not None else np.zeros(normalized)
    return [
        mb.layer_norm(
            x=x, axes=list(range(axis, rank)), gamma=mil_const(gamma, x), beta=mil_const(beta, x),
            epsilon=node.attributes.get_float("epsilon", 1e-5), name=name,
        )
    ]


@REGISTRY.register("LRN")
def _lrn(b: Builder, node: ir.Node, name: str) -> list[Value]:
    attrs = node.attributes
    return [
        mb.local_response_norm(
            x=b.var(node.inputs[0]), size=attrs.get_int("size"), alpha=attrs.get_float("alpha", 1e-4),
            beta=attrs.get_float("beta", 0.75), k=attrs.get_float("bias", 1.0), name=name,
        )
    ]
