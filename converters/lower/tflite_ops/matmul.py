"""Gemm and MatMul: FULLY_CONNECTED with constant weights (a following bias Add fused), else BATCH_MATMUL."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lower.tflite_builder import QuantParams
from edgeopt.converters.lower.tflite_graph import Conversion, attributes, identity, input_names, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    NOT_YET,
    Op,
    Opt,
    bias_int32,
    const_operand,
    fuse_activation,
    hybrid_weights,
    make_options,
    per_channel_for,
    quantized_mode,
    weight_params,
)
from edgeopt.runtime.kinds import Precision


def _fully_connected(
    c: Conversion, node: ir.Node, a: str, weight_name: str, weight_axis: int, transpose: bool,
    bias: np.ndarray | None, bias_name: str | None, out: str, act: int, quantized: bool, keep_dims: bool, alpha: float = 1.0,
) -> None:
    rank = len(c.shape(a))
    source = c.get(a, identity(rank), "q" if quantized else None)
    weight_shape = c.shape(weight_name)
    n_out = weight_shape[1] if transpose else weight_shape[0]
    order = c.column_order.get(c.resolve(a)[0].name)
    if quantized:
        qc = weight_params(c, weight_name, node, weight_axis)
        values = qc.values.T if transpose else qc.values
        if order is not None:
            values = values[:, order]
        params = per_channel_for(qc.params, 0, n_out)
        wq = QuantParams(tuple(s * abs(alpha) for s in params.scale), params.zero_point, "int8", 0)
        if alpha < 0:
            values = -values
        filt = c.builder.constant(f"{node.name}_weights", np.ascontiguousarray(values), "int8", wq)
        in_q = c.quant_of(a)
        values32, bq = bias_int32(c, node, None, n_out, in_q, wq)
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
        if c.precision == Precision.INT8_WEIGHTS and matrix.size >= 1024:
            filt = hybrid_weights(c, f"{node.name}_weights", np.ascontiguousarray(matrix), 0)
        else:
            filt = c.const_tensor(f"{node.name}_weights", np.ascontiguousarray(matrix, dtype=np.float32))
        bias_tensor = c.const_tensor(f"{node.name}_bias", np.broadcast_to(bias, (n_out,)).astype(np.float32)) if bias is not None else -1
        out_q = None
    target = c.new_output(out, identity(len(c.graph_shape(out))), out_q)
    options = make_options(
        schema.FullyConnectedOptionsT, fusedActivationFunction=act, keepNumDims=keep_dims,
        asymmetricQuantizeInputs=c.precision == Precision.INT8_WEIGHTS,
    )
    c.builder.op(Op.FULLY_CONNECTED, [source, filt, bias_tensor], [target], Opt.FullyConnectedOptions, options, version=5 if quantized else 1)


def _gemm_support(node: ir.Node, prepared: bool = False) -> str | None:
    return f"{NOT_YET} Gemm with transA=1 yet" if attributes(node).get("transA", 0) else None


@REGISTRY.register("Gemm", supports=_gemm_support)
def lower_gemm(c: Conversion, node: ir.Node) -> None:
    a, b = input_names(node)[0], input_names(node)[1]
    cin = input_names(node)[2] if len(input_names(node)) > 2 and input_names(node)[2] else None
    act, out = fuse_activation(c, output_names(node)[0])
    quantized = quantized_mode(c, node.op_type, [a, b], [out])
    alpha, beta = float(attributes(node).get("alpha", 1.0)), float(attributes(node).get("beta", 1.0))
    trans_b = bool(attributes(node).get("transB", 0))
    n_out = c.graph_shape(out)[-1]
    bias = None
    if cin is not None:
        bias = (c.const(cin).astype(np.float64) * beta).reshape(-1)
        if bias.size not in (1, n_out):
            raise LoweringError(f"Gemm '{node.name}': bias of shape {c.shape(cin)} is not per output", hint="use a [N] bias")
    _fully_connected(c, node, a, b, 0 if trans_b else 1, not trans_b, bias, cin, out, act, quantized, False, alpha)


def _bias_add(c: Conversion, node: ir.Node, n_out: int) -> tuple[ir.Node, list[ir.Node], str] | None:
    """The Add of a constant per-output bias that alone reads this MatMul (directly, or through one Q→DQ
    pair when the Add's output is quantized too), so FULLY_CONNECTED can take it as its bias."""
    out = output_names(node)[0]
    between: list[ir.Node] = []
    users = c.consumers.get(out, [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear" and c.precision == Precision.INT8:
        dq_users = c.consumers.get(users[0].outputs[0].name, [])
        if len(dq_users) != 1 or dq_users[0].op_type != "DequantizeLinear":
            return None
        between = [users[0], dq_users[0]]
        out = dq_users[0].outputs[0].name
        users = c.consumers.get(out, [])
    if len(users) != 1 or users[0].op_type != "Add" or out in c.graph_outputs or output_names(node)[0] in c.graph_outputs:
        return None
    add = users[0]
    first, second = input_names(add)
    bias = second if first == out else first
    if not c.is_weight(bias) or int(np.prod(c.graph_shape(bias))) != n_out or c.graph_shape(bias)[-1:] != (n_out,):
        return None
    if between and c.output_quant(add.outputs[0].name) is None:
        return None
    return add, between, bias


def _diagonal(c: Conversion, node: ir.Node, a: str, weight_name: str, bias: np.ndarray | None, out: str, act: int) -> bool:
    """An int8 MatMul by a diagonal weight (a LayerNorm's gains: `DecomposeLayerNormPass`) as a 1x1
    DEPTHWISE_CONV_2D over the rows: the same int32 products and bias, C MACs a row instead of C^2
    (17 such FULLY_CONNECTED were +18% MACs on a 25 M BERT). False when the weight is not diagonal."""
    qc = weight_params(c, weight_name, node, 1)
    values = qc.values
    if values.ndim != 2 or values.shape[0] != values.shape[1] or np.count_nonzero(values - np.diag(np.diagonal(values))):
        return False
    channels = values.shape[1]
    shape = list(c.shape(a))
    rows = int(np.prod(shape[:-1]))
    source = c.get(a, identity(len(shape)), "q")
    in_q = c.quant_of(a)
    flat = c.builder.tensor(f"{out}_rows_in", [1, 1, rows, channels], "int8", c.builder.quant[source])
    c.reshape_op(source, flat, [1, 1, rows, channels])
    params = per_channel_for(qc.params, 0, channels)
    wq = QuantParams(params.scale, params.zero_point, "int8", 3)
    filt = c.builder.constant(f"{node.name}_diagonal", np.diagonal(values).reshape(1, 1, 1, channels).copy(), "int8", wq)
    scale = in_q.scale[0] * np.asarray(params.scale, np.float64)
    values32 = np.zeros(channels, np.int32) if bias is None else np.clip(np.round(np.broadcast_to(bias, (channels,)) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    bias_tensor = c.builder.constant(f"{node.name}_bias", values32, "int32", QuantParams(tuple(float(v) for v in scale), (0,) * channels, "int32", 0))
    out_q = c.output_quant(out)
    result = c.builder.tensor(f"{out}_rows", [1, 1, rows, channels], "int8", out_q)
    options = make_options(
        schema.DepthwiseConv2DOptionsT, padding=schema.Padding.VALID, strideH=1, strideW=1, depthMultiplier=1, fusedActivationFunction=act,
        dilationHFactor=1, dilationWFactor=1,
    )
    c.builder.op(Op.DEPTHWISE_CONV_2D, [flat, filt, bias_tensor], [result], Opt.DepthwiseConv2DOptions, options, version=3)
    c.reshape_op(result, c.new_output(out, identity(len(c.graph_shape(out))), out_q), list(c.graph_shape(out)))
    return True


@REGISTRY.register("MatMul")
def lower_matmul(c: Conversion, node: ir.Node) -> None:
    a, b = input_names(node)
    out = output_names(node)[0]
    if c.is_const(b) and len(c.shape(b)) == 2:
        fused = _bias_add(c, node, c.shape(b)[1])
        bias = None
        if fused is not None:
            add, between, bias_name = fused
            c.skip.update(id(n) for n in (add, *between))
            bias = c.const(bias_name).astype(np.float64).reshape(-1)
            out = add.outputs[0].name
            c.fused_bias += 1
        act, out = fuse_activation(c, out)
        quantized = quantized_mode(c, node.op_type, [a, b], [out])
        if quantized and _diagonal(c, node, a, b, bias, out, act):
            return
        _fully_connected(c, node, a, b, 1, True, bias, None, out, act, quantized, len(c.shape(a)) > 2)
        return
    quantized = quantized_mode(c, node.op_type, [a, b], [out])
    operands, adjoint = [], []
    for name in (a, b):
        rank = len(c.shape(name))
        if c.is_const(name):
            operands.append(const_operand(c, name, rank, identity(rank), quantized))
            adjoint.append(False)
            continue
        swapped = (*range(rank - 2), rank - 1, rank - 2)
        natural = c.natural_perm(name)
        use_adjoint = natural == swapped
        operands.append(c.get(name, swapped if use_adjoint else identity(rank), "q" if quantized else None))
        adjoint.append(use_adjoint)
    target = c.new_output(out, identity(len(c.graph_shape(out))), c.output_quant(out) if quantized else None)
    options = make_options(schema.BatchMatMulOptionsT, adjX=adjoint[0], adjY=adjoint[1])
    c.builder.op(Op.BATCH_MATMUL, operands, [target], Opt.BatchMatMulOptions, options, version=2 if quantized else 1)

