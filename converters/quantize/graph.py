"""ONNX helpers the quantizer shares: opset, constant nodes, extra outputs, and running graphs on ONNX Runtime.

ONNX Runtime is used only as an executor here (to run the fp32 and QDQ graphs and read intermediate
tensors), never for its quantization tooling.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

__all__ = [
    "MIN_OPSET",
    "fold_constant_nodes",
    "onnx_opset",
    "run_model",
    "session",
    "tensor_types",
    "with_min_opset",
    "with_outputs",
]

#: Per-channel DequantizeLinear (the `axis` attribute) needs opset 13.
MIN_OPSET = 13


def onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def with_min_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if onnx_opset(model) >= MIN_OPSET:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, MIN_OPSET)


def fold_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn `Constant` nodes, and `Identity` of an initializer, into initializers (exporters emit scales this way)."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    initializers = {i.name: i for i in folded.graph.initializer}
    outputs = {o.name for o in folded.graph.output}
    kept = []
    for node in folded.graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        tensor = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = value.t
        elif node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            tensor = initializers[node.input[0]]
        if tensor is None:
            kept.append(node)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = node.output[0]
        folded.graph.initializer.append(copy)
        initializers[copy.name] = copy
    del folded.graph.node[:]
    folded.graph.node.extend(kept)
    return folded


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
    """A copy of the model that also returns these intermediate tensors."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    types = types if types is not None else tensor_types(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
            present.add(name)
    return extended


def session(model: onnx.ModelProto, threads: int = 0):  # -> onnxruntime.InferenceSession
    """An ONNX Runtime CPU session that computes what the graph says.

    A graph with Q/DQ runs with graph optimizations off, so every DequantizeLinear -> op ->
    QuantizeLinear is evaluated in float exactly as the QDQ graph defines it. With optimizations on,
    ONNX Runtime fuses them into int8 kernels whose results depend on the CPU (x86 without VNNI
    saturates int16 pair sums); the quantizer's measurements and every int8 parity check need the
    graph's own semantics, and the backends' kernels are what gets checked against it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_model(
    model: onnx.ModelProto,
    samples: Iterable[Mapping[str, np.ndarray]],
    outputs: Sequence[str] | None = None,
    *,
    threads: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Run the model on each sample and yield {output name: array}; `outputs` adds intermediate tensors."""
    if outputs:
        model = with_outputs(model, outputs)
    runner = session(model, threads)
    names = [o.name for o in runner.get_outputs()]
    input_names = [i.name for i in runner.get_inputs()]
    for sample in samples:
        values = runner.run(names, {name: sample[name] for name in input_names})
        yield dict(zip(names, values))

