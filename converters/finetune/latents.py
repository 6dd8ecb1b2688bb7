"""Latent weights from the fp32 model, as PyTorch QAT starts: off the integer grid, where rounding can learn.

Read back from the stored integers, every latent weight sits at the centre of its rounding bin, half a
step from a code change, and LSQ's weight-scale gradient Σ g·(round(w/s) − w/s) is exactly 0 there
(`train.freeze_weight_grids`). The fp32 model holds the weight before it was rounded, up to what the
quantizer did to it first: cross-layer equalization rescales a layer's output channels and the next
layer's input channels. `fp32_latents` finds each quantized weight's fp32 tensor (the initializer at
the same input of the same-named node), fits one factor per output and per input channel (alternating
least squares), and clips the result into the bin of the integer that was stored. The student's
forward is unchanged bit for bit (every code stays), but each latent keeps the fp32 weight's distance
to its rounding boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from edgeopt.converters.finetune.interpreter import QuantRecord, TrainableGraph

__all__ = ["LatentReport", "fp32_latents"]

#: a fitted fp32 weight counts as the stored weight's source when it rounds to at least this share of its integers
MIN_CODES_MATCHED = 0.9
#: clipped this far (in grid steps) inside its bin, a latent rounds to its stored integer whatever float32's rounding
BIN_MARGIN = 0.01


class LatentReport(TypedDict):
    """Where the latent weights started."""

    weights: int  # weight tensors with a latent
    from_fp32: int  # started from their fp32 weight (the rest start on their grid)
    codes_matched: float  # share of those tensors' integers the fitted fp32 weight rounds to before clipping


def fp32_latents(student: TrainableGraph, qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> LatentReport:
    """Set each weight latent of `student` (made from `qdq`) from `fp32`'s weight where one is found (module docstring)."""
    import torch

    sources = _fp32_sources(qdq, fp32)
    report: LatentReport = {"weights": 0, "from_fp32": 0, "codes_matched": 0.0}
    matched = total = 0
    for record in student.quant_params():
        if record.kind != "weight" or record.latent is None or record.quantizer is None:
            continue
        report["weights"] += 1
        weight = sources.get(record.dequantize_nodes[0])
        if weight is None or weight.shape != tuple(record.latent.shape):
            continue
        with torch.no_grad():
            codes = record.quantizer.quantize(record.latent).cpu().numpy()
            scale, zero = (t.cpu().numpy().astype(np.float64) for t in record.quantizer.parameters_for(record.latent))
            fitted = _fit_channels(weight.astype(np.float64), record.latent.cpu().numpy().astype(np.float64))
            same = np.round(fitted / scale + zero) == codes
            if same.mean() < MIN_CODES_MATCHED:
                continue
            low, high = (codes - zero - 0.5 + BIN_MARGIN) * scale, (codes - zero + 0.5 - BIN_MARGIN) * scale
            record.latent.copy_(torch.from_numpy(np.clip(fitted, low, high).astype(np.float32)))
        report["from_fp32"] += 1
        matched += int(same.sum())
        total += same.size
    report["codes_matched"] = round(matched / total, 6) if total else 0.0
    return report


def _fp32_sources(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{weight DequantizeLinear of `qdq`: the fp32 initializer at the same input of the same-named node of `fp32` as
    the one it feeds} (by node, not by integer initializer: readers of a shared one may dequantize it differently)."""
    integers = {i.name for i in qdq.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in qdq.graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    fp32_nodes = {node.name: node for node in fp32.graph.node if node.name}
    fp32_weights = {i.name: i for i in fp32.graph.initializer}
    sources: dict[str, np.ndarray] = {}
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in integers or len(readers.get(node.output[0], [])) != 1:
            continue
        consumer, index = readers[node.output[0]][0]
        twin = fp32_nodes.get(consumer.name)
        if twin is None or twin.op_type != consumer.op_type or index >= len(twin.input) or twin.input[index] not in fp32_weights:
            continue
        sources[node.name] = numpy_helper.to_array(fp32_weights[twin.input[index]])
    return sources


def _fit_channels(weight: np.ndarray, target: np.ndarray, rounds: int = 10) -> np.ndarray:
    """weight · a[axis 0] · b[axis 1], the factors least-squares fitted to `target` (equalization's rescaling)."""
    if weight.ndim == 0:
        return weight
    rows = [-1] + [1] * (weight.ndim - 1)
    columns = [1, -1] + [1] * (weight.ndim - 2)
    b = np.ones(weight.shape[1]) if weight.ndim > 1 else None
    a = np.ones(weight.shape[0])
    for _ in range(rounds):
        scaled = weight if b is None else weight * b.reshape(columns)
        axes = tuple(range(1, weight.ndim))
        a = _ratio((target * scaled).sum(axes), (scaled * scaled).sum(axes))
        if b is None:
            break
        scaled = weight * a.reshape(rows)
        axes = (0, *range(2, weight.ndim))
        b = _ratio((target * scaled).sum(axes), (scaled * scaled).sum(axes))
    return weight * a.reshape(rows) * (1.0 if b is None else b.reshape(columns))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 1 where the channel is all zero."""
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 1.0)
