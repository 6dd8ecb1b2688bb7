"""Import a model that already carries Q/DQ (PyTorch QAT export, NNCF, TensorRT Model Optimizer).

Learned scales are kept. They change only where the target's scheme cannot run them, with the
least change that keeps the represented range, and every change is listed:
- asymmetric activations on a symmetric target (TensorRT): zero point 0, scale covering the same range;
- uint8 activations on an int8 asymmetric target: zero point shifted by 128, same values exactly;
- per-channel activations on a per-tensor target: one scale over the union of the ranges;
- a fixed output rule (TFLite softmax/logistic/tanh): the fixed parameters;
- asymmetric or wrongly-oriented weight quantization: symmetric per-channel on the output axis;
- 8-bit weights of a pairwise-summing op on a 7-bit CPU class (x86 without VNNI): the learned range on [-64, 64].
Weights fake-quantized as Q(float) -> DQ are folded to the explicit int8 initializer -> DQ form,
and on int32-bias targets float biases become int32 with scale = input scale x weight scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.quantize.placement import WEIGHTED_OPS, sums_products_pairwise
from edgeopt.converters.quantize.qdq import activation_params, qrange, quantize_weight
from edgeopt.targets import QuantScheme

__all__ = ["import_qdq", "strip_qdq"]


def _params(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    scale = arrays[node.input[1]].astype(np.float64)
    zero_point = arrays[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(scale.shape, np.uint8)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return scale, zero_point, axis


def _describe(scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> dict[str, Any]:
    per_channel = scale.size > 1
    return {
        "scale": scale.astype(float).round(9).tolist() if per_channel else float(scale.reshape(-1)[0]),
        "zero_point": zero_point.astype(int).tolist() if per_channel else int(zero_point.reshape(-1)[0]),
        "dtype": zero_point.dtype.name,
        **({"axis": axis} if per_channel else {}),
    }


def _set_axis(node: onnx.NodeProto, axis: int | None) -> None:
    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(kept)
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.names = set(self.arrays) | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if name in n.input]

    def producer(self, name: str) -> onnx.NodeProto | None:
        return next((n for n in self.model.graph.node if name in n.output), None)

    def add(self, name: str, array: np.ndarray) -> str:
        candidate, index = name, 1
        while candidate in self.names:
            candidate, index = f"{name}_{index}", index + 1
        self.names.add(candidate)
        self.arrays[candidate] = array
        self.model.graph.initializer.append(numpy_helper.from_array(array, candidate))
        return candidate


def import_qdq(model: onnx.ModelProto, scheme: QuantScheme) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """(adapted QDQ model, report with qat_imported, scales [before/after], adaptations, float_model)."""
    adapted = onnx.ModelProto()
    adapted.CopyFrom(model)
    graph = _Graph(adapted)
    scales: list[dict[str, Any]] = []
    adaptations: list[dict[str, Any]] = []
    stored_weights = [n for n in adapted.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in graph.arrays]
    for q in [n for n in adapted.graph.node if n.op_type == "QuantizeLinear"]:
        if q.input[0] in graph.arrays:
            _import_weight(graph, q, scheme, scales, adaptations)
        else:
            _import_activation(graph, q, scheme, scales, adaptations)
    for dq in stored_weights:
        _check_stored_weight(graph, dq, scheme, scales, adaptations)
    _quantize_through_data_movement(graph, scheme, adaptations)
    if scheme.bias_int32:
        _int32_biases(graph, adaptations)
    _drop_unused_initializers(adapted)
    report = {
        "qat_imported": True,
        "scales": scales,
        "scales_kept": sum(1 for s in scales if s["kept"]),
        "scales_adapted": sum(1 for s in scales if not s["kept"]),
        "adaptations": adaptations,
        "float_model": strip_qdq(model),
    }
    return adapted, report


def _import_activation(graph: _Graph, q: onnx.NodeProto, scheme: QuantScheme, scales: list, adaptations: list) -> None:
    tensor = q.input[0]
    scale, zero_point, axis = _params(q, graph.arrays)
    qmin, qmax = qrange(zero_point.dtype.name)
    target = scheme.activation_dtype
    low = (qmin - zero_point.astype(np.float64)) * scale
    high = (qmax - zero_point.astype(np.float64)) * scale
    changes: list[tuple[str, str]] = []
    new_scale, new_zero = scale, zero_point
    if scale.size > 1:
        changes.append(("per-channel activation -> per-tensor over the union of the channel ranges", "the target quantizes activations per tensor"))
    symmetric_zero = 0 if qrange(target)[0] < 0 else (qrange(target)[1] + 1) // 2
    producer = graph.producer(tensor)
    rule = scheme.rule_for(producer.op_type) if producer is not None else None
    if rule is not None and rule.output_scale is not None:
        fixed_zero = int(rule.output_zero_point or 0) + (128 if target == "uint8" else 0)
        if not (scale.size == 1 and np.isclose(scale.reshape(-1)[0], rule.output_scale) and int(zero_point.reshape(-1)[0]) == fixed_zero and zero_point.dtype.name == target):
            changes.append((f"fixed output parameters scale {rule.output_scale:g}, zero point {fixed_zero}", f"the target requires them after {producer.op_type}"))
            new_scale, new_zero = np.array(rule.output_scale, np.float64), np.array(fixed_zero, target)
    elif scheme.activation_symmetric and (np.any(zero_point.astype(int) != symmetric_zero) or zero_point.dtype.name != target or scale.size > 1):
        params = activation_params(float(low.min()), float(high.max()), target, True)
        ratio = params.scale / float(scale.max())
        changes.append(
            (
                f"{zero_point.dtype.name} zero point {int(zero_point.reshape(-1)[0])} -> symmetric {target} zero point {symmetric_zero}, "
                f"scale x{ratio:.3f} to cover the same range",
                "the target requires symmetric activations (zero point 0)",
            )
        )
        new_scale, new_zero = np.array(params.scale, np.float64), np.array(params.zero_point, target)
    elif not scheme.activation_symmetric and (zero_point.dtype.name != target or scale.size > 1):
        if scale.size > 1:
            params = activation_params(float(low.min()), float(high.max()), target, False)
            new_scale, new_zero = np.array(params.scale, np.float64), np.array(params.zero_point, target)
        else:
            shift = qrange(target)[0] - qmin
            changes.append((f"{zero_point.dtype.name} -> {target}, zero point shifted by {shift}, same values", f"the target runs {target} activations"))
            new_zero = (zero_point.astype(np.int64) + shift).astype(target)
    before = _describe(scale, zero_point, axis)
    if changes:
        scale_name = graph.add(f"{tensor}_scale_adapted", np.asarray(new_scale, np.float32).reshape(()))
        zero_name = graph.add(f"{tensor}_zero_point_adapted", np.asarray(new_zero, target).reshape(()))
        for node in [q, *[d for d in graph.consumers(q.output[0]) if d.op_type == "DequantizeLinear"]]:
            node.input[1] = scale_name
            if len(node.input) > 2:
                node.input[2] = zero_name
            else:
                node.input.append(zero_name)
            _set_axis(node, None)
    after = _describe(np.asarray(new_scale).reshape(-1) if np.asarray(new_scale).size > 1 else np.asarray(new_scale), np.asarray(new_zero, target))
    scales.append({"tensor": tensor, "kind": "activation", "before": before, "after": after, "kept": not changes})
    adaptations.extend({"tensor": tensor, "change": change, "why": why, "before": before, "after": after} for change, why in changes)


#: Ops whose outputs stay on their input's quantization grid, so a Q/DQ after them with the same
#: parameters is exact.
GRID_PRESERVING_OPS = frozenset({"MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})


def _quantize_through_data_movement(graph: _Graph, scheme: QuantScheme, adaptations: list) -> None:
    """A weighted op whose input reaches it from a DQ only through max-pool/reshape-like ops gets
    its own Q/DQ with that DQ's parameters (exact), so the target runs it in int8."""
    for node in list(graph.model.graph.node):
        if node.op_type not in WEIGHTED_OPS or node.op_type not in scheme.quantized_ops:
            continue
        producer = graph.producer(node.input[0])
        if producer is None or producer.op_type == "DequantizeLinear" or producer.op_type not in GRID_PRESERVING_OPS:
            continue
        source = producer
        while source is not None and source.op_type in GRID_PRESERVING_OPS:
            source = graph.producer(source.input[0])
        if source is None or source.op_type != "DequantizeLinear" or source.input[0] in graph.arrays:
            continue
        tensor = node.input[0]
        parameters = list(source.input[1:3])
        quantized, dequantized = f"{tensor}_quantized", f"{tensor}_dequantized"
        while quantized in graph.names or dequantized in graph.names:
            quantized, dequantized = quantized + "_", dequantized + "_"
        graph.names.update({quantized, dequantized})
        index = list(graph.model.graph.node).index(node)
        graph.model.graph.node.insert(index, helper.make_node("DequantizeLinear", [quantized, *parameters], [dequantized], name=f"{tensor}_DequantizeLinear"))
        graph.model.graph.node.insert(index, helper.make_node("QuantizeLinear", [tensor, *parameters], [quantized], name=f"{tensor}_QuantizeLinear"))
        node.input[0] = dequantized
        adaptations.append(
            {
                "tensor": tensor,
                "change": f"added Q/DQ with the scale and zero point of '{source.output[0]}' ({producer.op_type} keeps values on that grid, so it is exact)",
                "why": f"the target runs {node.op_type} in int8 only with a quantized input",
            }
        )


def _weight_consumer(graph: _Graph, dq_output: str) -> onnx.NodeProto | None:
    return next((n for n in graph.consumers(dq_output) if n.op_type in WEIGHTED_OPS), None)


def _expected_axis(node: onnx.NodeProto | None, rank: int) -> int | None:
    if node is None:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return rank - 1 if rank == 2 else None


def _weight_bits(consumer: onnx.NodeProto | None, shape: tuple[int, ...], scheme: QuantScheme) -> int:
    if consumer is None:
        return 8
    group = next((a.i for a in consumer.attribute if a.name == "group"), 1)
    return scheme.pairwise_weight_bits if sums_products_pairwise(consumer.op_type, tuple(shape), group) else 8


def _requantized_weight(
    values: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int,
    consumer: onnx.NodeProto | None,
    scheme: QuantScheme,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, list[str]]:
    """(int weights, scale, zero point, axis, changes): the learned grid, unless the scheme forbids it."""
    per_channel = scale.size > 1
    expected = _expected_axis(consumer, values.ndim)
    changes = []
    wrong_axis = per_channel and expected is not None and axis % values.ndim != expected
    asymmetric = scheme.weight_symmetric and np.any(zero_point.astype(int) != 0)
    wrong_dtype = zero_point.dtype.name != scheme.weight_dtype
    qmin, qmax = qrange(zero_point.dtype.name)
    shape = [1] * values.ndim
    if per_channel:
        shape[axis] = -1
    quantized = np.clip(np.round(values / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int64), qmin, qmax)
    bits = _weight_bits(consumer, values.shape, scheme)
    too_wide = bits < 8 and np.abs(quantized - zero_point.reshape(shape).astype(np.int64)).max(initial=0) > 2 ** (bits - 1)
    if wrong_axis or asymmetric or wrong_dtype or too_wide:
        use_axis = expected if (per_channel or scheme.weight_per_channel) and expected is not None else None
        if wrong_axis:
            changes.append(f"per-channel axis {axis} -> {expected} (output channels)")
        if asymmetric:
            changes.append("asymmetric -> symmetric weights (zero point 0), covering the learned range")
        if wrong_dtype:
            changes.append(f"{zero_point.dtype.name} -> {scheme.weight_dtype} weights")
        if too_wide:
            changes.append(
                f"{bits}-bit weights ([-{2 ** (bits - 1)}, {2 ** (bits - 1)}], scale widened to the learned range): "
                "the CPU class sums int8 products pairwise in a saturating int16"
            )
        learned = ((quantized - zero_point.reshape(shape).astype(np.int64)) * scale.reshape(shape)).astype(np.float32)
        quantized, new_scale, new_zero = quantize_weight(learned, use_axis, scheme.weight_dtype, scheme.weight_symmetric, bits)
        return quantized, new_scale, new_zero, use_axis, changes
    return quantized.astype(zero_point.dtype), scale.astype(np.float32), zero_point, (axis if per_channel else None), changes


def _import_weight(graph: _Graph, q: onnx.NodeProto, scheme: QuantScheme, scales: list, adaptations: list) -> None:
    """Fold Q(float weight) -> DQ into int8 initializer -> DQ with the learned scale."""
    name = q.input[0]
    scale, zero_point, axis = _params(q, graph.arrays)
    dqs = [d for d in graph.consumers(q.output[0]) if d.op_type == "DequantizeLinear"]
    if not dqs:
        return
    consumer = _weight_consumer(graph, dqs[0].output[0])
    values = graph.arrays[name].astype(np.float32)
    quantized, new_scale, new_zero, new_axis, changes = _requantized_weight(values, scale, zero_point, axis, consumer, scheme)
    _store_weight(graph, name, dqs, quantized, new_scale, new_zero, new_axis)
    graph.model.graph.node.remove(q)
    _record_weight(name, scale, zero_point, axis, new_scale, new_zero, new_axis, changes, scales, adaptations)


def _check_stored_weight(graph: _Graph, dq: onnx.NodeProto, scheme: QuantScheme, scales: list, adaptations: list) -> None:
    """A weight already stored as integers -> DQ: keep it unless the scheme forbids its parameters."""
    name = dq.input[0]
    scale, zero_point, axis = _params(dq, graph.arrays)
    stored = graph.arrays[name]
    if stored.dtype.kind not in "iu" or stored.dtype == np.int32:
        return
    shape = [1] * stored.ndim
    if scale.size > 1:
        shape[axis] = -1
    values = ((stored.astype(np.float64) - zero_point.reshape(shape).astype(np.float64)) * scale.reshape(shape)).astype(np.float32)
    consumer = _weight_consumer(graph, dq.output[0])
    quantized, new_scale, new_zero, new_axis, changes = _requantized_weight(values, scale, zero_point, axis, consumer, scheme)
    if changes:
        _store_weight(graph, name, [dq], quantized, new_scale, new_zero, new_axis)
    _record_weight(name, scale, zero_point, axis, new_scale, new_zero, new_axis, changes, scales, adaptations)


def _store_weight(graph: _Graph, name: str, dqs: list[onnx.NodeProto], quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> None:
    weight_name = graph.add(f"{name}_quantized", quantized)
    scale_name = graph.add(f"{name}_scale", np.asarray(scale, np.float32).reshape(-1 if axis is not None else ()))
    zero_name = graph.add(f"{name}_zero_point", np.asarray(zero_point).reshape(-1 if axis is not None else ()))
    for dq in dqs:
        dq.input[0] = weight_name
        dq.input[1] = scale_name
        if len(dq.input) > 2:
            dq.input[2] = zero_name
        else:
            dq.input.append(zero_name)
        _set_axis(dq, axis)


def _record_weight(
    name: str,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int,
    new_scale: np.ndarray,
    new_zero: np.ndarray,
    new_axis: int | None,
    changes: list[str],
    scales: list,
    adaptations: list,
) -> None:
    before = _describe(scale, zero_point, axis)
    after = _describe(np.asarray(new_scale), np.asarray(new_zero), new_axis)
    why = "the target runs symmetric int8 weights per output channel"
    scales.append({"tensor": name, "kind": "weight", "before": before, "after": after, "kept": not changes})
    adaptations.extend({"tensor": name, "change": change, "why": why, "before": before, "after": after} for change in changes)


def _int32_biases(graph: _Graph, adaptations: list) -> None:
    """Float biases of quantized Conv/Gemm become int32 -> DQ with scale = input scale x weight scale."""
    for node in list(graph.model.graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or node.input[2] not in graph.arrays:
            continue
        data, weight = graph.producer(node.input[0]), graph.producer(node.input[1])
        if data is None or weight is None or data.op_type != "DequantizeLinear" or weight.op_type != "DequantizeLinear":
            continue
        input_scale = graph.arrays[data.input[1]].astype(np.float64)
        weight_scale = graph.arrays[weight.input[1]].astype(np.float64).reshape(-1)
        bias = graph.arrays[node.input[2]].astype(np.float64)
        if input_scale.size != 1 or bias.ndim != 1:
            continue
        scale = input_scale.reshape(-1)[0] * (weight_scale if weight_scale.size == bias.size else np.full(bias.shape, weight_scale[0]))
        quantized = np.clip(np.round(bias / scale), -(2**31 - 1), 2**31 - 1).astype(np.int32)
        bias_name = node.input[2]
        inputs = [
            graph.add(f"{bias_name}_quantized", quantized),
            graph.add(f"{bias_name}_scale", scale.astype(np.float32)),
            graph.add(f"{bias_name}_zero_point", np.zeros(bias.shape, np.int32)),
        ]
        output = f"{bias_name}_dequantized"
        while output in graph.names:
            output += "_"
        graph.names.add(output)
        dq = helper.make_node("DequantizeLinear", inputs, [output], name=f"{bias_name}_DequantizeLinear", axis=0)
        index = list(graph.model.graph.node).index(node)
        graph.model.graph.node.insert(index, dq)
        node.input[2] = output
        adaptations.append(
            {
                "tensor": bias_name,
                "change": "float bias -> int32 bias with scale = input scale x weight scale",
                "why": "full-integer kernels take an int32 bias",
                "max_abs_change": float(np.max(np.abs(quantized * scale - bias))) if bias.size else 0.0,
            }
        )


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model under a QDQ graph: activation Q->DQ pairs removed, weights as float (the fp32 reference of a QAT model)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    graph = stripped.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    removed = []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        source = producers.get(dq.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            rename[dq.output[0]] = source.input[0]
            removed.extend([dq, source])
        elif dq.input[0] in arrays:
            scale, zero_point, axis = _params(dq, arrays)
            stored = arrays[dq.input[0]]
            shape = [1] * stored.ndim
            if scale.size > 1:
                shape[axis] = -1
            values = (stored.astype(np.float64) - zero_point.reshape(shape).astype(np.float64)) * scale.reshape(shape)
            graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), dq.output[0]))
            removed.append(dq)
    for node in {id(n): n for n in removed}.values():
        if node in graph.node:
            graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    for output in graph.output:
        name = output.name
        while name in rename:
            name = rename[name]
        if name != output.name:
            graph.node.append(helper.make_node("Identity", [name], [output.name]))
    _drop_unused_initializers(stripped)
    return stripped
