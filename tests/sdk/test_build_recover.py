"""`edgeopt build … --prune R --recover --train-data …`: the pruned fp32 graph is distilled from the
unpruned one before it is quantized, and the int8 bundle that ships is made from the recovered graph.

The digits model is pruned at 0.4 for raspberry-pi (channel multiple 8: its 32-channel conv keeps 24;
at onnxruntime-cpu's 16 nothing is pruned); recovery trains on 300 labelled samples of
examples/digits/eval.npz and the bundles are judged on the other 150, which neither training nor its
early stop ever sees, run by `edgeopt.runtime` (the int8 TFLite artifact on LiteRT).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result

pytest.importorskip("torch")

import edgeopt  # noqa: E402
from edgeopt.cli import cli  # noqa: E402
from edgeopt.converters.graph.session import run_model  # noqa: E402
from edgeopt.converters.metrics import fidelity  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.runtime import load  # noqa: E402

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SCHEMA = json.loads((Path(edgeopt.__file__).parent / "schemas" / "manifest.schema.json").read_text())
TRAIN = 300


def _edgeopt(*args: str) -> Result:
    """The real CLI, run in this process (torch is already imported here)."""
    return CliRunner().invoke(cli, list(args))


def _common(model: Path, output: Path, target: str = "raspberry-pi") -> list[str]:
    return [str(model), "-t", target, "-p", "int8", "--calibration", str(DIGITS / "calib.npz"), "--effort", "fast", "-o", str(output)]


@pytest.fixture(scope="module")
def held_out() -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    data = np.load(DIGITS / "eval.npz")
    return [{"image": data["image"][i : i + 1]} for i in range(TRAIN, len(data["labels"]))], data["labels"][TRAIN:]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same int8 build pruned at 0.4, without and with --recover."""
    folder = tmp_path_factory.mktemp("recover")
    data = np.load(DIGITS / "eval.npz")
    np.savez(folder / "train.npz", image=data["image"][:TRAIN], labels=data["labels"][:TRAIN])
    pruned = _edgeopt("build", *_common(DIGITS / "model.onnx", folder / "pruned"), "--prune", "0.4", "--quiet")
    assert pruned.exit_code == 0, pruned.stderr
    recovered = _edgeopt("build", *_common(DIGITS / "model.onnx", folder / "recovered"), "--prune", "0.4", "--recover", "--train-data", str(folder / "train.npz"))
    assert recovered.exit_code == 0, recovered.stderr
    assert "recover epoch 0/8: before training, held-out top1_agreement" in recovered.stderr
    assert "recover epoch 1/8: loss" in recovered.stderr
    return {"pruned": folder / "pruned", "recovered": folder / "recovered"}


def _run_bundle(bundle: Path, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    with load(bundle) as model:
        return [model.predict(sample) for sample in samples]


def _artifact_bytes(bundle: Path) -> bytes:
    (path,) = [p for p in bundle.rglob("*.tflite")]
    return path.read_bytes()


def test_recovery_brings_the_pruned_model_back_toward_the_unpruned_one_on_unseen_samples(
    bundles: dict[str, Path], held_out: tuple[list[dict[str, np.ndarray]], np.ndarray]
) -> None:
    samples, labels = held_out
    unpruned = list(run_model(simplify(onnx.load(DIGITS / "model.onnx"))[0], samples))
    figures = {name: fidelity(unpruned, _run_bundle(bundle, samples), labels) for name, bundle in bundles.items()}
    pruned, recovered = figures["pruned"], figures["recovered"]
    # measured: min SQNR 11.5 -> 15.0 dB, min cosine 0.9886 -> 0.9926. Accuracy is no judge here: keeping
    # 24 of 32 channels costs digits none (150/150 pruned, 149/150 recovered; fp32 150/150).
    assert recovered["min_sqnr_db"] > pruned["min_sqnr_db"] + 2, (pruned["min_sqnr_db"], recovered["min_sqnr_db"])
    assert recovered["min_cosine"] > pruned["min_cosine"], (pruned["min_cosine"], recovered["min_cosine"])


def test_the_manifest_records_recovery_and_the_bundle_verifies(bundles: dict[str, Path]) -> None:
    manifest = json.loads((bundles["recovered"] / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    stages = [s["name"] for s in manifest["stages"]]
    assert stages[:6] == ["load", "validate", "simplify", "prune", "recover", "check_ops"] and "finetune" not in stages
    recovery = manifest["pruning"]["recovery"]
    assert recovery["mode"] == "qad" and recovery["labels"] and recovery["samples"] == {"train": 240, "held_out": 60}
    assert 1 <= recovery["best_epoch"] <= recovery["epochs_run"] <= recovery["epochs"] == 8
    assert recovery["float_tensors_written"] > 0 and recovery["wall_seconds"] > 0
    assert recovery["held_out_after"]["min_sqnr_db"] > recovery["held_out_before"]["min_sqnr_db"]
    assert manifest["reference"]["measured"]["checked"]
    assert _artifact_bytes(bundles["recovered"]) != _artifact_bytes(bundles["pruned"])
    assert manifest["pruning"]["parameters_after"] == json.loads((bundles["pruned"] / "manifest.json").read_text())["pruning"]["parameters_after"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--recover", "--train-data", str(DIGITS / "eval.npz")], "nothing is pruned without --prune"),
        (["--prune", "0.4", "--recover"], "--recover needs training data"),
        (["--prune", "0.4", "--train-data", str(DIGITS / "eval.npz")], "--train-data is read only by --finetune and --recover"),
    ],
)
def test_cli_refuses_what_recovery_cannot_do_before_any_work(tmp_path: Path, args: list[str], needle: str) -> None:
    result = _edgeopt("build", *_common(DIGITS / "model.onnx", tmp_path / "b"), *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "b").exists()


def test_recovery_is_skipped_when_the_channel_multiple_leaves_nothing_pruned(tmp_path: Path) -> None:
    """onnxruntime-cpu rounds digits' kept widths up to 16: the graph stays whole, and training it on the
    task loss would only move it off the original."""
    result = _edgeopt("build", *_common(DIGITS / "model.onnx", tmp_path / "b", "onnxruntime-cpu"), "--prune", "0.4", "--recover", "--train-data", str(DIGITS / "eval.npz"))
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (recover,) = [s for s in manifest["stages"] if s["name"] == "recover"]
    assert manifest["pruning"]["groups_pruned"] == 0 and "recovery" not in manifest["pruning"]
    assert not recover["changed"] and recover["details"]["skipped"] == "prune removed no channel: nothing to recover"
