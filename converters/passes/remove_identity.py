"""Remove nodes that pass their input through unchanged at inference time."""

from __future__ import annotations

__all__ = ["RemoveIdentityPass"]

import logging

import onnx_ir as ir

from edgeopt.converters.graph.rewrite import bypass_node, constant_array
from edgeopt.converters.passes.base import GraphPass

logger = logging.getLogger(__name__)


class RemoveIdentityPass(GraphPass):
    """Bypass ``Identity``, inference-mode ``Dropout``, ``Cast`` to the input's own type and
    ``Reshape`` to the input's own static shape.

    A Dropout is removed only when it is in inference mode (no ``training_mode`` input, or a
    constant false one) and its optional mask output is unused. Graph input and output names are
    kept: when a removed node's output is a graph output, its input takes over the name, and a node
    that links a graph input (or initializer) directly to a graph output stays, following the
    rules of onnx_ir's ``IdentityEliminationPass``. That pass is not used directly because it only
    knows ``Identity``.
    """

    def __init__(self, *, remove_dropout: bool = True, remove_noop_cast: bool = True, remove_noop_reshape: bool = True) -> None:
        super().__init__()
        self.remove_dropout = remove_dropout
        self.remove_noop_cast = remove_noop_cast
        self.remove_noop_reshape = remove_noop_reshape

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = 0
        for node in list(model.graph):
            source = self._pass_through_input(node)
            if source is not None and bypass_node(node, source):
                removed += 1
        if removed:
            logger.info("removed %d pass-through node(s)", removed)
        return ir.passes.PassResult(model, modified=bool(removed))

    def _pass_through_input(self, node: ir.Node) -> ir.Value | None:
        """The input the node's first output equals, or None if the node does real work."""
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            return None
        source = node.inputs[0]
        op = node.op_type
        if op == "Identity":
            return source
        if op == "Dropout" and self.remove_dropout:
            return source if _dropout_is_inference(node) else None
        if op == "Cast" and self.remove_noop_cast:
            target = node.attributes.get_int("to")
            return source if source.dtype is not None and target == source.dtype.value else None
        if op == "Reshape" and self.remove_noop_reshape:
            output = node.outputs[0]
            same = (
                source.shape is not None
                and output.shape is not None
                and source.shape.is_static()
                and output.shape.is_static()
                and tuple(source.shape) == tuple(output.shape)
            )
            return source if same else None
        return None


def _dropout_is_inference(node: ir.Node) -> bool:
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        training_mode = constant_array(node.inputs[2])
        return training_mode is not None and not bool(training_mode)
    return True
