"""Activations: Relu, LeakyRelu, PRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, Gelu, Elu, Selu, Celu, Mish, Softplus,
Softsign, ThresholdedRelu, Clip, Softmax, LogSoftmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec


def _gelu_support(node: NodeSpec) -> str | None:
    return None if node.attr("approximate", "none") in ("none", "tanh") else f"Gelu approximate={node.attr('approximate')!r}"


@REGISTRY.register("Relu", "Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "Elu", "HardSigmoid", "Softplus", "Softsign", "Mish", "Selu", "Celu", "ThresholdedRelu")
@REGISTRY.register("Gelu", supports=_gelu_support)
def activation(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    match node.op_type:
        case "Relu":
            return (torch.relu(x),)
        case "Sigmoid":
            return (torch.sigmoid(x),)
        case "Tanh":
            return (torch.tanh(x),)
        case "HardSwish":  # x · max(0, min(1, x/6 + 1/2)), as ONNX writes it
            return (x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0),)
        case "HardSigmoid":
            return (torch.clamp(x * float(node.attr("alpha", 0.2)) + float(node.attr("beta", 0.5)), 0.0, 1.0),)
        case "LeakyRelu":
            return (F.leaky_relu(x, float(node.attr("alpha", 0.01))),)
        case "Elu":
            return (F.elu(x, float(node.attr("alpha", 1.0))),)
        case "Softplus":
            return (F.softplus(x),)
        case "Softsign":
            return (F.softsign(x),)
        case "Mish":
            return (F.mish(x),)
        case "Selu":  # ONNX's defaults are SELU's constants to float precision
            alpha, gamma = float(node.attr("alpha", 1.67326319217681884765625)), float(node.attr("gamma", 1.05070102214813232421875))
            return (gamma * torch.where(x > 0, x, alpha * torch.expm1(x)),)
        case "Celu":
            return (F.celu(x, float(node.attr("alpha", 1.0))),)
        case "ThresholdedRelu":
            return (torch.where(x > float(node.attr("alpha", 1.0)), x, torch.zeros_like(x)),)
        case "Gelu":
            return (F.gelu(x, approximate=node.attr("approximate", "none")),)
    raise AssertionError(node.op_type)


@REGISTRY.register("PRelu")
def prelu(node: NodeSpec, inputs: list, graph) -> tuple:
    x, slope = inputs
    return (torch.where(x >= 0, x, x * slope),)


@REGISTRY.register("Clip")
def clip(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    else:
        low = inputs[1] if len(inputs) > 1 else None
        high = inputs[2] if len(inputs) > 2 else None
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return (x,)


@REGISTRY.register("Softmax", "LogSoftmax")
def softmax(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    function = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if node.opset >= 13:
        return (function(x, dim=int(node.attr("axis", -1))),)
    # before opset 13: the input is coerced to 2-D at `axis`, normalized over everything after it
    axis = int(node.attr("axis", 1)) % x.dim()
    flat = x.reshape(*x.shape[:axis], -1)
    return (function(flat, dim=-1).reshape(x.shape),)
