"""Helpers shared by the ONNX-emitting lowerings (onnxruntime-cpu, jetson-orin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.runtime.spec import TensorSpec

__all__ = ["graph_io_specs", "save_onnx", "store_weights_fp16"]


def _spec(value: onnx.ValueInfoProto, layout: str | None) -> TensorSpec:
    tensor = value.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    return TensorSpec(value.name, shape, dtype, layout if len(shape) == 4 else None)


def graph_io_specs(model: onnx.ModelProto, layout: str | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (without initializers listed as inputs) and outputs as the device sees them."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_spec(v, layout) for v in model.graph.input if v.name not in initializers]
    return inputs, [_spec(v, layout) for v in model.graph.output]


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save inline when it fits a protobuf (2 GB), else with one external data file beside it."""
    if model.ByteSize() < 1_800_000_000:
        onnx.save_model(model, path)
    else:
        onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")


def store_weights_fp16(model: onnx.ModelProto, min_elements: int = 16) -> tuple[onnx.ModelProto, int]:
    """Store float32 weights as float16 followed by a Cast back to float32.

    Halves the file; ONNX Runtime's constant folding turns each Cast back into an fp32 initializer at
    load, so compute stays fp32 on CPUs, where fp16 kernels are mostly absent.
    """
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    kept, casts, count = [], [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            kept.append(init)
            continue
        half_name = f"{init.name}__fp16"
        kept.append(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), half_name))
        casts.append(onnx.helper.make_node("Cast", [half_name], [init.name], to=onnx.TensorProto.FLOAT, name=f"{init.name}__cast"))
        count += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return converted, count
