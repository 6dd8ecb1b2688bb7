"""ONNX op → TFLite builtin lowerings: one module per op family, each handler registered beside its support check.

`REGISTRY` is the one source of truth for what the raspberry-pi target can run: the lowering
dispatches through it, and the validation's "unsupported ops" report asks it why not.
"""

from __future__ import annotations

from edgeopt.runtime.op_registry import OpRegistry

__all__ = ["REGISTRY"]

REGISTRY: OpRegistry = OpRegistry("edgeopt's TFLite lowering")

# The family modules register their handlers on import.
from edgeopt.converters.lower.tflite_ops import (  # noqa: E402
    activations,
    conv,
    elementwise,
    folding,
    gather,
    matmul,
    normalization,
    pooling,
    quantize,
    reduce,
    resize,
    shape_ops,
)

del activations, conv, elementwise, folding, gather, matmul, normalization, pooling, quantize, reduce, resize, shape_ops
