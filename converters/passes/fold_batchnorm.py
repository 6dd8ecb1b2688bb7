"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul+Add before it."""

from __future__ import annotations

__all__ = ["FoldBatchNormPass"]

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeopt.converters.graph.rewrite import NameScope, add_initializer, bypass_node, can_bypass, constant_array
from edgeopt.converters.passes.base import GraphPass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Affine:
    """Per-channel y = x * scale + shift equivalent to one BatchNormalization in inference."""

    scale: np.ndarray
    shift: np.ndarray


class FoldBatchNormPass(GraphPass):
    """Merge ``BatchNormalization`` into the weights and bias of the layer that feeds it.

    The producer's output must feed only the BatchNorm (otherwise the unnormalised tensor is still
    needed), its weights and the BatchNorm statistics must be constants, and the BatchNorm must be
    in inference mode. Supported producers: ``Conv``, ``ConvTranspose`` (any group count),
    ``Gemm``, and ``MatMul`` with a 2-D constant weight followed by a constant ``Add``. A BatchNorm
    after anything else is left for the runtime, which handles it as a per-channel affine op.
    New weight initializers are created, so weights shared with other nodes are never changed.
    """

    def __init__(self, *, fold_into: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")) -> None:
        super().__init__()
        self.fold_into = fold_into

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        folded = 0
        for node in list(graph):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                if self._fold(graph, names, node):
                    folded += 1
        if folded:
            logger.info("folded %d BatchNormalization node(s)", folded)
        return ir.passes.PassResult(model, modified=bool(folded))

    def _fold(self, graph: ir.Graph, names: NameScope, bn: ir.Node) -> bool:
        affine = _inference_affine(bn)
        source = bn.inputs[0]
        if affine is None or source is None or not _feeds_only(source, bn) or not can_bypass(bn, source):
            return False
        producer = source.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return False
        kind = "MatMul" if producer.op_type == "Add" else producer.op_type
        if kind not in self.fold_into:
            return False
        if kind in ("Conv", "ConvTranspose"):
            folded = _fold_into_conv(graph, names, producer, affine)
        elif kind == "Gemm":
            folded = _fold_into_gemm(graph, names, producer, affine)
        elif kind == "MatMul":
            folded = _fold_into_matmul_add(graph, names, producer, affine)
        else:
            return False
        return folded and bypass_node(bn, source)


def _feeds_only(value: ir.Value, consumer: ir.Node) -> bool:
    return not value.is_graph_output() and all(use.node is consumer for use in value.uses())


def _inference_affine(bn: ir.Node) -> _Affine | None:
    """The BatchNorm as scale/shift, if it is in inference mode with constant statistics."""
    if bn.attributes.get_int("training_mode", 0) != 0:
        return None
    if any(output.uses() or output.is_graph_output() for output in bn.outputs[1:]):
        return None
    params = [constant_array(value) for value in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    epsilon = bn.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    return _Affine(scale=scale, shift=beta - mean * scale)


def _fold_into_conv(graph: ir.Graph, names: NameScope, conv: ir.Node, affine: _Affine) -> bool:
    weight = constant_array(conv.inputs[1])
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = constant_array(bias_value) if bias_value is not None else None
    if weight is None or (bias_value is not None and bias is None):
        return False
    if conv.op_type == "Conv":
        out_channels = weight.shape[0]
        channel_scale = affine.scale.reshape((out_channels,) + (1,) * (weight.ndim - 1))
        new_weight = weight * channel_scale
    else:  # ConvTranspose weights are [C_in, C_out / group, k...]
        group = conv.attributes.get_int("group", 1)
        c_in, c_out_per_group = weight.shape[0], weight.shape[1]
        grouped = weight.reshape((group, c_in // group, c_out_per_group) + weight.shape[2:])
        channel_scale = affine.scale.reshape((group, 1, c_out_per_group) + (1,) * (weight.ndim - 2))
        new_weight = (grouped * channel_scale).reshape(weight.shape)
        out_channels = group * c_out_per_group
    if affine.scale.shape != (out_channels,):
        return False
    old_bias = np.zeros(out_channels) if bias is None else bias.astype(np.float64)
    new_bias = old_bias * affine.scale + affine.shift
    weight_name = conv.inputs[1].name or "weight"
    conv.replace_input_with(1, add_initializer(graph, names, f"{weight_name}__bn", new_weight.astype(weight.dtype)))
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, add_initializer(graph, names, f"{weight_name}__bn_bias", new_bias.astype(weight.dtype)))
    return True


def _fold_into_gemm(graph: ir.Graph, names: NameScope, gemm: ir.Node, affine: _Affine) -> bool:
    weight = constant_array(gemm.inputs[1])
    bias_value = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    bias = constant_array(bias_value) if bias_value is not None else None
    if weight is None or weight.ndim != 2 or (bias_value is not None and bias is None):
        return False
    trans_b = gemm.attributes.get_int("transB", 0)
    out_features = weight.shape[0] if trans_b else weight.shape[1]
    if affine.scale.shape != (out_features,):
        return False
    new_weight = weight * (affine.scale[:, None] if trans_b else affine.scale[None, :])
    beta = gemm.attributes.get_float("beta", 1.0)
    old_bias = np.zeros(out_features) if bias is None else beta * bias.astype(np.float64)
    new_bias = old_bias * affine.scale + affine.shift
    weight_name = gemm.inputs[1].name or "weight"
    gemm.replace_input_with(1, add_initializer(graph, names, f"{weight_name}__bn", new_weight.astype(weight.dtype)))
    new_bias_value = add_initializer(graph, names, f"{weight_name}__bn_bias", new_bias.astype(weight.dtype))
    if len(gemm.inputs) < 3:
        gemm.resize_inputs(3)
    gemm.replace_input_with(2, new_bias_value)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return True


def _fold_into_matmul_add(graph: ir.Graph, names: NameScope, add: ir.Node, affine: _Affine) -> bool:
    """``Add(MatMul(x, W), b)`` with 2-D x: the BatchNorm channel is W's last axis."""
    for matmul_slot, bias_slot in ((0, 1), (1, 0)):
        matmul_out, bias_value = add.inputs[matmul_slot], add.inputs[bias_slot]
        matmul = matmul_out.producer() if matmul_out is not None else None
        if matmul is not None and matmul.op_type == "MatMul" and _feeds_only(matmul_out, add):
            break
    else:
        return False
    weight, bias = constant_array(matmul.inputs[1]), constant_array(bias_value)
    activation = matmul.inputs[0]
    if weight is None or bias is None or weight.ndim != 2 or activation is None:
        return False
    if activation.shape is None or len(activation.shape) != 2:
        return False  # with rank > 2 the BatchNorm channel axis (1) is not the feature axis
    out_features = weight.shape[1]
    if affine.scale.shape != (out_features,) or bias.size not in (1, out_features):
        return False
    new_weight = weight * affine.scale[None, :]
    new_bias = np.broadcast_to(bias.astype(np.float64).reshape(-1), (out_features,)) * affine.scale + affine.shift
    weight_name = matmul.inputs[1].name or "weight"
    matmul.replace_input_with(1, add_initializer(graph, names, f"{weight_name}__bn", new_weight.astype(weight.dtype)))
    add.replace_input_with(bias_slot, add_initializer(graph, names, f"{weight_name}__bn_bias", new_bias.astype(bias.dtype)))
    return True
