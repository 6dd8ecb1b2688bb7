"""Where int8 quantization will likely lose accuracy, read from the float (or QDQ) model before any calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.analysis.stats import node_label
from edgeopt.converters.graph.qdq import (
    QDQ_OPS,
    WEIGHTED_OPS,
    build_time_array,
    dequantize,
    int_attribute,
    output_channel_axis,
    qparams,
)
from edgeopt.targets import Target

__all__ = ["MIN_CHANNEL_LEVELS", "MIN_OUTLIER_SAMPLE", "OUTLIER_RATIO", "Advice", "quantization_advice"]


@dataclass(frozen=True)
class Advice:
    """One place where int8 quantization is likely to lose accuracy, and what to do about it."""

    rule: str
    node: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# A weight channel whose max |w| exceeds this many (robust) standard deviations leaves the bulk of
# its values (within ±1σ) fewer than 127/16 ≈ 8 int8 levels under a max-calibrated scale.
OUTLIER_RATIO = 16.0
# Fewest weights per channel for the outlier statistic to mean something.
MIN_OUTLIER_SAMPLE = 32
_MAD_SAMPLE = 128
# Per-tensor int8 on a depthwise conv: flag when some channel would use fewer levels than this.
MIN_CHANNEL_LEVELS = 16
_SILU_RANGES = {"SiLU/Swish": -0.2785, "HardSwish": -0.375}


def quantization_advice(model: onnx.ModelProto, target: Target | None = None) -> list[Advice]:
    """Where int8 will likely hurt: per-tensor depthwise weights, SiLU/Swish/HardSwish activations
    under a symmetric scheme, and weights with outliers. A QDQ model is already calibrated, so for
    it only the structure of its existing quantization is judged."""
    graph = ir.from_proto(model).graph
    if any(node.op_type in QDQ_OPS for node in graph.all_nodes()):
        return _per_tensor_depthwise_in_qdq(graph)
    advice: list[Advice] = []
    advice += _depthwise_spread(graph, target)
    advice += _swish_activations(graph, target)
    advice += _weight_outliers(graph, target)
    return advice


def _weight(node: ir.Node) -> np.ndarray | None:
    return build_time_array(node.inputs[1]) if len(node.inputs) > 1 else None


def _is_depthwise(node: ir.Node, weight: np.ndarray) -> bool:
    group = int_attribute(node, "group", 1)
    return node.op_type == "Conv" and group > 1 and weight.ndim >= 3 and weight.shape[1] == 1


def _worst_channel_levels(weight: np.ndarray) -> tuple[int, float]:
    """(channel, int8 levels it gets) for the channel that fares worst under one per-tensor scale."""
    channel_max = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    overall = float(channel_max.max())
    channel = int(np.argmin(channel_max))
    levels = 127.0 * float(channel_max[channel]) / overall if overall > 0 else 127.0
    return channel, levels


def _depthwise_spread(graph: ir.Graph, target: Target | None) -> list[Advice]:
    if target is not None and target.quant_scheme.weight_per_channel:
        return []  # the target's scheme already quantizes weights per channel
    advice = []
    for index, node in enumerate(graph):
        weight = _weight(node)
        if weight is None or not np.issubdtype(weight.dtype, np.floating) or not _is_depthwise(node, weight):
            continue
        channel, levels = _worst_channel_levels(weight.astype(np.float32))
        if levels < MIN_CHANNEL_LEVELS:
            advice.append(
                Advice(
                    "depthwise-per-channel",
                    node_label(node, index),
                    f"depthwise conv weights differ widely between channels: with one per-tensor int8 scale, "
                    f"channel {channel} would use only {levels:.1f} of 127 levels; quantize these weights per channel",
                )
            )
    return advice


def _per_tensor_depthwise_in_qdq(graph: ir.Graph) -> list[Advice]:
    advice = []
    for index, node in enumerate(graph):
        if node.op_type != "Conv" or len(node.inputs) < 2:
            continue
        dq = node.inputs[1].producer() if node.inputs[1] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        quantized, params = build_time_array(dq.inputs[0]), qparams(dq)
        if quantized is None or params.scale is None or params.scale.size != 1 or not _is_depthwise(node, quantized):
            continue
        channel, levels = _worst_channel_levels(dequantize(quantized, params.scale, params.zero_point, params.axis).astype(np.float32))
        advice.append(
            Advice(
                "depthwise-per-tensor",
                node_label(node, index),
                f"depthwise conv weights share one per-tensor scale ({dq.name or dq.outputs[0].name}); "
                f"channel {channel} uses {levels:.1f} of 127 levels. Re-quantize them per channel (axis 0)",
            )
        )
    return advice


def _swish_activations(graph: ir.Graph, target: Target | None) -> list[Advice]:
    symmetric = target is None or target.quant_scheme.activation_symmetric
    if not symmetric:
        return []  # an asymmetric zero point covers the skewed range without wasting levels
    where = f"{target.name}'s symmetric int8 activations" if target else "a symmetric int8 scheme (e.g. TensorRT)"
    advice = []
    for index, node in enumerate(graph):
        kind = None
        if node.op_type in ("HardSwish", "Swish"):
            kind = "HardSwish" if node.op_type == "HardSwish" else "SiLU/Swish"
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            for this, other in (node.inputs, node.inputs[::-1]):
                sigmoid = this.producer() if this is not None else None
                if sigmoid is not None and sigmoid.op_type == "Sigmoid" and sigmoid.inputs[0] is other:
                    kind = "SiLU/Swish"
        if kind is None:
            continue
        advice.append(
            Advice(
                "swish-before-int8",
                node_label(node, index),
                f"{kind} output lies in [{_SILU_RANGES[kind]}, +inf): under {where} (zero point 0) the negative "
                "half of the int8 range is spent on that small tail, leaving about 7 bits for the rest; "
                "keep the next layer's input in float, calibrate with percentile/MSE, or fine-tune with QAT",
            )
        )
    return advice


def _weight_outliers(graph: ir.Graph, target: Target | None) -> list[Advice]:
    per_channel = target is None or target.quant_scheme.weight_per_channel
    advice = []
    for index, node in enumerate(graph):
        if node.op_type not in WEIGHTED_OPS:
            continue
        weight = _weight(node)
        if weight is None or not np.issubdtype(weight.dtype, np.floating):
            continue
        channels = _output_channels(node, weight.astype(np.float32)) if per_channel else weight.reshape(1, -1)
        if channels.shape[1] < MIN_OUTLIER_SAMPLE:
            continue  # a median over a handful of values (e.g. a 3x3 depthwise filter) says nothing
        # A robust sigma (1.4826 x median absolute deviation): the outliers themselves must not inflate it,
        # and a plain std can never exceed max/sqrt(n) in a small channel. The medians come from an
        # evenly strided sample of each channel (at most _MAD_SAMPLE values); the peak from all of it.
        sample = channels[:, :: max(1, channels.shape[1] // _MAD_SAMPLE)]
        center = np.median(sample, axis=1, keepdims=True)
        sigma = 1.4826 * np.median(np.abs(sample - center), axis=1)
        peak = np.abs(channels - center).max(axis=1)
        ratio = np.divide(peak, sigma, out=np.zeros_like(peak), where=sigma > 0)
        worst = int(np.argmax(ratio))
        if ratio[worst] > OUTLIER_RATIO:
            where = f"output channel {worst}" if per_channel else "the tensor"
            advice.append(
                Advice(
                    "weight-outliers",
                    node_label(node, index),
                    f"in {where} of '{node.inputs[1].name}' max |w| is {ratio[worst]:.0f}x the typical spread (robust sigma): "
                    f"a max-based int8 scale leaves the bulk of the weights about {127 / ratio[worst]:.0f} levels; "
                    "clip the weights (percentile/MSE calibration) or keep this layer in float",
                )
            )
    return advice


def _output_channels(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as [output channels, everything else], following each op's weight layout."""
    axis = output_channel_axis(node, 1, weight.ndim)
    assert axis is not None, f"{node.op_type} has no weight layout"
    return np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
