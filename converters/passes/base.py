"""What every edgeopt pass shares: onnx_ir's in-place pass, with the graph's interface as its invariant.

Subgraphs (the bodies of If, Loop and Scan) are safe by construction, not rejected:
- a pass walks the main graph's nodes only, and never rewrites a node that holds a subgraph;
- onnx_ir lists a value's uses inside subgraphs among its ``uses()``, so ``replace_all_uses_with``
  rewires every subgraph that reads the value from the outer scope, and a value read there counts as
  used (a BatchNorm is not folded away from under it, a node feeding it is not removed);
- fresh names (``NameScope``) avoid every name of every subgraph, so nothing is shadowed.
"""

from __future__ import annotations

__all__ = ["GraphPass"]

import onnx_ir as ir


def _interface(graph: ir.Graph) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    return tuple(value.name for value in graph.inputs), tuple(value.name for value in graph.outputs)


class GraphPass(ir.passes.InPlacePass):
    """An in-place pass over the main graph that keeps the names of the graph's inputs and outputs.

    ``requires`` records them and ``ensures`` checks them (a failure is a bug in the pass): the
    calibration data, later stages, the manifest and the reference data all refer to them by name.
    A subclass that adds preconditions extends ``requires`` and calls ``super().requires``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._interface: tuple[tuple[str | None, ...], tuple[str | None, ...]] | None = None

    def requires(self, model: ir.Model) -> None:
        self._interface = _interface(model.graph)

    def ensures(self, model: ir.Model) -> None:
        after = _interface(model.graph)
        if self._interface is not None and after != self._interface:
            raise ir.passes.PostconditionError(
                f"{type(self).__name__} changed the graph's inputs or outputs from {self._interface} to {after}"
            )
