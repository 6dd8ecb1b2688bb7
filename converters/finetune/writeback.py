"""Write what fine-tuning learned into the very QDQ graph that was quantized: nothing is re-exported.

For each fake-quant of the `TrainableGraph` (its `quant_params()` records name the ONNX initializers):

- activations: the trained scale and zero point go into the initializers the QuantizeLinear and its
  DequantizeLinears read (the same values in each);
- weights: the integers are the trained quantizer's own codes of the latent weight,
  clamp(round(w / s) + z, qmin, qmax) in float32 with round half to even (torch.round, as ONNX
  Runtime's QuantizeLinear), so the graph holds exactly the integers training computed with;
  the scale (per channel on the DequantizeLinear's axis) and zero point as above;
- int32 biases: scale re-derived as s_in · s_w from the trained input and weight scales (float32),
  integers round(b / scale) clipped to ±(2³¹ − 1) (a stored integer that still dequantizes to b
  exactly stays), zero point 0 as the quantizer writes them;
- float initializers that trained outside any quantizer (`TrainableGraph.float_parameters()`: layers
  left float, float biases, LayerNorm scales): their trained values, in the initializer's dtype.

Only initializer values change: every node, name, shape and dtype of the graph stays as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.runtime.errors import EdgeoptError

if TYPE_CHECKING:
    from edgeopt.converters.finetune.interpreter import QuantRecord, TrainableGraph

__all__ = ["WritebackReport", "write_back"]

INT32_MAX = 2**31 - 1


class WritebackReport(TypedDict):
    """What the write-back changed, against the graph as it was quantized."""

    activations: int  # activation quantizers written (scale and zero point)
    activation_scales_changed: int
    zero_points_changed: int
    weights: int  # weight tensors written
    weight_scales_changed: int  # per-channel scale values that differ
    weight_values: int  # integers in them
    weight_values_changed: int
    weight_values_at_range_end: int  # integers at qmin or qmax (clamped, or exactly there)
    biases: int  # int32 biases re-derived
    float_tensors: int  # float initializers written (trained outside any quantizer)
    float_values_changed: int
    max_relative_scale_change: float


def write_back(qdq: onnx.ModelProto, graph: TrainableGraph) -> tuple[onnx.ModelProto, WritebackReport]:
    """A copy of `qdq` holding `graph`'s trained integers, scales and zero points (see the module docstring)."""
    import torch

    model = ir.from_proto(qdq)
    writer = _Writer(model.graph.initializers)
    report: WritebackReport = {
        "activations": 0, "activation_scales_changed": 0, "zero_points_changed": 0, "weights": 0, "weight_scales_changed": 0,
        "weight_values": 0, "weight_values_changed": 0, "weight_values_at_range_end": 0, "biases": 0,
        "float_tensors": 0, "float_values_changed": 0, "max_relative_scale_change": 0.0,
    }
    with torch.no_grad():
        for record in graph.quant_params():
            if record.kind in ("activation", "weight") and not record.spec.fixed:
                _write_quantizer(writer, record, report)
            if record.kind == "weight":
                assert record.quantizer is not None and record.latent is not None and record.latent_initializer is not None
                codes = record.quantizer.quantize(record.latent).cpu().numpy()
                changed = writer.put(record.latent_initializer, codes)
                report["weights"] += 1
                report["weight_values"] += codes.size
                report["weight_values_changed"] += changed
                report["weight_values_at_range_end"] += int(np.count_nonzero((codes == record.spec.qmin) | (codes == record.spec.qmax)))
            elif record.kind == "bias":
                _write_bias(writer, record, graph)
                report["biases"] += 1
        for name, parameter in graph.float_parameters().items():
            report["float_values_changed"] += writer.put(name, parameter.detach().cpu().numpy())
            report["float_tensors"] += 1
    report["max_relative_scale_change"] = round(writer.max_relative_scale_change, 6)
    return ir.to_proto(model), report


def _write_quantizer(writer: _Writer, record: QuantRecord, report: WritebackReport) -> None:
    assert record.quantizer is not None
    scale, zero_point = record.quantizer.scale_value(), record.quantizer.zero_point_value()
    scales_changed = zeros_changed = 0
    for name in record.scale_initializers:
        scales_changed = writer.put(name, scale, scale=True)
    for name in record.zero_point_initializers:
        zeros_changed = writer.put(name, zero_point)
    if record.kind == "activation":
        report["activations"] += 1
        report["activation_scales_changed"] += scales_changed
    else:
        report["weight_scales_changed"] += scales_changed
    report["zero_points_changed"] += zeros_changed


def _write_bias(writer: _Writer, record: QuantRecord, graph: TrainableGraph) -> None:
    """round(b / s), except where the stored integer still dequantizes to the latent b exactly: it stays.
    Above 2²⁴ a float32 latent stands for several integers (PP-OCR rec's dead channels, whose scales
    are subnormal, hold int32 biases near ±2³¹), and an untrained bias must ship bit for bit."""
    assert record.latent is not None and record.latent_initializer is not None
    latent = record.latent.detach().cpu().numpy()
    scale = np.broadcast_to(graph.bias_scale(record).reshape(-1), latent.shape).astype(np.float32)
    codes = np.clip(np.round(latent.astype(np.float64) / scale.astype(np.float64)), -INT32_MAX, INT32_MAX)
    stored = writer.initializers[record.latent_initializer].const_value.numpy().reshape(latent.shape)
    codes = np.where(stored.astype(np.float32) * scale == latent, stored, codes)  # DequantizeLinear in float32, as training read it
    writer.put(record.latent_initializer, codes)
    for name in record.scale_initializers:
        writer.put(name, scale, scale=True)


class _Writer:
    """Replaces initializer values in place, keeping each one's name, shape and dtype."""

    def __init__(self, initializers: dict[str, ir.Value]) -> None:
        self.initializers = initializers
        self.written: dict[str, np.ndarray] = {}
        self.originals: dict[str, np.ndarray] = {}  # as quantized, for the counts of what changed
        self.max_relative_scale_change = 0.0

    def put(self, name: str, values: np.ndarray, *, scale: bool = False) -> int:
        """Write `values` (cast and shaped like the initializer); how many elements changed."""
        value = self.initializers[name]
        old = self.originals.setdefault(name, value.const_value.numpy())
        new = np.asarray(values).reshape(old.shape).astype(old.dtype)
        if np.issubdtype(old.dtype, np.integer) and not np.array_equal(new, np.asarray(values).reshape(old.shape)):
            raise EdgeoptError(f"cannot write back {name!r}: trained values do not fit its {old.dtype} type")
        earlier = self.written.get(name)
        if earlier is not None and not np.array_equal(earlier, new):
            raise EdgeoptError(
                f"cannot write back {name!r}: quantizers that share it trained to different values",
                hint="give each QuantizeLinear/DequantizeLinear pair its own scale and zero-point initializers",
            )
        self.written[name] = new
        value.const_value = ir.tensor(new, name=name)
        if scale:
            relative = np.abs(new.astype(np.float64) / old.astype(np.float64) - 1.0)
            self.max_relative_scale_change = max(self.max_relative_scale_change, float(relative.max(initial=0.0)))
        return int(np.count_nonzero(new != old))
