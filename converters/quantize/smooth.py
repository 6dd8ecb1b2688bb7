"""SmoothQuant (Xiao et al., ICML 2023): per-channel outliers of MatMul/Gemm inputs moved into the weights.

A transformer's activations have a few channels tens of times larger than the rest; one per-tensor
int8 grid sized for them leaves the other channels a handful of levels. For a MatMul ``X @ W`` with a
constant ``W``, ``(X / s) @ (s * W)`` is the same product; with ``s_j = max|X_j|^α / max|W_j|^(1-α)``
the activation's channels even out and the weight rows (quantized per output channel) absorb them.

The division by ``s`` is folded where it costs nothing: into the LayerNormalization that makes ``X``
(its scale and bias), or into the MatMul/Gemm (+ bias) that makes it (its output columns). Consumers
of ``X`` that are not smoothed get a ``Mul`` by ``s`` that restores it, and when nothing can absorb the
division a ``Mul`` by ``1/s`` is inserted; each added op is reported. All MatMul/Gemm reading the same
``X`` (an attention block's Q, K and V) share one ``s``, computed over their concatenated weights.

α is chosen per group by measured error: int8 quantization of ``X / s`` (per tensor, as the target's
scheme says) and of ``s * W`` (per channel or per tensor) is simulated in numpy on calibration rows, and
the α with the smallest output error wins; α = 0 leaves the group as it is.
"""

from __future__ import annotations

__all__ = ["SmoothQuantOptions", "SmoothQuantPass", "SmoothQuantReport", "SmoothedGroup", "smooth_quant"]

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.data import Dataset
from edgeopt.converters.graph.rewrite import NameScope, add_initializer, constant_array
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.passes.base import GraphPass
from edgeopt.targets import QuantScheme

log = logging.getLogger(__name__)

#: Smoothing factors are kept within these bounds: a dead channel (max |X_j| = 0) must not zero a weight row.
SCALE_BOUNDS = (1e-4, 1e4)


@dataclass(frozen=True)
class SmoothQuantOptions:
    """`alphas`: the migration strengths tried per group (0 = leave it). `samples`: calibration samples
    run to measure activations. `rows`: activation rows (tokens) the error simulation uses per group.
    `min_outlier_ratio`: a group is tried only when its input's largest channel absmax is at least this
    many times the median one. `min_error_reduction`: relative error drop an α must bring over
    leaving the group, else α = 0 (less is noise on the calibration rows)."""

    alphas: tuple[float, ...] = (0.0, 0.3, 0.5, 0.65, 0.8)
    samples: int = 32
    rows: int = 4096
    min_outlier_ratio: float = 4.0
    min_error_reduction: float = 0.1
    seed: int = 0


class SmoothedGroup(TypedDict):
    activation: str
    layers: list[str]
    alpha: float
    outlier_ratio_before: float
    outlier_ratio_after: float
    error_before: float  # simulated int8 output error of the group's layers, ||Y - Yq||^2 / ||Y||^2
    error_after: float
    errors_by_alpha: dict[str, float]
    folded_into: str
    added_ops: int


class SmoothQuantReport(TypedDict):
    changed: bool
    alphas: list[float]
    samples: int
    groups: list[SmoothedGroup]
    skipped: list[dict[str, str]]
    added_ops: int


@dataclass
class _Group:
    """MatMul/Gemm nodes with a constant weight that read the same activation."""

    activation: ir.Value
    nodes: list[ir.Node] = field(default_factory=list)

    def weights(self) -> list[np.ndarray]:
        """Each weight as [in, out] (a Gemm's transB undone)."""
        return [_weight_in_out(node) for node in self.nodes]


def _weight_in_out(node: ir.Node) -> np.ndarray:
    weight = constant_array(node.inputs[1])
    assert weight is not None
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return (weight.T if transposed else weight).astype(np.float64)


def _smoothable(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or node.inputs[0] is None or constant_array(node.inputs[0]) is not None:
        return False
    return node.op_type == "MatMul" or node.attributes.get_int("transA", 0) == 0


def find_groups(graph: ir.Graph) -> list[_Group]:
    """The smoothing groups, in graph order: one per activation read by MatMul/Gemm with constant weights."""
    groups: dict[int, _Group] = {}
    for node in graph:
        if _smoothable(node):
            activation = node.inputs[0]
            groups.setdefault(id(activation), _Group(activation)).nodes.append(node)
    return [g for g in groups.values() if len({w.shape[0] for w in g.weights()}) == 1]


def _outlier_ratio(channel_absmax: np.ndarray) -> float:
    median = float(np.median(channel_absmax))
    return float(channel_absmax.max() / median) if median > 0 else float("inf")


def _fake_quant(x: np.ndarray, low: np.ndarray, high: np.ndarray, levels: int, symmetric: bool) -> np.ndarray:
    """x on the grid of `levels` steps spanning [low, high] (broadcast per channel or per tensor),
    dequantized; symmetric grids are [-qmax, qmax] with qmax = levels / 2 - 1 (127 for int8)."""
    if symmetric:
        qmax = levels // 2 - 1
        scale = np.maximum(np.maximum(np.abs(low), np.abs(high)), 1e-12) / qmax
        return np.clip(np.round(x / scale), -qmax, qmax) * scale
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    scale = np.maximum(high - low, 1e-12) / (levels - 1)
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, levels - 1) - zero) * scale


def simulated_error(rows: np.ndarray, low: np.ndarray, high: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray, scheme: QuantScheme) -> float:
    """Relative output error ||XW - q(X/s) q(sW)||^2 / ||XW||^2 over the group's weights.

    The activation grid is the per-tensor min-max of X / s over all calibration rows (`low`, `high`
    per channel), as the quantizer's min-max observer would set it.
    """
    x_low, x_high = np.min(low / s), np.max(high / s)
    quantized_x = _fake_quant(rows / s, x_low, x_high, 256, scheme.activation_symmetric)
    weight_levels = 2 ** min(8, scheme.pairwise_weight_bits)
    noise = signal = 0.0
    for weight in weights:
        scaled = weight * s[:, None]
        axis = 0 if scheme.weight_per_channel else None
        w_low, w_high = scaled.min(axis=axis, keepdims=True), scaled.max(axis=axis, keepdims=True)
        reference = rows @ weight
        noise += float(np.sum((reference - quantized_x @ _fake_quant(scaled, w_low, w_high, weight_levels, scheme.weight_symmetric)) ** 2))
        signal += float(np.sum(reference**2))
    return noise / max(signal, 1e-30)


def smoothing_scale(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    if alpha == 0.0:
        return np.ones_like(x_absmax)
    s = np.power(np.maximum(x_absmax, 1e-12), alpha) / np.power(np.maximum(w_absmax, 1e-12), 1.0 - alpha)
    s = np.where((x_absmax > 0) & (w_absmax > 0), s, 1.0)
    return np.clip(s, *SCALE_BOUNDS)


@dataclass
class _Statistics:
    """Per channel min, max and absmax of an activation over the calibration samples, and some of its rows."""

    low: np.ndarray
    high: np.ndarray
    rows: np.ndarray

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


def collect_statistics(model: onnx.ModelProto, dataset: Dataset, names: Sequence[str], options: SmoothQuantOptions) -> dict[str, _Statistics]:
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for outputs in run_model(model, dataset.take(options.samples), list(names)):
        for name in names:
            value = outputs[name]
            rows[name].append(value.reshape(-1, value.shape[-1]).astype(np.float64))
    rng = np.random.default_rng(options.seed)
    statistics = {}
    for name, chunks in rows.items():
        every = np.concatenate(chunks)
        kept = every if len(every) <= options.rows else every[rng.choice(len(every), options.rows, replace=False)]
        statistics[name] = _Statistics(every.min(axis=0), every.max(axis=0), kept)
    return statistics


class SmoothQuantPass(GraphPass):
    """Apply chosen smoothing factors: scale weight rows by `s` and fold `1 / s` into the activation's producer.

    `scales` maps an activation name to its factors (one per input channel of the MatMul/Gemm that
    read it); `folds` records, per activation, where the division went and how many ops it added.
    """

    def __init__(self, scales: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.scales = dict(scales)
        self.folds: dict[str, tuple[str, int]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(graph)
        used_before = [value for value in graph.initializers.values() if value.uses()]
        for group in find_groups(graph):
            s = self.scales.get(group.activation.name or "")
            if s is None:
                continue
            for node in group.nodes:
                _scale_weight_rows(graph, names, node, s)
            self.folds[group.activation.name or ""] = _fold_division(graph, names, group, s)
        _drop_unused_initializers(graph, used_before)
        return ir.passes.PassResult(model, modified=bool(self.folds))


def _drop_unused_initializers(graph: ir.Graph, values: Sequence[ir.Value]) -> None:
    """Remove the initializers the rewrite left unread (a weight shared with another node stays)."""
    for value in values:
        if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]


def _scale_weight_rows(graph: ir.Graph, names: NameScope, node: ir.Node, s: np.ndarray) -> None:
    weight = constant_array(node.inputs[1])
    assert weight is not None
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    scaled = weight * (s[None, :] if transposed else s[:, None])
    node.replace_input_with(1, add_initializer(graph, names, f"{node.inputs[1].name or 'weight'}__smooth", scaled.astype(weight.dtype)))


def _fold_division(graph: ir.Graph, names: NameScope, group: _Group, s: np.ndarray) -> tuple[str, int]:
    """Divide the activation by `s` for the group's nodes; returns (where, ops added)."""
    activation = group.activation
    smoothed = {id(node) for node in group.nodes}
    others = [use for use in activation.uses() if id(use.node) not in smoothed]
    producer = activation.producer()
    if producer is not None and producer.op_type == "LayerNormalization" and not activation.is_graph_output() and _fold_into_layernorm(graph, names, producer, s):
        where = f"LayerNormalization {producer.name}"
        if len(others) == 1 and (carried := _carry_through_residual(graph, names, others[0].node, others[0].idx, s)) is not None:
            return f"{where} (+ residual {carried} carried smoothed, Mul restoring its sum)", 1
        if others:
            _insert_mul(graph, names, activation, s, [(use.node, use.idx) for use in others], "restore")
            return f"{where} (+ Mul restoring it for {len(others)} other consumer(s))", 1
        return where, 0
    if not others and not activation.is_graph_output() and producer is not None:
        fold = _linear_fold(producer, s)
        if fold is not None:
            return fold(graph, names), 0
    _insert_mul(graph, names, activation, 1.0 / s, [(node, 0) for node in group.nodes], "smooth")
    return "Mul (new op: nothing before the activation could absorb the division)", 1


def _carry_through_residual(graph: ir.Graph, names: NameScope, add: ir.Node, slot: int, s: np.ndarray) -> str | None:
    """Post-LN transformers add the norm's output to the next sublayer's projection: divide that
    projection's output columns by `s` too, so the residual Add sums smoothed channels (one int8 grid
    without the outliers), and restore the sum with a Mul by `s` before what reads it (a LayerNorm)."""
    if add.op_type != "Add" or slot not in (0, 1) or len(add.inputs) != 2:
        return None
    partner, total = add.inputs[1 - slot], add.outputs[0]
    if partner is None or partner is add.inputs[slot] or partner.is_graph_output() or total.is_graph_output():
        return None
    if any(u.node is not add for u in partner.uses()) or partner.producer() is None:
        return None
    fold = _linear_fold(partner.producer(), s)
    if fold is None:
        return None
    fold(graph, names)
    _insert_mul(graph, names, total, s, [(u.node, u.idx) for u in total.uses()], "restore")
    return f"Add {add.name}"


def _fold_into_layernorm(graph: ir.Graph, names: NameScope, norm: ir.Node, s: np.ndarray) -> bool:
    scale = constant_array(norm.inputs[1]) if len(norm.inputs) > 1 else None
    bias_value = norm.inputs[2] if len(norm.inputs) > 2 else None
    bias = constant_array(bias_value) if bias_value is not None else None
    rank = len(norm.inputs[0].shape) if norm.inputs[0] is not None and norm.inputs[0].shape is not None else None
    axis = norm.attributes.get_int("axis", -1)
    if scale is None or (bias_value is not None and bias is None) or axis not in (-1, None if rank is None else rank - 1):
        return False
    if scale.shape not in ((s.size,), (1, s.size)) or (bias is not None and bias.shape != scale.shape):
        return False
    base = norm.inputs[1].name or "norm"
    norm.replace_input_with(1, add_initializer(graph, names, f"{base}__smooth", (scale / s.reshape(scale.shape)).astype(scale.dtype)))
    if bias is not None:
        norm.replace_input_with(2, add_initializer(graph, names, f"{bias_value.name or base}__smooth", (bias / s.reshape(bias.shape)).astype(bias.dtype)))
    return True


def _linear_fold(producer: ir.Node, s: np.ndarray) -> Callable[[ir.Graph, NameScope], str] | None:
    """How to divide the output columns (and bias) of the MatMul, MatMul + Add or Gemm `producer` by
    `s`, or None when it cannot absorb them. The returned function rewrites and says where."""
    bias_slot = None
    if producer.op_type == "Add":
        for matmul_slot, bias_slot in ((0, 1), (1, 0)):
            made = producer.inputs[matmul_slot]
            matmul = made.producer() if made is not None else None
            if matmul is not None and matmul.op_type == "MatMul" and all(use.node is producer for use in made.uses()) and not made.is_graph_output():
                break
        else:
            return None
        bias_owner, linear = producer, matmul
    elif producer.op_type in ("MatMul", "Gemm"):
        bias_owner, linear = producer, producer
        bias_slot = 2 if producer.op_type == "Gemm" and len(producer.inputs) > 2 and producer.inputs[2] is not None else None
    else:
        return None
    weight = constant_array(linear.inputs[1]) if len(linear.inputs) > 1 else None
    if weight is None or weight.ndim != 2 or (linear.op_type == "Gemm" and linear.attributes.get_int("transA", 0)):
        return None
    transposed = linear.op_type == "Gemm" and linear.attributes.get_int("transB", 0)
    if (weight.shape[0] if transposed else weight.shape[1]) != s.size:
        return None
    bias = constant_array(bias_owner.inputs[bias_slot]) if bias_slot is not None else None
    if bias_slot is not None and (bias is None or bias.shape[-1:] not in ((1,), (s.size,))):
        return None

    def fold(graph: ir.Graph, names: NameScope) -> str:
        new_weight = weight / (s[:, None] if transposed else s[None, :])
        base = linear.inputs[1].name or "weight"
        linear.replace_input_with(1, add_initializer(graph, names, f"{base}__smooth", new_weight.astype(weight.dtype)))
        if bias is not None and bias_slot is not None:
            new_bias = (np.broadcast_to(bias, bias.shape[:-1] + (s.size,)) / s).astype(bias.dtype)
            bias_owner.replace_input_with(bias_slot, add_initializer(graph, names, f"{bias_owner.inputs[bias_slot].name or base}__smooth", new_bias))
        what = f"{linear.op_type} + Add" if bias_owner is not linear else linear.op_type
        return f"{what} {linear.name} (output columns)"

    return fold


def _insert_mul(graph: ir.Graph, names: NameScope, activation: ir.Value, factor: np.ndarray, uses: Sequence[tuple[ir.Node, int]], role: str) -> None:
    base = activation.name or "activation"
    constant = add_initializer(graph, names, f"{base}__{role}_factor", factor.astype(np.float32))
    output = ir.Value(name=names.fresh(f"{base}__{role}"), shape=activation.shape, type=activation.type)
    mul = ir.Node("", "Mul", [activation, constant], outputs=[output], name=names.fresh(f"{base}__{role}_mul"))
    producer = activation.producer()
    if producer is not None:
        graph.insert_after(producer, mul)
    else:
        graph.insert_before(next(iter(graph)), mul)
    for node, index in uses:
        node.replace_input_with(index, output)


def smooth_quant(
    model: onnx.ModelProto,
    dataset: Dataset,
    scheme: QuantScheme,
    options: SmoothQuantOptions = SmoothQuantOptions(),
) -> tuple[onnx.ModelProto, SmoothQuantReport]:
    """The fp32 model with activation outliers migrated into MatMul/Gemm weights where int8 error drops.

    The argument is not changed; the model returned is equal to it in fp32 up to float rounding.
    """
    report = SmoothQuantReport(changed=False, alphas=list(options.alphas), samples=min(options.samples, len(dataset)), groups=[], skipped=[], added_ops=0)
    groups = find_groups(ir.from_proto(model).graph)
    if not groups:
        return model, report
    statistics = collect_statistics(model, dataset, [g.activation.name or "" for g in groups], options)
    scales: dict[str, np.ndarray] = {}
    chosen: dict[str, SmoothedGroup] = {}
    for group in groups:
        name = group.activation.name or ""
        stats = statistics[name]
        layers = [node.name or node.op_type for node in group.nodes]
        ratio = _outlier_ratio(stats.absmax)
        if ratio < options.min_outlier_ratio:
            report["skipped"].append({"activation": name, "why": f"no outlier channels (max/median channel absmax {ratio:.1f} < {options.min_outlier_ratio})"})
            continue
        weights = group.weights()
        w_absmax = np.max(np.abs(np.concatenate(weights, axis=1)), axis=1)
        errors = {alpha: simulated_error(stats.rows, stats.low, stats.high, weights, smoothing_scale(stats.absmax, w_absmax, alpha), scheme) for alpha in options.alphas}
        untouched = errors.get(0.0, simulated_error(stats.rows, stats.low, stats.high, weights, np.ones_like(w_absmax), scheme))
        alpha = min(errors, key=lambda a: errors[a])
        if alpha == 0.0 or errors[alpha] > (1.0 - options.min_error_reduction) * untouched:
            report["skipped"].append({"activation": name, "why": f"smoothing does not lower the simulated int8 error (best α {alpha}: {errors[alpha]:.3g} vs {untouched:.3g})"})
            continue
        s = smoothing_scale(stats.absmax, w_absmax, alpha)
        scales[name] = s
        chosen[name] = SmoothedGroup(
            activation=name,
            layers=layers,
            alpha=alpha,
            outlier_ratio_before=round(ratio, 2),
            outlier_ratio_after=round(_outlier_ratio(stats.absmax / s), 2),
            error_before=untouched,
            error_after=errors[alpha],
            errors_by_alpha={str(a): e for a, e in errors.items()},
            folded_into="",
            added_ops=0,
        )
    if not scales:
        return model, report
    ir_model = ir.from_proto(model)
    smoothing = SmoothQuantPass(scales)
    ir_model = smoothing(ir_model).model
    for name, (where, added) in smoothing.folds.items():
        chosen[name]["folded_into"] = where
        chosen[name]["added_ops"] = added
        log.info("smoothquant: %s α=%s folded into %s", name, chosen[name]["alpha"], where)
    report["groups"] = list(chosen.values())
    report["added_ops"] = sum(g["added_ops"] for g in chosen.values())
    report["changed"] = True
    return ir.to_proto(ir_model), report
