"""Per-layer quantization debug: where the SQNR goes, tensor by tensor, against the fp32 model.

For every activation Q/DQ pair: the SQNR of the dequantized tensor in the QDQ model against the
same tensor in fp32 (error accumulated up to there), and the SQNR its own rounding and clipping
would cause on the fp32 values (error added by this pair alone). For every quantized layer: the
SQNR of its output and the noise it adds over its inputs, which ranks layers by sensitivity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.converters.graph.session import ort_session
from edgeopt.converters.graph.shapes import with_outputs
from edgeopt.converters.metrics import sqnr_db
from edgeopt.converters.quantize.qdq import TENSOR_TAG, qrange

__all__ = ["layer_sqnr"]

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass
class _Pair:
    fp32_name: str
    dequantized: str
    scale: float
    zero_point: int
    dtype: str
    consumers: list[str]


@dataclass
class _Power:
    signal: float = 0.0
    noise: float = 0.0
    rounding_noise: float = 0.0

    def ratio(self) -> float:
        return self.noise / self.signal if self.signal > 0 else 0.0


def _activation_pairs(qdq_model: onnx.ModelProto, fp32_names: set[str]) -> list[_Pair]:
    constants = {i.name: numpy_helper.to_array(i) for i in qdq_model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in qdq_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in qdq_model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        scale = constants.get(node.input[1])
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else np.array(0, np.uint8)
        if scale is None or zero_point is None or scale.size != 1:
            continue
        tagged = node.doc_string[len(TENSOR_TAG):] if node.doc_string.startswith(TENSOR_TAG) else node.input[0]
        for dq in consumers.get(node.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            fp32_name = tagged if tagged in fp32_names else (dq.output[0] if dq.output[0] in fp32_names else None)
            if fp32_name is None:
                continue
            readers = [c.name or c.op_type for c in consumers.get(dq.output[0], [])]
            pairs.append(_Pair(fp32_name, dq.output[0], float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]), zero_point.dtype.name, readers))
            break
    return pairs


def _quantized_layers(qdq_model: onnx.ModelProto, fp32_model: onnx.ModelProto) -> list[tuple[str, str, str, str, list[str]]]:
    """(node, op, output in fp32, output in QDQ, dequantized inputs) of every compute node fed by a DequantizeLinear."""
    producers = {o: n for n in qdq_model.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32_model.graph.node if n.name}
    layers = []
    for node in qdq_model.graph.node:
        if node.op_type in QDQ_OPS or not node.name or node.name not in fp32_nodes:
            continue
        fed = [name for name in node.input if name in producers and producers[name].op_type == "DequantizeLinear"]
        if fed:
            layers.append((node.name, node.op_type, fp32_nodes[node.name].output[0], node.output[0], fed))
    return layers


def layer_sqnr(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    dataset: Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int = 0,
) -> list[dict]:
    """Per quantized tensor and per quantized layer SQNR (dB) of the QDQ model against fp32.

    Entries are JSON-able dicts with `kind` "activation" (tensor, scale, zero_point, consumers,
    sqnr_db, quantization_sqnr_db) or "layer" (node, op, output, sqnr_db, added_noise), in graph order.
    """
    fp32_names = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    pairs = _activation_pairs(qdq_model, fp32_names)
    layers = _quantized_layers(qdq_model, float_model)
    fp32_wanted = sorted({p.fp32_name for p in pairs} | {layer[2] for layer in layers})
    qdq_wanted = sorted({p.dequantized for p in pairs} | {layer[3] for layer in layers})
    fp32_run = ort_session(with_outputs(float_model, fp32_wanted), threads=threads)
    qdq_run = ort_session(with_outputs(qdq_model, qdq_wanted), threads=threads)
    input_names = [i.name for i in fp32_run.get_inputs()]
    pair_power = [_Power() for _ in pairs]
    layer_power = [_Power() for _ in layers]
    for sample in dataset:
        feed = {name: sample[name] for name in input_names}
        reference = dict(zip(fp32_wanted, fp32_run.run(fp32_wanted, feed)))
        quantized = dict(zip(qdq_wanted, qdq_run.run(qdq_wanted, feed)))
        for pair, power in zip(pairs, pair_power):
            ref = reference[pair.fp32_name].astype(np.float64)
            qmin, qmax = qrange(pair.dtype)
            rounded = (np.clip(np.round(ref / pair.scale) + pair.zero_point, qmin, qmax) - pair.zero_point) * pair.scale
            power.signal += float(np.sum(ref * ref))
            power.noise += float(np.sum((ref - quantized[pair.dequantized]) ** 2))
            power.rounding_noise += float(np.sum((ref - rounded) ** 2))
        for layer, power in zip(layers, layer_power):
            ref = reference[layer[2]].astype(np.float64)
            power.signal += float(np.sum(ref * ref))
            power.noise += float(np.sum((ref - quantized[layer[3]]) ** 2))
    report: list[dict] = []
    input_ratio = {p.dequantized: power.ratio() for p, power in zip(pairs, pair_power)}
    for pair, power in zip(pairs, pair_power):
        report.append(
            {
                "kind": "activation",
                "tensor": pair.fp32_name,
                "scale": pair.scale,
                "zero_point": pair.zero_point,
                "consumers": pair.consumers,
                "sqnr_db": sqnr_db(power.signal, power.noise),
                "quantization_sqnr_db": sqnr_db(power.signal, power.rounding_noise),
            }
        )
    for (node, op, output, _, fed), power in zip(layers, layer_power):
        inherited = max((input_ratio.get(name, 0.0) for name in fed), default=0.0)
        report.append(
            {
                "kind": "layer",
                "node": node,
                "op": op,
                "output": output,
                "sqnr_db": sqnr_db(power.signal, power.noise),
                "added_noise": max(power.ratio() - inherited, 0.0),
            }
        )
    return report
