"""The technique search: each candidate is built, measured on held-out calibration samples, and kept
only if the output SQNR rises; forced switches skip the measurement; nothing is tried at `fast`.

The candidates here are real QDQ models of the trained digits CNN built with range estimators of
known quality (min-max against a heavily clipping percentile), so which one helps is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeopt.converters.data import Dataset, model_input_specs, open_dataset
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.converters.quantize.techniques import MIN_GAIN_DB, TechniqueSearch
from edgeopt.runtime.kinds import Effort, Technique
from edgeopt.targets import get_target

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SCHEME = get_target("onnxruntime-cpu").quant_scheme


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(DIGITS / "model.onnx"))


@pytest.fixture(scope="module")
def data(model: onnx.ModelProto) -> tuple[Dataset, Dataset]:
    with np.load(DIGITS / "calib.npz") as archive:
        arrays = {k: archive[k] for k in archive.files if k != "labels"}
    everything = open_dataset(arrays, model_input_specs(model))
    return everything.take(64), everything.skip(64)


def _builder(model: onnx.ModelProto, fit: Dataset, helpful: Technique, harmful: Technique):
    """QDQ models whose quality depends on the recipe: `harmful` clips every activation at its 60th
    percentile; the baseline clips at the 80th; `helpful` restores min-max ranges."""
    built: list[frozenset[Technique]] = []

    def build(recipe: frozenset[Technique]) -> onnx.ModelProto:
        built.append(recipe)
        if harmful in recipe:
            options = QuantizeOptions(method="percentile", percentile=60.0, debug_samples=0)
        elif helpful in recipe:
            options = QuantizeOptions(method="minmax", debug_samples=0)
        else:
            options = QuantizeOptions(method="percentile", percentile=80.0, debug_samples=0)
        return quantize(model, SCHEME, fit, options).model

    return build, built


def _search(model, data, effort=Effort.MAX, forced=None, applies=lambda t: None, budget=None):
    fit, held_out = data
    build, built = _builder(model, fit, helpful=Technique.RANGE_SEARCH, harmful=Technique.EQUALIZATION)
    search = TechniqueSearch(
        float_model=model, build=build, applies=applies, held_out=held_out, effort=effort, forced=forced or {}, cpu_budget_s=budget
    )
    recipe, report = search.run()
    return recipe, report, built


def test_a_technique_that_helps_is_kept_and_one_that_hurts_is_dropped_with_its_figure(model, data) -> None:
    recipe, report, _ = _search(model, data)
    trials = {t["technique"]: t for t in report["trials"]}
    assert Technique.RANGE_SEARCH in recipe and Technique.EQUALIZATION not in recipe
    assert trials["equalization"]["kept"] is False
    assert trials["equalization"]["sqnr_db_after"] < trials["equalization"]["sqnr_db_before"]
    assert "dropped" in trials["equalization"]["why"]
    assert trials["range_search"]["kept"] is True
    assert trials["range_search"]["sqnr_db_after"] >= trials["range_search"]["sqnr_db_before"] + MIN_GAIN_DB
    assert report["chosen"] == [Technique.RANGE_SEARCH.value]  # bias correction changes nothing in these builds: tried, dropped
    assert report["sqnr_db"] == trials["range_search"]["sqnr_db_after"]
    assert report["held_out_samples"] == len(data[1])


def test_the_default_effort_tries_no_rounding_and_fast_tries_nothing(model, data) -> None:
    _, report, _ = _search(model, data, effort=Effort.DEFAULT)
    assert {t["technique"] for t in report["trials"]} <= {"equalization", "bias_absorption", "smoothquant", "range_search", "bias_correction"}
    recipe, report, built = _search(model, data, effort=Effort.FAST)
    assert report["trials"] == [] and recipe == frozenset()
    assert built == [recipe]  # the baseline alone is built, to score it


def test_forced_switches_are_not_measured(model, data) -> None:
    recipe, report, _ = _search(model, data, forced={Technique.EQUALIZATION: True, Technique.RANGE_SEARCH: False})
    assert Technique.EQUALIZATION in recipe and Technique.RANGE_SEARCH not in recipe
    assert not {"equalization", "range_search"} & {t["technique"] for t in report["trials"]}
    assert report["forced"] == {"equalization": True, "range_search": False}


def test_a_technique_with_nothing_to_do_is_reported_not_tried(model, data) -> None:
    def applies(technique: Technique) -> str | None:
        return "no MatMul or Gemm" if technique is Technique.SMOOTHQUANT else None

    _, report, built = _search(model, data, applies=applies)
    assert {"technique": "smoothquant", "why": "no MatMul or Gemm"} in report["not_tried"]
    assert all(Technique.SMOOTHQUANT not in recipe for recipe in built)


def test_a_spent_cpu_budget_stops_further_trials_and_says_so_without_running_the_model_again(model, data) -> None:
    """The baseline is measured, then nothing: `applies` is not asked either (bias absorption's
    answer runs the model on calibration data)."""
    asked = []
    _, report, built = _search(model, data, budget=0.0, applies=asked.append)
    assert report["trials"] == [] and asked == [] and len(built) == 1
    assert report["not_tried"] and all(t["why"].startswith("CPU budget of 0 s: ") for t in report["not_tried"])
    assert report["cpu_budget_s"] == 0.0 and report["cpu_seconds"] > 0


def test_the_budget_counts_cpu_seconds_so_a_wait_spends_none_of_it(model, data) -> None:
    """A machine loaded by others stretches wall time, not this process's CPU time: a search that
    waits (here: sleeps 1 s before each answer) still tries every technique within a 2 s budget."""
    import time

    def slow_applies(technique: Technique) -> None:
        time.sleep(1.0)

    _, report, _ = _search(model, data, effort=Effort.DEFAULT, budget=2.0, applies=slow_applies)
    assert report["seconds"] > 4 * 1.0 and report["cpu_seconds"] < 2.0, report
    assert {t["technique"] for t in report["trials"]} == {"range_search", "equalization", "bias_absorption", "smoothquant", "bias_correction"}
    assert all(t["cpu_seconds"] <= t["seconds"] * 2 + 0.5 for t in report["trials"])


def test_no_trial_starts_that_is_forecast_to_end_past_the_budget(model, data) -> None:
    """A trial is forecast to cost what the last one did: the baseline burns 0.1 CPU s, the range
    search 0.6 s; with a 1.2 s budget the range search starts (0.2 + 0.2 fit), and equalization
    does not, though less than the budget is spent (about 0.8 + 0.7 would end past it)."""
    import time

    fit, held_out = data
    build, _ = _builder(model, fit, helpful=Technique.RANGE_SEARCH, harmful=Technique.EQUALIZATION)

    def burning(recipe: frozenset[Technique]) -> onnx.ModelProto:
        until = time.process_time() + (0.6 if Technique.RANGE_SEARCH in recipe else 0.1)
        while time.process_time() < until:
            pass
        return build(recipe)

    search = TechniqueSearch(float_model=model, build=burning, applies=lambda t: None, held_out=held_out, effort=Effort.DEFAULT, cpu_budget_s=1.2)
    _, report = search.run()
    assert [t["technique"] for t in report["trials"]] == ["range_search"], report
    assert report["cpu_seconds"] < 1.2
    assert [t["technique"] for t in report["not_tried"]] == ["equalization", "bias_absorption", "smoothquant", "bias_correction"]
    assert all(t["why"].startswith("CPU budget of 1.2 s: ") and "CPU s spent, a trial takes ~" in t["why"] for t in report["not_tried"]), report["not_tried"]
