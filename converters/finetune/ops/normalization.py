"""LayerNormalization, BatchNormalization (inference), InstanceNormalization."""

from __future__ import annotations

import torch.nn.functional as F

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec


def _layer_norm_support(node: NodeSpec) -> str | None:
    return "LayerNormalization's Mean/InvStdDev outputs" if any(node.outputs[1:]) else None


@REGISTRY.register("LayerNormalization", supports=_layer_norm_support)
def layer_norm(node: NodeSpec, inputs: list, graph) -> tuple:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = int(node.attr("axis", -1)) % x.dim()
    return (F.layer_norm(x, x.shape[axis:], scale, bias, float(node.attr("epsilon", 1e-5))),)


def _batch_norm_support(node: NodeSpec) -> str | None:
    return "BatchNormalization in training mode" if node.attr("training_mode", 0) or any(node.outputs[1:]) else None


@REGISTRY.register("BatchNormalization", supports=_batch_norm_support)
def batch_norm(node: NodeSpec, inputs: list, graph) -> tuple:
    x, scale, bias, mean, variance = inputs
    return (F.batch_norm(x, mean, variance, scale, bias, training=False, eps=float(node.attr("epsilon", 1e-5))),)


@REGISTRY.register("InstanceNormalization")
def instance_norm(node: NodeSpec, inputs: list, graph) -> tuple:
    x, scale, bias = inputs
    return (F.instance_norm(x, weight=scale, bias=bias, eps=float(node.attr("epsilon", 1e-5))),)
