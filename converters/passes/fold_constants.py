"""Constant folding: nodes whose inputs are all known at build time become initializers."""

from __future__ import annotations

__all__ = ["FoldConstantsPass"]

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from edgeopt.converters.graph.rewrite import NameScope, add_initializer, constant_array, rename
from edgeopt.converters.passes.base import GraphPass

logger = logging.getLogger(__name__)

# Ops whose result must not be computed once at build time.
_NON_DETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


class FoldConstantsPass(GraphPass):
    """Replace each node whose inputs are all constants by initializers holding its outputs.

    Also folds ``Shape`` and ``Size`` of tensors whose shape is fully static (run shape inference
    first), which removes the shape arithmetic exporters emit around Reshape and Flatten.
    Nodes are evaluated one at a time with ``onnx.reference.ReferenceEvaluator``; a node whose
    result would have more than ``max_output_elements`` elements is left in place so that
    generated tensors (``ConstantOfShape``, ``Expand``, ``Tile``) do not bloat the file.
    ``Constant`` nodes become initializers whatever their size (their data is in the file already).
    Ops in ``keep_ops`` are never folded: by default the quantize/dequantize pairs on weights of a
    QAT-exported model, whose scales are part of the model and must reach the quantizer intact.
    ``only_ops`` limits folding to those op types (the quantizer materialises only ``Constant`` and
    ``Identity`` of a constant, where exporters put scales and shared zero points).
    """

    def __init__(
        self,
        *,
        max_output_elements: int = 1 << 22,
        keep_ops: frozenset[str] = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}),
        only_ops: frozenset[str] | None = None,
    ) -> None:
        super().__init__()
        self.max_output_elements = max_output_elements
        self.keep_ops = keep_ops
        self.only_ops = only_ops

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        opsets = dict(model.opset_imports)
        folded = 0
        for node in list(graph):
            outputs = self._evaluate(node, opsets)
            if outputs is None:
                continue
            replacements = []
            for value, array in zip(node.outputs, outputs):
                if not value.name:
                    continue
                if value.dtype is not None:
                    array = array.astype(value.dtype.numpy(), copy=False)
                replacement = add_initializer(graph, names, f"{value.name}__folded", array)
                ir.convenience.replace_all_uses_with(value, replacement, replace_graph_outputs=True)
                replacements.append((replacement, value.name))
            graph.remove(node, safe=True)
            for replacement, name in replacements:
                rename(replacement, name)
            folded += 1
        if folded:
            logger.info("folded %d constant node(s)", folded)
        return ir.passes.PassResult(model, modified=bool(folded))

    def _evaluate(self, node: ir.Node, opsets: dict[str, int]) -> list[np.ndarray] | None:
        """The node's outputs if it can and may be folded, else None."""
        if node.domain not in ("", "ai.onnx") or node.op_type in _NON_DETERMINISTIC_OPS or node.op_type in self.keep_ops:
            return None
        if self.only_ops is not None and node.op_type not in self.only_ops:
            return None
        if node.op_type in ("Shape", "Size"):
            return self._static_shape(node)
        materialise = node.op_type == "Constant"
        inputs = [value for value in node.inputs if value is not None]
        if not (inputs or materialise) or any(value is not None and constant_array(value) is None for value in node.inputs):
            return None
        if any(attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return None
        if not (materialise or self._small_enough(node)):
            return None
        try:
            arrays = _run_single_node(node, opsets)
        except Exception as error:  # the reference evaluator lacks a kernel or rejects the node
            logger.debug("not folding %s (%s): %s", node.name, node.op_type, error)
            return None
        if any(array.dtype.kind in "OSU" for array in arrays):
            return None  # onnx_ir cannot write a string tensor built from numpy
        if not materialise and any(array.size > self.max_output_elements for array in arrays):
            return None
        return arrays

    def _static_shape(self, node: ir.Node) -> list[np.ndarray] | None:
        source = node.inputs[0]
        if source is None or source.shape is None or not source.shape.is_static():
            return None
        dims = [int(d) for d in source.shape]
        if node.op_type == "Size":
            return [np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return [np.array(dims[start:end], dtype=np.int64)]

    def _small_enough(self, node: ir.Node) -> bool:
        """Check inferred output sizes (and ConstantOfShape's target) before materialising anything."""
        if node.op_type == "ConstantOfShape":
            shape = constant_array(node.inputs[0])
            if shape is not None and int(np.prod(shape, dtype=np.int64)) > self.max_output_elements:
                return False
        for value in node.outputs:
            if value.shape is not None and value.shape.is_static():
                if int(np.prod([int(d) for d in value.shape], dtype=np.int64)) > self.max_output_elements:
                    return False
        return True


def _run_single_node(node: ir.Node, opsets: dict[str, int]) -> list[np.ndarray]:
    if node.op_type == "GatherElements":
        return [_gather_elements(constant_array(node.inputs[0]), constant_array(node.inputs[1]), node.attributes.get_int("axis", 0))]
    feeds = {value.name: constant_array(value) for value in node.inputs if value is not None}
    node_proto = ir.serde.serialize_node(node)
    graph = onnx.helper.make_graph(
        [node_proto],
        "fold",
        [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape) for name, array in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(value.name) for value in node.outputs if value.name],
    )
    opset_imports = [onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    evaluator = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opset_imports))
    results = evaluator.run(None, feeds)
    arrays = [np.asarray(result) for result in results]
    # Absent optional outputs keep their (empty) slot so results line up with node.outputs.
    named = iter(arrays)
    return [next(named) if value.name else np.empty(0) for value in node.outputs]


def _gather_elements(data: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    """ONNX GatherElements. onnx.reference's kernel (onnx 1.23) goes through np.choose, which takes at
    most 64 choices, and its 2-D fallback reads only column 0 of the indices (BERT's token-type
    GatherElements over a [1, 512] buffer)."""
    axis %= data.ndim
    indices = np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64)
    return np.take_along_axis(data, indices, axis=axis)
