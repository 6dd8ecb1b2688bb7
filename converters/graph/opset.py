"""The model's default-domain opset, and raising it to what edgeopt needs."""

from __future__ import annotations

import onnx
import onnx_ir as ir

__all__ = ["MIN_OPSET", "ir_opset", "onnx_opset", "with_min_opset"]

#: Per-channel DequantizeLinear (the `axis` attribute) and Split/Squeeze/ReduceSum with tensor inputs need opset 13.
MIN_OPSET = 13

_DEFAULT_DOMAINS = ("", "ai.onnx")


def onnx_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ONNX domain the model imports (None: it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)


def ir_opset(graph: ir.Graph) -> int | None:
    """The version of the default ONNX domain an onnx_ir graph's model imports (None: it imports none)."""
    return next((version for domain, version in graph.opset_imports.items() if domain in _DEFAULT_DOMAINS), None)


def with_min_opset(model: onnx.ModelProto, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """The model itself when it is at `opset` or newer, else a converted copy."""
    current = onnx_opset(model)
    if current is not None and current >= opset:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, opset)
