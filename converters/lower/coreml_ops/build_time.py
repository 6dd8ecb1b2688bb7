"""Ops that only ever run at build time: `prepare` folds them once input shapes are fixed.

A node of these types that is still in the graph when the program is built could not be folded,
and is refused with the reason.
"""

from __future__ import annotations

import onnx_ir as ir

from edgeopt.converters.errors import UnsupportedOpsError
from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.context import Builder, Value

__all__ = ["FOLD_ONLY_OPS", "NEVER_FOLDED", "known_at_build_time"]

FOLD_ONLY_OPS = ("Constant", "ConstantOfShape", "Shape", "Size", "Range", "Tile", "Floor", "Ceil")
_SHAPE_OPS = frozenset({"Shape", "Size"})
# A DequantizeLinear of an int8 weight stays a compressed constant, so it is never folded.
NEVER_FOLDED = frozenset({"DequantizeLinear"})
_DEPTH_LIMIT = 64


def known_at_build_time(value: ir.Value | None, seen: dict[ir.Value, bool | None] | None = None, depth: int = 0) -> bool | None:
    """Whether `value` is known once input shapes are fixed (what FoldConstantsPass folds); None: cannot tell.

    Constants (initializers, also those an IR < 4 export lists as inputs, and Constant outputs), `Shape`/
    `Size` of a static shape, and anything computed only from those are known; a graph input or
    anything computed from one is not. A `Shape` of a shape that is not static yet is
    undecided (--input-shape may fix it).
    """
    if value is None or ir.convenience.get_const_tensor(value) is not None:  # no data is read
        return True
    seen = {} if seen is None else seen
    if value in seen:
        return seen[value]
    producer = value.producer()
    if producer is None or producer.op_type in NEVER_FOLDED or producer.domain not in ("", "ai.onnx"):
        verdict: bool | None = False
    elif producer.op_type in _SHAPE_OPS:
        shape = producer.inputs[0].shape if producer.inputs and producer.inputs[0] is not None else None
        verdict = True if shape is not None and shape.is_static() else None
    elif depth >= _DEPTH_LIMIT:
        verdict = None
    else:
        verdict = True
        for source in producer.inputs:
            known = known_at_build_time(source, seen, depth + 1)
            if known is False:
                verdict = False
                break
            if known is None:
                verdict = None
    seen[value] = verdict
    return verdict


def inputs_known_support(node: ir.Node) -> str | None:
    """A fold-only op is refused when one of its inputs is computed from the model's inputs."""
    if node.op_type in _SHAPE_OPS:
        return None
    if any(known_at_build_time(value) is False for value in node.inputs):
        return "only supported when its inputs are known at build time"
    return None


@REGISTRY.register(*FOLD_ONLY_OPS, supports=inputs_known_support)
def _not_folded(b: Builder, node: ir.Node, name: str) -> list[Value]:
    """Reached only when the folding pass left the node in place though its inputs are known."""
    raise UnsupportedOpsError(
        b.target_name,
        [(node.name, node.op_type, "its inputs are known, but it could not be evaluated at build time (output too large, or no reference kernel)")],
        hint="simplify the model before export, or choose another --target",
    )
