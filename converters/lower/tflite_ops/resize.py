"""Resize: RESIZE_BILINEAR or RESIZE_NEAREST_NEIGHBOR."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.lower.tflite_graph import Conversion, attributes, input_names, nhwc_perm, output_names
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
)


def _resize_support(node: ir.Node, prepared: bool = False) -> str | None:
    if (why := needs_rank4(node)) is not None:
        return why
    mode = node.attributes.get_string("mode", "nearest")
    transform = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        return f"LiteRT resizes only nearest or bilinear, not mode '{mode}'"
    if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
        return f"{NOT_YET} Resize with coordinate_transformation_mode '{transform}' yet"
    if mode == "nearest" and transform == "asymmetric" and node.attributes.get_string("nearest_mode", "round_prefer_floor") != "floor":
        return "LiteRT's RESIZE_NEAREST_NEIGHBOR with asymmetric coordinates rounds down; this Resize needs nearest_mode 'floor'"
    if attributes(node).get("antialias", 0):
        return "LiteRT's resize builtins have no antialias"
    return needs_static_output(node, prepared)


@REGISTRY.register("Resize", supports=_resize_support)
def lower_resize(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    quantized = quantized_mode(c, node.op_type, [x], [out])
    mode = node.attributes.get_string("mode", "nearest")
    transform = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
    perm = nhwc_perm(4)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    target = finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    size = c.builder.constant(f"{out}_size", np.asarray(c.graph_shape(out)[2:], np.int32))
    align = transform == "align_corners"
    half = transform in ("half_pixel", "pytorch_half_pixel")
    if mode == "linear":
        options = make_options(schema.ResizeBilinearOptionsT, alignCorners=align, halfPixelCenters=half)
        c.builder.op(Op.RESIZE_BILINEAR, [source, size], [target], Opt.ResizeBilinearOptions, options, version=2 if quantized else 1)
    else:
        options = make_options(schema.ResizeNearestNeighborOptionsT, alignCorners=align, halfPixelCenters=half)
        c.builder.op(Op.RESIZE_NEAREST_NEIGHBOR, [source, size], [target], Opt.ResizeNearestNeighborOptions, options, version=2 if quantized else 1)
    flush_requant(c)

