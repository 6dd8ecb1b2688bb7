"""Shape and type queries on a protobuf model, and exposing intermediate tensors as outputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx
from onnx import helper

__all__ = ["tensor_types", "with_outputs"]


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the shape inference can type (inputs, outputs, intermediates, initializers)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def with_outputs(model: onnx.ModelProto, names: Iterable[str], types: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A copy of the model that also returns these intermediate tensors (typed by shape inference unless `types` is given)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    types = types if types is not None else tensor_types(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
            present.add(name)
    return extended
