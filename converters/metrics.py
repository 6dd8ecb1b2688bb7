"""Fidelity of an optimized model against its fp32 reference: accuracy, top-1 agreement, cosine, SQNR.

Figures are accumulated sample by sample, so references and candidates may be streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TypedDict

import numpy as np

__all__ = ["Fidelity", "OutputFidelity", "cosine", "fidelity", "quality_drop", "sqnr_db"]

#: SQNR reported when the candidate equals the reference exactly (JSON has no infinity).
EXACT_SQNR_DB = 200.0


class _OutputFigures(TypedDict):
    cosine: float  # over the whole stream
    cosine_mean: float  # per sample
    cosine_p5: float
    nonfinite: int
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float


class OutputFidelity(_OutputFigures, total=False):
    """One output's figures; top-1 agreement for classifier-like outputs, accuracies only with labels."""

    top1_agreement: float
    accuracy_fp32: float
    accuracy: float


class _Figures(TypedDict):
    samples: int
    outputs: dict[str, OutputFidelity]


class Fidelity(_Figures, total=False):
    """What `fidelity` reports (JSON-able): per output, plus the first classifier output's figures
    and the worst cosine and SQNR across outputs."""

    top1_agreement: float
    accuracy_fp32: float
    accuracy: float
    min_cosine: float
    min_sqnr_db: float


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10·log10(signal/noise), within ±EXACT_SQNR_DB; defined for every input (no NaN, no error)."""
    if not math.isfinite(noise_power) or not math.isfinite(signal_power):
        return -EXACT_SQNR_DB
    if noise_power <= 0.0:
        return EXACT_SQNR_DB
    if signal_power <= 0.0:
        return -EXACT_SQNR_DB
    return max(-EXACT_SQNR_DB, min(EXACT_SQNR_DB, 10.0 * math.log10(signal_power / noise_power)))


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of two arrays; 1 for two all-zero arrays, 0 for one, -1 if not finite."""
    ref = reference.astype(np.float64).ravel()
    cand = candidate.astype(np.float64).ravel()
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(cand))):
        return -1.0
    denominator = math.sqrt(float(ref @ ref) * float(cand @ cand))
    if denominator == 0.0:
        return 1.0 if not np.any(ref) and not np.any(cand) else 0.0
    return max(-1.0, min(1.0, float(ref @ cand) / denominator))


def _is_classifier(array: np.ndarray) -> bool:
    """(batch, classes) or (classes,) float scores with at least two classes."""
    return np.issubdtype(array.dtype, np.floating) and array.ndim in (1, 2) and array.shape[-1] > 1


class _OutputStats:
    def __init__(self) -> None:
        self.dot = self.ref_sq = self.cand_sq = self.noise_sq = 0.0
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.classifier = True
        self.agree = 0
        self.rows = 0
        self.ref_correct = 0
        self.cand_correct = 0
        self.cosines: list[float] = []
        self.nonfinite = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> None:
        if reference.shape != candidate.shape:
            raise ValueError(f"reference shape {reference.shape} differs from candidate shape {candidate.shape}")
        self.cosines.append(cosine(reference, candidate))
        self.nonfinite += int(np.count_nonzero(~np.isfinite(candidate))) if np.issubdtype(candidate.dtype, np.floating) else 0
        # non-finite values count as such above and as zero noise below, so the sums stay finite
        ref = np.nan_to_num(reference.astype(np.float64).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
        cand = np.nan_to_num(candidate.astype(np.float64).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
        diff = ref - cand
        self.dot += float(ref @ cand)
        self.ref_sq += float(ref @ ref)
        self.cand_sq += float(cand @ cand)
        self.noise_sq += float(diff @ diff)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)
        self.abs_sum += float(np.sum(np.abs(diff)))
        self.count += diff.size
        self.classifier = self.classifier and _is_classifier(reference)
        if self.classifier:
            ref_top = np.argmax(reference.reshape(-1, reference.shape[-1]), axis=-1)
            cand_top = np.argmax(candidate.reshape(-1, candidate.shape[-1]), axis=-1)
            self.agree += int(np.sum(ref_top == cand_top))
            self.rows += len(ref_top)
            if labels is not None:
                truth = np.asarray(labels).reshape(-1)[: len(ref_top)]
                self.ref_correct += int(np.sum(ref_top == truth))
                self.cand_correct += int(np.sum(cand_top == truth))

    def summary(self, with_labels: bool) -> OutputFidelity:
        denominator = math.sqrt(self.ref_sq * self.cand_sq)
        result: OutputFidelity = {
            "cosine": 1.0 if denominator == 0.0 and self.noise_sq == 0.0 else (self.dot / denominator if denominator else 0.0),
            "cosine_mean": float(np.mean(self.cosines)) if self.cosines else 1.0,
            "cosine_p5": float(np.percentile(self.cosines, 5)) if self.cosines else 1.0,
            "nonfinite": self.nonfinite,
            "sqnr_db": sqnr_db(self.ref_sq, self.noise_sq),
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / max(self.count, 1),
        }
        if self.classifier and self.rows:
            result["top1_agreement"] = self.agree / self.rows
            if with_labels:
                result["accuracy_fp32"] = self.ref_correct / self.rows
                result["accuracy"] = self.cand_correct / self.rows
        return result


def fidelity(
    reference: Iterable[Mapping[str, np.ndarray]],
    candidate: Iterable[Mapping[str, np.ndarray]],
    labels: np.ndarray | None = None,
) -> Fidelity:
    """Per-output cosine, SQNR (dB), max/mean abs error; top-1 agreement for classifier-like outputs;
    accuracy of both models when labels (one per sample, in order) are given. JSON-able.

    The top-level `accuracy_fp32`/`accuracy`/`top1_agreement` come from the first classifier output.
    """
    stats: dict[str, _OutputStats] = {}
    label_array = None if labels is None else np.asarray(labels).reshape(-1)
    samples = 0
    label_offset = 0
    for ref_sample, cand_sample in zip(reference, candidate, strict=True):
        rows = 1
        for name, ref in ref_sample.items():
            if name not in cand_sample:
                raise ValueError(f"candidate has no output '{name}' (it has {sorted(cand_sample)})")
            ref = np.asarray(ref)
            rows = ref.reshape(-1, ref.shape[-1]).shape[0] if _is_classifier(ref) else 1
            batch_labels = None if label_array is None else label_array[label_offset : label_offset + rows]
            stats.setdefault(name, _OutputStats()).add(ref, np.asarray(cand_sample[name]), batch_labels)
        label_offset += rows
        samples += 1
    with_labels = label_array is not None
    outputs = {name: s.summary(with_labels) for name, s in stats.items()}
    result: Fidelity = {"samples": samples, "outputs": outputs}
    classifier = next((o for o in outputs.values() if "top1_agreement" in o), None)
    if classifier is not None:
        result["top1_agreement"] = classifier["top1_agreement"]
        if with_labels:
            result["accuracy_fp32"] = classifier["accuracy_fp32"]
            result["accuracy"] = classifier["accuracy"]
    if outputs:
        result["min_cosine"] = min(o["cosine"] for o in outputs.values())
        result["min_sqnr_db"] = min(o["sqnr_db"] for o in outputs.values())
    return result


def quality_drop(report: Fidelity) -> tuple[float, str]:
    """The figure an accuracy budget is checked against, in percentage points, and its name.

    Accuracy drop when labels were given; else top-1 disagreement for classifiers; else
    (1 - min cosine) x 100 for other outputs.
    """
    if "accuracy" in report:
        drop, metric = 100.0 * (report["accuracy_fp32"] - report["accuracy"]), "accuracy drop (points)"
    elif "top1_agreement" in report:
        drop, metric = 100.0 * (1.0 - report["top1_agreement"]), "top-1 disagreement (%)"
    else:
        drop, metric = 100.0 * (1.0 - report.get("min_cosine", 0.0)), "(1 - cosine) x 100"
    return round(drop, 9), metric  # 100 x (1 - 0.99) must compare equal to a budget of 1.0
