"""Gather and GatherElements (MIL gather / gather_along_axis; a constant scalar index is a slice)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value


@REGISTRY.register("Gather")
def _gather(b: Builder, node: ir.Node, name: str) -> list[Value]:
    data, indices = node.inputs[0], b.value(node.inputs[1])
    shape = b.shape(data)
    rank = len(shape)
    axis = node.attributes.get_int("axis", 0) % rank
    if isinstance(indices, np.ndarray):
        indices = np.where(indices < 0, indices + shape[axis], indices).astype(np.int32)
        if indices.ndim == 0:
            # A constant scalar index (e.g. q, k, v = qkv[0], qkv[1], qkv[2]) is a slice, not a gather.
            begin, end = [0] * rank, list(shape)
            begin[axis], end[axis] = int(indices), int(indices) + 1
            squeeze = [i == axis for i in range(rank)]
            return [mb.slice_by_index(x=b.var(data), begin=begin, end=end, squeeze_mask=squeeze, name=name)]
    return [_gather_op(b, mb.gather, b.const_or_var(data), indices, axis, name)]


def _gather_op(b: Builder, gather: Callable[..., Var], x: Value, indices: Value, axis: int, name: str) -> Var:
    """gather/gather_along_axis; MIL's take no bool tensors, so a mask is gathered as int32 and cast back."""
    is_bool = x.dtype == types.bool if isinstance(x, Var) else np.asarray(x).dtype == bool
    if not is_bool:
        return gather(x=x, indices=indices, axis=axis, name=name)
    as_int = mb.cast(x=x, dtype="int32", name=b.fresh(name + "_int")) if isinstance(x, Var) else np.asarray(x, np.int32)
    picked = gather(x=as_int, indices=indices, axis=axis, name=b.fresh(name + "_picked"))
    return mb.cast(x=picked, dtype="bool", name=name)


@REGISTRY.register("GatherElements")
def _gather_elements(b: Builder, node: ir.Node, name: str) -> list[Value]:
    """MIL gather_along_axis; ONNX's negative indices count from the end of the axis."""
    shape = b.shape(node.inputs[0])
    axis = node.attributes.get_int("axis", 0) % len(shape)
    size = shape[axis]
    indices = b.value(node.inputs[1])
    if isinstance(indices, np.ndarray):
        indices = np.where(indices < 0, indices + size, indices).astype(np.int32)
    else:
        negative = mb.less(x=indices, y=np.int32(0), name=b.fresh(name + "_negative"))
        wrapped = mb.add(x=indices, y=np.int32(size), name=b.fresh(name + "_wrapped"))
        indices = mb.select(cond=negative, a=wrapped, b=indices, name=b.fresh(name + "_indices"))
    return [_gather_op(b, mb.gather_along_axis, b.const_or_var(node.inputs[0]), indices, axis, name)]
