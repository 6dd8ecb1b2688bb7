"""Bundles whose device backend cannot run here are verified and benched on a stand-in, marked.

apple-ane bundles run on the `coreml-reference` backend off macOS, jetson-orin bundles on ONNX
Runtime without TensorRT; every verify and bench result names the stand-in and carries the note
that its figures are not the device's. A device backend named explicitly is never replaced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy
import pytest
from click.testing import CliRunner

import edgeopt
from edgeopt.cli import cli
from edgeopt.runtime import benchmark_schema, load
from edgeopt.runtime.backends import STAND_INS
from edgeopt.runtime.errors import BackendUnavailableError
from edgeopt.zipapp import build_runtime_zipapp

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
CORE_ML_NOTE = "reference evaluator, not Core ML: latency is not the device's"
TENSORRT_NOTE = "ONNX Runtime on the TensorRT-ready ONNX, not TensorRT: latency is not the device's"

off_macos = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML runs the bundle itself")
without_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits example built for apple-ane (fp16, int8) and jetson-orin (fp16), once per module."""
    root = tmp_path_factory.mktemp("stand-ins")
    for name, target, precision in (("ane-fp16", "apple-ane", "fp16"), ("ane-int8", "apple-ane", "int8"), ("orin", "jetson-orin", "fp16")):
        edgeopt.build(DIGITS / "model.onnx", target, output=root / name, precision=precision, calibration=DIGITS / "calib.npz")
    return {name: root / name for name in ("ane-fp16", "ane-int8", "orin")}


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.stderr
    return result.exit_code, result.stdout, result.stderr


@off_macos
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_edgeopt_verify_checks_an_apple_ane_bundle_on_the_reference_evaluator(bundles: dict[str, Path], precision: str) -> None:
    code, out, err = run_cli("verify", str(bundles[f"ane-{precision}"]), "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["passed"] is True
    assert (document["backend"], document["stand_in_for"], document["note"]) == ("coreml-reference", "coreml", CORE_ML_NOTE)
    code, text, _ = run_cli("verify", str(bundles[f"ane-{precision}"]))
    assert code == 0 and f"note: coreml-reference stands in for coreml: {CORE_ML_NOTE}" in text


@off_macos
def test_edgeopt_bench_of_an_apple_ane_bundle_is_marked_in_every_figure(bundles: dict[str, Path]) -> None:
    code, out, err = run_cli("bench", str(bundles["ane-fp16"]), "--runs", "3", "--warmup", "1", "--json")
    assert code == 0, err
    document = json.loads(out)
    jsonschema.validate(document, benchmark_schema())
    assert document["runs"] == 3
    assert document["backend"]["name"] == "coreml-reference"
    assert (document["backend"]["stand_in_for"], document["backend"]["note"]) == ("coreml", CORE_ML_NOTE)
    assert document["warnings"][0].startswith(CORE_ML_NOTE) and "Core ML prediction needs macOS" in document["warnings"][0]
    code, text, _ = run_cli("bench", str(bundles["ane-fp16"]), "--runs", "3", "--warmup", "1")
    assert code == 0 and "on coreml-reference" in text and "(stand-in for coreml)" in text and f"warning: {CORE_ML_NOTE}" in text


@off_macos
def test_an_explicit_coreml_reference_works_and_an_explicit_coreml_still_fails(bundles: dict[str, Path]) -> None:
    code, out, err = run_cli("verify", str(bundles["ane-fp16"]), "--backend", "coreml-reference", "--json")
    assert code == 0, err
    assert json.loads(out)["note"] == CORE_ML_NOTE  # named or not, a stand-in is marked
    code, _, err = run_cli("verify", str(bundles["ane-fp16"]), "--backend", "coreml")
    assert code == 2
    assert "error: model.mlpackage: Core ML prediction needs macOS" in err and "--backend coreml-reference" in err


@off_macos
def test_loading_for_predict_never_switches_backend_silently(bundles: dict[str, Path]) -> None:
    """Only verify and bench stand in: an application's `load` fails clearly rather than run numpy."""
    with pytest.raises(BackendUnavailableError, match="Core ML prediction needs macOS"):
        load(bundles["ane-fp16"])
    with load(bundles["ane-fp16"], allow_stand_in=True) as model:
        assert model.backend == "coreml-reference" and model.stand_in is STAND_INS["coreml"]
        assert model.predict(numpy.zeros((1, 1, 8, 8), numpy.float32))["logits"].shape == (1, 10)


@off_macos
def test_the_runtime_alone_verifies_and_benches_an_apple_ane_bundle(bundles: dict[str, Path], tmp_path: Path) -> None:
    """`python -m edgeopt.runtime`, and the zipapp run where only numpy and coremltools are importable."""
    done = subprocess.run(
        [sys.executable, "-m", "edgeopt.runtime", "verify", str(bundles["ane-int8"]), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert (document["passed"], document["backend"], document["note"]) == (True, "coreml-reference", CORE_ML_NOTE)
    pyz = build_runtime_zipapp(tmp_path)
    site_packages = str(Path(numpy.__file__).parents[1])  # numpy and coremltools; edgeopt only via its .pth, skipped by -S
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": site_packages, "HOME": str(tmp_path)}
    bench = subprocess.run(
        [sys.executable, "-S", str(pyz), "bench", str(bundles["ane-int8"]), "--runs", "3", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert (result["backend"]["name"], result["backend"]["note"]) == ("coreml-reference", CORE_ML_NOTE)


@without_tensorrt
def test_a_jetson_orin_bench_runs_on_onnxruntime_marked(bundles: dict[str, Path]) -> None:
    code, out, err = run_cli("bench", str(bundles["orin"]), "--runs", "3", "--warmup", "1", "--json")
    assert code == 0, err
    document = json.loads(out)
    jsonschema.validate(document, benchmark_schema())
    assert document["backend"]["name"] == "onnxruntime"
    assert (document["backend"]["stand_in_for"], document["backend"]["note"]) == ("tensorrt", TENSORRT_NOTE)
    code, out, _ = run_cli("verify", str(bundles["orin"]), "--json")
    assert code == 0 and (json.loads(out)["backend"], json.loads(out)["note"]) == ("onnxruntime", TENSORRT_NOTE)
    code, _, err = run_cli("bench", str(bundles["orin"]), "--backend", "tensorrt", "--runs", "3")
    assert code == 2 and "backend 'tensorrt' needs tensorrt" in err
