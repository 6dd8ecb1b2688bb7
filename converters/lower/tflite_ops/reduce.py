"""Reductions: MEAN, REDUCE_MAX/MIN, SUM, and L1/L2/SumSquare as an elementwise op before SUM."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.graph.rewrite import constant_array
from edgeopt.converters.lower.tflite_graph import Conversion, attributes, input_names, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    NOT_YET,
    Op,
    Opt,
    Perm,
    finish_output,
    flush_requant,
    make_options,
    quantized_mode,
)


_REDUCE = {"ReduceMean": Op.MEAN, "ReduceMax": Op.REDUCE_MAX, "ReduceMin": Op.REDUCE_MIN, "ReduceSum": Op.SUM}
# LiteRT has no REDUCE_L1/L2/SUM_SQUARE builtin: an elementwise op before SUM (and SQRT after, for L2).
_REDUCE_NORMS = {"ReduceL1": (Op.ABS, None), "ReduceL2": (Op.MUL, Op.SQRT), "ReduceSumSquare": (Op.MUL, None)}


def _reduce_support(node: ir.Node, prepared: bool = False) -> str | None:
    axes = node.inputs[1] if len(node.inputs) > 1 else None
    if prepared and axes is not None and constant_array(axes) is None:
        return f"{NOT_YET} {node.op_type} with computed (non-constant) axes yet"
    return None


def _reduce_axes(c: Conversion, node: ir.Node, rank: int) -> list[int]:
    if len(input_names(node)) > 1 and input_names(node)[1]:
        axes = [int(a) % rank for a in c.const(input_names(node)[1]).reshape(-1)]
    else:
        axes = [int(a) % rank for a in attributes(node).get("axes", [])]
    # Empty axes reduce everything, unless noop_with_empty_axes (opset 18) asks for the identity.
    return axes if axes or attributes(node).get("noop_with_empty_axes", 0) else list(range(rank))


def _reduced_perm(perm: Perm, axes: Sequence[int], keep: bool) -> Perm:
    """The layout of a reduction's output when its input lies in `perm`."""
    if keep:
        return perm
    kept = [p for p in perm if p not in axes]
    return tuple(sorted(kept).index(p) for p in kept)


@REGISTRY.register(*_REDUCE, supports=_reduce_support)
def lower_reduce(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    quantized = quantized_mode(c, node.op_type, [x], [out])
    rank = len(c.shape(x))
    axes = _reduce_axes(c, node, rank)
    keep = bool(attributes(node).get("keepdims", 1))
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    out_perm = _reduced_perm(perm, axes, keep)
    code = _REDUCE[node.op_type]
    in_q = c.quant_of(x) if quantized else None
    wanted = c.output_quant(out) if quantized else None
    target = finish_output(c, out, out_perm, in_q if code == Op.REDUCE_MAX else wanted, wanted)
    axes_tensor = c.builder.constant(f"{out}_axes", np.asarray([perm.index(a) for a in axes], np.int32))
    c.builder.op(code, [source, axes_tensor], [target], Opt.ReducerOptions, make_options(schema.ReducerOptionsT, keepDims=keep), version=2 if quantized else 1)
    flush_requant(c)


@REGISTRY.register(*_REDUCE_NORMS, supports=_reduce_support)
def lower_reduce_norm(c: Conversion, node: ir.Node) -> None:
    """ReduceL1 = SUM(ABS x), ReduceSumSquare = SUM(x*x), ReduceL2 = SQRT(SUM(x*x)), in float."""
    x, out = input_names(node)[0], output_names(node)[0]
    rank = len(c.shape(x))
    axes = _reduce_axes(c, node, rank)
    keep = bool(attributes(node).get("keepdims", 1))
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
    b.op(Op.SUM, [mapped, axes_tensor], [summed], Opt.ReducerOptions, make_options(schema.ReducerOptionsT, keepDims=keep))
    if after is not None:
        b.op(after, [summed], [target])

