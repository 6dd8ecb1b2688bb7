"""ONNX helpers the quantizer shares: opset and constant nodes."""

from __future__ import annotations

import onnx

__all__ = [
    "MIN_OPSET",
    "fold_constant_nodes",
    "onnx_opset",
    "with_min_opset",
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
