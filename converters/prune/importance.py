"""How much each channel matters: filter norms, the BatchNorm scale read before simplify folds it, or
first-order Taylor on calibration data (`taylor.py`, needs torch).

Scores are per atom (one output channel of one layer), divided by their layer's mean so that layers
of different weight scales can be compared (as Torch-Pruning's "mean" normalizer does); a unit (a
channel with every copy tied to it) scores the sum of its atoms.

Why the BatchNorm scale is read from the model *before* simplify: simplify folds each BatchNorm into
the Conv before it (the graph that is pruned and shipped has none), and after folding the filter
carries gamma / sqrt(var + eps) mixed into its norm. `batchnorm_scales` reads |gamma| per layer from
the unfolded model, keyed by the layer's node name, which folding keeps. A layer with no BatchNorm
after it is ranked by its L2 norm instead, and the report says how many were.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.graph.qdq import build_time_array
from edgeopt.converters.prune.groups import Analysis
from edgeopt.runtime.kinds import PruneCriterion, unreachable

__all__ = ["atom_scores", "batchnorm_scales", "layer_taylor_scores", "resolve_criterion"]


def resolve_criterion(criterion: PruneCriterion, *, has_data: bool) -> PruneCriterion:
    """`auto` made concrete: taylor when calibration data is given and torch is installed, else l2.

    Taylor measures what the next layers do with a channel, and on the bench it keeps more than the
    filter norm wherever data exists (ppocr_cls at 0.4 before recovery: 0.77 against 0.63 top-1
    agreement; MobileNetV2 at 0.6 after recovery: 98.0% against 92.4%, bench/results/prune_vs_torch_pruning.md);
    without data or torch the filter's L2 norm is what remains. Other criteria pass through."""
    if criterion is not PruneCriterion.AUTO:
        return criterion
    if has_data and importlib.util.find_spec("torch") is not None:
        return PruneCriterion.TAYLOR
    return PruneCriterion.L2

_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: layers whose output channels are on axis 1 (NCHW); the others' are on the last axis
_CHANNELS_FIRST = frozenset({"Conv", "ConvTranspose"})


def batchnorm_scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """|gamma| of each BatchNormalization that directly follows a layer, by that layer's node name."""
    graph = ir.from_proto(model).graph
    scales: dict[str, np.ndarray] = {}
    for node in graph:
        if node.op_type != "BatchNormalization" or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        if producer is not None and producer.op_type == "Add" and producer.inputs[0] is not None:
            producer = producer.inputs[0].producer()  # MatMul + bias Add, as the fold sees it
        gamma = build_time_array(node.inputs[1])
        if producer is not None and producer.op_type in _LAYERS and producer.name and gamma is not None:
            scales[producer.name] = np.abs(gamma.astype(np.float64))
    return scales


def atom_scores(analysis: Analysis, criterion: PruneCriterion, measured: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """A score per atom (PINNED's is 0), and how many layers fell back to L2 for want of a measured score.

    measured: scores by layer name for the criteria that are not read off the weights (bn-scale:
    `batchnorm_scales`; taylor: `layer_taylor_scores`).
    """
    scores = np.zeros(len(analysis.parent))
    fallbacks = 0
    for source in analysis.sources:
        match criterion:
            case PruneCriterion.L1:
                raw = _filter_norms(source.node, source.weight_axis, 1)
            case PruneCriterion.L2:
                raw = _filter_norms(source.node, source.weight_axis, 2)
            case PruneCriterion.BN_SCALE | PruneCriterion.TAYLOR:
                raw = (measured or {}).get(source.node.name)
                if raw is None or raw.shape != (source.width,):
                    fallbacks += 1
                    raw = _filter_norms(source.node, source.weight_axis, 2)
            case PruneCriterion.AUTO:
                raise ValueError("the auto criterion is resolved (resolve_criterion) before channels are ranked")
            case _:
                unreachable(criterion)
        mean = float(np.mean(raw))
        scores[source.start : source.start + source.width] = raw / mean if mean > 0 else raw
    return scores, fallbacks


def layer_taylor_scores(
    model: ir.Model, analysis: Analysis, samples: Sequence[Mapping[str, np.ndarray]], progress: Callable[[int, int], None] | None = None
) -> dict[str, np.ndarray]:
    """Taylor scores of every layer the analysis found, by name (see `taylor.py`; torch imported here)."""
    from edgeopt.converters.prune.taylor import taylor_scores

    layers = {source.node.name: (source.node.outputs[0].name, 1 if source.node.op_type in _CHANNELS_FIRST else -1) for source in analysis.sources}
    return taylor_scores(ir.to_proto(model), layers, samples, progress=progress)


def _filter_norms(node: ir.Node, axis: int, p: int) -> np.ndarray:
    weight = build_time_array(node.inputs[1])
    assert weight is not None
    filters = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    return np.linalg.norm(filters, ord=p, axis=1)
