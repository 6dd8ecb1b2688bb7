"""Ops edgeopt writes no TFLite op for: they must disappear while the graph is prepared.

Constant, Shape and ConstantOfShape fold to constants once the input shapes are static; Erf is
written only inside the x*0.5*(1+erf(x/sqrt(2))) GELU pattern, which preparation fuses into one
Gelu. Each is registered so the registry knows it; its check says nothing before preparation (it
may still fold) and, for one left over in the prepared graph, why it cannot be written.
"""

from __future__ import annotations

import onnx_ir as ir

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lower.tflite_graph import Conversion
from edgeopt.converters.lower.tflite_ops import REGISTRY


def _left_over_shape(node: ir.Node, prepared: bool = False) -> str | None:
    return "depends on a shape that is not static; pass static input shapes so it folds to a constant" if prepared else None


def _left_over_erf(node: ir.Node, prepared: bool = False) -> str | None:
    if not prepared:
        return None
    return "LiteRT has no builtin for Erf; edgeopt writes it only inside the x*0.5*(1+erf(x/sqrt(2))) GELU pattern (as GELU)"


def _left_over_constant(node: ir.Node, prepared: bool = False) -> str | None:
    return "a Constant that did not fold" if prepared else None


@REGISTRY.register("Shape", "ConstantOfShape", supports=_left_over_shape)
@REGISTRY.register("Erf", supports=_left_over_erf)
@REGISTRY.register("Constant", supports=_left_over_constant)
def fold_only(c: Conversion, node: ir.Node) -> None:
    raise LoweringError(f"internal: {node.op_type} '{node.name}' reached the lowering without being folded")
