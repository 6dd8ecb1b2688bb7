"""`edgeopt build` end to end: real ONNX Runtime, real bundles, validated manifests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgeopt
from edgeopt.bundle import artifact_entry, write_manifest
from edgeopt.runtime.kinds import BackendName, Precision
from edgeopt.runtime.manifest import Manifest
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


def test_the_typed_manifest_writes_what_the_schema_describes_and_reads_back_unchanged(tmp_path: Path) -> None:
    """`Manifest.to_json` is what the build writes; the schema accepts it and `from_json` gives the same manifest."""
    result = edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b", precision="int8", calibration=DIGITS / "calib.npz")
    written = result.contents.to_json()
    jsonschema.validate(written, SCHEMA)
    assert written == json.loads((tmp_path / "b" / "manifest.json").read_text()) == result.manifest
    assert Manifest.from_json(written) == result.contents
    assert result.contents.precision is Precision.INT8 and result.contents.runtime.backend is BackendName.ONNXRUNTIME
    assert [s.name for s in result.contents.stages][-1] == "package" and result.contents.quality is not None


def test_the_schemas_closed_sets_are_the_enums_the_code_dispatches_on() -> None:
    from edgeopt.runtime.isa import IsaClass
    from edgeopt.runtime.kinds import ArtifactFormat

    target = SCHEMA["properties"]["target"]["properties"]
    assert SCHEMA["properties"]["precision"]["enum"] == [p.value for p in Precision]
    assert target["backend"]["enum"] == [b.value for b in BackendName]
    assert target["artifact_format"]["enum"] == [f.value for f in ArtifactFormat]
    assert target["isa"]["enum"] == [c.value for c in IsaClass] + [None]
    # the device runs the real backend; coreml-reference only stands in for Core ML off macOS
    assert SCHEMA["properties"]["runtime"]["properties"]["backend"]["enum"] == [b.value for b in BackendName if b is not BackendName.COREML_REFERENCE]


def test_a_precision_given_as_the_enum_builds_like_its_name(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b", precision=Precision.FP16)
    assert result.manifest["precision"] == "fp16" and result.contents.precision is Precision.FP16


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


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_device_is_held_to_the_builds_noise_bound_not_only_to_the_output_scale(tmp_path: Path, precision: str) -> None:
    calibration = DIGITS / "calib.npz" if precision == "int8" else None
    result = edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=tmp_path / "b", precision=precision, calibration=calibration)
    [bound] = result.manifest["reference"]["tolerance"]["outputs"].values()
    assert 0 < bound["rms"] < bound["atol"] / 20  # the element bound is the logits' scale; the RMS bound is the build's noise
    reference = tmp_path / "b" / "reference" / "outputs.npz"
    drifted = {k: v + 3 * bound["rms"] for k, v in np.load(reference).items()}  # everywhere, far under atol
    np.savez(reference, **drifted)
    manifest = result.manifest
    manifest["artifacts"] = [artifact_entry(tmp_path / "b", a["path"], a["format"], a["role"]) if a["path"] == "reference/outputs.npz" else a for a in manifest["artifacts"]]
    write_manifest(tmp_path / "b", manifest)
    outcome = verify_bundle(tmp_path / "b")
    assert not outcome.passed and outcome.outputs[0].mismatched == 0 and outcome.outputs[0].rms > bound["rms"]


def test_archive_and_tampering_are_detected(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b", archive=True)
    assert result.archive is not None and result.archive.is_file()
    with tarfile.open(result.archive) as tar:
        assert not [m.name for m in tar.getmembers() if Path(m.name).name.startswith(".")]  # no lock or temp files
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
    # of the rest, the technique search holds out its own samples to judge each technique; the chosen
    # recipe's ranges then come from all of the rest
    quantization = result.manifest["quantization"]
    assert 0 < quantization["techniques"]["search"]["held_out_samples"] < total - held_out
    assert quantization["samples"] == quantization["techniques"]["refit_samples"] == total - held_out
    agreement = next(m for m in quality["metrics"] if m["name"] == "top1_agreement")
    assert agreement["optimized"] >= 0.97
    assert "held out" in result.summary_text()


def _digits_with(tmp_path: Path, initializer: str, value: float, count: int) -> Path:
    """The digits model with `count` values of one initializer set to `value` (NaN or Inf)."""
    model = onnx.load(str(DIGITS / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    array = onnx.numpy_helper.to_array(tensor).copy()
    array.reshape(-1)[:count] = value
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, initializer))
    path = tmp_path / "poisoned.onnx"
    onnx.save(model, str(path))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("initializer", "value", "count"), [("classifier.weight", float("nan"), 1), ("features.0.weight", float("inf"), 3)])
def test_non_finite_weights_are_refused_naming_the_initializer(tmp_path: Path, initializer: str, value: float, count: int) -> None:
    """max() drops NaN: a poisoned weight would otherwise build a 'verified' bundle with NaN in its manifest."""
    model = _digits_with(tmp_path, initializer, value, count)
    proc = _cli("build", str(model), "-t", "ort", "-o", str(tmp_path / "b"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"NaN or Inf weights in 1 initializer(s): {initializer} ({count} of" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_a_model_producing_nan_on_the_data_is_refused_naming_the_output(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Log", ["x"], ["log_x"])],
        "log",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("log_x", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "log.onnx"))
    np.savez(tmp_path / "negative.npz", x=-np.ones((40, 4), np.float32))
    proc = _cli("build", str(tmp_path / "log.onnx"), "-t", "ort", "-o", str(tmp_path / "b"), "--eval", str(tmp_path / "negative.npz"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the fp32 model itself produces NaN or Inf on the 4 reference input(s) taken from" in proc.stderr
    assert "output 'log_x' (16 values)" in proc.stderr and not (tmp_path / "b").exists()


def test_every_number_in_the_manifest_is_strict_json(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b", precision="int8",
                           calibration=DIGITS / "calib.npz", evaluation=DIGITS / "eval.npz")
    json.loads((result.bundle / "manifest.json").read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in the manifest"))


def test_an_all_float_budget_fallback_is_labelled_float_and_budgets_print_in_points(tmp_path: Path) -> None:
    """The outlier MLP meets a zero budget only with every layer in float: the summary must not say int8."""
    from tests.converters.test_quantize_budget import outlier_mlp

    onnx.save(outlier_mlp(), str(tmp_path / "mlp.onnx"))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(2).normal(size=(200, 16)).astype(np.float32))
    result = edgeopt.build(tmp_path / "mlp.onnx", "ort", output=tmp_path / "b", precision="int8",
                           calibration=tmp_path / "calib.npz", evaluation=tmp_path / "eval.npz", max_accuracy_drop=0.0)
    summary = result.summary_text()
    assert summary.splitlines()[0] == "built mlp for onnxruntime-cpu (onnx, float: the accuracy budget kept every layer out of int8)"
    assert "top1_agreement logits: fp32 100.00% -> 100.00% (Δ +0.00 points)" in summary
    assert "  budget   top-1 disagreement 0.00 points (--max-accuracy-drop 0 points)" in summary
    assert any("held only with all 4 quantizable layers in float" in w for w in result.warnings)
    assert "(onnx, float: the accuracy budget kept every layer out of int8)</h1>" in (tmp_path / "b" / "report.html").read_text()


def test_a_budget_met_in_int8_prints_its_drop_in_points(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b", precision="int8",
                           calibration=DIGITS / "calib.npz", evaluation=DIGITS / "eval.npz", max_accuracy_drop=1.0)
    summary = result.summary_text()
    assert "(onnx, int8)" in summary.splitlines()[0]
    assert "  budget   accuracy drop " in summary and " points (--max-accuracy-drop 1 points)" in summary
    assert "points)" in next(line for line in summary.splitlines() if "accuracy logits" in line)


def _dynamic_image_conv(path: Path) -> Path:
    """A conv net whose height and width are dynamic, as PP-OCR exports them (-1)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "dynamic_hw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, -1, -1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, -1, -1])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_dynamic_model_given_its_input_shape_verifies_on_that_shape_and_counts_macs_there(tmp_path: Path) -> None:
    """Without data, the random reference inputs take the --input-shape (they were 1x1 and the bundle,
    fixed at 32x48, refused them), and MACs 'before' are counted at that shape, not at 1x1."""
    model = _dynamic_image_conv(tmp_path / "dynamic.onnx")
    result = edgeopt.build(model, target="onnxruntime-cpu", output=tmp_path / "b", input_shapes={"x": (1, 3, 32, 48)})
    with np.load(result.bundle / "reference" / "inputs.npz") as reference:
        assert reference["x"].shape[-3:] == (3, 32, 48)  # the samples, stacked
    compression = result.manifest["compression"]
    assert compression["macs_before"] == compression["macs_after"] == 8 * 3 * 3 * 3 * 32 * 48


def _dynamic_model(path: Path, dims: list[int | str]) -> Path:
    """A conv net with dynamic input sizes (`dims`: a name where dynamic), as PP-OCR's models are exported."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("GlobalAveragePool", ["c"], ["y"])],
        "dynamic_hw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 1, 1])], [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_tflite_refuses_dynamic_sizes_nothing_sets_instead_of_building_a_1x1_model(tmp_path: Path) -> None:
    model = _dynamic_model(tmp_path / "dynamic.onnx", ["batch", 3, "h", "w"])
    with pytest.raises(edgeopt.errors.EdgeoptError, match=r"input 'x' has dynamic sizes \[\?, 3, \?, \?\]") as info:
        edgeopt.build(model, "raspberry-pi", output=tmp_path / "b")
    assert info.value.exit_code == 2 and "--input-shape x=1,3,N,N" in info.value.hint and not (tmp_path / "b").exists()
    built = edgeopt.build(model, "raspberry-pi", output=tmp_path / "b", input_shapes={"x": (1, 3, 32, 48)})
    assert built.manifest["inputs"][0]["shape"] == [1, 3, 32, 48]
    assert edgeopt.build(model, "onnxruntime-cpu", output=tmp_path / "ort").manifest["target"]["name"] == "onnxruntime-cpu", "runs dynamic shapes"
    batch_only = _dynamic_model(tmp_path / "batch.onnx", ["batch", 3, 16, 16])  # the usual export: TFLite runs batch 1
    assert edgeopt.build(batch_only, "raspberry-pi", output=tmp_path / "b1").manifest["inputs"][0]["shape"] == [1, 3, 16, 16]
