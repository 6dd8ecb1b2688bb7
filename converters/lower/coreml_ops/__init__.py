"""ONNX nodes → Core ML MIL ops, built with coremltools' MIL builder: one module per op family.

Each family module registers its handlers in `REGISTRY` with the support check beside them
(`@REGISTRY.register("Resize", supports=resize_support)`). The registry is the one list of what the
Core ML lowering writes: the build's up-front check, the `apple-ane` profile's op list and the
validate stage's "unsupported ops" report all derive from it.

`REGISTRY.why_unsupported(op_type, node)` takes an `ir.Node` of a shape-inferred onnx_ir model,
folded or not, and returns None when it cannot decide; `program.build_program` runs the same checks
on the prepared (folded) model, and the handlers re-check what only the MIL shapes settle.
"""

from __future__ import annotations

import logging

from edgeopt.runtime.library_output import library_output_to_log
from edgeopt.runtime.op_registry import OpRegistry

with library_output_to_log(logging.getLogger(__name__), "coremltools"):  # its import-time warnings
    from edgeopt.converters.lower.coreml_ops.context import GraphInput, Handler, mil_name

__all__ = ["REGISTRY", "GraphInput", "build_program", "check_supported", "mil_name", "prepare"]

REGISTRY: OpRegistry[Handler] = OpRegistry("edgeopt's Core ML lowering")

# The family modules register themselves on import (after REGISTRY exists).
from edgeopt.converters.lower.coreml_ops import (  # noqa: E402
    activations,
    build_time,
    conv,
    elementwise,
    gather,
    matmul,
    normalization,
    pooling,
    quantize,
    reduce,
    resize,
    shape_ops,
)
from edgeopt.converters.lower.coreml_ops.program import build_program, check_supported, prepare  # noqa: E402

