"""Indexing: Gather (GATHER), GatherElements (GATHER_ND), Range (RANGE)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.lower.tflite_graph import Conversion, attributes, identity, input_names, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import (
    Op,
    Opt,
    finish_output,
    flush_requant,
    make_options,
    needs_static_output,
    quantized_mode,
)
from edgeopt.runtime.kinds import Precision


@REGISTRY.register("Gather")
def lower_gather(c: Conversion, node: ir.Node) -> None:
    data, indices = input_names(node)
    out = output_names(node)[0]
    axis = int(attributes(node).get("axis", 0))
    rank = len(c.shape(data))
    axis %= rank
    if c.is_const(data):
        quant = c.qconsts.get(data)
        wanted = c.output_quant(out) if c.precision == Precision.INT8 else None
        if quant is not None and quant.params.per_tensor and wanted is not None:
            table = c.builder.constant(data, quant.values, str(quant.values.dtype), quant.params)
            target = finish_output(c, out, identity(len(c.graph_shape(out))), quant.params, wanted)
        else:
            table = c.const_tensor(data, c.const(data).astype(np.float32))
            target = c.new_output(out, identity(len(c.graph_shape(out))), None)
        positions = c.get(indices, identity(len(c.shape(indices))))
        c.builder.op(Op.GATHER, [table, positions], [target], Opt.GatherOptions, make_options(schema.GatherOptionsT, axis=axis), version=2)
        flush_requant(c)
        return
    quantized = quantized_mode(c, node.op_type, [data], [out])
    index_value = c.const(indices).astype(np.int64)
    index_value = np.where(index_value < 0, index_value + c.shape(data)[axis], index_value).astype(np.int32)
    perm = c.natural_perm(data) if index_value.ndim == 0 else identity(rank)
    source = c.get(data, perm, "q" if quantized else None)
    if index_value.ndim == 0:
        kept = [p for p in perm if p != axis]
        out_perm = tuple(sorted(kept).index(p) for p in kept)
    else:
        out_perm = identity(len(c.graph_shape(out)))
    in_q = c.quant_of(data) if quantized else None
    target = finish_output(c, out, out_perm, in_q, c.output_quant(out) if quantized else None)
    positions = c.builder.constant(f"{out}_indices", index_value)
    options = make_options(schema.GatherOptionsT, axis=perm.index(axis))
    c.builder.op(Op.GATHER, [source, positions], [target], Opt.GatherOptions, options, version=2)
    flush_requant(c)


@REGISTRY.register("GatherElements")
def lower_gather_elements(c: Conversion, node: ir.Node) -> None:
    """GatherElements as GATHER_ND: out[i] = data[i with i[axis] replaced by indices[i]] (float, ONNX layout).

    The coordinates are one constant grid per axis and the indices on `axis` (made non-negative with
    FLOOR_MOD when they are computed; constant ones are resolved here)."""
    data, indices = input_names(node)
    out = output_names(node)[0]
    rank = len(c.shape(data))
    axis = int(attributes(node).get("axis", 0)) % rank
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
        b.op(Op.CONCATENATION, parts, [coordinates], Opt.ConcatenationOptions, make_options(schema.ConcatenationOptionsT, axis=rank))
    target = c.new_output(out, identity(len(index_shape)), None)
    b.op(Op.GATHER_ND, [table, coordinates], [target], Opt.GatherNdOptions, schema.GatherNdOptionsT())



@REGISTRY.register("Range", supports=needs_static_output)
def lower_range(c: Conversion, node: ir.Node) -> None:
    """RANGE(start, limit, delta) on scalars, all in the output's dtype (int64 values are int32 inside)."""
    out = output_names(node)[0]
    target = c.new_output(out, identity(1), None)
    dtype = c.builder.dtypes[target]
    operands = []
    for name, role in zip(input_names(node), ("start", "limit", "delta")):
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
    if out in c.probed:
        c.adapt(
            f"Range '{node.name}': its length depends on computed values; the file declares {c.graph_shape(out)[0]} "
            "(found by running the model on zero inputs). LiteRT's RANGE resizes its output at run time, "
            "but the ops after it were planned for that length"
        )
