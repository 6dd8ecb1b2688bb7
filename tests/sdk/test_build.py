"""`edgeopt build` end to end: real ONNX Runtime, real bundles, validated manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgeopt
from edgeopt.verify import validate_manifest, verify_bundle
from tests import zoo

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SCHEMA = json.loads((Path(edgeopt.__file__).parent / "schemas" / "manifest.schema.json").read_text())


def _ort(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "jetson-orin"])
def test_digits_builds_verifies_and_matches_the_schema(tmp_path: Path, target: str) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", target, output=tmp_path / "b", evaluation=DIGITS / "eval.npz")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    assert manifest == json.loads(json.dumps(result.manifest, default=str))
    assert manifest["reference"]["measured"]["max_abs"] < 1e-4
    accuracy = next(m for m in manifest["quality"]["metrics"] if m["name"] == "accuracy")
    assert accuracy["fp32"] > 0.9 and accuracy["delta"] == 0.0
    assert manifest["compression"]["nodes_after"] < manifest["compression"]["nodes_before"]
    assert [s["name"] for s in manifest["stages"]] == ["load", "validate", "simplify", "check_ops", "lower", "verify", "evaluate", "package"]
    assert verify_bundle(tmp_path / "b").passed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_jetson_bundle_carries_engine_recipe_and_triton_repository(tmp_path: Path) -> None:
    edgeopt.build(DIGITS / "model.onnx", "orin", output=tmp_path / "b", precision="fp16")
    bundle = tmp_path / "b"
    script = (bundle / "build_engine.sh").read_text()
    assert "--onnx=model.onnx" in script and "--saveEngine=model.plan" in script and "--fp16" in script
    assert "--memPoolSize=workspace:4096M" in script and "--timingCacheFile=timing.cache" in script
    assert os.access(bundle / "build_engine.sh", os.X_OK)
    config = (bundle / "triton" / "model" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and 'name: "image"' in config
    assert "dims: [ 1, 1, 8, 8 ]" in config and "TYPE_FP32" in config and 'name: "logits"' in config
    assert (bundle / "triton" / "model" / "1").is_dir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["runtime"]["backend"] == "tensorrt"
    assert manifest["precision"] == "fp16"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "squeezenet", "shufflenet", "densenet121"])
@pytest.mark.parametrize("target", ["onnxruntime-cpu", "jetson-orin"])
def test_light_models_build_and_match_ort(tmp_path: Path, name: str, target: str) -> None:
    path = tmp_path / f"{name}.onnx"
    onnx.save(zoo.light_model(name), path)
    result = edgeopt.build(path, target, output=tmp_path / "b", precision="fp32")
    measured = result.manifest["reference"]["measured"]
    assert measured["max_rel"] <= 1e-4
    jsonschema.validate(result.manifest, SCHEMA)
    feeds = zoo.random_inputs(zoo.light_model(name), n=1, seed=3)[0]
    ours = _ort(tmp_path / "b" / "model.onnx", feeds)
    reference = _ort(path, feeds)
    for a, b in zip(ours, reference):
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-6)


def test_onnxruntime_fp16_halves_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(zoo.light_model("squeezenet"), path)
    fp32 = edgeopt.build(path, "onnxruntime-cpu", output=tmp_path / "a", precision="fp32")
    fp16 = edgeopt.build(path, "onnxruntime-cpu", output=tmp_path / "b", precision="fp16")
    ratio = fp16.manifest["compression"]["bytes_after"] / fp32.manifest["compression"]["bytes_after"]
    assert 0.45 < ratio < 0.6
    assert fp16.manifest["reference"]["measured"]["max_rel"] <= 2e-2


def test_archive_and_tampering_are_detected(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b", archive=True)
    assert result.archive is not None and result.archive.is_file()
    assert verify_bundle(result.archive).passed
    model = tmp_path / "b" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    with pytest.raises(edgeopt.errors.BundleError, match="model.onnx"):
        verify_bundle(tmp_path / "b")


def test_schema_rejects_a_broken_manifest(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b")
    broken = dict(result.manifest, artifacts=[dict(result.manifest["artifacts"][0], sha256="nothex")])
    with pytest.raises(edgeopt.errors.BundleError, match="artifacts/0/sha256"):
        validate_manifest(json.loads(json.dumps(broken, default=str)))


def test_nhwc_io_layout_reference_data_is_in_the_artifacts_layout(tmp_path: Path) -> None:
    path = tmp_path / "unet.onnx"
    onnx.save(zoo.unet_style(), path)
    result = edgeopt.build(path, "raspberry-pi", output=tmp_path / "b", io_layout="nhwc")
    (spec,) = result.manifest["inputs"]
    assert spec["layout"] == "NHWC" and spec["shape"] == [1, 64, 64, 3]
    with np.load(tmp_path / "b" / "reference" / "inputs.npz") as data:
        assert data[spec["name"]].shape[1:] == (64, 64, 3)
    assert result.manifest["reference"]["measured"]["max_rel"] <= 1e-4
    assert verify_bundle(tmp_path / "b").passed


QAT_MODEL = Path(__file__).resolve().parents[1] / "data" / "digits_qat.onnx"


@pytest.mark.parametrize("target,isa", [("jetson-orin", None), ("onnxruntime-cpu", "vnni"), ("raspberry-pi", None)])
def test_qat_model_builds_int8_without_calibration_keeping_its_weight_scales(tmp_path: Path, target: str, isa: str | None) -> None:
    result = edgeopt.build(QAT_MODEL, target, output=tmp_path / "b", isa=isa)
    manifest = result.manifest
    assert manifest["precision"] == "int8" and manifest["target"]["isa"] == isa
    assert manifest["quantization"]["qat_imported"]
    scales = {s["tensor"]: s for s in manifest["quantization"]["scales"]}
    for weight in ("conv1.weight", "conv2.weight", "fc.weight"):  # learned weight scales are kept exactly
        assert scales[weight]["kept"] and scales[weight]["after"]["scale"] == scales[weight]["before"]["scale"]
    measured = manifest["reference"]["measured"]
    assert measured["against"] == "QDQ" and measured["checked"], "parity: the artifact computes the QDQ graph it came from"
    assert manifest["quality"] is None, "no data given: quality is not measured (and not invented)"
    assert verify_bundle(tmp_path / "b", backend="onnxruntime" if target == "jetson-orin" else None).passed
    if target == "jetson-orin":
        assert any("symmetric int8 zero point 0" in w for w in result.warnings)


def test_qat_model_for_the_default_x86_class_narrows_its_weights_and_says_so(tmp_path: Path) -> None:
    result = edgeopt.build(QAT_MODEL, "onnxruntime-cpu", output=tmp_path / "b")
    assert result.manifest["target"]["isa"] == "avx2"
    narrowed = [w for w in result.warnings if "7-bit weights" in w]
    assert sorted(w.split(":")[1].strip() for w in narrowed) == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert result.manifest["reference"]["measured"]["checked"]
    assert verify_bundle(tmp_path / "b").passed


def test_a_cpu_class_the_target_does_not_have_is_bad_usage_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(edgeopt.errors.EdgeoptError, match="no CPU class 'vnni'") as info:
        edgeopt.build(DIGITS / "model.onnx", "raspberry-pi", output=tmp_path / "b", isa="vnni")
    assert info.value.exit_code == 2 and not (tmp_path / "b").exists()


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "jetson-orin", "intel-openvino", "raspberry-pi", "apple-ane"])
@pytest.mark.parametrize("precision", [None, "int8"])
def test_every_target_builds_the_example_at_default_precision_and_int8(tmp_path: Path, target: str, precision: str | None) -> None:
    result = edgeopt.build(
        DIGITS / "model.onnx", target, output=tmp_path / "b", precision=precision,
        calibration=DIGITS / "calib.npz", evaluation=DIGITS / "eval.npz",
    )
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    accuracy = next(m for m in manifest["quality"]["metrics"] if m["name"] == "accuracy")
    assert accuracy["delta"] >= -0.01, accuracy  # at most one point lost on 450 held-out digits
    if precision == "int8":
        assert manifest["quantization"]["quantized_op_share"] > 0
        assert result.manifest["compression"]["bytes_after"] < result.manifest["compression"]["bytes_before"]
    if target != "apple-ane":  # Core ML prediction needs macOS; the build checked it with the reference evaluator
        assert verify_bundle(tmp_path / "b").passed
    else:
        assert "not Core ML" in manifest["reference"]["measured"]["verified_with"]


def test_int8_without_eval_measures_quality_on_calibration_samples_held_out_from_range_estimation(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=tmp_path / "b", precision="int8", calibration=DIGITS / "calib.npz")
    quality = result.manifest["quality"]
    with np.load(DIGITS / "calib.npz") as data:
        total = len(data["image"])
    held_out = min(256, max(32, total // 4))
    assert quality["samples"] == held_out and f"{held_out} calibration samples held out" in quality["data"]
    assert result.manifest["quantization"]["samples"] == total - held_out
    agreement = next(m for m in quality["metrics"] if m["name"] == "top1_agreement")
    assert agreement["optimized"] >= 0.97
    assert "held out" in result.summary_text()
