"""Conv and ConvTranspose, 1-D to 3-D: groups, dilations, strides, explicit or auto pads, output_padding/output_shape."""

from __future__ import annotations

import math

import torch.nn.functional as F

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec, pads_pair, torch_pad

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _conv_support(node: NodeSpec) -> str | None:
    if node.attr("auto_pad", "NOTSET") not in _AUTO_PADS:
        return f"auto_pad={node.attr('auto_pad')!r}"
    return None


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """ONNX SAME_UPPER/SAME_LOWER: output = ceil(input / stride), the odd pad at the end (upper) or start."""
    total = max(0, (math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def conv_pads(node: NodeSpec, sizes: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[list[int], list[int]]:
    """(begins, ends) of a Conv or pooling node over the spatial `sizes`."""
    auto_pad = node.attr("auto_pad", "NOTSET")
    spatial = len(sizes)
    if auto_pad == "VALID":
        return [0] * spatial, [0] * spatial
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [_same_pads(s, k, st, d, auto_pad == "SAME_UPPER") for s, k, st, d in zip(sizes, kernel, strides, dilations)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return pads_pair(node.attr("pads"), spatial)


def _conv_operands(node: NodeSpec, inputs: list) -> tuple:
    """(x, weight, bias or None, spatial rank, kernel, strides, dilations) of a Conv or ConvTranspose."""
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    spatial = weight.dim() - 2
    strides = node.attr("strides") or [1] * spatial
    dilations = node.attr("dilations") or [1] * spatial
    return x, weight, bias, spatial, list(weight.shape[2:]), strides, dilations


@REGISTRY.register("Conv", supports=_conv_support)
def conv(node: NodeSpec, inputs: list, graph) -> tuple:
    x, weight, bias, spatial, kernel, strides, dilations = _conv_operands(node, inputs)
    begins, ends = conv_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    if begins == ends:
        padding = begins
    else:
        x, padding = F.pad(x, torch_pad(begins, ends)), [0] * spatial
    return (_CONV[spatial](x, weight, bias, stride=strides, padding=padding, dilation=dilations, groups=int(node.attr("group", 1))),)


@REGISTRY.register("ConvTranspose", supports=_conv_support)
def conv_transpose(node: NodeSpec, inputs: list, graph) -> tuple:
    x, weight, bias, spatial, kernel, strides, dilations = _conv_operands(node, inputs)
    output_padding = node.attr("output_padding") or [0] * spatial
    sizes = list(x.shape[2:])
    full = [(s - 1) * st + (k - 1) * d + 1 for s, st, k, d in zip(sizes, strides, kernel, dilations)]
    output_shape = node.attr("output_shape")
    auto_pad = node.attr("auto_pad", "NOTSET")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        targets = list(output_shape)[-spatial:] if output_shape else [s * st for s, st in zip(sizes, strides)]
        totals = [f + op - t for f, op, t in zip(full, output_padding, targets)]
        # the ONNX rule (ONNX Runtime follows it): the odd pad goes at the end for SAME_UPPER, else at the start
        upper = auto_pad == "SAME_UPPER"
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        ends = [t - b for t, b in zip(totals, begins)]
    elif auto_pad == "VALID":
        begins, ends = [0] * spatial, [0] * spatial
    else:
        begins, ends = pads_pair(node.attr("pads"), spatial)
    # full transposed convolution (with output_padding rows at the end), then crop the pads
    y = _CONV_TRANSPOSE[spatial](x, weight, None, stride=strides, padding=0, output_padding=output_padding, groups=int(node.attr("group", 1)), dilation=dilations)
    index = [slice(None), slice(None)] + [slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(zip(begins, ends))]
    y = y[tuple(index)]
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * spatial))
    return (y,)
