"""QuantizeLinear/DequantizeLinear: the QDQ graph's scales become MIL ops or compressed weights.

`DequantizeLinear` of an int8 initializer becomes a compressed constant (`constexpr_affine_dequantize`,
iOS 18: `constexpr_blockwise_shift_scale`); activation pairs become the iOS 17 `quantize`/`dequantize` ops.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at


def _qparams(b: Builder, node: ir.Node, rank: int) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    scale = b.known(node.inputs[1]).astype(np.float32)
    zero_point_input = input_at(node, 2)
    zero_point = None if zero_point_input is None else b.known(zero_point_input)
    axis = node.attributes.get_int("axis", 1) % rank if scale.size > 1 else None
    if scale.size == 1:
        scale = scale.reshape(())
        zero_point = None if zero_point is None else zero_point.reshape(())
    return scale, zero_point, axis


def _with_offset(kwargs: dict[str, object], zero_point: np.ndarray | None, axis: int | None) -> dict[str, object]:
    if zero_point is not None and np.any(zero_point != 0):
        kwargs["zero_point"] = zero_point
    if axis is not None:
        kwargs["axis"] = axis
    return kwargs


@REGISTRY.register("QuantizeLinear")
def _quantize(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    scale, zero_point, axis = _qparams(b, node, len(x.shape))
    dtype = "int8" if zero_point is not None and zero_point.dtype == np.int8 else "uint8"
    return [mb.quantize(**_with_offset(dict(input=x, scale=scale, output_dtype=dtype, name=name), zero_point, axis))]


@REGISTRY.register("DequantizeLinear")
def _dequantize(b: Builder, node: ir.Node, name: str) -> list[Value]:
    data = b.value(node.inputs[0])
    rank = len(b.shape(node.inputs[0]))
    scale, zero_point, axis = _qparams(b, node, max(rank, 1))
    if isinstance(data, np.ndarray):
        if data.dtype not in (np.int8, np.uint8) or data.ndim < 2:
            return [_dequantized_now(data, scale, zero_point, axis)]
        return [_compressed_weight(b, data, scale, zero_point, axis, name)]
    return [mb.dequantize(**_with_offset(dict(input=data, scale=scale, name=name), zero_point, axis))]


def _dequantized_now(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None) -> np.ndarray:
    """int32 biases and tiny tensors: dequantized at build time, as float constants."""
    offset = 0 if zero_point is None else zero_point.astype(np.float64)
    if axis is None:
        return ((data.astype(np.float64) - offset) * scale).astype(np.float32)
    shape = [1] * data.ndim
    shape[axis] = -1
    offset = offset if np.isscalar(offset) else np.reshape(offset, shape)
    return ((data.astype(np.float64) - offset) * scale.reshape(shape)).astype(np.float32)


def _compressed_weight(
    b: Builder, data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None, name: str
) -> Var:
    """An int8 weight that stays int8 in the file and is dequantized by Core ML at load time."""
    zero = np.zeros_like(scale, dtype=data.dtype) if zero_point is None else zero_point.astype(data.dtype)
    if b.ios18:
        block = [1] * data.ndim
        if axis is not None:
            block[axis] = data.shape[axis]
        kwargs: dict[str, object] = dict(data=data, scale=scale.reshape(block), name=name)
        if np.any(zero != 0):
            kwargs["offset"] = zero.reshape(block)
        return mb.constexpr_blockwise_shift_scale(**kwargs)
    if not np.any(zero != 0):
        zero = np.zeros((), dtype=data.dtype)  # one scalar instead of a per-channel blob of zeros
    return mb.constexpr_affine_dequantize(
        quantized_data=data, zero_point=zero, scale=scale, axis=0 if axis is None else axis, name=name
    )
