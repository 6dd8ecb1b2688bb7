"""Normalizations: a BatchNormalization no Conv absorbed, LRN, LayerNormalization."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.lower.tflite_graph import Conversion, attributes, identity, input_names, nhwc_perm, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    NOT_YET,
    Op,
    Opt,
    fuse_activation,
    input_rank,
    make_options,
    needs_rank4,
)


@REGISTRY.register("BatchNormalization")
def lower_batchnorm(c: Conversion, node: ir.Node) -> None:
    """A BatchNormalization no Conv absorbed: per-channel MUL then ADD."""
    x, out = input_names(node)[0], output_names(node)[0]
    gamma, beta, mean, var = (c.const(n).astype(np.float64) for n in input_names(node)[1:5])
    factor = gamma / np.sqrt(var + float(attributes(node).get("epsilon", 1e-5)))
    shift = beta - mean * factor
    rank = len(c.shape(x))
    perm = c.natural_perm(x)
    shape = [1] * rank
    shape[1] = -1
    source = c.get(x, perm)
    scaled = c.builder.tensor(f"{out}_scaled", c.builder.shapes[source], "float32")
    c.builder.op(Op.MUL, [source, c.const_tensor(f"{out}_scale", factor.reshape(shape).transpose(perm).astype(np.float32))], [scaled], Opt.MulOptions, schema.MulOptionsT())
    act, out = fuse_activation(c, out)
    target = c.new_output(out, perm, None)
    options = make_options(schema.AddOptionsT, fusedActivationFunction=act)
    c.builder.op(Op.ADD, [scaled, c.const_tensor(f"{out}_shift", shift.reshape(shape).transpose(perm).astype(np.float32))], [target], Opt.AddOptions, options)


@REGISTRY.register("LRN", supports=needs_rank4)
def lower_lrn(c: Conversion, node: ir.Node) -> None:
    """ONNX divides alpha by size; TFLite's radius is (size - 1) / 2 over the channel axis (last in NHWC)."""
    x, out = input_names(node)[0], output_names(node)[0]
    size = int(attributes(node)["size"])
    perm = nhwc_perm(4)
    source = c.get(x, perm)
    target = c.new_output(out, perm, None)
    options = make_options(
        schema.LocalResponseNormalizationOptionsT, radius=(size - 1) // 2, bias=float(attributes(node).get("bias", 1.0)),
        alpha=float(attributes(node).get("alpha", 1e-4)) / size, beta=float(attributes(node).get("beta", 0.75)),
    )
    c.builder.op(Op.LOCAL_RESPONSE_NORMALIZATION, [source], [target], Opt.LocalResponseNormalizationOptions, options)


def _layer_norm_support(node: ir.Node, prepared: bool = False) -> str | None:
    rank = input_rank(node)
    if rank is not None and node.attributes.get_int("axis", -1) not in (-1, rank - 1):
        return f"{NOT_YET} LayerNormalization over more than the last axis yet"
    return None


@REGISTRY.register("LayerNormalization", supports=_layer_norm_support)
def lower_layer_norm(c: Conversion, node: ir.Node) -> None:
    """MEAN, SUB, MUL, MEAN, ADD eps, RSQRT, MUL, MUL gamma, ADD beta over the last axis (float)."""
    x, out = input_names(node)[0], output_names(node)[0]
    rank = len(c.shape(x))
    perm = identity(rank)
    source = c.get(x, perm)
    shape = list(c.shape(x))
    reduced = [*shape[:-1], 1]
    eps = float(attributes(node).get("epsilon", 1e-5))
    axes = c.builder.constant(f"{out}_axes", np.asarray([rank - 1], np.int32))
    keep = make_options(schema.ReducerOptionsT, keepDims=True)

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
    gamma = c.const(input_names(node)[1]).astype(np.float32)
    has_beta = len(input_names(node)) > 2 and input_names(node)[2]
    scaled = c.new_output(out, perm, None) if not has_beta else tensor("scaled", shape)
    b.op(Op.MUL, [normed, c.const_tensor(f"{out}_gamma", gamma)], [scaled], Opt.MulOptions, schema.MulOptionsT())
    if has_beta:
        target = c.new_output(out, perm, None)
        b.op(Op.ADD, [scaled, c.const_tensor(f"{out}_beta", c.const(input_names(node)[2]).astype(np.float32))], [target], Opt.AddOptions, schema.AddOptionsT())

