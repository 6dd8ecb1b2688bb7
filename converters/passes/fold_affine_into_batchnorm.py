"""Merge per-channel Mul/Add constants that follow a BatchNormalization into its scale and bias."""

from __future__ import annotations

__all__ = ["FoldAffineIntoBatchNormPass"]

import logging

import numpy as np
import onnx_ir as ir

from edgeopt.converters.graph.rewrite import NameScope, add_initializer, bypass_node, constant_array
from edgeopt.converters.passes.base import GraphPass

logger = logging.getLogger(__name__)


class FoldAffineIntoBatchNormPass(GraphPass):
    """``Add(Mul(BatchNormalization(x), s), b)`` with per-channel constants ``s``, ``b`` becomes one BatchNorm.

    Caffe2 and some TensorFlow exports split a batch norm into a normalisation and a separate
    scale layer (``Mul`` and ``Add`` by per-channel constants); DenseNet-121 and Inception v2 in the
    onnx package look like that. Merging the scale layer into the BatchNorm's gamma and beta removes
    two nodes per layer and lets ``FoldBatchNormPass`` fold the result into a preceding Conv.
    The BatchNorm's output must feed only the Mul/Add being merged.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        merged = 0
        for node in list(graph):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                while self._merge_next(graph, names, node):
                    merged += 1
        if merged:
            logger.info("merged %d Mul/Add node(s) into BatchNormalization", merged)
        return ir.passes.PassResult(model, modified=bool(merged))

    def _merge_next(self, graph: ir.Graph, names: NameScope, bn: ir.Node) -> bool:
        """Merge the single Mul or Add consuming ``bn``'s output, if it is per-channel constant."""
        output = bn.outputs[0]
        uses = list(output.uses())
        if len(uses) != 1 or output.is_graph_output() or bn.attributes.get_int("training_mode", 0) != 0:
            return False
        follower = uses[0].node
        if follower.graph is not bn.graph:  # a reader inside an If/Loop body stays where it is
            return False
        if follower.op_type not in ("Mul", "Add") or follower.domain not in ("", "ai.onnx") or len(follower.inputs) != 2:
            return False
        other = follower.inputs[1 - uses[0].idx]
        gamma, beta = constant_array(bn.inputs[1]), constant_array(bn.inputs[2])
        if other is None or gamma is None or beta is None or output.shape is None:
            return False
        vector = _per_channel(constant_array(other), len(output.shape), gamma.shape[0])
        if vector is None or (follower.outputs[0].dtype is not None and follower.outputs[0].dtype != output.dtype):
            return False
        if follower.op_type == "Mul":
            gamma, beta = gamma * vector, beta * vector
        else:
            beta = beta + vector
        if not bypass_node(follower, output):
            return False
        bn.replace_input_with(1, add_initializer(graph, names, f"{bn.inputs[1].name}__affine", gamma.astype(gamma.dtype)))
        bn.replace_input_with(2, add_initializer(graph, names, f"{bn.inputs[2].name}__affine", beta.astype(beta.dtype)))
        return True


def _per_channel(array: np.ndarray | None, rank: int, channels: int) -> np.ndarray | None:
    """The constant as a per-channel vector if it broadcasts along channel axis 1 only."""
    if array is None or array.ndim > rank or rank < 2:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).copy()
