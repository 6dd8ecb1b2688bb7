"""Data movement: Reshape family, Transpose, Identity, Concat, Split, Slice, Pad, Cast, Expand."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.graph.rewrite import constant_array
from edgeopt.converters.lower.tflite_builder import QuantParams
from edgeopt.converters.lower.tflite_graph import (
    Conversion,
    attributes,
    channel_last_family,
    identity,
    input_names,
    nhwc_perm,
    output_names,
    same_memory_order,
)
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    NOT_YET,
    Op,
    Opt,
    Perm,
    const_operand,
    finish_output,
    flush_requant,
    make_options,
    needs_static_output,
    pick_perm,
    quantized_mode,
)
from edgeopt.runtime.kinds import Precision


def _reshape_support(node: ir.Node, prepared: bool = False) -> str | None:
    return needs_static_output(node, prepared) if node.op_type == "Reshape" else None


@REGISTRY.register("Reshape", "Flatten", "Squeeze", "Unsqueeze", supports=_reshape_support)
def lower_reshape(c: Conversion, node: ir.Node) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze: a RESHAPE in whichever layout keeps the memory order."""
    x, out = input_names(node)[0], output_names(node)[0]
    quantized = quantized_mode(c, node.op_type, [x], [out])
    in_shape, out_shape = c.shape(x), c.graph_shape(out)
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
    if name in c.graph_outputs:
        return False
    users = c.consumers.get(name, [])
    if not users:
        return False
    for user in users:
        if user.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if not _feeds_only_dense(c, user.outputs[0].name):
                return False
        elif user.op_type == "Gemm":
            if input_names(user)[0] != name or user.attributes.get_int("transA", 0) or not c.is_weight(input_names(user)[1]):
                return False
        elif user.op_type == "MatMul":
            if input_names(user)[0] != name or not c.is_weight(input_names(user)[1]) or len(c.graph_shape(input_names(user)[1])) != 2:
                return False
        else:
            return False
    return True


def _emit_reshape(c: Conversion, node: ir.Node, x: str, in_perm: Perm, out: str, out_perm: Perm, quantized: bool, in_q: QuantParams | None) -> None:
    source = c.get(x, in_perm, "q" if quantized else None)
    target = finish_output(c, out, out_perm, in_q, c.output_quant(out) if quantized else None)
    c.reshape_op(source, target, c.builder.shapes[target])
    flush_requant(c)


@REGISTRY.register("Transpose")
def lower_transpose(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    rank = len(c.shape(x))
    perm = tuple(int(p) for p in attributes(node).get("perm", list(reversed(range(rank)))))
    in_q, out_q = c.quant_of(x), c.output_quant(out)
    if c.precision == Precision.INT8 and in_q is not None and out_q is not None and not in_q.same_as(out_q):
        source = c.get(x, identity(rank), "q")
        target = finish_output(c, out, identity(rank), in_q, out_q)
        c.builder.op(Op.TRANSPOSE, [source, c.builder.constant(f"{out}_perm", np.asarray(perm, np.int32))], [target], version=2)
        flush_requant(c)
        return
    c.alias(out, x, perm)


@REGISTRY.register("Identity", "Dropout")
def lower_identity(c: Conversion, node: ir.Node) -> None:
    c.alias(output_names(node)[0], input_names(node)[0])


@REGISTRY.register("Concat")
def lower_concat(c: Conversion, node: ir.Node) -> None:
    inputs = [i for i in input_names(node) if i]
    out = output_names(node)[0]
    quantized = quantized_mode(c, node.op_type, [i for i in inputs if not c.is_const(i)], [out])
    rank = len(c.graph_shape(out))
    axis = int(attributes(node)["axis"]) % rank
    perm = pick_perm(c, inputs, rank)
    out_q = c.output_quant(out) if quantized else None
    operands = []
    for name in inputs:
        if c.is_const(name):
            operands.append(const_operand(c, name, rank, perm, False) if not quantized else _requant_const(c, name, rank, perm, out_q))
            continue
        if quantized and not c.quant_of(name).same_as(out_q):
            c.adapt(f"Concat '{node.name}': input '{name}' requantized to the output's int8 params (TFLite concatenation shares one scale)")
            operands.append(c.get(name, perm, out_q))
        else:
            operands.append(c.get(name, perm, "q" if quantized else None))
    target = c.new_output(out, perm, out_q)
    options = make_options(schema.ConcatenationOptionsT, axis=perm.index(axis))
    c.builder.op(Op.CONCATENATION, operands, [target], Opt.ConcatenationOptions, options, version=2 if quantized else 1)


def _requant_const(c: Conversion, name: str, rank: int, perm: Perm, params: QuantParams) -> int:
    value = np.asarray(c.const(name), np.float64)
    value = value.reshape((1,) * (rank - value.ndim) + value.shape).transpose(perm)
    q = np.clip(np.round(value / params.scale[0]) + params.zero_point[0], -128, 127).astype(np.int8)
    return c.builder.constant(name, q, "int8", params)


@REGISTRY.register("Split")
def lower_split(c: Conversion, node: ir.Node) -> None:
    x = input_names(node)[0]
    outs = [o for o in output_names(node)]
    quantized = quantized_mode(c, node.op_type, [x], outs)
    rank = len(c.shape(x))
    axis = int(attributes(node).get("axis", 0)) % rank
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    sizes = [c.graph_shape(o)[axis] for o in outs]
    targets = [finish_output(c, o, perm, in_q, c.output_quant(o) if quantized else None) for o in outs]
    axis_tensor = c.builder.constant(f"{node.name}_axis", np.asarray(perm.index(axis), np.int32))
    if len(set(sizes)) == 1:
        c.builder.op(Op.SPLIT, [axis_tensor, source], targets, Opt.SplitOptions, make_options(schema.SplitOptionsT, numSplits=len(outs)), version=3 if quantized else 1)
    else:
        split = c.builder.constant(f"{node.name}_sizes", np.asarray(sizes, np.int32))
        c.builder.op(Op.SPLIT_V, [source, split, axis_tensor], targets, Opt.SplitVOptions, make_options(schema.SplitVOptionsT, numSplits=len(outs)), version=2 if quantized else 1)
    flush_requant(c)


def _slice_support(node: ir.Node, prepared: bool = False) -> str | None:
    steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 else None
    if steps is not None and (steps <= 0).any():
        return f"{NOT_YET} Slice with negative steps yet"
    return needs_static_output(node, prepared)


@REGISTRY.register("Slice", supports=_slice_support)
def lower_slice(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    quantized = quantized_mode(c, node.op_type, [x], [out])
    shape = c.shape(x)
    rank = len(shape)
    starts = c.const(input_names(node)[1]).astype(np.int64).reshape(-1)
    ends = c.const(input_names(node)[2]).astype(np.int64).reshape(-1)
    axes = c.const(input_names(node)[3]).astype(np.int64).reshape(-1) if len(input_names(node)) > 3 and input_names(node)[3] else np.arange(len(starts))
    steps = c.const(input_names(node)[4]).astype(np.int64).reshape(-1) if len(input_names(node)) > 4 and input_names(node)[4] else np.ones(len(starts), np.int64)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % rank
        first, stop, step = slice(int(s), int(e), int(st)).indices(shape[a])
        count = len(range(first, stop, step))
        begin[a], end[a], stride[a] = first, first + count * step, step
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    target = finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    inputs = [source] + [c.builder.constant(f"{out}_{k}", np.asarray([v[p] for p in perm], np.int32)) for k, v in (("begin", begin), ("end", end), ("strides", stride))]
    c.builder.op(Op.STRIDED_SLICE, inputs, [target], Opt.StridedSliceOptions, schema.StridedSliceOptionsT(), version=2 if quantized else 1)
    flush_requant(c)


def _pad_support(node: ir.Node, prepared: bool = False) -> str | None:
    mode = node.attributes.get_string("mode", "constant")
    if mode not in ("constant", "reflect"):
        return f"LiteRT pads only with a constant (PAD/PADV2) or by mirroring (MIRROR_PAD), not mode '{mode}'"
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return f"{NOT_YET} Pad with an axes input yet"
    return needs_static_output(node, prepared)


@REGISTRY.register("Pad", supports=_pad_support)
def lower_pad(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    mode = node.attributes.get_string("mode", "constant")
    rank = len(c.shape(x))
    pads = c.const(input_names(node)[1]).astype(np.int64).reshape(-1) if len(input_names(node)) > 1 and input_names(node)[1] else np.asarray(attributes(node)["pads"])
    fill = float(c.const(input_names(node)[2]).reshape(())) if len(input_names(node)) > 2 and input_names(node)[2] else 0.0
    quantized = quantized_mode(c, node.op_type, [x], [out]) and mode == "constant" and fill == 0.0
    perm = c.natural_perm(x)
    source = c.get(x, perm, "q" if quantized else None)
    in_q = c.quant_of(x) if quantized else None
    paddings = np.asarray([(pads[p], pads[p + rank]) for p in perm], np.int32)
    target = finish_output(c, out, perm, in_q, c.output_quant(out) if quantized else None)
    pad_tensor = c.builder.constant(f"{out}_paddings", paddings)
    if mode == "reflect":
        options = make_options(schema.MirrorPadOptionsT, mode=schema.MirrorPadMode.REFLECT)
        c.builder.op(Op.MIRROR_PAD, [source, pad_tensor], [target], Opt.MirrorPadOptions, options)
    elif fill != 0.0:
        c.builder.op(Op.PADV2, [source, pad_tensor, c.builder.constant(f"{out}_value", np.asarray(fill, np.float32))], [target], Opt.PadV2Options, schema.PadV2OptionsT())
    else:
        c.builder.op(Op.PAD, [source, pad_tensor], [target], Opt.PadOptions, schema.PadOptionsT(), version=2 if quantized else 1)
    flush_requant(c)



@REGISTRY.register("Cast")
def lower_cast(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    perm = c.natural_perm(x)
    source = c.get(x, perm)
    target = c.new_output(out, perm, None, str(np.dtype(c.graph_dtype(out))))
    c.builder.op(Op.CAST, [source], [target], Opt.CastOptions, schema.CastOptionsT())


@REGISTRY.register("Expand", supports=needs_static_output)
def lower_expand(c: Conversion, node: ir.Node) -> None:
    x, out = input_names(node)[0], output_names(node)[0]
    rank = len(c.graph_shape(out))
    source = c.get(x, identity(len(c.shape(x))))
    target = c.new_output(out, identity(rank), None)
    shape = c.builder.constant(f"{out}_shape", np.asarray(c.graph_shape(out), np.int32))
    c.builder.op(Op.BROADCAST_TO, [source, shape], [target], version=2)

