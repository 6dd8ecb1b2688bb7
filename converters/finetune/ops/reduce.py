"""ReduceMean, ReduceSum, ReduceMax, ReduceMin, ReduceL1, ReduceL2, ReduceProd, ReduceSumSquare, ReduceLogSumExp
(axes as attribute before opset 18, ReduceSum's from 13, or input), ArgMax/ArgMin, CumSum."""

from __future__ import annotations

import torch

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec, integers

#: the opset from which each reduction takes `axes` as an input
_AXES_INPUT_FROM = {"ReduceSum": 13}


@REGISTRY.register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp")
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
        case "ReduceL1":
            return (x.abs().sum(dim=dims, keepdim=keepdims),)
        case "ReduceSumSquare":
            return ((x * x).sum(dim=dims, keepdim=keepdims),)
        case "ReduceLogSumExp":
            return (torch.logsumexp(x, dim=dims, keepdim=keepdims),)
        case "ReduceProd":
            result = x
            for dim in sorted(dims, reverse=True):
                result = result.prod(dim=dim, keepdim=keepdims)
            return (result,)
    raise AssertionError(node.op_type)


def _arg_support(node: NodeSpec) -> str | None:
    return "ArgMax/ArgMin with select_last_index" if node.attr("select_last_index", 0) else None


@REGISTRY.register("ArgMax", "ArgMin", supports=_arg_support)
def arg_extreme(node: NodeSpec, inputs: list, graph) -> tuple:
    function = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    return (function(inputs[0], dim=int(node.attr("axis", 0)), keepdim=bool(node.attr("keepdims", 1))),)


@REGISTRY.register("CumSum")
def cumulative_sum(node: NodeSpec, inputs: list, graph) -> tuple:
    x, axis = inputs[0], int(inputs[1].reshape(-1)[0])
    if node.attr("reverse", 0):
        x = x.flip(axis)
    if node.attr("exclusive", 0):
        result = torch.cumsum(x, dim=axis) - x
    else:
        result = torch.cumsum(x, dim=axis)
    return (result.flip(axis) if node.attr("reverse", 0) else result,)
