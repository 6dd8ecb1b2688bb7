"""MaxPool, AveragePool (count_include_pad, ceil_mode), GlobalAveragePool, GlobalMaxPool."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec, pads_pair, torch_pad
from edgeopt.converters.finetune.ops.conv import conv_pads

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVERAGE = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_support(node: NodeSpec) -> str | None:
    if len(node.outputs) > 1 and node.outputs[1]:
        return "MaxPool's Indices output"
    if node.attr("storage_order", 0):
        return "storage_order=1"
    if node.attr("ceil_mode", 0):
        kernel = list(node.attr("kernel_shape") or [])
        begins, ends = pads_pair(node.attr("pads"), len(kernel))
        if node.attr("auto_pad", "NOTSET") != "NOTSET" or begins != ends or any(2 * p > k for p, k in zip(begins, kernel)):
            return "ceil_mode with asymmetric pads, pads over half the kernel or auto_pad"
    if node.op_type == "AveragePool" and any(d != 1 for d in node.attr("dilations") or []):
        return "AveragePool with dilations"
    return None


@REGISTRY.register("MaxPool", "AveragePool", supports=_pool_support)
def pool(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    kernel = list(node.attr("kernel_shape"))
    spatial = len(kernel)
    strides = node.attr("strides") or [1] * spatial
    dilations = node.attr("dilations") or [1] * spatial
    ceil_mode = bool(node.attr("ceil_mode", 0))
    begins, ends = conv_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    # torch pads symmetrically by at most half the kernel; anything else is padded explicitly
    native = begins == ends and all(2 * p <= k for p, k in zip(begins, kernel))
    if node.op_type == "MaxPool":
        if not native:
            x, begins = F.pad(x, torch_pad(begins, ends), value=float("-inf")), [0] * spatial
        return (_MAX[spatial](x, kernel, strides, begins, dilations, ceil_mode),)
    include_pad = bool(node.attr("count_include_pad", 0))
    if native:
        return (_AVERAGE[spatial](x, kernel, strides, begins, ceil_mode, include_pad),)
    padded = F.pad(x, torch_pad(begins, ends))
    sums = _AVERAGE[spatial](padded, kernel, strides, 0, False, True)
    if include_pad:
        return (sums,)
    valid = F.pad(torch.ones_like(x[:1, :1]), torch_pad(begins, ends))
    return (sums / _AVERAGE[spatial](valid, kernel, strides, 0, False, True),)


@REGISTRY.register("GlobalAveragePool", "GlobalMaxPool")
def global_pool(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    dims = tuple(range(2, x.dim()))
    if node.op_type == "GlobalAveragePool":
        return (x.mean(dim=dims, keepdim=True),)
    return (x.amax(dim=dims, keepdim=True),)
