"""The lowering's walk: prepare the onnx_ir model, check every node up front, build the MIL program.

`prepare` runs edgeopt's graph passes (input shapes fixed, shapes inferred, constants folded with
`FoldConstantsPass` until nothing more folds), so the shape arithmetic exporters emit never reaches
the device; the walk then visits each remaining node once, in order, through its registered handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types
from onnx_ir.passes import common as ir_common

from edgeopt.converters.errors import UnsupportedOpsError
from edgeopt.converters.graph.opset import MIN_OPSET, ir_opset
from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.build_time import NEVER_FOLDED
from edgeopt.converters.lower.coreml_ops.context import Builder, GraphInput, mil_dtype, mil_name
from edgeopt.converters.passes.fix_input_shapes import FixInputShapesPass
from edgeopt.converters.passes.fold_constants import FoldConstantsPass

__all__ = ["build_program", "check_supported", "prepare"]

def prepare(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> ir.Model:
    """An onnx_ir copy of `model` with input shapes fixed and everything known at build time folded.

    Initializers listed as graph inputs (IR < 4 exports) are weights here, as Core ML has no
    overridable constants.
    """
    working_copy = onnx.ModelProto()
    working_copy.CopyFrom(model)  # onnx_ir wraps the proto's tensors without copying
    prepared = ir.from_proto(working_copy)
    ir_common.RemoveInitializersFromInputsPass()(prepared)
    if input_shapes:
        FixInputShapesPass(input_shapes)(prepared)
    ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(prepared)
    infer_shapes, fold = ir_common.ShapeInferencePass(strict_mode=False), FoldConstantsPass(keep_ops=NEVER_FOLDED)
    # A fold can make shapes static that inference could not see before (Reshape to a computed shape).
    while True:
        infer_shapes(prepared)
        if not fold(prepared).modified:
            return prepared


def check_supported(model: ir.Model, target_name: str) -> None:
    """Raise UnsupportedOpsError naming every node the lowering cannot handle, before any work."""
    problems: list[tuple[str, str, str]] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            problems.append((node.name or "", f"{node.domain}.{node.op_type}", "custom-domain op"))
        elif node.op_type not in REGISTRY:
            problems.append((node.name or "", node.op_type, f"{REGISTRY.name} does not write {node.op_type} yet"))
        elif (reason := REGISTRY.why_unsupported(node.op_type, node)) is not None:
            problems.append((node.name or "", node.op_type, reason))
    if problems:
        raise UnsupportedOpsError(
            target_name, problems,
            hint="replace these ops before export, fix the input shapes with --input-shape, or choose another --target",
        )


def build_program(
    model: ir.Model, inputs: Sequence[GraphInput], opset_target: object, target_name: str
) -> tuple[Program, dict[str, str]]:
    """The MIL program of a prepared `model`, and the MIL name each ONNX output got (Core ML features are renamed back)."""
    import coremltools as ct

    graph = model.graph
    b = Builder(ir_opset(graph) or MIN_OPSET, opset_target >= ct.target.iOS18, target_name)
    b.values.update({value: value.const_value.numpy() for value in graph.initializers.values() if value.const_value is not None})
    placeholders = {mil_name(i.name): mb.placeholder(shape=i.shape, dtype=mil_dtype(i.onnx_dtype)) for i in inputs}
    graph_inputs = {value.name: value for value in graph.inputs}
    output_names: dict[str, str] = {}
    with Function(placeholders, opset_version=opset_target) as function:
        for graph_input in inputs:
            b.values[graph_inputs[graph_input.name]] = function.inputs[mil_name(graph_input.name)]
            b.fresh(graph_input.name)
        for node in graph:
            _lower_node(b, node)
        results = []
        for output in graph.outputs:
            onnx_name = output.name
            value = b.values[output]
            if isinstance(value, np.ndarray) or value.op is None or value.name in output_names.values():
                value = mb.identity(x=b.var(output), name=b.fresh(onnx_name + "_out"))
            if value.dtype == types.int32 or value.dtype == types.bool:
                value = mb.cast(x=value, dtype="int32" if value.dtype == types.int32 else "bool", name=b.fresh(onnx_name))
            output_names[onnx_name] = value.name
            results.append(value)
        function.set_outputs(results)
    program = Program()
    program.add_function("main", function)
    return program, output_names


def _lower_node(b: Builder, node: ir.Node) -> None:
    handler = REGISTRY.handler(node.op_type)
    name = b.fresh(node.outputs[0].name if node.outputs and node.outputs[0].name else node.name or node.op_type)
    for output, result in zip(node.outputs, handler(b, node, name)):
        if output.name:
            b.values[output] = result
