"""Remove channels for real: smaller weights, rewritten shapes and split sizes, fewer MACs.

`PruneChannelsPass` analyses the graph (`groups.py`), ranks every removable channel
(`importance.py`), chooses what to keep in each group and slices every weight, bias and per-channel
constant the analysis listed, then rewrites what states a channel count (Reshape shapes, Resize
sizes, Split sizes, Slice bounds, a depthwise Conv's group). What to keep:

- layer-wise (default): in each group, `ratio` of its channels go; global: one ranking over every
  group, the lowest-scored `ratio` of all channels go;
- channels tied in the same way (same layers, same Split/Slice segments) are a *class*; each class
  keeps a multiple of `channel_multiple` channels, rounded up, so every layer's width is one too
  (a unit holding k channels of a layer, an attention head or a grouped conv's position, counts k);
- a class narrower than two multiples is left alone (rounding would give back nothing or all).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from edgeopt.converters.analysis import model_stats
from edgeopt.converters.graph.qdq import build_time_array
from edgeopt.converters.graph.rewrite import NameScope, add_initializer
from edgeopt.converters.passes.base import GraphPass
from edgeopt.converters.prune.groups import PINNED, Analysis, Group, analyze
from edgeopt.converters.prune.importance import atom_scores, layer_taylor_scores
from edgeopt.runtime.kinds import PruneCriterion

__all__ = ["GroupReport", "PruneChannelsPass", "PruneOptions", "PruneReport"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOptions:
    """ratio: share of each group's channels removed (0 <= ratio < 1); channel_multiple: kept counts
    are multiples of it (the target's); protected: node names whose output channels are kept;
    bn_scales: |gamma| by layer (`batchnorm_scales`), read by bn-scale; samples: calibration inputs
    (with the model's batch axis), read by taylor."""

    ratio: float
    criterion: PruneCriterion = PruneCriterion.L2
    channel_multiple: int = 1
    global_ranking: bool = False
    protected: tuple[str, ...] = ()
    bn_scales: Mapping[str, np.ndarray] = field(default_factory=dict)
    samples: tuple[Mapping[str, np.ndarray], ...] = ()


class GroupReport(TypedDict):
    """One dependency group: its layers, widths before -> after, and why it was not pruned."""

    layers: list[str]
    widths: dict[str, list[int]]  # layer name: [before, after]
    channels: int  # removable channels (units) in the group
    removed: int
    pruned: bool
    why: list[str]  # why channels were kept: pinned (with the op that pinned them), too narrow, rounding


class PruneReport(TypedDict):
    ratio: float
    criterion: str
    channel_multiple: int
    global_ranking: bool
    samples: int  # calibration samples the taylor criterion ran on (0 for the others)
    bn_fallback_layers: int  # layers ranked by L2 for want of a measured score (bn-scale: no BatchNorm after them)
    groups_found: int
    groups_pruned: int
    groups: list[GroupReport]
    macs_before: int
    macs_after: int
    parameters_before: int
    parameters_after: int


class PruneChannelsPass(GraphPass):
    """Structured channel pruning; the report is `self.report` after the pass runs. `progress(done, total)`
    follows the taylor criterion's calibration samples."""

    def __init__(self, options: PruneOptions, progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__()
        self.options = options
        self.progress = progress
        self.report: PruneReport | None = None
        self.kept_atoms: np.ndarray | None = None  # which atoms (see groups.py) were kept: the zero-equivalence check reads it

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        options = self.options
        analysis = analyze(model, options.protected)
        measured = layer_taylor_scores(model, analysis, options.samples, self.progress) if options.criterion is PruneCriterion.TAYLOR else options.bn_scales
        scores, fallbacks = atom_scores(analysis, options.criterion, measured)
        groups = analysis.groups()
        keep, group_reports = _choose(analysis, groups, scores, options)
        self.kept_atoms = keep
        before = model_stats(ir.to_proto(model))
        self.report = PruneReport(
            ratio=options.ratio,
            criterion=options.criterion.value,
            channel_multiple=options.channel_multiple,
            global_ranking=options.global_ranking,
            samples=len(options.samples) if options.criterion is PruneCriterion.TAYLOR else 0,
            bn_fallback_layers=fallbacks,
            groups_found=len(groups),
            groups_pruned=sum(g["pruned"] for g in group_reports),
            groups=group_reports,
            macs_before=before.macs,
            macs_after=before.macs,
            parameters_before=before.parameters,
            parameters_after=before.parameters,
        )
        if keep.all():
            return ir.passes.PassResult(model, modified=False)
        _cut(model.graph, analysis, keep)
        for value in _intermediate_values(model.graph):
            value.shape = None
        ir_common.ShapeInferencePass(strict_mode=False)(model)
        ir_common.RemoveUnusedNodesPass()(model)
        after = model_stats(ir.to_proto(model))
        self.report["macs_after"], self.report["parameters_after"] = after.macs, after.parameters
        logger.info("pruned %d of %d groups", self.report["groups_pruned"], len(groups))
        return ir.passes.PassResult(model, modified=True)


def _choose(analysis: Analysis, groups: list[Group], scores: np.ndarray, options: PruneOptions) -> tuple[np.ndarray, list[GroupReport]]:
    """Which atoms are kept (a bool per atom), and a report per group."""
    multiple = max(1, options.channel_multiple)
    removed_units: list[np.ndarray] = []
    classes_per_group: list[list[_Class]] = []
    for group in groups:
        classes: dict[tuple[int, ...], list[np.ndarray]] = defaultdict(list)
        for unit in group.units:
            classes[tuple(sorted(analysis.segment_of(unit).tolist()))].append(unit)
        classes_per_group.append([_class(analysis, units, scores, multiple) for units in classes.values()])
    threshold = _global_threshold(classes_per_group, options.ratio) if options.global_ranking else None
    reports: list[GroupReport] = []
    for group, classes in zip(groups, classes_per_group):
        why = list(group.pinned_reasons)
        removed = 0
        for units, unit_scores, step in classes:
            width = len(units)
            # a unit of k channels per layer (grouped conv, attention head): `step` units make a multiple
            if width < 2 * step:
                why.append(f"{width} channel(s) tied together, narrower than two multiples of {multiple}")
                continue
            wanted = math.ceil(width * (1 - options.ratio)) if threshold is None else int((unit_scores > threshold).sum())
            kept = min(width, max(step, math.ceil(wanted / step) * step))
            if kept == width and wanted < width:
                why.append(f"{width} channel(s) tied together: keeping {wanted} rounds up to all of them (multiple of {multiple})")
            order = np.argsort(-unit_scores, kind="stable")
            for position in order[kept:]:
                removed_units.append(units[position])
            removed += width - kept
        reports.append(_group_report(group, removed, why))
    keep = np.ones(len(analysis.parent), dtype=bool)
    for unit in removed_units:
        keep[unit] = False
    keep[PINNED] = True
    for report, group in zip(reports, groups):
        report["widths"] = {s.node.name: [s.width, int(keep[s.start : s.start + s.width].sum())] for s in group.sources}
    return keep, reports


#: units tied the same way, their scores, and how many of them make a multiple of the channel multiple
_Class = tuple[list[np.ndarray], np.ndarray, int]


def _class(analysis: Analysis, units: list[np.ndarray], scores: np.ndarray, multiple: int) -> _Class:
    per_layer = analysis.channels_per_layer(units[0])
    return units, np.array([scores[u].sum() for u in units]), multiple // math.gcd(multiple, per_layer)


def _global_threshold(classes_per_group: list[list[_Class]], ratio: float) -> float:
    """The score below which channels go when one ranking covers every group."""
    scores = [s for classes in classes_per_group for units, unit_scores, step in classes if len(units) >= 2 * step for s in unit_scores]
    if not scores:
        return -math.inf
    return float(np.quantile(np.asarray(scores), ratio, method="lower")) if ratio > 0 else -math.inf


def _group_report(group: Group, removed: int, why: list[str]) -> GroupReport:
    return GroupReport(
        layers=[s.node.name for s in group.sources],
        widths={},
        channels=len(group.units),
        removed=removed,
        pruned=removed > 0,
        why=list(dict.fromkeys(why)) if why or removed else ["nothing to remove at this ratio"],
    )


def _cut(graph: ir.Graph, analysis: Analysis, keep_atom: np.ndarray) -> None:
    """Slice every listed weight and constant to the kept channels and rewrite the stated counts."""
    masks: dict[tuple[ir.Node, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for source in analysis.sources:
        kept = keep_atom[source.atoms]
        masks[(source.node, 1)].append((source.weight_axis, kept))
        if len(source.node.inputs) > 2 and source.node.inputs[2] is not None:
            masks[(source.node, 2)].append((0, kept))
    for param in analysis.params:
        masks[(param.node, param.input_index)].append((param.axis, keep_atom[param.atoms]))
    names = NameScope(graph)
    for (node, index), cuts in masks.items():
        if all(mask.all() for _, mask in cuts):
            continue
        array = build_time_array(node.inputs[index])
        assert array is not None
        for axis, mask in cuts:
            array = np.compress(mask, array, axis=axis)
        node.replace_input_with(index, add_initializer(graph, names, f"{node.inputs[index].name}_pruned", array))
    for edit in analysis.edits:
        node = edit.node
        if edit.kind == "slice":
            _rewrite_slice(graph, names, node, edit.axis, *edit.atoms, keep_atom)
            continue
        counts = [int(keep_atom[atoms].sum()) for atoms in edit.atoms]
        if edit.kind == "group":
            node.attributes["group"] = ir.AttrInt64("group", counts[0])
            continue
        if edit.kind == "split":
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                node.replace_input_with(1, add_initializer(graph, names, f"{node.name or 'split'}_sizes", np.asarray(counts, dtype=np.int64)))
            elif "split" in node.attributes:
                node.attributes["split"] = ir.AttrInt64s("split", counts)
            continue
        index = 1 if edit.kind == "reshape" else 3
        shape = build_time_array(node.inputs[index]).copy()  # type: ignore[union-attr]
        shape[edit.axis] = counts[0]
        node.replace_input_with(index, add_initializer(graph, names, f"{node.inputs[index].name}_pruned", shape))


def _rewrite_slice(graph: ir.Graph, names: NameScope, node: ir.Node, entry: int, atoms: np.ndarray, taken: np.ndarray, keep_atom: np.ndarray) -> None:
    """A Slice on the channel axis: its bounds, counted in kept positions."""
    kept = keep_atom[atoms]
    start = int(kept[: taken[0]].sum()) if len(taken) else 0
    stop = start + int(kept[taken].sum())
    for input_index, bound in ((1, start), (2, stop)):
        bounds = build_time_array(node.inputs[input_index]).copy()  # type: ignore[union-attr]
        bounds[entry] = bound
        node.replace_input_with(input_index, add_initializer(graph, names, f"{node.inputs[input_index].name}_pruned", bounds))


def _intermediate_values(graph: ir.Graph) -> list[ir.Value]:
    """Every value a node makes that is not a graph output: its inferred shape may have changed."""
    return [value for node in graph for value in node.outputs if not value.is_graph_output()]
