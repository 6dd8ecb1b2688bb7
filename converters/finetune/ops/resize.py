"""Resize (and the older Upsample), nearest and (bi/tri)linear, separably per axis, with the coordinate modes ONNX Runtime has.

Coordinates are computed in float32 as ONNX Runtime does, so nearest picks the very same pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec

_COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize_support(node: NodeSpec) -> str | None:
    mode = node.attr("mode", "nearest")
    if node.op_type == "Upsample" and node.opset < 9:
        return "Upsample before opset 9 (scales as an attribute)"
    if mode not in ("nearest", "linear"):
        return f"Resize mode={mode!r}"
    if node.opset >= 11 and node.attr("coordinate_transformation_mode", "half_pixel") not in _COORDINATES:
        return f"coordinate_transformation_mode={node.attr('coordinate_transformation_mode')!r}"
    if node.attr("nearest_mode", "round_prefer_floor") not in _NEAREST:
        return f"nearest_mode={node.attr('nearest_mode')!r}"
    if node.attr("antialias", 0) or node.attr("axes") or node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "Resize with antialias, axes or a keep_aspect_ratio_policy"
    return None


def _source_coordinates(mode: str, out: int, size: int, scale: np.float32) -> np.ndarray:
    x = np.arange(out, dtype=np.float32)
    match mode:
        case "half_pixel":
            return (x + np.float32(0.5)) / scale - np.float32(0.5)
        case "pytorch_half_pixel":
            return (x + np.float32(0.5)) / scale - np.float32(0.5) if out > 1 else np.zeros(out, np.float32)
        case "align_corners":
            return x * np.float32((size - 1) / (out - 1)) if out > 1 else np.zeros(out, np.float32)
        case "asymmetric":
            return x / scale
        case "tf_half_pixel_for_nn":
            return (x + np.float32(0.5)) / scale
    raise AssertionError(mode)


def _nearest(coordinates: np.ndarray, rounding: str, size: int) -> np.ndarray:
    match rounding:
        case "round_prefer_floor":
            picked = np.ceil(coordinates - np.float32(0.5))
        case "round_prefer_ceil":
            picked = np.floor(coordinates + np.float32(0.5))
        case "floor":
            picked = np.floor(coordinates)
        case _:
            picked = np.ceil(coordinates)
    return np.clip(picked, 0, size - 1).astype(np.int64)


@REGISTRY.register("Resize", "Upsample", supports=_resize_support)
def resize(node: NodeSpec, inputs: list, graph) -> tuple:
    x = inputs[0]
    if node.opset < 11 or node.op_type == "Upsample":  # Resize-10 and Upsample: (X, scales), asymmetric, floor
        scales_in, sizes_in, mode, rounding = inputs[1], None, "asymmetric", "floor"
    else:
        scales_in = inputs[2] if len(inputs) > 2 else None
        sizes_in = inputs[3] if len(inputs) > 3 else None
        mode = node.attr("coordinate_transformation_mode", "half_pixel")
        rounding = node.attr("nearest_mode", "round_prefer_floor")
    shape = list(x.shape)
    if sizes_in is not None and sizes_in.numel():
        outs = [int(v) for v in sizes_in.tolist()]
        scales = [np.float32(o) / np.float32(s) for o, s in zip(outs, shape)]
    else:
        scales = [np.float32(v) for v in scales_in.tolist()]
        outs = [int(np.float32(s) * scale) for s, scale in zip(shape, scales)]
    linear = node.attr("mode", "nearest") == "linear"
    for axis, (size, out, scale) in enumerate(zip(shape, outs, scales)):
        if size == out and scale == 1:
            continue
        coordinates = _source_coordinates(mode, out, size, scale)
        if not linear:
            x = x.index_select(axis, torch.as_tensor(_nearest(coordinates, rounding, size), device=x.device))
            continue
        clipped = np.clip(coordinates, 0, size - 1)
        low = np.floor(clipped).astype(np.int64)
        high = np.minimum(low + 1, size - 1)
        weight_shape = [1] * x.dim()
        weight_shape[axis] = out
        weight = torch.as_tensor(clipped - low, dtype=x.dtype, device=x.device).reshape(weight_shape)
        below = x.index_select(axis, torch.as_tensor(low, device=x.device))
        above = x.index_select(axis, torch.as_tensor(high, device=x.device))
        x = below + (above - below) * weight
    return (x,)
