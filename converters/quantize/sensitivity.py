"""Accuracy budget: keep the most sensitive layers in float until the quality drop fits the budget.

Layers are ranked once by the noise each adds over its inputs (from the per-layer SQNR debug pass
on the fully quantized model). The smallest prefix of that ranking that meets the budget is found
by doubling then bisecting, so a model with N quantized layers needs about 2·log2(N) evaluations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import onnx

from edgeopt.converters.data import Dataset
from edgeopt.converters.errors import QualityBudgetError
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.metrics import fidelity, quality_drop
from edgeopt.converters.quantize.debug import layer_sqnr
from edgeopt.converters.quantize.placement import QuantPlan

__all__ = ["meet_budget", "rank_layers"]

log = logging.getLogger(__name__)

RANKING_SAMPLES = 16


def rank_layers(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, dataset: Dataset) -> list[tuple[str, float]]:
    """(node, added noise) of every quantized layer, most sensitive first."""
    layers = [e for e in layer_sqnr(float_model, qdq_model, dataset.take(RANKING_SAMPLES)) if e["kind"] == "layer"]
    return [(e["node"], e["added_noise"]) for e in sorted(layers, key=lambda e: -e["added_noise"])]


def meet_budget(
    float_model: onnx.ModelProto,
    build: Callable[[Iterable[str]], onnx.ModelProto],
    excluded: Sequence[str],
    evaluation: Dataset,
    max_drop: float,
    plan: Callable[[Iterable[str]], QuantPlan],
) -> tuple[onnx.ModelProto, list[str], dict]:
    """(QDQ model, nodes kept in float, budget report); QualityBudgetError if no prefix meets the budget.

    The budget and every drop are in points of the quality metric (accuracy or top-1 agreement, %);
    `all_float` in the report says the budget held only with every quantized layer in float.
    """
    reference = list(run_model(float_model, evaluation))
    labels = evaluation.labels

    def measure(model: onnx.ModelProto) -> tuple[float, str, dict]:
        report = fidelity(reference, list(run_model(model, evaluation)), labels)
        drop, metric = quality_drop(report)
        return drop, metric, report

    base = build(excluded)
    drop, metric, base_report = measure(base)
    trials = [{"float_layers": 0, "drop": drop}]
    result = {"metric": metric, "max_drop": max_drop, "trials": trials}
    if drop <= max_drop:
        return base, [], {**result, "met": True, "drop": drop, "all_float": False, "fidelity": base_report}
    candidates = [node for node, _ in rank_layers(float_model, base, evaluation) if node in plan(excluded).quantized_nodes]
    log.info("budget %.2f missed (%s %.2f); trying float fallback over %d ranked layers", max_drop, metric, drop, len(candidates))
    cache: dict[int, tuple[onnx.ModelProto, float, dict]] = {0: (base, drop, base_report)}

    def attempt(count: int) -> float:
        if count not in cache:
            model = build([*excluded, *candidates[:count]])
            value, _, report = measure(model)
            cache[count] = (model, value, report)
            trials.append({"float_layers": count, "drop": value})
        return cache[count][1]

    low, high = 0, 1
    while high < len(candidates) and attempt(high) > max_drop:
        low, high = high, min(2 * high, len(candidates))
    if attempt(high) > max_drop:
        best = min(cache.values(), key=lambda entry: entry[1])
        raise QualityBudgetError(
            f"the accuracy budget of {max_drop:g} points cannot be met: the best {metric} reached is {best[1]:.3f} points "
            f"(with {len(candidates)} of {len(candidates)} ranked layers in float it is {cache[high][1]:.3f})",
            hint="raise --max-accuracy-drop, use another calibration method (--calibration-method percentile|entropy|mse), "
            "more representative calibration data, or build fp16",
        )
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle) <= max_drop:
            high = middle
        else:
            low = middle
    model, value, report = cache[high]
    fallback = list(candidates[:high])
    all_float = high == len(candidates)
    if all_float:
        log.warning("the budget %.2f holds only with all %d quantized layers in float: the result computes in float", max_drop, high)
    return model, fallback, {**result, "met": True, "drop": value, "all_float": all_float, "fidelity": report, "ranking": candidates[: max(high, 1) * 2]}

