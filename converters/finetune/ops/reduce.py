"""ReduceMean, ReduceSum, ReduceMax, ReduceMin, ReduceL2, ReduceProd: axes as attribute (old opsets) or input."""

from __future__ import annotations

import torch

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec, integers

#: the opset from which each reduction takes `axes` as an input
_AXES_INPUT_FROM = {"ReduceSum": 13}


@REGISTRY.register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd")
def reduce(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    if node.opset >= _AXES_INPUT_FROM.get(node.op_type, 18):
        axes = integers(inputs[1]) if len(inputs) > 1 else None
    else:
        axes = node.attr("axes")
    keepdims = bool(node.attr("keepdims", 1))
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return (x,)
        axes = list(range(x.dim()))
    dims = tuple(sorted(a % x.dim() for a in axes))
    match node.op_type:
        case "ReduceMean":
            return (x.mean(dim=dims, keepdim=keepdims),)
        case "ReduceSum":
            return (x.sum(dim=dims, keepdim=keepdims),)
        case "ReduceMax":
            return (x.amax(dim=dims, keepdim=keepdims),)
        case "ReduceMin":
            return (x.amin(dim=dims, keepdim=keepdims),)
        case "ReduceL2":
            return (torch.sqrt((x * x).sum(dim=dims, keepdim=keepdims)),)
        case "ReduceProd":
            result = x
            for dim in sorted(dims, reverse=True):
                result = result.prod(dim=dim, keepdim=keepdims)
            return (result,)
    raise AssertionError(node.op_type)
