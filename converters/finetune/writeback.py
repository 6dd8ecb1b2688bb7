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

Only initializer values change: every node, name, shape and dtype of the graph stays as it was, with one
exception. An initializer several nodes read (a graph whose equal constants were deduplicated: yolov8n's
zero int32 bias is also its zero point) is written per reader: when every reader's value is the same it
is written in place; when training left readers with different values (the bias moved off 0, two
quantizers that shared an equal scale trained apart), the readers that keep the stored value keep the
initializer and each other value goes into a copy those readers are rewired to (`initializers_untied`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.graph.rewrite import NameScope
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
    initializers_untied: int  # shared initializers whose readers trained to different values: copies made


def write_back(qdq: onnx.ModelProto, graph: TrainableGraph) -> tuple[onnx.ModelProto, WritebackReport]:
    """A copy of `qdq` holding `graph`'s trained integers, scales and zero points (see the module docstring)."""
    import torch

    model = ir.from_proto(qdq)
    writer = _Writer(model.graph, {spec.name: spec.outputs[0] for spec in graph.nodes})
    report: WritebackReport = {
        "activations": 0, "activation_scales_changed": 0, "zero_points_changed": 0, "weights": 0, "weight_scales_changed": 0,
        "weight_values": 0, "weight_values_changed": 0, "weight_values_at_range_end": 0, "biases": 0,
        "float_tensors": 0, "float_values_changed": 0, "max_relative_scale_change": 0.0, "initializers_untied": 0,
    }
    with torch.no_grad():
        for record in graph.quant_params():
            if record.kind in ("activation", "weight") and not record.spec.fixed:
                _write_quantizer(writer, record, report)
            if record.kind == "weight":
                assert record.quantizer is not None and record.latent is not None and record.latent_initializer is not None
                codes = record.quantizer.quantize(record.latent).cpu().numpy()
                changed = writer.put(record.latent_initializer, codes, record.dequantize_nodes, 0)
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
    report["initializers_untied"] = writer.untie()
    report["max_relative_scale_change"] = round(writer.max_relative_scale_change, 6)
    return ir.to_proto(model), report


def _write_quantizer(writer: _Writer, record: QuantRecord, report: WritebackReport) -> None:
    assert record.quantizer is not None
    scale, zero_point = record.quantizer.scale_value(), record.quantizer.zero_point_value()
    scales_changed = zeros_changed = 0
    readers = tuple(name for name in (record.quantize_node, *record.dequantize_nodes) if name is not None)
    for name in record.scale_initializers:
        scales_changed = writer.put(name, scale, readers, 1, scale=True)
    for name in record.zero_point_initializers:
        zeros_changed = writer.put(name, zero_point, readers, 2)
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
    stored = writer.original(record.latent_initializer).reshape(latent.shape)
    codes = np.where(stored.astype(np.float32) * scale == latent, stored, codes)  # DequantizeLinear in float32, as training read it
    writer.put(record.latent_initializer, codes, record.dequantize_nodes, 0)
    for name in record.scale_initializers:
        writer.put(name, scale, record.dequantize_nodes, 1, scale=True)


class _Writer:
    """Collects each initializer's new value per reader (node, input index), keeping its shape and dtype;
    `untie` then writes them (module docstring)."""

    def __init__(self, graph: ir.Graph, outputs: Mapping[str, str]) -> None:
        self.graph = graph
        self.initializers = graph.initializers
        producers = {node.outputs[0].name: node for node in graph if node.outputs}
        self.nodes = {name: producers[output] for name, output in outputs.items() if output in producers}  # TrainableGraph's node names
        self.written: dict[str, dict[tuple[ir.Node, int], np.ndarray]] = {}
        self.originals: dict[str, np.ndarray] = {}  # as quantized, for the counts of what changed
        self.max_relative_scale_change = 0.0

    def original(self, name: str) -> np.ndarray:
        return self.originals.setdefault(name, self.initializers[name].const_value.numpy())

    def put(self, name: str, values: np.ndarray, nodes: Sequence[str] | None = None, index: int | None = None, *, scale: bool = False) -> int:
        """`values` (cast and shaped like the initializer) for the readers among `nodes` that read `name` at
        input `index` (every reader without `nodes`); how many elements differ from the stored ones."""
        value = self.initializers[name]
        old = self.original(name)
        new = np.asarray(values).reshape(old.shape).astype(old.dtype)
        if np.issubdtype(old.dtype, np.integer) and not np.array_equal(new, np.asarray(values).reshape(old.shape)):
            raise EdgeoptError(f"cannot write back {name!r}: trained values do not fit its {old.dtype} type")
        if nodes is None:
            readers = list(value.uses())
        else:
            readers = [(self.nodes[node], index) for node in nodes if index < len(self.nodes[node].inputs) and self.nodes[node].inputs[index] is value]
        written = self.written.setdefault(name, {})
        for reader in readers:
            earlier = written.get(reader)
            if earlier is not None and not np.array_equal(earlier, new):
                raise EdgeoptError(f"cannot write back {name!r}: input {reader[1]} of {reader[0].name!r} was given two different trained values")
            written[reader] = new
        if scale:
            relative = np.abs(new.astype(np.float64) / old.astype(np.float64) - 1.0)
            self.max_relative_scale_change = max(self.max_relative_scale_change, float(relative.max(initial=0.0)))
        return int(np.count_nonzero(new != old))

    def untie(self) -> int:
        """Write every initializer: in place when all its readers hold one value, else a copy per further
        value (the readers of the stored value, or else the first reader's, keep the name); how many copies."""
        names, copies = None, 0
        for name, written in self.written.items():
            value, original = self.initializers[name], self.original(name)
            groups: dict[bytes, tuple[np.ndarray, list[tuple[ir.Node, int]]]] = {}
            for reader in value.uses():
                array = written.get(reader, original)
                groups.setdefault(array.tobytes(), (array, []))[1].append(reader)
            kept = original.tobytes() if original.tobytes() in groups else next(iter(groups), None)
            if kept is not None:
                value.const_value = ir.tensor(groups[kept][0], name=name)
            for key, (array, readers) in groups.items():
                if key == kept:
                    continue
                names = names or NameScope(self.graph)
                fresh = names.fresh(f"{name}__{readers[0][0].name}")
                copy = ir.val(fresh, value.dtype, value.shape, const_value=ir.tensor(array, name=fresh))
                self.graph.register_initializer(copy)
                for node, index in readers:
                    node.replace_input_with(index, copy)
                copies += 1
        return copies
