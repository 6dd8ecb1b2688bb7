"""Fidelity figures: accuracy with labels, top-1 agreement, cosine, SQNR and errors per output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeopt.converters.metrics import EXACT_SQNR_DB, fidelity, quality_drop


def _stream(arrays: list[np.ndarray], name: str = "logits") -> list[dict[str, np.ndarray]]:
    return [{name: a} for a in arrays]


def test_classifier_accuracy_agreement_and_noise_figures() -> None:
    reference = [np.array([[2.0, 1.0, 0.0]]), np.array([[0.0, 3.0, 1.0]]), np.array([[0.0, 1.0, 2.0]]), np.array([[1.0, 0.0, 0.5]])]
    candidate = [r.copy() for r in reference]
    candidate[2] = np.array([[0.0, 2.5, 2.0]])  # top-1 flips from class 2 to 1
    labels = np.array([0, 1, 2, 2])
    report = fidelity(_stream(reference), _stream(candidate), labels)
    assert report["samples"] == 4
    assert report["top1_agreement"] == 0.75
    assert report["accuracy_fp32"] == 0.75 and report["accuracy"] == 0.5
    output = report["outputs"]["logits"]
    noise, signal = 1.5**2, sum(float(np.sum(r**2)) for r in reference)
    assert output["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise))
    assert output["max_abs_error"] == 1.5
    assert 0.9 < output["cosine"] < 1.0
    assert quality_drop(report) == (25.0, "accuracy drop (points)")
    json.dumps(report)


def test_exact_match_caps_sqnr_and_non_classifiers_use_cosine() -> None:
    maps = [np.random.default_rng(i).normal(size=(1, 4, 3, 3)).astype(np.float32) for i in range(3)]
    report = fidelity(_stream(maps, "features"), _stream(maps, "features"))
    assert report["outputs"]["features"]["sqnr_db"] == EXACT_SQNR_DB and report["min_cosine"] == pytest.approx(1.0)
    assert "top1_agreement" not in report
    assert quality_drop(report) == (0.0, "(1 - cosine) x 100")


def test_top1_disagreement_is_the_budget_figure_without_labels() -> None:
    reference = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
    candidate = [np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])]
    assert quality_drop(fidelity(_stream(reference), _stream(candidate))) == (50.0, "top-1 disagreement (%)")


def test_batched_outputs_consume_one_label_per_row() -> None:
    reference = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])]
    report = fidelity(_stream(reference), _stream(reference), labels=np.array([0, 1, 0, 1]))
    assert report["accuracy_fp32"] == 0.75 and report["top1_agreement"] == 1.0


def test_mismatched_streams_are_refused() -> None:
    with pytest.raises(ValueError):
        fidelity(_stream([np.zeros((1, 2))]), _stream([np.zeros((1, 3))]))
    with pytest.raises(ValueError):
        fidelity(_stream([np.zeros((1, 2))]), _stream([np.zeros((1, 2))], "other"))
    with pytest.raises(ValueError):
        fidelity(_stream([np.zeros((1, 2))] * 2), _stream([np.zeros((1, 2))]))
