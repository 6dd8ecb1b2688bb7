"""Check a QDQ model against what its target can execute, before a device build finds out.

Every target gets the generic checks (scales positive and finite, zero points shaped like their
scales, valid per-channel axes, matching Q/DQ pairs). TensorRT and TFLite get their own rules:

- TensorRT explicit quantization (TensorRT Developer Guide, "Explicit Quantization" and "Q/DQ
  Layer-Placement Recommendations"; IQuantizeLayer/IDequantizeLayer API): int8, zero points 0,
  build-time-constant scales, per-channel only for weights and only on the output-channel axis;
  Q/DQ on every input of Conv/Gemm/MatMul and on the residual input of an Add so they fuse; an
  int32 bias DequantizeLinear is rejected by the ONNX parser ("only activation types allowed as
  input to this layer", onnx/onnx-tensorrt#850, microsoft/onnxruntime#14229).
- TFLite int8 (https://ai.google.dev/edge/litert/models/quantization_spec): int8 per-tensor
  activations, int8 symmetric weights per channel on the output axis, int32 bias with scale =
  input scale x weight scale, and the fixed or shared output parameters the target profile lists
  in `quant_scheme.op_rules`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.analysis.stats import shape_inferred
from edgeopt.converters.graph.qdq import (
    WEIGHTED_OPS,
    build_time_array,
    int_attribute,
    output_channel_axis,
    output_quantizer,
    producer_op,
    qparams,
    quantization_source,
)
from edgeopt.runtime.kinds import BackendName, unreachable
from edgeopt.targets import Target

__all__ = ["Finding", "lint_qdq"]

# Ops a DequantizeLinear commutes with, so TensorRT moves the DQ past them and keeps the data int8,
# and ReLU-like activations it fuses into the neighbouring int8 kernel.
_TENSORRT_INT8_PASSTHROUGH = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Gather", "Pad",
     "Resize", "Identity", "MaxPool", "GlobalMaxPool", "Relu", "LeakyRelu", "Clip"}
)
_RELATIVE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Finding:
    """One rule a QDQ graph breaks; "error" means the target will reject or mis-run it."""

    severity: str
    rule: str
    node: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def lint_qdq(model: onnx.ModelProto, target: Target) -> list[Finding]:
    """Every rule of `target` the model's Q/DQ nodes break, in graph order; [] for a float model."""
    nodes = list(shape_inferred(model).graph.all_nodes())
    tensors = [_tensor(node) for node in nodes if _defines_tensor(node)]
    if not tensors:
        return []
    findings = list(_generic(tensors))
    match target.backend:
        case BackendName.TENSORRT:
            findings += _tensorrt(nodes, tensors, target)
        case BackendName.TFLITE:
            findings += _tflite(tensors)
        case BackendName.ONNXRUNTIME | BackendName.OPENVINO | BackendName.COREML | BackendName.COREML_REFERENCE:
            pass  # they run any valid Q/DQ: the generic rules and the profile's op rules say it all
        case _:
            unreachable(target.backend)
    findings += _op_rules(nodes, target)
    position = {_label(node): index for index, node in enumerate(nodes)}
    return sorted(findings, key=lambda f: position.get(f.node, len(position)))


# --------------------------------------------------------------------------------------------
# The graph as quantized tensors


@dataclass
class _QTensor:
    """One quantized tensor: a QuantizeLinear and the DequantizeLinears reading it, or a lone
    DequantizeLinear of stored integers (pre-quantized weights, int32 biases)."""

    node: ir.Node  # the node that defines the parameters: the Q, or the lone DQ
    dequantizers: list[ir.Node]
    scale: np.ndarray | None  # None when not a constant
    zero_point: np.ndarray | None  # None when absent, i.e. 0
    dtype: ir.DataType
    axis: int
    block_size: int
    is_weight: bool
    shape: tuple[int | None, ...] | None  # of the float tensor being quantized
    consumers: list[tuple[ir.Node, int]] = field(default_factory=list)

    @property
    def per_channel(self) -> bool:
        return self.scale is not None and self.scale.size > 1 and self.block_size == 0

    @property
    def nonzero_zero_point(self) -> bool:
        return self.zero_point is not None and bool(np.any(self.zero_point.astype(np.float64) != 0))


def _defines_tensor(node: ir.Node) -> bool:
    if node.op_type == "QuantizeLinear":
        return True
    return node.op_type == "DequantizeLinear" and producer_op(node.inputs[0]) != "QuantizeLinear"


def _tensor(node: ir.Node) -> _QTensor:
    """The quantized tensor `node` (a QuantizeLinear, or a lone DequantizeLinear) defines."""
    data = node.inputs[0]
    if node.op_type == "QuantizeLinear":
        dequantizers = [user for user in node.outputs[0].consumers() if user.op_type == "DequantizeLinear"]
        dtype = _quantized_dtype_of_q(node)
    else:
        dequantizers = [node]
        dtype = _dtype(data)
    params = qparams(node)
    return _QTensor(
        node=node,
        dequantizers=dequantizers,
        scale=params.scale,
        zero_point=params.zero_point,
        dtype=dtype,
        axis=params.axis,
        block_size=params.block_size,
        is_weight=build_time_array(data) is not None,
        shape=_shape(data),
        consumers=[use for dq in dequantizers for use in dq.outputs[0].uses()],
    )


def _from_dequantize(value: ir.Value | None) -> _QTensor | None:
    """The quantized tensor a value is the dequantized form of, if any."""
    source = quantization_source(value)
    return _tensor(source) if source is not None else None


def _quantized_output(node: ir.Node) -> _QTensor | None:
    """The quantized tensor made from the node's first output by a QuantizeLinear, if any."""
    quantizer = output_quantizer(node)
    return _tensor(quantizer) if quantizer is not None else None


def _label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({node.outputs[0].name})"


def _dtype(value: ir.Value) -> ir.DataType:
    if value.dtype is not None:
        return value.dtype
    tensor = ir.convenience.get_const_tensor(value)
    return tensor.dtype if tensor is not None else ir.DataType.UNDEFINED


def _quantized_dtype_of_q(node: ir.Node) -> ir.DataType:
    """ONNX: the zero point's type, else the `output_dtype` attribute (opset 21), else uint8."""
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return _dtype(node.inputs[2])
    output_dtype = int_attribute(node, "output_dtype", 0)
    return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8


def _shape(value: ir.Value) -> tuple[int | None, ...] | None:
    constant = build_time_array(value)
    if constant is not None:
        return tuple(constant.shape)
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def _finding(severity: str, rule: str, node: ir.Node, message: str) -> Finding:
    return Finding(severity, rule, _label(node), message)


def _close(actual: np.ndarray, expected: np.ndarray) -> bool:
    actual, expected = np.broadcast_arrays(actual.astype(np.float64), expected.astype(np.float64))
    return bool(np.all(np.abs(actual - expected) <= _RELATIVE_TOLERANCE * np.abs(expected)))


# --------------------------------------------------------------------------------------------
# Generic rules


def _generic(tensors: list[_QTensor]) -> Iterator[Finding]:
    for t in tensors:
        if t.scale is not None and not np.all(np.isfinite(t.scale) & (t.scale > 0)):
            yield _finding("error", "scale-invalid", t.node, f"scale must be positive and finite, got {_preview(t.scale)}")
        if t.zero_point is not None and t.scale is not None and t.zero_point.size != t.scale.size:
            yield _finding(
                "error", "zero-point-shape", t.node,
                f"{t.zero_point.size} zero points for {t.scale.size} scales; give one zero point per scale",
            )
        if t.dtype == ir.DataType.INT32 and t.nonzero_zero_point:
            yield _finding("error", "bias-zero-point", t.node, "an int32 (bias) DequantizeLinear must have zero point 0")
        yield from _axis_findings(t)
        for dq in t.dequantizers:
            if t.node is not dq and not _same_parameters(t.node, dq):
                yield _finding(
                    "warning", "qdq-pair-mismatch", dq,
                    f"scale/zero point differ from its QuantizeLinear {_label(t.node)}: the pair is not one int8 "
                    "tensor, so lowerings that store int8 tensors cannot keep both",
                )


def _axis_findings(t: _QTensor) -> Iterator[Finding]:
    if not t.per_channel or t.shape is None:
        return
    rank = len(t.shape)
    if not -rank <= t.axis < rank:
        yield _finding("error", "axis-invalid", t.node, f"per-channel axis {t.axis} is outside the tensor's rank {rank}")
        return
    size = t.shape[t.axis]
    if size is not None and t.scale is not None and size != t.scale.size:
        yield _finding(
            "error", "axis-invalid", t.node,
            f"{t.scale.size} per-channel scales for axis {t.axis}, which has {size} channels",
        )


def _same_parameters(q: ir.Node, dq: ir.Node) -> bool:
    """Whether a QuantizeLinear and a DequantizeLinear reading it use the same scale and zero point."""
    q_scale, dq_scale = build_time_array(q.inputs[1]), build_time_array(dq.inputs[1])
    if q_scale is None or dq_scale is None:
        return q.inputs[1] is dq.inputs[1]
    return q_scale.shape == dq_scale.shape and _close(dq_scale, q_scale) and _zero_points(q) == _zero_points(dq)


def _zero_points(node: ir.Node) -> list[int]:
    constant = build_time_array(node.inputs[2] if len(node.inputs) > 2 else None)
    return [0] if constant is None else [int(v) for v in constant.reshape(-1)]


def _preview(array: np.ndarray) -> str:
    flat = array.reshape(-1)
    shown = ", ".join(f"{v:g}" for v in flat[:4])
    return f"[{shown}{', ...' if flat.size > 4 else ''}]"


# --------------------------------------------------------------------------------------------
# Weight axes (shared by TensorRT and TFLite)


def _weight_axis_findings(t: _QTensor, rule: str, warn_per_tensor: bool) -> Iterator[Finding]:
    if not t.is_weight or t.shape is None or t.block_size:
        return
    rank = len(t.shape)
    for consumer, index in t.consumers:
        expected = output_channel_axis(consumer, index, rank)
        if expected is None:
            continue
        if t.per_channel:
            axis = t.axis + rank if t.axis < 0 else t.axis
            if axis != expected:
                yield _finding(
                    "error", f"{rule}-weight-axis", t.node,
                    f"weight of {consumer.op_type} {_label(consumer)} is quantized per channel on axis {t.axis}; "
                    f"the output-channel axis is {expected}",
                )
        elif warn_per_tensor:
            yield _finding(
                "warning", f"{rule}-weight-per-tensor", t.node,
                f"weight of {consumer.op_type} {_label(consumer)} has one per-tensor scale; per-channel scales "
                f"on axis {expected} keep small channels accurate at no cost",
            )


# --------------------------------------------------------------------------------------------
# TensorRT


def _tensorrt(nodes: list[ir.Node], tensors: list[_QTensor], target: Target) -> list[Finding]:
    findings: list[Finding] = []
    for t in tensors:
        if t.nonzero_zero_point:
            findings.append(_finding(
                "error", "trt-zero-point", t.node,
                f"zero point {_preview(t.zero_point)} is not 0: TensorRT quantization is symmetric only; "
                "re-quantize symmetrically (the scale becomes max|x|/127)",
            ))
        if message := _tensorrt_dtype_problem(t):
            findings.append(_finding("error", "trt-int8-only", t.node, message))
        if t.scale is None:
            findings.append(_finding(
                "error", "trt-scale-not-constant", t.node,
                "the scale is computed at run time; TensorRT needs a build-time constant scale",
            ))
        if t.per_channel and not t.is_weight:
            findings.append(_finding(
                "error", "trt-activation-per-channel", t.node,
                "activation quantized per channel: TensorRT takes per-channel scales for weights only; use one scale",
            ))
        findings += _weight_axis_findings(t, "trt", warn_per_tensor=True)
    findings += _tensorrt_placement(nodes, tensors, target)
    return findings


def _tensorrt_dtype_problem(t: _QTensor) -> str | None:
    if t.dtype == ir.DataType.INT8 or (t.dtype == ir.DataType.INT4 and t.is_weight):
        return None
    if t.dtype == ir.DataType.UINT8:
        return "uint8 quantization: TensorRT quantizes to signed int8 only; re-quantize as int8 with zero point 0"
    if t.dtype == ir.DataType.INT32:
        return (
            "int32 DequantizeLinear (a quantized bias): TensorRT's parser rejects it ('only activation types "
            "allowed as input to this layer'); keep the bias float, TensorRT fuses it into the int8 kernel"
        )
    if t.dtype.name.startswith("FLOAT8"):
        return f"{t.dtype.name} needs an FP8 GPU (compute capability 8.9+); Orin's Ampere GPU (8.7) runs int8"
    return f"{t.dtype.name} quantization: TensorRT on Orin runs int8 (and int4 weight-only) Q/DQ"


def _tensorrt_placement(nodes: list[ir.Node], tensors: list[_QTensor], target: Target) -> Iterator[Finding]:
    int8_consumers = frozenset(target.quant_scheme.quantized_ops) | _TENSORRT_INT8_PASSTHROUGH
    for node in nodes:
        if node.op_type in WEIGHTED_OPS:
            yield from _missing_qdq(node)
        elif node.op_type == "Add":
            yield from _residual_add(node)
    for t in tensors:
        if t.is_weight or t.node.op_type != "QuantizeLinear" or not t.consumers:
            continue
        if all(consumer.op_type not in int8_consumers for consumer, _ in t.consumers):
            ops = ", ".join(sorted({consumer.op_type for consumer, _ in t.consumers}))
            yield _finding(
                "warning", "trt-unfused-qdq", t.node,
                f"this Q/DQ pair feeds only {ops}, which TensorRT does not run in int8: the pair only adds "
                "rounding error and a reformat; remove it, or quantize where an int8 op consumes the tensor",
            )


def _missing_qdq(node: ir.Node) -> Iterator[Finding]:
    operands = [v for v in node.inputs[:2] if v is not None]
    quantized = [_from_dequantize(v) is not None for v in operands]
    if any(quantized) and not all(quantized):
        floats = ", ".join(f"'{v.name}'" for v, q in zip(operands, quantized, strict=True) if not q)
        yield _finding(
            "warning", "trt-missing-qdq", node,
            f"input {floats} has no Q/DQ, so TensorRT runs this {node.op_type} in float and the other input's "
            "Q/DQ is wasted; quantize every input of Conv/Gemm/MatMul",
        )


def _residual_add(node: ir.Node) -> Iterator[Finding]:
    operands = [v for v in node.inputs if v is not None and build_time_array(v) is None]
    if len(operands) != 2:
        return
    quantized = [_from_dequantize(v) is not None for v in operands]
    fusable = [_is_int8_weighted_output(v) for v in operands]
    if all(quantized):
        return
    if any(quantized):
        other = operands[quantized.index(False)]
        if fusable[quantized.index(False)]:
            return  # the TensorRT pattern: Conv output + quantized residual fuse into one int8 kernel
        yield _finding(
            "warning", "trt-residual-add", node,
            f"only one input of this Add is quantized; '{other.name}' stays float, so TensorRT dequantizes and "
            "adds in float; put Q/DQ on it too",
        )
    elif any(fusable):
        residual = operands[1] if fusable[0] else operands[0]
        yield _finding(
            "warning", "trt-residual-add", node,
            f"the residual input '{residual.name}' of this Add has no Q/DQ: TensorRT fuses a residual Add into the "
            f"preceding int8 {producer_op(operands[fusable.index(True)])} only when the residual input is "
            "quantized; add Q/DQ on it",
        )


def _is_int8_weighted_output(value: ir.Value) -> bool:
    producer = value.producer()
    while producer is not None and producer.op_type == "BatchNormalization":
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return (
        producer is not None
        and producer.op_type in WEIGHTED_OPS
        and _from_dequantize(producer.inputs[0]) is not None
    )


# --------------------------------------------------------------------------------------------
# TFLite


def _tflite(tensors: list[_QTensor]) -> list[Finding]:
    findings: list[Finding] = []
    for t in tensors:
        if any(i == 2 and c.op_type in WEIGHTED_OPS for c, i in t.consumers):
            findings += _tflite_bias(t)
            continue
        if t.dtype != ir.DataType.INT8:
            where = " (int32 is for Conv/FullyConnected biases only)" if t.dtype == ir.DataType.INT32 else ""
            findings.append(_finding(
                "error", "tflite-int8-only", t.node,
                f"{t.dtype.name} quantization: the TFLite int8 scheme stores activations and weights as int8{where}",
            ))
        if t.per_channel and not t.is_weight:
            findings.append(_finding(
                "error", "tflite-activation-per-channel", t.node,
                "activation quantized per channel: TFLite activations are per-tensor; use one scale and zero point",
            ))
        if t.is_weight and t.nonzero_zero_point:
            findings.append(_finding(
                "error", "tflite-weight-zero-point", t.node,
                f"weight zero point {_preview(t.zero_point)} is not 0: TFLite int8 weights are symmetric",
            ))
        findings += _weight_axis_findings(t, "tflite", warn_per_tensor=False)
    return findings


def _tflite_bias(bias: _QTensor) -> Iterator[Finding]:
    if bias.dtype != ir.DataType.INT32:
        yield _finding(
            "warning", "tflite-bias-dtype", bias.node,
            f"{bias.dtype.name} bias: TFLite int8 kernels take an int32 bias (scale = input scale x weight scale)",
        )
        return
    for consumer, index in bias.consumers:
        if index != 2 or consumer.op_type not in WEIGHTED_OPS:
            continue
        activation = _from_dequantize(consumer.inputs[0])
        weight = _from_dequantize(consumer.inputs[1])
        if activation is None or weight is None or bias.scale is None:
            continue
        if activation.scale is None or weight.scale is None:
            continue
        expected = activation.scale.reshape(-1) * weight.scale.reshape(-1)
        if bias.scale.size != expected.size and 1 not in (bias.scale.size, expected.size):
            continue  # mismatched channel counts are the axis rules' business
        if not _close(bias.scale.reshape(-1), expected):
            yield _finding(
                "warning", "tflite-bias-scale", bias.node,
                f"bias scale {_preview(bias.scale)} is not input scale x weight scale {_preview(expected)} "
                f"(relative tolerance {_RELATIVE_TOLERANCE:g}); TFLite's kernels assume it",
            )


# --------------------------------------------------------------------------------------------
# Fixed and shared output parameters from the target profile (e.g. TFLite softmax 1/256, -128)


def _op_rules(nodes: list[ir.Node], target: Target) -> Iterator[Finding]:
    scheme = target.quant_scheme
    for node in nodes:
        rule = scheme.rule_for(node.op_type)
        output = _quantized_output(node) if rule is not None else None
        if rule is None or output is None or output.scale is None:
            continue
        zero_point = _zero_point_value(output)
        if rule.output_scale is not None:
            scale_ok = _close(output.scale, np.asarray(rule.output_scale))
            zero_ok = rule.output_zero_point is None or zero_point == rule.output_zero_point
            if not (scale_ok and zero_ok):
                yield _finding(
                    "error", "fixed-output-params", node,
                    f"{target.name} runs int8 {node.op_type} only with output scale {rule.output_scale:g} and zero "
                    f"point {rule.output_zero_point}; its QuantizeLinear {_label(output.node)} has "
                    f"{_preview(output.scale)}, {zero_point}",
                )
        if rule.same_scale_as_input:
            yield from _shared_scale(node, output, target)


def _shared_scale(node: ir.Node, output: _QTensor, target: Target) -> Iterator[Finding]:
    data_inputs: Iterable[ir.Value | None] = node.inputs if node.op_type == "Concat" else node.inputs[:1]
    for value in data_inputs:
        source = _from_dequantize(value)
        if source is None or source.scale is None or output.scale is None:
            continue
        if not (
            source.scale.shape == output.scale.shape
            and _close(output.scale, source.scale)
            and _zero_point_value(source) == _zero_point_value(output)
        ):
            yield _finding(
                "error", "same-scale", node,
                f"{target.name} needs the same scale and zero point on the input and output of {node.op_type}: "
                f"input '{value.name}' has {_preview(source.scale)}, {_zero_point_value(source)}, the output "
                f"{_preview(output.scale)}, {_zero_point_value(output)}",
            )


def _zero_point_value(t: _QTensor) -> Any:
    if t.zero_point is None:
        return 0
    return int(t.zero_point.reshape(-1)[0]) if t.zero_point.size == 1 else t.zero_point.tolist()
