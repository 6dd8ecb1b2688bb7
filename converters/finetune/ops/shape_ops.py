"""Shape and data movement: Shape, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice,
Gather, Expand, Tile, Cast, Constant, ConstantOfShape, Range."""

from __future__ import annotations

import math

import numpy as np
import torch

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import TORCH_DTYPES, NodeSpec, integers


@REGISTRY.register("Shape")
def shape(node: NodeSpec, inputs: list, graph) -> tuple:
    dims = list(inputs[0].shape)
    start, end = node.attr("start", 0), node.attr("end")
    return (torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64, device=graph.device),)


@REGISTRY.register("Reshape")
def reshape(node: NodeSpec, inputs: list, graph) -> tuple:
    x, target = inputs[0], integers(inputs[1])
    if not node.attr("allowzero", 0):  # 0 copies the input's dimension
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return (x.reshape(target),)


@REGISTRY.register("Flatten")
def flatten(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    axis = int(node.attr("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return (x.reshape(math.prod(x.shape[:axis]), -1),)


@REGISTRY.register("Transpose")
def transpose(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return (x.permute(*perm),)


def _axes(node: NodeSpec, inputs: list) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, an input from 13."""
    return node.attr("axes") if node.opset < 13 else (integers(inputs[1]) if len(inputs) > 1 else None)


@REGISTRY.register("Squeeze")
def squeeze(node: NodeSpec, inputs: list, graph) -> tuple:
    x, axes = inputs[0], _axes(node, inputs)
    if not axes:
        return (x.reshape([d for d in x.shape if d != 1]),)
    drop = {a % x.dim() for a in axes}
    return (x.reshape([d for i, d in enumerate(x.shape) if i not in drop]),)


@REGISTRY.register("Unsqueeze")
def unsqueeze(node: NodeSpec, inputs: list, graph) -> tuple:
    x, axes = inputs[0], _axes(node, inputs)
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for axis in sorted(a % rank for a in axes):
        shape.insert(axis, 1)
    return (x.reshape(shape),)


@REGISTRY.register("Concat")
def concat(node: NodeSpec, inputs: list, graph) -> tuple:
    return (torch.cat([x for x in inputs if x is not None], dim=int(node.attr("axis"))),)


@REGISTRY.register("Split")
def split(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    axis = int(node.attr("axis", 0))
    sizes = node.attr("split") if node.opset < 13 else (integers(inputs[1]) if len(inputs) > 1 else None)
    if not sizes:
        parts = len(node.outputs)
        size = -(-x.shape[axis] // parts)  # ceil: the last part is smaller (opset 18's num_outputs)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    return tuple(torch.split(x, list(sizes), dim=axis))


@REGISTRY.register("Slice")
def slice_(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    if node.opset < 10:
        starts, ends, axes, steps = node.attr("starts"), node.attr("ends"), node.attr("axes"), None
    else:
        starts, ends = integers(inputs[1]), integers(inputs[2])
        axes = integers(inputs[3]) if len(inputs) > 3 else None
        steps = integers(inputs[4]) if len(inputs) > 4 else None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        # ONNX clamps starts/ends exactly as Python's slice does, large sentinels included
        indices = range(*slice(start, end, step).indices(x.shape[axis]))
        if step > 0:
            x = x.narrow(axis, indices.start, len(indices)) if step == 1 else x[(slice(None),) * axis + (slice(indices.start, indices.stop, step),)]
        else:
            x = x.index_select(axis, torch.tensor(list(indices), dtype=torch.int64, device=x.device))
    return (x,)


@REGISTRY.register("Gather")
def gather(node: NodeSpec, inputs: list, graph) -> tuple:
    data, indices = inputs
    axis = int(node.attr("axis", 0)) % data.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return (picked.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]),)


@REGISTRY.register("Expand")
def expand(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    return (x.expand(torch.broadcast_shapes(x.shape, tuple(integers(inputs[1])))),)


@REGISTRY.register("Tile")
def tile(node: NodeSpec, inputs: list, graph) -> tuple:
    return (inputs[0].repeat(*integers(inputs[1])),)


def _cast_support(node: NodeSpec) -> str | None:
    return None if int(node.attr("to", 1)) in TORCH_DTYPES else f"Cast to ONNX type {node.attr('to')}"


@REGISTRY.register("Cast", supports=_cast_support)
def cast(node: NodeSpec, inputs: list, graph) -> tuple:
    return (inputs[0].to(TORCH_DTYPES[int(node.attr("to"))]),)


def _constant_support(node: NodeSpec) -> str | None:
    return None if "value" in node.attrs or any(k in node.attrs for k in ("value_float", "value_int", "value_floats", "value_ints")) else "Constant without a tensor or number value"


@REGISTRY.register("Constant", supports=_constant_support)
def constant(node: NodeSpec, inputs: list, graph) -> tuple:
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in node.attrs:
            return (torch.as_tensor(np.asarray(node.attrs[key], dtype), device=graph.device),)
    return (torch.as_tensor(np.array(node.attrs["value"]), device=graph.device),)


@REGISTRY.register("ConstantOfShape")
def constant_of_shape(node: NodeSpec, inputs: list, graph) -> tuple:
    value = node.attr("value")
    fill = torch.as_tensor(np.array(value).reshape(-1)[:1]) if value is not None else torch.zeros(1, dtype=torch.float32)
    return (fill.reshape([]).expand(integers(inputs[0])).clone().to(graph.device),)


@REGISTRY.register("Range")
def range_(node: NodeSpec, inputs: list, graph) -> tuple:
    start, limit, delta = inputs
    return (torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device),)
