"""MaxPool/AveragePool (MAX_POOL_2D, AVERAGE_POOL_2D) and the global pools (MEAN, REDUCE_MAX)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.lower.tflite_graph import Conversion, attributes, input_names, nhwc_perm, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    Op,
    Opt,
    finish_output,
    flush_requant,
    fuse_activation,
    make_options,
    needs_rank4,
    pad_input,
    quantized_mode,
    same_pads,
    spatial_padding,
)


def _pool_support(node: ir.Node, prepared: bool = False) -> str | None:
    if (why := needs_rank4(node)) is not None:
        return why
    if any(d != 1 for d in attributes(node).get("dilations", [1, 1])) or len(output_names(node)) > 1 and output_names(node)[1]:
        return "LiteRT's pooling builtins have no dilation and no indices output"
    return None


@REGISTRY.register("MaxPool", "AveragePool", supports=_pool_support)
def lower_pool(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    is_max = node.op_type == "MaxPool"
    act, out = fuse_activation(c, out)
    quantized = quantized_mode(c, node.op_type, [x], [out])
    kernel = attributes(node)["kernel_shape"]
    strides = attributes(node).get("strides", [1] * len(kernel))
    padding, explicit = spatial_padding(
        c.shape(x)[2:], c.graph_shape(out)[2:], kernel, strides, attributes(node).get("dilations", [1, 1]),
        attributes(node).get("pads", []), attributes(node).get("auto_pad", "NOTSET"),
    )
    include_pad = bool(attributes(node).get("count_include_pad", 0))
    perm = nhwc_perm(4)
    needs_correction = not is_max and not include_pad and any(p != (0, 0) for p in explicit)
    if needs_correction and quantized:
        c.adapt(f"AveragePool '{node.name}': padding TFLite cannot express in int8; runs in float between DEQUANTIZE/QUANTIZE")
        quantized = False
    if not is_max and include_pad and padding == "SAME":
        padding, explicit = "VALID", [same_pads(c.shape(x)[2 + i], kernel[i], strides[i], 1) for i in range(2)]
    source = c.get(x, perm, "q" if quantized else None)
    if any(p != (0, 0) for p in explicit):
        source = pad_input(c, source, out, explicit, float(np.finfo(np.float32).min) if is_max else None)
    in_q = c.quant_of(x) if quantized else None
    target = finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    write = target
    if needs_correction:
        write = c.builder.tensor(f"{out}_sum_like", c.builder.shapes[target], "float32")
    options = make_options(
        schema.Pool2DOptionsT, padding=schema.Padding.SAME if padding == "SAME" else schema.Padding.VALID,
        strideH=strides[0], strideW=strides[1], filterHeight=kernel[0], filterWidth=kernel[1], fusedActivationFunction=act,
    )
    c.builder.op(Op.MAX_POOL_2D if is_max else Op.AVERAGE_POOL_2D, [source], [write], Opt.Pool2DOptions, options, version=2 if quantized else 1)
    if needs_correction:
        # VALID pooling over zero padding divides by the full window; ONNX divides by the real count.
        counts = np.pad(np.ones(c.shape(x)[2:], np.float32), explicit)
        windows = np.lib.stride_tricks.sliding_window_view(counts, kernel)[:: strides[0], :: strides[1]]
        real = windows.sum(axis=(-2, -1))[: c.graph_shape(out)[2], : c.graph_shape(out)[3]]
        factor = (kernel[0] * kernel[1] / real).astype(np.float32).reshape(1, *real.shape, 1)
        c.builder.op(Op.MUL, [write, c.const_tensor(f"{out}_count_fix", factor)], [target], Opt.MulOptions, schema.MulOptionsT())
    flush_requant(c)


@REGISTRY.register("GlobalAveragePool", "GlobalMaxPool")
def lower_global_pool(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    quantized = quantized_mode(c, node.op_type, [x], [out])
    rank = len(c.shape(x))
    perm = nhwc_perm(rank)
    source = c.get(x, perm, "q" if quantized else None)
    target = c.new_output(out, perm, c.output_quant(out) if quantized else None)
    axes = c.builder.constant(f"{out}_axes", np.arange(1, rank - 1, dtype=np.int32))
    code = Op.MEAN if node.op_type == "GlobalAveragePool" else Op.REDUCE_MAX
    c.builder.op(code, [source, axes], [target], Opt.ReducerOptions, make_options(schema.ReducerOptionsT, keepDims=True), version=2 if quantized else 1)

