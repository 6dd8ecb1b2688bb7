"""Conv and ConvTranspose, and the ONNX → MIL padding both they and pooling use."""

from __future__ import annotations

import onnx_ir as ir
from coremltools.converters.mil import Builder as mb

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at


def spatial_pads(node: ir.Node, spatial: int) -> tuple[str, list[int]]:
    """ONNX pads [b1, b2, …, e1, e2, …] → MIL pad_type and [b1, e1, b2, e2, …]."""
    match node.attributes.get_string("auto_pad", "NOTSET"):
        case "SAME_UPPER":
            return "same", [0] * 2 * spatial
        case "SAME_LOWER":
            return "same_lower", [0] * 2 * spatial
        case "VALID":
            return "valid", [0] * 2 * spatial
    pads = list(node.attributes.get_ints("pads", [0] * 2 * spatial))
    return "custom", [int(p) for pair in zip(pads[:spatial], pads[spatial:]) for p in pair]


def _window(node: ir.Node, spatial: int) -> tuple[list[int], list[int], int]:
    strides = [int(s) for s in node.attributes.get_ints("strides", [1] * spatial)]
    dilations = [int(d) for d in node.attributes.get_ints("dilations", [1] * spatial)]
    return strides, dilations, node.attributes.get_int("group", 1)


@REGISTRY.register("Conv")
def _conv(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    spatial = len(x.shape) - 2
    pad_type, pad = spatial_pads(node, spatial)
    strides, dilations, groups = _window(node, spatial)
    kwargs: dict[str, object] = dict(
        x=x, weight=b.const_or_var(node.inputs[1], x), strides=strides, dilations=dilations, groups=groups,
        pad_type=pad_type, pad=pad, name=name,
    )
    bias = input_at(node, 2)
    if bias is not None:
        kwargs["bias"] = b.const_or_var(bias, x)
    return [mb.conv(**kwargs)]


@REGISTRY.register("ConvTranspose")
def _conv_transpose(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    spatial = len(x.shape) - 2
    kernel = b.shape(node.inputs[1])[2:]
    strides, dilations, groups = _window(node, spatial)
    output_padding = [int(p) for p in node.attributes.get_ints("output_padding", [0] * spatial)]
    _, pad = spatial_pads(node, spatial)
    full = [strides[i] * (x.shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(spatial)]
    out_spatial = [full[i] - pad[2 * i] - pad[2 * i + 1] for i in range(spatial)]
    output_shape = node.attributes.get_ints("output_shape")
    if output_shape is not None:
        out_spatial = [int(d) for d in list(output_shape)[-spatial:]]
        total = [full[i] - out_spatial[i] for i in range(spatial)]
        upper = node.attributes.get_string("auto_pad", "NOTSET") != "SAME_LOWER"
        pad = [p for t in total for p in ((t // 2, t - t // 2) if upper else (t - t // 2, t // 2))]
    out_channels = b.shape(node.inputs[1])[1] * groups
    kwargs: dict[str, object] = dict(
        x=x, weight=b.const_or_var(node.inputs[1], x), strides=strides, dilations=dilations, groups=groups,
        pad_type="custom", pad=pad, output_shape=[int(x.shape[0]), out_channels, *out_spatial], name=name,
    )
    bias = input_at(node, 2)
    if bias is not None:
        kwargs["bias"] = b.const_or_var(bias, x)
    return [mb.conv_transpose(**kwargs)]
