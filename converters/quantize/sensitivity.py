"""Accuracy budget: keep the most sensitive layers in float until the quality drop fits the budget.

Layers are ranked once, by default by the noise each adds over its inputs (from the per-layer
SQNR debug pass on the fully quantized model); `Ranking.OUTPUT` ranks by the final-output noise
each layer removes when it alone is float (one build per layer). The smallest prefix of that
ranking that meets the budget is found by doubling then bisecting, so a model with N quantized
layers needs about 2·log2(N) evaluations.
"""

from __future__ import annotations

import copy
import enum
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from edgeopt.converters.data import Dataset
from edgeopt.converters.errors import QualityBudgetError
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.metrics import Fidelity, fidelity, quality_drop
from edgeopt.converters.quantize.debug import layer_sqnr
from edgeopt.converters.quantize.placement import QuantPlan

__all__ = ["FallbackSearch", "Ranking", "meet_budget", "rank_by_output", "rank_layers"]

log = logging.getLogger(__name__)

RANKING_SAMPLES = 16
#: Ranking.OUTPUT re-orders this many of the SQNR ranking's leaders (one build each); the rest follow in SQNR order.
OUTPUT_SHORTLIST = 24

Build = Callable[[Iterable[str]], onnx.ModelProto]


class Ranking(str, enum.Enum):
    """How layers are ordered for float fallback."""

    SQNR = "sqnr"  # noise each layer adds over its inputs: one debug pass
    OUTPUT = "output"  # final-output noise removed when that layer alone is float: one build per shortlisted layer


def rank_layers(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, dataset: Dataset) -> list[tuple[str, float]]:
    """(node, added noise) of every quantized layer, most sensitive first."""
    layers = [e for e in layer_sqnr(float_model, qdq_model, dataset.take(RANKING_SAMPLES)) if e["kind"] == "layer"]
    return [(e["node"], e["added_noise"]) for e in sorted(layers, key=lambda e: -e["added_noise"])]


def _output_noise(reference: Sequence[Mapping[str, np.ndarray]], outputs: Iterable[Mapping[str, np.ndarray]]) -> float:
    """Noise power over signal power of all outputs together (1 / linear SQNR)."""
    signal = noise = 0.0
    for ref_sample, sample in zip(reference, outputs, strict=True):
        for name, ref in ref_sample.items():
            ref64 = np.asarray(ref, np.float64)
            signal += float(np.sum(ref64 * ref64))
            noise += float(np.sum((ref64 - sample[name]) ** 2))
    return noise / signal if signal > 0 else 0.0


def rank_by_output(
    float_model: onnx.ModelProto, build: Build, excluded: Sequence[str], candidates: Sequence[str], dataset: Dataset
) -> list[tuple[str, float]]:
    """(node, output noise removed) of each candidate, kept alone in float: most useful first.

    Measures what the budget is about (the final output) instead of each layer's local noise,
    which misses noise a later layer amplifies or hides; costs one build and run per candidate.
    """
    samples = dataset.take(RANKING_SAMPLES)
    reference = list(run_model(float_model, samples))
    base = _output_noise(reference, run_model(build(excluded), samples))
    removed = [(node, base - _output_noise(reference, run_model(build([*excluded, node]), samples))) for node in candidates]
    return sorted(removed, key=lambda e: -e[1])


class FallbackSearch:
    """Float-fallback prefixes of a layer ranking, each built and measured on `evaluation` once.

    `trials` lists every prefix measured (float_layers, drop), in the order they were tried.
    """

    def __init__(self, float_model: onnx.ModelProto, build: Build, excluded: Sequence[str], evaluation: Dataset) -> None:
        self.build = build
        self.excluded = list(excluded)
        self.evaluation = evaluation
        self.reference = list(run_model(float_model, evaluation))
        self.candidates: list[str] = []
        self.trials: list[dict[str, float]] = []
        self.cache: dict[int, tuple[onnx.ModelProto, float, Fidelity]] = {}
        self.metric = ""

    def fork(self) -> FallbackSearch:
        """A search over another ranking that reuses this one's fp32 outputs and all-int8 measurement."""
        other = copy.copy(self)
        other.candidates = []
        other.trials = [trial for trial in self.trials if trial["float_layers"] == 0]
        other.cache = {count: entry for count, entry in self.cache.items() if count == 0}
        return other

    def measure(self, model: onnx.ModelProto) -> tuple[float, Fidelity]:
        report = fidelity(self.reference, list(run_model(model, self.evaluation)), self.evaluation.labels)
        drop, self.metric = quality_drop(report)
        return drop, report

    def attempt(self, count: int) -> float:
        """The drop with the first `count` ranked layers in float."""
        if count not in self.cache:
            model = self.build([*self.excluded, *self.candidates[:count]])
            drop, report = self.measure(model)
            self.cache[count] = (model, drop, report)
            self.trials.append({"float_layers": count, "drop": drop})
        return self.cache[count][1]

    def smallest(self, goal: float, limit: int) -> int | None:
        """The fewest ranked layers (≤ limit) in float whose drop is ≤ goal, None when `limit` misses it.

        Doubling then bisecting: assumes more float layers never hurt.
        """
        if self.attempt(0) <= goal:
            return 0
        if limit <= 0:
            return None
        low, high = 0, 1
        while high < limit and self.attempt(high) > goal:
            low, high = high, min(2 * high, limit)
        if self.attempt(high) > goal:
            return None
        while high - low > 1:
            middle = (low + high) // 2
            if self.attempt(middle) <= goal:
                high = middle
            else:
                low = middle
        return high

    def best(self) -> int:
        """The measured prefix with the lowest drop (the shorter one on a tie)."""
        return min(self.cache, key=lambda count: (self.cache[count][1], count))

    def rank(self, float_model: onnx.ModelProto, quantized: Iterable[str], ranking: Ranking) -> list[str]:
        """Order the quantized layers for fallback (needs attempt(0) first) and keep that order in `candidates`."""
        quantized = set(quantized)
        base = self.cache[0][0]
        ranked = [node for node, _ in rank_layers(float_model, base, self.evaluation) if node in quantized]
        if ranking is Ranking.OUTPUT:
            shortlist = ranked[:OUTPUT_SHORTLIST]
            reordered = rank_by_output(float_model, self.build, self.excluded, shortlist, self.evaluation)
            ranked = [node for node, _ in reordered] + ranked[OUTPUT_SHORTLIST:]
        self.candidates = ranked
        return ranked


def meet_budget(
    float_model: onnx.ModelProto,
    build: Build,
    excluded: Sequence[str],
    evaluation: Dataset,
    max_drop: float,
    plan: Callable[[Iterable[str]], QuantPlan],
    ranking: Ranking = Ranking.SQNR,
) -> tuple[onnx.ModelProto, list[str], dict]:
    """(QDQ model, nodes kept in float, budget report); QualityBudgetError if no prefix meets the budget.

    The budget and every drop are in points of the quality metric (accuracy or top-1 agreement, %);
    `all_float` in the report says the budget held only with every quantized layer in float.
    """
    search = FallbackSearch(float_model, build, excluded, evaluation)
    drop = search.attempt(0)
    base_report = search.cache[0][2]
    result = {"metric": search.metric, "max_drop": max_drop, "trials": search.trials}
    if drop <= max_drop:
        return search.cache[0][0], [], {**result, "met": True, "drop": drop, "all_float": False, "fidelity": base_report}
    candidates = search.rank(float_model, plan(excluded).quantized_nodes, ranking)
    log.info("budget %.2f missed (%s %.2f); trying float fallback over %d ranked layers", max_drop, search.metric, drop, len(candidates))
    high = search.smallest(max_drop, len(candidates))
    if high is None:
        best = search.cache[search.best()][1]
        raise QualityBudgetError(
            f"the accuracy budget of {max_drop:g} points cannot be met: the best {search.metric} reached is {best:.3f} points "
            f"(with {len(candidates)} of {len(candidates)} ranked layers in float it is {search.attempt(len(candidates)):.3f})",
            hint="raise --max-accuracy-drop, use another calibration method (--calibration-method percentile|entropy|mse), "
            "more representative calibration data, or build fp16",
        )
    model, value, report = search.cache[high]
    all_float = high == len(candidates)
    if all_float:
        log.warning("the budget %.2f holds only with all %d quantized layers in float: the result computes in float", max_drop, high)
    return model, candidates[:high], {
        **result,
        "met": True,
        "drop": value,
        "all_float": all_float,
        "fidelity": report,
        "ranking": candidates[: max(high, 1) * 2],
        "ranked_by": ranking.value,
    }
