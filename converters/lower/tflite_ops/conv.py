"""Conv (CONV_2D, DEPTHWISE_CONV_2D, grouped as SPLIT + CONV_2D + CONCATENATION) and ConvTranspose (TRANSPOSE_CONV)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.lower.tflite_builder import QuantParams
from edgeopt.converters.lower.tflite_graph import Conversion, attributes, input_names, nhwc_perm, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    NOT_YET,
    Op,
    Opt,
    bias_int32,
    fuse_activation,
    hybrid_weights,
    is_weight,
    make_options,
    needs_rank4,
    pad_input,
    per_channel_for,
    quantized_mode,
    spatial_padding,
    weight_params,
)
from edgeopt.runtime.kinds import Precision


def _conv_support(node: ir.Node, prepared: bool = False) -> str | None:
    if (why := needs_rank4(node)) is not None:
        return why
    if prepared and not is_weight(node.inputs[1]):
        return f"{NOT_YET} {node.op_type} with computed (non-constant) weights yet"
    return None


@REGISTRY.register("Conv", supports=_conv_support)
def lower_conv(c: Conversion, node: ir.Node) -> None:
    x, w = input_names(node)[0], input_names(node)[1]
    b = input_names(node)[2] if len(input_names(node)) > 2 and input_names(node)[2] else None
    act, out = fuse_activation(c, output_names(node)[0])
    quantized = quantized_mode(c, node.op_type, [x, w], [out])
    c_out, c_in_per_group, kh, kw = c.shape(w)
    group = int(attributes(node).get("group", 1))
    c_in = c.shape(x)[1]
    strides = attributes(node).get("strides", [1, 1])
    dilations = attributes(node).get("dilations", [1, 1])
    padding, explicit = spatial_padding(
        c.shape(x)[2:], c.graph_shape(out)[2:], (kh, kw), strides, dilations, attributes(node).get("pads", []), attributes(node).get("auto_pad", "NOTSET")
    )
    perm = nhwc_perm(4)
    source = c.get(x, perm, "q" if quantized else None)
    if any(p != (0, 0) for p in explicit):
        source = pad_input(c, source, out, explicit)
    in_q = c.quant_of(x) if quantized else None
    out_q = c.output_quant(out) if quantized else None
    depthwise = group == c_in and group > 1 and c_in_per_group == 1
    pad_code = schema.Padding.SAME if padding == "SAME" else schema.Padding.VALID
    target = c.new_output(out, perm, out_q)

    def filters(values: np.ndarray, channels: slice, axis_out: int) -> tuple[np.ndarray, QuantParams | None]:
        if not quantized:
            return values, None
        qc = weight_params(c, w, node, 0)
        params = per_channel_for(qc.params, 0, c_out)
        scale = np.asarray(params.scale)[channels]
        return values, QuantParams(tuple(scale), (0,) * len(scale), "int8", axis_out)

    raw = c.qconsts[w].values if quantized else c.const(w)
    if depthwise:
        data, wq = filters(raw.transpose(1, 2, 3, 0), slice(None), 3)
        filt = _filter_tensor(c, f"{node.name}_filter", data, wq, 3)
        bias = _conv_bias(c, node, b, c_out, in_q, wq)
        options = make_options(
            schema.DepthwiseConv2DOptionsT, padding=pad_code, strideH=strides[0], strideW=strides[1],
            depthMultiplier=c_out // c_in, fusedActivationFunction=act, dilationHFactor=dilations[0], dilationWFactor=dilations[1],
        )
        c.builder.op(Op.DEPTHWISE_CONV_2D, [source, filt, bias], [target], Opt.DepthwiseConv2DOptions, options, version=3 if quantized else 2)
        return
    if group == 1:
        data, wq = filters(raw.transpose(0, 2, 3, 1), slice(None), 0)
        filt = _filter_tensor(c, f"{node.name}_filter", data, wq, 0)
        _emit_conv(c, node, source, filt, _conv_bias(c, node, b, c_out, in_q, wq), target, pad_code, strides, dilations, act, quantized)
        return
    # Grouped convolution: split channels, one CONV_2D per group, concatenate.
    shape = c.builder.shapes[source]
    part = c_in // group
    pieces = [c.builder.tensor(f"{node.name}_group{g}_in", [*shape[:3], part], c.builder.dtypes[source], c.builder.quant[source]) for g in range(group)]
    axis = c.builder.constant(f"{node.name}_split_axis", np.asarray(3, np.int32))
    c.builder.op(Op.SPLIT, [axis, source], pieces, Opt.SplitOptions, make_options(schema.SplitOptionsT, numSplits=group), version=3 if quantized else 1)
    per_group = c_out // group
    outs = []
    out_shape = list(c.builder.shapes[target])
    for g in range(group):
        channels = slice(g * per_group, (g + 1) * per_group)
        data, wq = filters(raw[channels].transpose(0, 2, 3, 1), channels, 0)
        filt = _filter_tensor(c, f"{node.name}_filter{g}", data, wq, 0)
        all_channels = None if wq is None else per_channel_for(weight_params(c, w, node, 0).params, 0, c_out)
        sub_bias = _conv_bias(c, node, b, c_out, in_q, all_channels, channels)
        piece_out = c.builder.tensor(f"{node.name}_group{g}_out", [*out_shape[:3], per_group], c.builder.dtypes[target], out_q)
        _emit_conv(c, node, pieces[g], filt, sub_bias, piece_out, pad_code, strides, dilations, act, quantized)
        outs.append(piece_out)
    c.builder.op(Op.CONCATENATION, outs, [target], Opt.ConcatenationOptions, make_options(schema.ConcatenationOptionsT, axis=3), version=2 if quantized else 1)


def _filter_tensor(c: Conversion, name: str, data: np.ndarray, quant: QuantParams | None, channel_axis: int) -> int:
    """Int8 weights as given (int8), int8 per-channel for dynamic range (int8-weights), else float."""
    if quant is not None:
        return c.builder.constant(name, data, "int8", quant)
    if c.precision == Precision.INT8_WEIGHTS and data.size >= 1024:
        return hybrid_weights(c, name, np.ascontiguousarray(data, np.float32), channel_axis)
    return c.const_tensor(name, np.ascontiguousarray(data, np.float32))


def _conv_bias(
    c: Conversion, node: ir.Node, b: str | None, channels: int, in_q: QuantParams | None, wq: QuantParams | None, part: slice | None = None
) -> int:
    part = part or slice(None)
    if in_q is None or wq is None:
        bias = c.const(b).astype(np.float32).reshape(-1) if b else np.zeros(channels, np.float32)
        return c.const_tensor(f"{node.name}_bias", bias[part])
    values, params = bias_int32(c, node, b, channels, in_q, per_channel_for(wq, 0, channels) if wq.per_tensor else wq)
    scale = np.asarray(params.scale)[part] if len(params.scale) == channels else np.asarray(params.scale)
    values = values[part]
    return c.builder.constant(f"{node.name}_bias", values, "int32", QuantParams(tuple(scale), (0,) * len(values), "int32", 0))


def _emit_conv(
    c: Conversion, node: ir.Node, source: int, filt: int, bias: int, target: int, pad_code: int, strides: Sequence[int],
    dilations: Sequence[int], act: int, quantized: bool,
) -> None:
    options = make_options(
        schema.Conv2DOptionsT, padding=pad_code, strideH=strides[0], strideW=strides[1], fusedActivationFunction=act,
        dilationHFactor=dilations[0], dilationWFactor=dilations[1],
    )
    c.builder.op(Op.CONV_2D, [source, filt, bias], [target], Opt.Conv2DOptions, options, version=3 if quantized else 1)


def _conv_transpose_support(node: ir.Node, prepared: bool = False) -> str | None:
    attrs = attributes(node)
    if (why := _conv_support(node, prepared)) is not None:
        return why
    if int(attrs.get("group", 1)) != 1:
        return f"LiteRT's TRANSPOSE_CONV has no groups, and {NOT_YET} grouped ConvTranspose as split convolutions yet"
    if any(d != 1 for d in attrs.get("dilations", [1, 1])) or any(attrs.get("output_padding", [0, 0])) or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return f"{NOT_YET} dilated, output_padding or auto_pad ConvTranspose yet"
    return None


@REGISTRY.register("ConvTranspose", supports=_conv_transpose_support)
def lower_conv_transpose(c: Conversion, node: ir.Node) -> None:
    x, w = input_names(node)[0], input_names(node)[1]
    b = input_names(node)[2] if len(input_names(node)) > 2 and input_names(node)[2] else None
    act, out = fuse_activation(c, output_names(node)[0])
    quantized = quantized_mode(c, node.op_type, [x, w], [out])
    c_out = c.shape(w)[1]  # ONNX ConvTranspose weights are [C_in, C_out, kh, kw]
    strides = attributes(node).get("strides", [1, 1])
    n, _, h, wd = c.shape(x)
    out_shape = c.graph_shape(out)
    kh, kw = c.shape(w)[2:]
    full = [(h - 1) * strides[0] + kh, (wd - 1) * strides[1] + kw]
    perm = nhwc_perm(4)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    out_q = c.output_quant(out) if quantized else None
    if quantized:
        qc = weight_params(c, w, node, 1)
        params = per_channel_for(qc.params, 0, c_out)
        wq = QuantParams(params.scale, params.zero_point, "int8", 0)
        filt = c.builder.constant(f"{node.name}_filter", qc.values.transpose(1, 2, 3, 0), "int8", wq)
    else:
        wq = None
        filt = c.const_tensor(f"{node.name}_filter", c.const(w).transpose(1, 2, 3, 0))
    bias = _conv_bias(c, node, b, c_out, in_q, wq)
    crop = [(full[i] - out_shape[2 + i]) for i in range(2)]
    pads = attributes(node).get("pads", [0, 0, 0, 0])
    target = c.new_output(out, perm, out_q)
    write = target if crop == [0, 0] else c.builder.tensor(f"{out}_full", [n, *full, c_out], c.builder.dtypes[target], out_q)
    sizes = c.builder.constant(f"{node.name}_output_shape", np.asarray([n, *full, c_out] if write != target else c.builder.shapes[target], np.int32))
    options = make_options(schema.TransposeConvOptionsT, padding=schema.Padding.VALID, strideH=strides[0], strideW=strides[1], fusedActivationFunction=act)
    c.builder.op(Op.TRANSPOSE_CONV, [sizes, filt, source, bias], [write], Opt.TransposeConvOptions, options, version=3 if quantized else 4)
    if write != target:
        begin = np.asarray([0, pads[0], pads[1], 0], np.int32)
        size = np.asarray(c.builder.shapes[target], np.int32)
        c.builder.op(
            Op.SLICE, [write, c.builder.constant(f"{out}_crop_begin", begin), c.builder.constant(f"{out}_crop_size", size)], [target],
            Opt.SliceOptions, schema.SliceOptionsT(), version=2 if quantized else 1,
        )

