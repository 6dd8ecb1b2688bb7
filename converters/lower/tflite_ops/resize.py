"""Resize: RESIZE_BILINEAR or RESIZE_NEAREST_NEIGHBOR."""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.lower.tflite_graph import Conversion, nhwc_perm
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    NOT_YET,
    Op,
    Opt,
    finish_output,
    flush_requant,
    make_options,
    needs_rank4,
    needs_static_output,
    quantized_mode,
    text,
)
from edgeopt.converters.lower.tflite_prepare import Node


def _resize_support(node: Node, c: Conversion) -> str | None:
    if (why := needs_rank4(node, c)) is not None:
        return why
    mode = text(node.attrs.get("mode", "nearest"))
    transform = text(node.attrs.get("coordinate_transformation_mode", "half_pixel"))
    if mode not in ("nearest", "linear"):
        return f"LiteRT resizes only nearest or bilinear, not mode '{mode}'"
    if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
        return f"{NOT_YET} Resize with coordinate_transformation_mode '{transform}' yet"
    if mode == "nearest" and transform == "asymmetric" and text(node.attrs.get("nearest_mode", "round_prefer_floor")) != "floor":
        return "LiteRT's RESIZE_NEAREST_NEIGHBOR with asymmetric coordinates rounds down; this Resize needs nearest_mode 'floor'"
    if node.attrs.get("antialias", 0):
        return "LiteRT's resize builtins have no antialias"
    return needs_static_output(node, c)


@REGISTRY.register("Resize", supports=_resize_support)
def lower_resize(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    quantized = quantized_mode(c, node, [x], [out])
    mode = text(node.attrs.get("mode", "nearest"))
    transform = text(node.attrs.get("coordinate_transformation_mode", "half_pixel"))
    perm = nhwc_perm(4)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    target = finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    size = c.builder.constant(f"{out}_size", np.asarray(c.graph.shapes[out][2:], np.int32))
    align = transform == "align_corners"
    half = transform in ("half_pixel", "pytorch_half_pixel")
    if mode == "linear":
        options = make_options(schema.ResizeBilinearOptionsT, alignCorners=align, halfPixelCenters=half)
        c.builder.op(Op.RESIZE_BILINEAR, [source, size], [target], Opt.ResizeBilinearOptions, options, version=2 if quantized else 1)
    else:
        options = make_options(schema.ResizeNearestNeighborOptionsT, alignCorners=align, halfPixelCenters=half)
        c.builder.op(Op.RESIZE_NEAREST_NEIGHBOR, [source, size], [target], Opt.ResizeNearestNeighborOptions, options, version=2 if quantized else 1)
    flush_requant(c)

