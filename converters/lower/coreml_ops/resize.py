"""Resize and Upsample: MIL's nearest-neighbour (integer factors) and bilinear resizes of 4-D tensors.

Only the variants whose pixels MIL picks exactly as ONNX does are lowered; the support check says
which do not, from the node alone when its shapes and scales are known, and again at build time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb

from edgeopt.converters.errors import UnsupportedOpsError
from edgeopt.converters.graph.qdq import build_time_array
from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at, node_opset

_MODES = ("nearest", "linear")
#: (in_h, in_w, out_h, out_w)
Geometry = tuple[int, int, int, int]


def _geometry(node: ir.Node, shape: tuple[int, ...], lookup: Callable[[ir.Value], np.ndarray | None]) -> Geometry | str | None:
    """The 4-D geometry from the scales or sizes input, the reason MIL cannot resize it, or None if unknown."""
    if len(shape) != 4:
        return f"a rank-{len(shape)} input; Core ML resizes 4-D NCHW tensors"
    opset = node_opset(node)
    sizes_input = input_at(node, 3) if opset >= 11 else None
    if sizes_input is not None:
        sizes = lookup(sizes_input)
        if sizes is None:
            return None
        out = [int(s) for s in sizes]
    else:
        scales_input = input_at(node, 1 if opset < 11 else 2)
        scales = None if scales_input is None else lookup(scales_input)
        if scales is None:
            return None
        out = [int(math.floor(d * s)) for d, s in zip(shape, scales.astype(np.float64))]
    if out[:2] != list(shape[:2]):
        return "it scales the batch or channel axis, which Core ML cannot do"
    return shape[2], shape[3], out[2], out[3]


def _nearest_index(size_in: int, size_out: int, coordinate_mode: str, nearest_mode: str) -> np.ndarray:
    """The source index ONNX Resize (nearest) picks for each output index."""
    scale = size_out / size_in
    dst = np.arange(size_out, dtype=np.float64)
    src = {
        "asymmetric": dst / scale,
        "half_pixel": (dst + 0.5) / scale - 0.5,
        "pytorch_half_pixel": (dst + 0.5) / scale - 0.5 if size_out > 1 else np.zeros_like(dst),
        "align_corners": dst * (size_in - 1) / max(size_out - 1, 1),
        "tf_half_pixel_for_nn": (dst + 0.5) / scale,
    }[coordinate_mode]
    picked = {
        "floor": np.floor(src),
        "ceil": np.ceil(src),
        "round_prefer_floor": np.ceil(src - 0.5),
        "round_prefer_ceil": np.floor(src + 0.5),
    }[nearest_mode]
    return np.clip(picked, 0, size_in - 1).astype(np.int64)


def _geometry_reason(node: ir.Node, geometry: Geometry) -> str | None:
    """Why MIL cannot express this Resize exactly at this geometry, or None when it can."""
    in_h, in_w, out_h, out_w = geometry
    opset = node_opset(node)
    coordinate_mode = node.attributes.get_string("coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric")
    if node.attributes.get_string("mode", "nearest") == "nearest":
        nearest_mode = node.attributes.get_string("nearest_mode", "round_prefer_floor" if opset >= 11 else "floor")
        for size_in, size_out in ((in_h, out_h), (in_w, out_w)):
            if size_out % size_in:
                return f"nearest resize by a non-integer factor ({size_in}→{size_out})"
            floor_map = np.arange(size_out) // (size_out // size_in)
            if not np.array_equal(_nearest_index(size_in, size_out, coordinate_mode, nearest_mode), floor_map):
                return f"nearest resize with {coordinate_mode}/{nearest_mode} does not pick the pixels Core ML picks"
        return None
    if coordinate_mode in ("half_pixel", "align_corners"):
        return None
    if coordinate_mode == "pytorch_half_pixel" and min(out_h, out_w) > 1:
        return None
    return f"linear resize with coordinate_transformation_mode={coordinate_mode}"


def resize_support(node: ir.Node) -> str | None:
    """Why this Resize cannot be lowered; None when it can or when its shapes are not known yet."""
    mode = node.attributes.get_string("mode", "nearest")
    if mode not in _MODES:
        return f"Resize mode '{mode}' (Core ML's MIL resize ops are nearest-neighbour or bilinear only)"
    shape = node.inputs[0].shape
    if shape is None or not shape.is_static():
        return None
    geometry = _geometry(node, tuple(int(d) for d in shape), build_time_array)
    return geometry if isinstance(geometry, str) or geometry is None else _geometry_reason(node, geometry)


@REGISTRY.register("Resize", "Upsample", supports=resize_support)
def _resize(b: Builder, node: ir.Node, name: str) -> list[Value]:
    geometry = _geometry(node, b.shape(node.inputs[0]), b.known)
    reason = geometry if isinstance(geometry, str) else _geometry_reason(node, geometry)
    if reason:
        raise UnsupportedOpsError(b.target_name, [(node.name, node.op_type, reason)])
    x = b.var(node.inputs[0])
    in_h, in_w, out_h, out_w = geometry
    if node.attributes.get_string("mode", "nearest") == "nearest":
        return [mb.upsample_nearest_neighbor(x=x, scale_factor_height=out_h // in_h, scale_factor_width=out_w // in_w, name=name)]
    coordinate_mode = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
    sampling = "ALIGN_CORNERS" if coordinate_mode == "align_corners" else "UNALIGN_CORNERS"
    return [mb.resize_bilinear(x=x, target_size_height=out_h, target_size_width=out_w, sampling_mode=sampling, name=name)]
