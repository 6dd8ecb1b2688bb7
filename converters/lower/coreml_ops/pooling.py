"""MaxPool, AveragePool and their global forms."""

from __future__ import annotations

import onnx_ir as ir
from coremltools.converters.mil import Builder as mb

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value
from edgeopt.converters.lower.coreml_ops.conv import spatial_pads


def _pool_support(node: ir.Node) -> str | None:
    if node.op_type == "MaxPool" and len([o for o in node.outputs if o.name]) > 1:
        return "the indices output has no Core ML equivalent"
    if any(d != 1 for d in node.attributes.get_ints("dilations", [])):
        return "dilated pooling"
    return None


@REGISTRY.register("MaxPool", "AveragePool", supports=_pool_support)
def _pool(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    spatial = len(x.shape) - 2
    pad_type, pad = spatial_pads(node, spatial)
    kwargs: dict[str, object] = dict(
        x=x,
        kernel_sizes=[int(k) for k in node.attributes.get_ints("kernel_shape")],
        strides=[int(s) for s in node.attributes.get_ints("strides", [1] * spatial)],
        pad_type=pad_type,
        pad=pad,
        ceil_mode=bool(node.attributes.get_int("ceil_mode", 0)),
        name=name,
    )
    if node.op_type == "MaxPool":
        return [mb.max_pool(**kwargs)]
    return [mb.avg_pool(exclude_padding_from_average=not node.attributes.get_int("count_include_pad", 0), **kwargs)]


@REGISTRY.register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    axes = list(range(2, len(x.shape)))
    reduce = mb.reduce_mean if node.op_type == "GlobalAveragePool" else mb.reduce_max
    return [reduce(x=x, axes=axes, keep_dims=True, name=name)]
