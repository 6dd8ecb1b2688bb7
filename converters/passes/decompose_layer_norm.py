"""Write LayerNormalization over the last axis as the primitive ops a full-integer backend runs in int8."""

from __future__ import annotations

__all__ = ["DecomposeLayerNormPass"]

import logging

import numpy as np
import onnx_ir as ir

from edgeopt.converters.graph.rewrite import NameScope, add_initializer, constant_array
from edgeopt.converters.passes.base import GraphPass

logger = logging.getLogger(__name__)


class DecomposeLayerNormPass(GraphPass):
    """Replace each ``LayerNormalization`` over the last axis with constant scale (and bias) by

        mean = ReduceMean(x); d = x - mean; var = ReduceMean(d * d)
        y = MatMul(d * Pow(var + eps, -0.5), diag(scale)) + bias

    TFLite has no LayerNorm builtin; its int8 MEAN, SUB, MUL, RSQRT and FULLY_CONNECTED kernels
    run this chain, and the quantizer calibrates a scale for each step. The affine is a MatMul with
    a diagonal weight, not a Mul, because a per-channel weight scale holds every channel's gain
    exactly (TFLite's int8 MUL takes one scale per operand: gains 30x apart would share one grid);
    the bias then folds into FULLY_CONNECTED as int32. ``decomposed`` counts the nodes replaced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.decomposed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        axes_as_input = model.opset_imports.get("", 1) >= 18
        chosen = [node for node in graph if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and _decomposable(node)]
        for node in chosen:
            _decompose(graph, names, node, axes_as_input)
        self.decomposed = len(chosen)
        if chosen:
            logger.info("decomposed %d LayerNormalization node(s)", len(chosen))
        return ir.passes.PassResult(model, modified=bool(chosen))


def _decomposable(node: ir.Node) -> bool:
    """Over the last axis of a known rank, constant 1-D scale (and bias), only the first output used."""
    x = node.inputs[0]
    if x is None or x.shape is None or any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        return False
    if node.attributes.get_int("axis", -1) % len(x.shape) != len(x.shape) - 1:
        return False
    params = [constant_array(value) for value in node.inputs[1:3] if value is not None]
    return len(params) == len([v for v in node.inputs[1:3] if v is not None]) and all(p.ndim == 1 for p in params)


def _decompose(graph: ir.Graph, names: NameScope, norm: ir.Node, axes_as_input: bool) -> None:
    x, output = norm.inputs[0], norm.outputs[0]
    base = norm.name or "LayerNormalization"
    scale = constant_array(norm.inputs[1]).astype(np.float32)
    bias = constant_array(norm.inputs[2]) if len(norm.inputs) > 2 and norm.inputs[2] is not None else None
    epsilon = norm.attributes.get_float("epsilon", 1e-5)
    new: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], tag: str, **attributes: object) -> ir.Value:
        node = ir.node(op, inputs, attributes, name=names.fresh(f"{base}/{tag}"), num_outputs=1)
        node.outputs[0].name = names.fresh(f"{base}/{tag}_output_0")
        node.outputs[0].type = output.type
        new.append(node)
        return node.outputs[0]

    def mean(value: ir.Value, tag: str) -> ir.Value:
        if axes_as_input:
            return add("ReduceMean", [value, add_initializer(graph, names, f"{base}/axes", np.asarray([-1], np.int64))], tag, keepdims=1)
        return add("ReduceMean", [value], tag, axes=[-1], keepdims=1)

    def scalar(tag: str, value: float) -> ir.Value:
        return add_initializer(graph, names, f"{base}/{tag}", np.asarray(value, np.float32))

    centred = add("Sub", [x, mean(x, "mean")], "centred")
    variance = mean(add("Mul", [centred, centred], "squared"), "variance")
    inverse_std = add("Pow", [add("Add", [variance, scalar("epsilon", epsilon)], "variance_eps"), scalar("minus_half", -0.5)], "rstd")
    normed = add("Mul", [centred, inverse_std], "normed")
    result = add("MatMul", [normed, add_initializer(graph, names, f"{base}/scale_diagonal", np.diag(scale))], "scaled")
    if bias is not None:
        result = add("Add", [result, add_initializer(graph, names, f"{base}/bias", bias.astype(np.float32))], "shifted")
    graph.insert_before(norm, new)
    result.shape = output.shape
    name = output.name
    params = [value for value in norm.inputs[1:] if value is not None]
    ir.convenience.replace_all_uses_with(output, result, replace_graph_outputs=True)
    graph.remove(norm, safe=True)
    result.name = name
    for value in params:  # the scale and bias now live in the new initializers
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            del graph.initializers[value.name]
