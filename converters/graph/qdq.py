"""Queries on the Q/DQ nodes of an onnx_ir graph, shared by the QAT import, the lint and the analysis.

A quantized tensor is defined by one node: the QuantizeLinear that makes it (its DequantizeLinears
read the same parameters), or a lone DequantizeLinear of stored integers (a pre-quantized weight,
an int32 bias). These functions find that node and read its parameters; they never re-index a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = [
    "QDQ_OPS",
    "QParams",
    "WEIGHTED_OPS",
    "build_time_array",
    "dequantize",
    "int_attribute",
    "output_channel_axis",
    "output_quantizer",
    "producer_op",
    "qparams",
    "quantization_source",
]

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops whose input 1 is a weight with output channels (see `output_channel_axis`).
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def int_attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return int(attribute.value) if attribute is not None else default


def producer_op(value: ir.Value | None) -> str | None:
    producer = value.producer() if value is not None else None
    return producer.op_type if producer is not None else None


def build_time_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when the model fixes it: an initializer or a Constant node's output.

    Unlike `constant_array`, an initializer that is also listed as a graph input counts: deployment
    toolchains (TensorRT's parser, the lowerings) and exporters of IR < 4 treat it as a weight.
    """
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


@dataclass(frozen=True)
class QParams:
    """The parameters a QuantizeLinear or DequantizeLinear reads; arrays are None when not build-time constants."""

    scale: np.ndarray | None
    zero_point: np.ndarray | None  # None also when absent, i.e. 0
    axis: int
    block_size: int


def qparams(node: ir.Node) -> QParams:
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    return QParams(
        scale=build_time_array(node.inputs[1]),
        zero_point=build_time_array(zero_point),
        axis=int_attribute(node, "axis", 1),
        block_size=int_attribute(node, "block_size", 0),
    )


def dequantize(stored: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """DequantizeLinear in float64, per tensor or per channel on `axis`."""
    shape = [1] * stored.ndim
    if scale.size > 1:
        shape[axis] = -1
    offset = 0.0 if zero_point is None else zero_point.reshape(shape).astype(np.float64)
    return (stored.astype(np.float64) - offset) * scale.astype(np.float64).reshape(shape)


def quantization_source(value: ir.Value | None) -> ir.Node | None:
    """For the output of a DequantizeLinear, the node that defines its quantization: the
    QuantizeLinear it reads, or the DequantizeLinear itself (stored integers). None otherwise."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
    return q if q is not None and q.op_type == "QuantizeLinear" else dq


def output_quantizer(node: ir.Node) -> ir.Node | None:
    """The QuantizeLinear that reads the node's first output, if any."""
    return next((user for user, _ in node.outputs[0].uses() if user.op_type == "QuantizeLinear"), None)


def output_channel_axis(consumer: ir.Node, index: int, rank: int) -> int | None:
    """The output-channel axis of input `index` of a weighted op, in that op's ONNX weight layout
    (None: that input is not a weight)."""
    if index != 1:
        return None
    match consumer.op_type:
        case "Conv":
            return 0  # [M, C/group, *kernel]
        case "ConvTranspose":
            return 1  # [C, M/group, *kernel]
        case "Gemm":
            return 0 if int_attribute(consumer, "transB", 0) else 1
        case "MatMul":
            return rank - 1  # [..., K, N]
    return None
