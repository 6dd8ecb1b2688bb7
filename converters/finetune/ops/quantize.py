"""QuantizeLinear and DequantizeLinear, through the graph's quantizers (`TrainableGraph.quantizer_of`).

A QuantizeLinear gives integer codes as floats (so gradients flow through its straight-through
rounding); the DequantizeLinears that read them use the same quantizer. A DequantizeLinear of a
stored weight fake-quantizes the latent float weight the graph keeps in its place; one of an int32
bias passes the float bias through (its scale is re-derived as s_in·s_w at write-back).
"""

from __future__ import annotations

from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import NodeSpec


def _qdq_support(node: NodeSpec) -> str | None:
    if node.attr("block_size", 0):
        return "blocked quantization (block_size)"
    return None


@REGISTRY.register("QuantizeLinear", supports=_qdq_support)
def quantize_linear(node: NodeSpec, inputs: list, graph) -> tuple:
    return (graph.quantizer_of(node.name).quantize(inputs[0].float()),)


@REGISTRY.register("DequantizeLinear", supports=_qdq_support)
def dequantize_linear(node: NodeSpec, inputs: list, graph) -> tuple:
    role = graph.dequantize_role(node.name)
    if role == "bias":
        return (inputs[0],)
    quantizer = graph.quantizer_of(node.name)
    if role == "weight":
        return (quantizer(inputs[0]),)
    return (quantizer.dequantize(inputs[0].float()),)
