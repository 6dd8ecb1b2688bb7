"""Activations: Relu, Sigmoid, Tanh, HardSwish, LeakyRelu, Elu, Gelu, Clip, HardSigmoid, PRelu, Softmax."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lower.tflite_graph import Conversion, attributes, identity, input_names, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    Act,
    NOT_YET,
    Op,
    Opt,
    SOFTMAX_PARAMS,
    TANH_PARAMS,
    activation_code,
    clip_bounds,
    const_operand,
    finish_output,
    flush_requant,
    is_weight,
    make_options,
    quantized_mode,
    unary_op,
)


def _elu_support(node: ir.Node, prepared: bool = False) -> str | None:
    return "LiteRT's ELU has alpha 1 only" if float(attributes(node).get("alpha", 1.0)) != 1.0 else None


@REGISTRY.register("Relu", "Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "Gelu")
@REGISTRY.register("Elu", supports=_elu_support)
def lower_activation(c: Conversion, node: ir.Node) -> None:
    match node.op_type:
        case "Relu":
            unary_op(c, node, Op.RELU, None, None)
        case "Sigmoid":
            unary_op(c, node, Op.LOGISTIC, None, None, SOFTMAX_PARAMS)
        case "Tanh":
            unary_op(c, node, Op.TANH, None, None, TANH_PARAMS)
        case "HardSwish":
            unary_op(c, node, Op.HARD_SWISH, Opt.HardSwishOptions, schema.HardSwishOptionsT(), version=1)
        case "LeakyRelu":
            options = make_options(schema.LeakyReluOptionsT, alpha=float(attributes(node).get("alpha", 0.01)))
            unary_op(c, node, Op.LEAKY_RELU, Opt.LeakyReluOptions, options)
        case "Elu":
            unary_op(c, node, Op.ELU, None, None)
        case "Gelu":
            options = make_options(schema.GeluOptionsT, approximate=attributes(node).get("approximate", "none") == "tanh")
            unary_op(c, node, Op.GELU, Opt.GeluOptions, options)
        case _:
            raise LoweringError(f"internal: no activation lowering for {node.op_type}")


def _clip_support(node: ir.Node, prepared: bool = False) -> str | None:
    if prepared and any(bound is not None and not is_weight(bound) for bound in node.inputs[1:]):
        return f"{NOT_YET} Clip with computed (non-constant) bounds yet"
    return None


@REGISTRY.register("Clip", supports=_clip_support)
def lower_clip(c: Conversion, node: ir.Node) -> None:
    code = activation_code(c, node)
    if code is not None:
        op = {Act.RELU: Op.RELU, Act.RELU6: Op.RELU6, Act.RELU_N1_TO_1: Op.RELU_N1_TO_1}[code]
        unary_op(c, node, op, None, None)
        return
    low, high = clip_bounds(c, node)
    x, out = input_names(node)[0], output_names(node)[0]
    perm = c.natural_perm(x)
    current = c.get(x, perm)
    shape = [c.graph_shape(out)[p] for p in perm]
    for bound, code, last in ((low, Op.MAXIMUM, math.isinf(high)), (high, Op.MINIMUM, True)):
        if math.isinf(bound):
            continue
        target = c.new_output(out, perm, None) if last else c.builder.tensor(f"{out}_low", shape, "float32")
        constant = c.builder.constant(f"{out}_{'min' if code == Op.MAXIMUM else 'max'}", np.asarray(bound, np.float32))
        c.builder.op(code, [current, constant], [target], Opt.MaximumMinimumOptions, schema.MaximumMinimumOptionsT())
        current = target


@REGISTRY.register("HardSigmoid")
def lower_hard_sigmoid(c: Conversion, node: ir.Node) -> None:
    """clip(alpha*x + beta, 0, 1) = relu6(6*alpha*x + 6*beta) / 6, in ops every TFLite runtime has."""
    x, out = input_names(node)[0], output_names(node)[0]
    alpha, beta = float(attributes(node).get("alpha", 0.2)), float(attributes(node).get("beta", 0.5))
    perm = c.natural_perm(x)
    shape = [c.graph_shape(out)[p] for p in perm]
    source = c.get(x, perm)
    scaled = c.builder.tensor(f"{out}_scaled", shape, "float32")
    c.builder.op(Op.MUL, [source, c.builder.constant(f"{out}_alpha", np.asarray(6 * alpha, np.float32))], [scaled], Opt.MulOptions, schema.MulOptionsT())
    shifted = c.builder.tensor(f"{out}_relu6", shape, "float32")
    c.builder.op(
        Op.ADD, [scaled, c.builder.constant(f"{out}_beta", np.asarray(6 * beta, np.float32))], [shifted], Opt.AddOptions,
        make_options(schema.AddOptionsT, fusedActivationFunction=Act.RELU6),
    )
    target = c.new_output(out, perm, None)
    c.builder.op(Op.MUL, [shifted, c.builder.constant(f"{out}_sixth", np.asarray(1 / 6, np.float32))], [target], Opt.MulOptions, schema.MulOptionsT())


@REGISTRY.register("PRelu")
def lower_prelu(c: Conversion, node: ir.Node) -> None:
    x, slope = input_names(node)
    out = output_names(node)[0]
    quantized = quantized_mode(c, node.op_type, [x, slope], [out])
    rank = len(c.shape(x))
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    alpha = const_operand(c, slope, rank, perm, quantized)
    target = c.new_output(out, perm, c.output_quant(out) if quantized else None)
    c.builder.op(Op.PRELU, [source, alpha], [target], version=2 if quantized else 1)


@REGISTRY.register("Softmax")
def lower_softmax(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    rank = len(c.shape(x))
    axis = int(attributes(node).get("axis", -1 if c.opset >= 13 else 1)) % rank
    if c.opset < 13 and axis != rank - 1:
        raise LoweringError(f"Softmax '{node.name}': opset<13 softmax over flattened axes {axis}.. is not supported")
    quantized = quantized_mode(c, node.op_type, [x], [out])
    natural = c.natural_perm(x)
    perm = natural if natural[-1] == axis else tuple([*[d for d in identity(rank) if d != axis], axis])
    source = c.get(x, perm, "q" if quantized else None)
    wanted = c.output_quant(out) if quantized else None
    target = finish_output(c, out, perm, SOFTMAX_PARAMS, wanted) if quantized else c.new_output(out, perm, None)
    c.builder.op(Op.SOFTMAX, [source], [target], Opt.SoftmaxOptions, make_options(schema.SoftmaxOptionsT, beta=1.0), version=2 if quantized else 1)
    flush_requant(c)

