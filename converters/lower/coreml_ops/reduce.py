"""Reductions (ReduceMean, ReduceSum, ReduceL2, …); their axes moved from attribute to input in opset 13/18."""

from __future__ import annotations

import onnx_ir as ir
from coremltools.converters.mil import Builder as mb

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at

_REDUCE = {
    "ReduceMean": mb.reduce_mean, "ReduceMax": mb.reduce_max, "ReduceSum": mb.reduce_sum, "ReduceMin": mb.reduce_min,
    "ReduceL1": mb.reduce_l1_norm, "ReduceL2": mb.reduce_l2_norm, "ReduceSumSquare": mb.reduce_sum_square,
}


@REGISTRY.register(*_REDUCE)
def _reduce(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    if b.opset >= 18 or (node.op_type == "ReduceSum" and b.opset >= 13):
        axes_input = input_at(node, 1)
        axes = None if axes_input is None else list(b.known(axes_input))
    else:
        axes = node.attributes.get_ints("axes")
    if not axes:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            return [mb.identity(x=x, name=name)]
        axes = list(range(len(x.shape)))
    keep = bool(node.attributes.get_int("keepdims", 1))
    return [_REDUCE[node.op_type](x=x, axes=[int(a) for a in axes], keep_dims=keep, name=name)]
