"""Model.benchmark (one JSON schema for every backend) and verify (reference parity at tolerance)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgeopt.runtime import TensorSpec, VerificationError, benchmark_schema, load, verify
from tests.runtime.factory import float_bundle, tiny_float_model, tiny_float_reference, tiny_tflite, write_bundle


def _openvino_bundle(root: Path, tmp_path: Path) -> Path:
    import openvino

    onnx_path = tmp_path / "src.onnx"
    onnx_path.write_bytes(tiny_float_model().SerializeToString())
    ir_dir = tmp_path / "ir"
    ir_dir.mkdir()
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(ir_dir / "model.xml"), compress_to_fp16=False)
    x = np.random.default_rng(2).standard_normal((2, 1, 4)).astype(np.float32)
    return write_bundle(
        root,
        model_file="model.xml",
        model_bytes=(ir_dir / "model.xml").read_bytes(),
        extra_files={"model.bin": (ir_dir / "model.bin").read_bytes()},
        backend="openvino",
        target="intel-openvino",
        install="pip install openvino",
        options={"device": "CPU", "performance_hint": "LATENCY", "inference_precision": "f32"},
        inputs=[TensorSpec("x", (1, 4), "float32", "NC")],
        outputs=[TensorSpec("y", (1, 3), "float32")],
        reference_inputs={"x": x},
        reference_outputs={"y": np.stack([tiny_float_reference(s) for s in x])},
    )


def _tflite_bundle(root: Path) -> Path:
    x = np.random.default_rng(2).standard_normal((2, 1, 4)).astype(np.float32)
    return write_bundle(
        root,
        model_file="model.tflite",
        model_bytes=tiny_tflite(int8=True),
        backend="tflite",
        target="raspberry-pi",
        precision="int8",
        install="pip install ai-edge-litert",
        inputs=[TensorSpec("x", (1, 4), "int8", None, {"scale": 0.1, "zero_point": 2})],
        outputs=[TensorSpec("y", (1, 4), "int8", None, {"scale": 0.1, "zero_point": 2})],
        reference_inputs={"x": x},
        reference_outputs={"y": x + np.array([1.0, -2.0, 0.5, 3.0], np.float32)},
        tolerance={"atol": 0.1, "rtol": 0.0},
    )


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino", "tflite"])
def test_benchmark_results_of_every_backend_match_one_schema(kind: str, tmp_path: Path) -> None:
    if kind == "onnxruntime":
        bundle = float_bundle(tmp_path / "b")
    elif kind == "openvino":
        bundle = _openvino_bundle(tmp_path / "b", tmp_path)
    else:
        bundle = _tflite_bundle(tmp_path / "b")
    with load(bundle) as model:
        result = model.benchmark(warmup=2, runs=20)
    document = result.to_dict()
    jsonschema.validate(document, benchmark_schema())
    assert document["backend"]["name"] == kind
    assert f'"name": "{kind}"' in json.dumps(document["backend"]), "the JSON edge writes a BackendName as its plain value"
    assert document["runs"] == len(document["samples_ms"]) == 20
    latency = document["latency_ms"]
    assert latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert document["first_inference_ms"] > 0 and document["load_ms"] > 0
    assert document["input_source"] == "reference"
    assert document["memory"]["peak_rss_bytes"] >= document["memory"]["rss_bytes"] > 0
    assert document["device"]["python"]["version"] and document["libraries"]["numpy"] == np.__version__
    assert kind in result.format_text() and "p50" in result.format_text()


def test_a_duration_benchmark_runs_for_that_long_and_threads_reload_the_backend(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(tiny_float_model().SerializeToString())
    with load(path) as model:
        result = model.benchmark(warmup=0, duration=0.2, threads=1)
    assert result.duration_s >= 0.2 and result.runs > 10
    assert result.threads == 1 and result.input_source == "synthetic"
    jsonschema.validate(result.to_dict(), benchmark_schema())


def test_verify_passes_within_the_manifest_tolerance(tmp_path: Path) -> None:
    result = verify(float_bundle(tmp_path / "b", samples=4))
    assert result.passed and result.samples == 4
    assert result.tolerance == {"atol": 1e-5, "rtol": 1e-4}
    [output] = result.outputs
    assert output.name == "y" and output.max_abs < 1e-5 and output.mismatched == 0
    assert result.to_dict()["outputs"][0]["elements"] == 12
    assert '"backend": "onnxruntime"' in json.dumps(result.to_dict())
    result.raise_for_failure()


def test_verify_fails_when_outputs_differ_and_says_by_how_much(tmp_path: Path) -> None:
    result = verify(float_bundle(tmp_path / "b", wrong_reference=True))
    assert not result.passed
    [output] = result.outputs
    assert output.max_abs == pytest.approx(0.5, abs=1e-5) and output.mismatched == output.elements
    with pytest.raises(VerificationError, match=r"y \(max_abs 0\.5, 9/9 elements\)") as caught:
        result.raise_for_failure()
    assert caught.value.exit_code == 3
    assert "FAILED" in result.format_text()


def test_drift_under_the_element_bound_fails_the_rms_bound(tmp_path: Path) -> None:
    """fp16/int8 element bounds only catch values off the output's scale; the build's RMS bound catches drift everywhere."""
    loose = {"atol": 10.0, "rtol": 0.0, "outputs": {"y": {"atol": 10.0, "rtol": 0.0, "rms": 0.1}}}
    result = verify(float_bundle(tmp_path / "b", tolerance=loose, wrong_reference=True))
    [output] = result.outputs
    assert not result.passed and output.mismatched == 0
    assert output.rms == pytest.approx(0.5, abs=1e-5) and output.allowed_rms == 0.1
    with pytest.raises(VerificationError, match=r"rms 0\.5 > 0\.1"):
        result.raise_for_failure()
    within = {"atol": 10.0, "rtol": 0.0, "outputs": {"y": {"atol": 10.0, "rtol": 0.0, "rms": 0.6}}}
    assert verify(float_bundle(tmp_path / "c", tolerance=within, wrong_reference=True)).passed


def test_verify_accepts_references_concatenated_along_a_batch_of_one(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    bundle = write_bundle(
        tmp_path / "b",
        model_file="model.onnx",
        model_bytes=tiny_float_model().SerializeToString(),
        backend="onnxruntime",
        inputs=[TensorSpec("x", (1, 4), "float32")],
        outputs=[TensorSpec("y", (1, 3), "float32")],
        reference_inputs={"x": x},
        reference_outputs={"y": tiny_float_reference(x)},
    )
    result = verify(bundle)
    assert result.passed and result.samples == 3


def test_verify_on_tflite_int8_compares_dequantized_outputs(tmp_path: Path) -> None:
    result = verify(_tflite_bundle(tmp_path / "b"))
    assert result.passed, result.format_text()
    assert result.backend == "tflite"
