"""ONNX op → torch handlers of the trainable interpreter: one module per op family, each handler
registered beside its support check (`edgeopt.runtime.op_registry`).

`REGISTRY` is the one source of truth for what `TrainableGraph` can run: construction asks it why
not for every node and reports all unsupported nodes at once. A handler is
`handler(node: NodeSpec, inputs: list[Tensor | None], graph: TrainableGraph) -> Sequence[Tensor]`;
a support check is `supports(node: NodeSpec) -> str | None`.
"""

from __future__ import annotations

from edgeopt.runtime.op_registry import OpRegistry

__all__ = ["REGISTRY"]

REGISTRY: OpRegistry = OpRegistry("edgeopt's trainable interpreter")

# The family modules register their handlers on import.
from edgeopt.converters.finetune.ops import (  # noqa: E402
    activations,
    conv,
    elementwise,
    matmul,
    normalization,
    pooling,
    quantize,
    reduce,
    resize,
    shape_ops,
)

del activations, conv, elementwise, matmul, normalization, pooling, quantize, reduce, resize, shape_ops
