"""Give graph inputs static shapes, so shape arithmetic folds and every lowering sees one shape."""

from __future__ import annotations

__all__ = ["FixInputShapesPass", "unknown_negative_output_sizes"]

from collections.abc import Mapping

import onnx_ir as ir

from edgeopt.converters.errors import InputShapeError
from edgeopt.converters.passes.base import GraphPass


def _static(dim: object) -> bool:
    """A known size; some exporters (Paddle) write a dynamic dimension as -1."""
    return isinstance(dim, int) and dim >= 0


def unknown_negative_output_sizes(graph: ir.Graph) -> None:
    """Make a graph output's -1 sizes unknown: Paddle writes a dynamic size so, and against the size shape inference
    computes from fixed inputs it fails the ONNX checker (and LiteRT)."""
    for value in graph.outputs:
        if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape):
            value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in value.shape])


class _InputShapeMismatch(InputShapeError, ir.passes.PreconditionError):
    """InputShapeError as the pass's failed precondition: onnx_ir's pass machinery raises it as it is."""


class FixInputShapesPass(GraphPass):
    """Set the shape of each named graph input, keeping rank and every dimension already static.

    ``requires`` that every name is a graph input, with the input's rank and static dimensions
    (an ``InputShapeError`` saying what to give otherwise). Intermediate shapes, inside If/Loop
    bodies too, are cleared so the shape inference that follows recomputes them from the new
    inputs, and a graph output's -1 sizes become unknown (the checker rejects a -1 against an inferred
    size); ``Shape -> Range``-style chains of a model exported with dynamic height and width then
    become constants that ``FoldConstantsPass`` removes.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = dict(shapes)

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        known = {value.name: value for value in model.graph.inputs}
        unknown = sorted(set(self.shapes) - set(known))
        if unknown:
            raise _InputShapeMismatch(
                f"--input-shape names {', '.join(unknown)}, which the model does not have as inputs (it has {', '.join(known)})",
                hint="use the input names `edgeopt inspect MODEL` lists",
            )
        for name, wanted in self.shapes.items():
            current = known[name].shape
            if current is None:
                continue
            if len(current) != len(wanted):
                raise _InputShapeMismatch(
                    f"input '{name}' has rank {len(current)} but --input-shape gives {len(wanted)} dimensions {tuple(wanted)}",
                    hint=f"give {len(current)} dimensions, e.g. {name}={','.join(str(d) if _static(d) else '1' for d in current)}",
                )
            clash = [(i, d, w) for i, (d, w) in enumerate(zip(current, wanted)) if _static(d) and d != w]
            if clash:
                index, fixed, given = clash[0]
                raise _InputShapeMismatch(
                    f"input '{name}' has static dimension {index} = {fixed}, but the shape given is {tuple(wanted)} ({given})",
                    hint="only dynamic dimensions can be fixed",
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        known = {value.name: value for value in graph.inputs}
        modified = False
        for name, wanted in self.shapes.items():
            value = known[name]
            if value.shape is None or not all(_static(d) for d in value.shape):
                value.shape = ir.Shape(list(wanted))
                modified = True
        if modified:
            for node in ir.traversal.RecursiveGraphIterator(graph):
                for output in node.outputs:
                    if not output.is_graph_output():
                        output.shape = None
            unknown_negative_output_sizes(graph)
        return ir.passes.PassResult(model, modified=modified)
