"""Broadcasting binary ops, Where, and the float unary math ops."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lower.tflite_graph import Conversion, input_names, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    Act,
    Op,
    Opt,
    fuse_activation,
    operand,
    pick_perm,
    quantized_mode,
    unary_op,
)


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
# Pow by a constant that is a unary builtin: (op, whether LiteRT has an int8 kernel for it).
_POWERS = {2.0: (Op.SQUARE, False), 0.5: (Op.SQRT, False), -0.5: (Op.RSQRT, True)}
# Binary ops whose output is bool (comparisons; the logical ops read and write bool).
_BOOL_OUT = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor"}


@REGISTRY.register(*_BINARY)
def lower_binary(c: Conversion, node: ir.Node) -> None:
    inputs = [i for i in input_names(node) if i]
    out = output_names(node)[0]
    if node.op_type == "Sum" and len(inputs) == 1:
        c.alias(out, inputs[0])
        return
    if node.op_type == "Pow" and c.is_const(inputs[1]) and c.const(inputs[1]).size == 1:
        exponent = float(c.const(inputs[1]).reshape(()))
        if exponent in _POWERS:
            code, int8 = _POWERS[exponent]
            return unary_op(c, node, code, None, None, int8=int8)
    _binary(c, node.op_type, inputs, out)


def _negligible_constant(c: Conversion, op_type: str, inputs: list[str], out: str) -> str | None:
    """The variable input of an int8 Add/Sub whose other operand is a scalar constant below half an
    output step (a LayerNorm's eps beside the variance): adding it changes no int8 value, and as an
    int8 operand its own scale would be ~1e-10 of the other's, beyond what LiteRT's ADD can rescale."""
    if op_type not in ("Add", "Sub") or len(inputs) != 2 or (wanted := c.output_quant(out)) is None or not wanted.per_tensor:
        return None
    constants = [name for name in inputs if c.is_const(name) and name not in c.qconsts]
    variable = [name for name in inputs if not c.is_const(name)]
    if len(constants) != 1 or len(variable) != 1 or (op_type == "Sub" and inputs[0] != variable[0]):
        return None
    value = np.asarray(c.const(constants[0]))
    return variable[0] if value.size == 1 and abs(float(value.reshape(()))) < 0.5 * wanted.scale[0] else None


def _binary(c: Conversion, op_type: str, inputs: list[str], out: str) -> None:
    """`op_type` over the named inputs, broadcasting in the layout of the largest dynamic one."""
    if op_type == "Div" and c.is_const(inputs[1]) and not np.issubdtype(c.const(inputs[1]).dtype, np.integer):
        name = f"{inputs[1]}__reciprocal"
        c.constants[name] = (1.0 / c.const(inputs[1]).astype(np.float64)).astype(np.float32)
        inputs, op_type = [inputs[0], name], "Mul"
    act, out = fuse_activation(c, out) if op_type in _FUSABLE else (Act.NONE, out)
    # LiteRT has no int8 POW (x^-0.5 is an int8 RSQRT: lower_binary)
    quantized = op_type != "Pow" and quantized_mode(c, op_type, [i for i in inputs if not c.is_const(i)], [out])
    if quantized and (kept := _negligible_constant(c, op_type, inputs, out)) is not None:
        perm = c.natural_perm(kept)  # requantized to the output's params: Q(x + eps) on the int8 grid
        c.builder.op(Op.QUANTIZE, [c.get(kept, perm, "q")], [c.new_output(out, perm, c.output_quant(out))], version=2)
        return
    rank = len(c.graph_shape(out))
    perm = pick_perm(c, inputs, rank)
    code, options_type, options_cls = _BINARY[op_type]
    operands = [operand(c, name, rank, perm, quantized) for name in inputs]
    out_dtype = "bool" if op_type in _BOOL_OUT else None
    options = options_cls()
    if hasattr(options, "fusedActivationFunction"):
        options.fusedActivationFunction = act
    while len(operands) > 2:  # n-ary Sum
        partial = c.builder.tensor(f"{out}_partial", [c.graph_shape(out)[p] for p in perm], "float32")
        c.builder.op(code, operands[:2], [partial], options_type, options_cls())
        operands = [partial, *operands[2:]]
    target = c.new_output(out, perm, c.output_quant(out) if quantized else None, out_dtype)
    c.builder.op(code, operands, [target], options_type, options, version=2 if quantized else 1)


@REGISTRY.register("Where")
def lower_where(c: Conversion, node: ir.Node) -> None:
    out = output_names(node)[0]
    rank = len(c.graph_shape(out))
    perm = pick_perm(c, input_names(node), rank)
    operands = [operand(c, name, rank, perm, False) for name in input_names(node)]
    target = c.new_output(out, perm, None)
    c.builder.op(Op.SELECT_V2, operands, [target], Opt.SelectV2Options, schema.SelectV2OptionsT())


@REGISTRY.register("Sqrt", "Exp", "Neg", "Abs", "Reciprocal", "Not")
def lower_unary_math(c: Conversion, node: ir.Node) -> None:
    """Float-only math: TFLite has no int8 kernel for these in the QDQ form edgeopt writes."""
    match node.op_type:
        case "Sqrt":
            unary_op(c, node, Op.SQRT, None, None, int8=False)
        case "Exp":
            unary_op(c, node, Op.EXP, Opt.ExpOptions, schema.ExpOptionsT(), int8=False)
        case "Neg":
            unary_op(c, node, Op.NEG, Opt.NegOptions, schema.NegOptionsT(), int8=False)
        case "Abs":
            unary_op(c, node, Op.ABS, Opt.AbsOptions, schema.AbsOptionsT(), int8=False)
        case "Reciprocal":
            c.constants.setdefault("__one", np.asarray(1.0, np.float32))
            _binary(c, "Div", ["__one", input_names(node)[0]], output_names(node)[0])
        case "Not":
            unary_op(c, node, Op.LOGICAL_NOT, Opt.LogicalNotOptions, schema.LogicalNotOptionsT(), int8=False, out_dtype="bool")
        case _:
            raise LoweringError(f"internal: no unary lowering for {node.op_type}")
