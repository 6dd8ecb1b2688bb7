"""Shape and data movement: Shape, Size, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice,
Gather, GatherElements, Expand, Tile, Pad, DepthToSpace, SpaceToDepth, Cast, CastLike, Constant, ConstantOfShape, Range, Trilu."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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
    return (picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])),)  # () for a scalar index into a vector


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


@REGISTRY.register("Size")
def size(node: NodeSpec, inputs: list, graph) -> tuple:
    return (torch.tensor(inputs[0].numel(), dtype=torch.int64, device=graph.device),)


@REGISTRY.register("GatherElements")
def gather_elements(node: NodeSpec, inputs: list, graph) -> tuple:
    data, indices = inputs
    axis = int(node.attr("axis", 0)) % data.dim()
    indices = indices.long()
    return (torch.gather(data, axis, torch.where(indices < 0, indices + data.shape[axis], indices)),)


@REGISTRY.register("CastLike")
def cast_like(node: NodeSpec, inputs: list, graph) -> tuple:
    return (inputs[0].to(inputs[1].dtype),)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad_support(node: NodeSpec) -> str | None:
    return None if node.attr("mode", "constant") in _PAD_MODES else f"Pad mode={node.attr('mode')!r}"


@REGISTRY.register("Pad", supports=_pad_support)
def pad(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    if node.opset < 11:
        pads, value, axes = list(node.attr("pads")), float(node.attr("value", 0.0)), None
    else:
        pads = integers(inputs[1])
        value = float(inputs[2].reshape(-1)[0]) if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else 0.0
        axes = integers(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    axes = [a % x.dim() for a in axes] if axes else list(range(x.dim()))
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[i + len(axes)]
    flat: list[int] = []  # torch: last axis first; negative pads crop, as in ONNX
    for axis in reversed(range(x.dim())):
        flat += [begins[axis], ends[axis]]
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]  # torch's non-constant modes pad only trailing axes
    mode = _PAD_MODES[node.attr("mode", "constant")]
    return (F.pad(x, flat, mode=mode, value=value) if mode == "constant" else F.pad(x, flat, mode=mode),)


def _depth_to_space_support(node: NodeSpec) -> str | None:
    return None if node.attr("mode", "DCR") in ("DCR", "CRD") else f"DepthToSpace mode={node.attr('mode')!r}"


@REGISTRY.register("DepthToSpace", supports=_depth_to_space_support)
def depth_to_space(node: NodeSpec, inputs: list, graph) -> tuple:
    x, block = inputs[0], int(node.attr("blocksize"))
    n, c, h, w = x.shape
    if node.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // block**2, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
    return (y.reshape(n, c // block**2, h * block, w * block),)


@REGISTRY.register("SpaceToDepth")
def space_to_depth(node: NodeSpec, inputs: list, graph) -> tuple:
    x, block = inputs[0], int(node.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return (y.reshape(n, c * block**2, h // block, w // block),)


@REGISTRY.register("Trilu")
def trilu(node: NodeSpec, inputs: list, graph) -> tuple:
    k = int(inputs[1].reshape(-1)[0]) if len(inputs) > 1 and inputs[1] is not None else 0
    return (torch.triu(inputs[0], k) if node.attr("upper", 1) else torch.tril(inputs[0], k),)
