"""Bring an ONNX model into the static, constant-folded onnx_ir form the TFLite lowering walks.

TFLite wants static shapes and constant weights, so before any op is lowered the input shapes are
pinned, edgeopt's passes fold every node whose inputs are known (shape arithmetic, ConstantOfShape
weights, Unsqueeze of constants ...) and BatchNormalization into the Conv before it, and fuse the
erf GELU pattern; shape inference gives every remaining value its static shape and dtype.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx_ir.passes import common as ir_common

from edgeopt.converters.errors import LoweringError, ModelLoadError
from edgeopt.converters.graph.opset import MIN_OPSET, onnx_opset, with_min_opset
from edgeopt.converters.graph.session import ort_session
from edgeopt.converters.passes.fold_batchnorm import FoldBatchNormPass
from edgeopt.converters.passes.fix_input_shapes import unknown_negative_output_sizes
from edgeopt.converters.passes.fold_constants import FoldConstantsPass
from edgeopt.converters.passes.fuse_erf_gelu import FuseErfGeluPass

__all__ = ["Prepared", "prepare_graph"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """The prepared model and what preparation did to it (reported in the lowering's summary)."""

    model: ir.Model
    folded_nodes: int
    fused: dict[str, int]
    # Values whose static shape comes from one ONNX Runtime run on zeros (shape inference left them
    # symbolic): right for shape arithmetic, an assumption where a size depends on computed values.
    probed: frozenset[str]


def _pin_inputs(graph: ir.Graph, input_shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """Static graph input shapes: user shapes first, symbolic dims become 1. Initializers that are
    also listed as inputs (IR < 4) are constants here: TFLite has no way to feed them."""
    for value in [v for v in graph.inputs if v.is_initializer()]:
        graph.inputs.remove(value)
    for value in graph.inputs:
        dims = list(value.shape) if value.shape is not None else []
        wanted = (input_shapes or {}).get(value.name)
        if wanted is not None:
            if len(wanted) != len(dims):
                raise LoweringError(
                    f"input '{value.name}' has rank {len(dims)} but --input-shape gives {tuple(wanted)}",
                    hint="pass one size per dimension of the ONNX input",
                )
            value.shape = ir.Shape([int(size) for size in wanted])
            continue
        for index, dim in enumerate(dims):
            if not isinstance(dim, int) or dim <= 0:
                log.info("input '%s': dynamic dim '%s' fixed to 1 for TFLite", value.name, getattr(dim, "value", dim))
                dims[index] = 1
        value.shape = ir.Shape(dims)


def _forget_inferred_shapes(graph: ir.Graph) -> None:
    """Intermediate shapes are recomputed from the pinned inputs; negative output dims (Paddle writes
    dynamic dims as -1, which inference would keep and LiteRT rejects) become unknown."""
    for node in graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    unknown_negative_output_sizes(graph)


def _infer_shapes(model: ir.Model) -> None:
    ir_common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)


def _unfolded_shapes(graph: ir.Graph) -> bool:
    """Whether a Shape node reads a value whose shape inference has just made static (another folding round)."""
    return any(n.op_type == "Shape" and n.inputs[0].shape is not None and n.inputs[0].shape.is_static() for n in graph)


def _probe_shapes(model: ir.Model) -> frozenset[str]:
    """Shapes shape inference left symbolic, from one ONNX Runtime run on zeros."""
    graph = model.graph
    missing = [out for node in graph for out in node.outputs if out.name and (out.shape is None or not out.shape.is_static())]
    if not missing:
        return frozenset()
    probe = ir.to_proto(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(value.name) for value in missing)
    session = ort_session(probe)
    feeds = {
        value.name: np.zeros(value.shape, dtype=helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(value.type[len("tensor(") : -1].upper())))
        for value in session.get_inputs()
    }
    for value, result in zip(missing, session.run([v.name for v in missing], feeds)):
        value.shape = ir.Shape(result.shape)
        if value.dtype is None:
            value.dtype = ir.DataType.from_numpy(result.dtype)
    return frozenset(value.name for value in missing)


def prepare_graph(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Prepared:
    """Static shapes, folded constants and fused patterns; raises ModelLoadError on an invalid model."""
    try:
        work = with_min_opset(model)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise ModelLoadError(
            f"cannot bring the model from opset {onnx_opset(model) or 1} to opset {MIN_OPSET}: {exc}",
            hint="re-export the model with opset >= 13",
        ) from exc
    # onnx_ir wraps the proto's tensors without copying: the caller's model stays as it was.
    ir_model = ir.from_proto(onnx.ModelProto.FromString(work.SerializeToString()))
    graph = ir_model.graph
    _pin_inputs(graph, input_shapes)
    _forget_inferred_shapes(graph)
    nodes_before = len(graph)
    ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    # Q/DQ pairs stay (they carry the int8 meaning of the tensors they touch), but a Q of a constant folds.
    fold = FoldConstantsPass(max_output_elements=sys.maxsize, keep_ops=frozenset({"DequantizeLinear"}))
    fold(ir_model)
    _infer_shapes(ir_model)
    # Shapes known only after inference (Shape of an intermediate) unlock another folding round.
    while _unfolded_shapes(graph) and fold(ir_model).modified:
        _infer_shapes(ir_model)
    folded = nodes_before - len(graph)
    probed = _probe_shapes(ir_model)
    for index, node in enumerate(graph):
        node.name = node.name or f"{node.op_type}_{index}"
    batchnorms = sum(n.op_type == "BatchNormalization" for n in graph)
    FoldBatchNormPass(fold_into=("Conv",))(ir_model)
    fused = {}
    if folded_batchnorms := batchnorms - sum(n.op_type == "BatchNormalization" for n in graph):
        fused["BatchNormalization->Conv"] = folded_batchnorms
    gelu = FuseErfGeluPass()
    gelu(ir_model)
    if gelu.fused:
        fused["erf GELU -> Gelu"] = gelu.fused
    return Prepared(ir_model, folded, fused, probed)
