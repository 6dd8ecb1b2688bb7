"""Scale/zero-point arithmetic and Q/DQ insertion for a `QuantPlan`.

The emitted graph is explicit, the form every lowering reads: activations as QuantizeLinear ->
DequantizeLinear pairs with scalar scale and zero point; weights as an int8 initializer ->
DequantizeLinear (axis set when per channel); int32 biases as an initializer -> DequantizeLinear
with scale = input scale x weight scale and zero point 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.quantize.placement import QuantPlan
from edgeopt.targets import QuantScheme

__all__ = ["TENSOR_TAG", "ChannelQParams", "QParams", "activation_params", "channel_params", "group_params", "insert_qdq", "quantize_weight", "qrange"]

log = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
#: The largest |int32 bias| a weight scale is chosen for: INT32_MAX less a margin for the float32 rounding of the scales.
BIAS_LIMIT = 0.999 * INT32_MAX
#: Written into the doc_string of each QuantizeLinear the quantizer adds: the fp32 tensor it stands for.
TENSOR_TAG = "edgeopt:tensor="


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: str


@dataclass(frozen=True, eq=False)
class ChannelQParams:
    """Per-channel scales and zero points of an activation (QuantizeLinear `axis`)."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int


def qrange(dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def activation_params(low: float, high: float, dtype: str, symmetric: bool) -> QParams:
    """Scale and zero point covering [low, high] (always including 0, so zero is exact)."""
    qmin, qmax = qrange(dtype)
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        amax = max(abs(low), abs(high))
        levels = (qmax - qmin) // 2  # 127: the grid [-127, 127] (+ -128) around zero point 0 / 128
        scale = amax / levels if amax > 0 else 1.0
        zero_point = 0 if qmin < 0 else (qmax + 1) // 2
        return QParams(float(np.float32(scale)), zero_point, dtype)
    scale = (high - low) / (qmax - qmin) if high > low else 1.0
    scale = float(np.float32(scale))
    zero_point = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return QParams(scale, zero_point, dtype)


def channel_params(low: np.ndarray, high: np.ndarray, dtype: str, symmetric: bool, axis: int) -> ChannelQParams:
    """`activation_params` for each channel."""
    each = [activation_params(float(lo), float(hi), dtype, symmetric) for lo, hi in zip(low, high)]
    scale = np.array([p.scale for p in each], np.float32)
    return ChannelQParams(scale, np.array([p.zero_point for p in each], np.dtype(dtype)), dtype, axis)


def group_format(plan: QuantPlan, members: Iterable[str], scheme: QuantScheme) -> tuple[str, bool]:
    """(dtype, symmetric) of a group's Q/DQ: int8 symmetric where the placement asks for it
    (`ActivationSite.signed`), else the scheme's activation type."""
    if any(plan.sites[m].signed for m in members):
        return "int8", True
    return scheme.activation_dtype, scheme.activation_symmetric


def group_params(
    plan: QuantPlan, ranges: Mapping[str, tuple[Any, Any]], scheme: QuantScheme
) -> dict[str, QParams | ChannelQParams]:
    """One QParams per activation site; sites that must share a scale get the union of their ranges.
    A per-channel site (placement's `axis`; never shared) gets its channels' ranges."""
    params: dict[str, QParams | ChannelQParams] = {}
    for members in plan.groups().values():
        axis = plan.sites[members[0]].axis
        dtype, symmetric = group_format(plan, members, scheme)
        if axis is not None and len(members) == 1:
            low, high = ranges[members[0]]
            params[members[0]] = channel_params(np.asarray(low), np.asarray(high), dtype, symmetric, axis)
            continue
        fixed = next((plan.sites[m].fixed for m in members if plan.sites[m].fixed is not None), None)
        if fixed is not None:
            scale, zero_point = fixed
            if dtype == "uint8":  # fixed rules are written for int8 (TFLite); shift to the uint8 grid
                zero_point += 128
            group = QParams(float(scale), int(zero_point), dtype)
        else:
            low = min(ranges[m][0] for m in members)
            high = max(ranges[m][1] for m in members)
            clips = [plan.sites[m].clip for m in members if plan.sites[m].clip is not None]
            if clips:
                low = 0.0
                high = min(high, min(c[1] for c in clips))
            group = activation_params(low, high, dtype, symmetric)
        for member in members:
            params[member] = group
    return params


def quantize_weight(
    weight: np.ndarray, axis: int | None, dtype: str, symmetric: bool, bits: int = 8, min_scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quantized, scale, zero_point): per channel on `axis` (scale/zero point 1-D) or per tensor (scalars).

    `bits` < 8 narrows the grid: symmetric 7-bit int8 weights span [-64, 64] (as ONNX Runtime's
    reduce_range), the widest that keeps 2 x 255 x |w| within a saturating int16 pair sum.
    `min_scale` (symmetric only) is a floor under each scale (`bias_scale_floors`).
    """
    qmin, qmax = qrange(dtype)
    if bits < 8:
        if symmetric and qmin < 0:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1)
        else:
            qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if qmin < 0 else (0, 2**bits - 1)
    weight = weight.astype(np.float32)
    if axis is None:
        reduce_axes = tuple(range(weight.ndim))
    else:
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    low = np.minimum(weight.min(axis=reduce_axes), 0.0) if weight.size else np.zeros(())
    high = np.maximum(weight.max(axis=reduce_axes), 0.0) if weight.size else np.zeros(())
    if symmetric:
        amax = np.maximum(np.abs(low), np.abs(high))
        half = (qmax - qmin) // 2
        scale = np.where(amax > 0, amax / half, 1.0)
        if min_scale is not None:
            scale = np.maximum(scale, min_scale)
        scale = scale.astype(np.float32)
        zero_point = np.full(scale.shape, 0 if qmin < 0 else (qmax + 1) // 2)
    else:
        span = high - low
        scale = np.where(span > 0, span / (qmax - qmin), 1.0).astype(np.float32)
        zero_point = np.clip(np.round(qmin - low / scale), qmin, qmax)
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    quantized = np.clip(np.round(weight / scale.reshape(shape)) + zero_point.reshape(shape), qmin, qmax)
    return quantized.astype(dtype), scale, zero_point.astype(dtype)


class _Builder:
    """Adds initializers and nodes to an onnx_ir graph under unique names."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.names = {v.name for v in graph.initializers.values()} | {v.name for v in graph.inputs}
        for node in graph:
            self.names.update(v.name for v in node.outputs if v.name)

    def unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self.names:
            candidate = f"{name}_{index}"
            index += 1
        self.names.add(candidate)
        return candidate

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=self.unique(name))
        value = ir.val(tensor.name, tensor.dtype, tensor.shape, const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def node(self, op: str, inputs: list[ir.Value], output: str, name: str, attributes: dict | None = None) -> ir.Node:
        out = ir.val(self.unique(output))
        node = ir.node(op, inputs, attributes or {}, outputs=[out], name=self.unique(name))
        self.graph.append(node)
        return node


def bias_scale_floors(plan: QuantPlan, params: Mapping[str, QParams | ChannelQParams], nodes: Mapping[str, ir.Node]) -> dict[str, np.ndarray]:
    """Per weight initializer, the smallest scale of each output channel at which every int32 bias it
    meets fits: |bias| / (input scale x weight scale) <= 2^31 - 1. A tiny input range times a tiny weight
    range (a conv after a near-constant map) would clip a large bias instead; TFLite's converter raises the
    weight scale the same way (tensorflow/lite/tools/optimize: AdjustWeightsForBiasScale)."""
    floors: dict[str, np.ndarray] = {}
    for node_name, (index, activation, weight_name) in plan.biases.items():
        input_params = params.get(activation)
        if not isinstance(input_params, QParams):
            continue
        bias = np.abs(nodes[node_name].inputs[index].const_value.numpy().astype(np.float64)).reshape(-1)
        floor = bias / (input_params.scale * BIAS_LIMIT)
        floors[weight_name] = np.maximum(floors[weight_name], floor) if weight_name in floors and floors[weight_name].shape == floor.shape else floor
    return floors


def insert_qdq(model: onnx.ModelProto, plan: QuantPlan, params: Mapping[str, QParams | ChannelQParams], scheme: QuantScheme) -> onnx.ModelProto:
    """The QDQ model for this plan and these activation parameters."""
    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    build = _Builder(graph)
    nodes = {node.name: node for node in graph}
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    values.update({v.name: v for v in graph.initializers.values()})
    for node in graph:
        values.update({v.name: v for v in node.outputs})

    weight_scales: dict[str, np.ndarray] = {}
    dequantized: dict[str, ir.Value] = {}
    floors = bias_scale_floors(plan, params, nodes) if scheme.weight_symmetric else {}
    for site in plan.weights:
        node = nodes[site.node]
        if site.initializer not in dequantized:
            weight = values[site.initializer].const_value.numpy()
            floor = floors.get(site.initializer)
            floor = floor.max() if floor is not None and site.axis is None else floor
            quantized, scale, zero_point = quantize_weight(weight, site.axis, scheme.weight_dtype, scheme.weight_symmetric, site.bits, floor)
            if floor is not None and (raised := int(np.sum(np.asarray(floor, np.float32) >= scale))):
                log.info("weight scale of %d channel(s) of %s raised so its bias fits int32", raised, site.initializer)
            weight_scales[site.initializer] = scale
            inputs = [
                build.constant(f"{site.initializer}_quantized", quantized),
                build.constant(f"{site.initializer}_scale", scale),
                build.constant(f"{site.initializer}_zero_point", zero_point),
            ]
            attributes = {"axis": site.axis} if site.axis is not None else {}
            dq = build.node("DequantizeLinear", inputs, f"{site.initializer}_dequantized", f"{site.initializer}_DequantizeLinear", attributes)
            dequantized[site.initializer] = dq.outputs[0]
        node.replace_input_with(site.input_index, dequantized[site.initializer])

    for node_name, (index, activation, weight_name) in plan.biases.items():
        if activation not in params or weight_name not in weight_scales:
            continue
        node = nodes[node_name]
        bias_value = node.inputs[index]
        bias = bias_value.const_value.numpy().astype(np.float64)
        scale = (params[activation].scale * weight_scales[weight_name].astype(np.float64)).reshape(-1)
        if scale.size == 1:
            scale = np.full(bias.shape, scale[0])
        if scale.shape != bias.shape:
            continue
        quantized = np.round(bias / scale)
        if np.any(np.abs(quantized) > INT32_MAX):
            log.warning("bias of %s exceeds int32 at its scale; clipped", node_name)
        quantized = np.clip(quantized, -INT32_MAX, INT32_MAX).astype(np.int32)
        inputs = [
            build.constant(f"{bias_value.name}_quantized", quantized),
            build.constant(f"{bias_value.name}_scale", scale.astype(np.float32)),
            build.constant(f"{bias_value.name}_zero_point", np.zeros(bias.shape, np.int32)),
        ]
        dq = build.node("DequantizeLinear", inputs, f"{bias_value.name}_dequantized", f"{bias_value.name}_DequantizeLinear", {"axis": 0})
        node.replace_input_with(index, dq.outputs[0])

    for node_name, index, initializer in plan.constants:
        if initializer not in dequantized:
            # stored like a weight (per tensor): the target's constant-tensor rules are its weight rules
            constant = values[initializer].const_value.numpy()
            quantized, scale, zero_point = quantize_weight(constant, None, scheme.weight_dtype, scheme.weight_symmetric)
            inputs = [
                build.constant(f"{initializer}_quantized", quantized),
                build.constant(f"{initializer}_scale", scale.reshape(())),
                build.constant(f"{initializer}_zero_point", zero_point.reshape(())),
            ]
            dq = build.node("DequantizeLinear", inputs, f"{initializer}_dequantized", f"{initializer}_DequantizeLinear")
            dequantized[initializer] = dq.outputs[0]
        nodes[node_name].replace_input_with(index, dequantized[initializer])

    for site in plan.sites.values():
        if site.tensor not in params or site.tensor not in values:
            continue
        qp = params[site.tensor]
        tensor, source = values[site.tensor], values[site.source]
        scale = build.constant(f"{site.tensor}_scale", np.array(qp.scale, np.float32))
        zero_point = build.constant(f"{site.tensor}_zero_point", np.array(qp.zero_point, np.dtype(qp.dtype)))
        axis = {"axis": qp.axis} if isinstance(qp, ChannelQParams) else {}
        q = build.node("QuantizeLinear", [source, scale, zero_point], f"{site.tensor}_quantized", f"{site.tensor}_QuantizeLinear", axis)
        q.doc_string = TENSOR_TAG + site.tensor
        dq = build.node("DequantizeLinear", [q.outputs[0], scale, zero_point], f"{site.tensor}_dequantized", f"{site.tensor}_DequantizeLinear", axis)
        dequantized_value = dq.outputs[0]
        dequantized_value.type, dequantized_value.shape = tensor.type, tensor.shape
        q.outputs[0].dtype, q.outputs[0].shape = ir.DataType.from_numpy(np.dtype(qp.dtype)), tensor.shape
        if site.consumers is None:
            is_output = tensor.is_graph_output()
            for user, index in list(tensor.uses()):
                if user is not q:
                    user.replace_input_with(index, dequantized_value)
            if is_output:
                graph.outputs[:] = [dequantized_value if v is tensor else v for v in graph.outputs]
                original = tensor.name
                tensor.name = build.unique(f"{original}_float")
                dequantized_value.name = original
            if site.source != site.tensor:  # an absorbed ReLU/Clip: the Q node now does its clamping
                graph.remove(tensor.producer(), safe=True)
        else:
            for consumer in site.consumers:
                user = nodes[consumer]
                for index, value in enumerate(user.inputs):
                    if value is tensor:
                        user.replace_input_with(index, dequantized_value)
    inputs = {v.name for v in graph.inputs}
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and name not in inputs:
            del graph.initializers[name]  # the float weights and biases now stored as integers
    graph.sort()
    proto = ir.to_proto(ir_model)
    _ensure_opset(proto)
    return proto


def _ensure_opset(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 13:
            opset.version = 13
