"""load() and Model: every file type this machine runs, input checking, float in/out for int8 I/O."""

from __future__ import annotations

import logging

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.runtime import BackendUnavailableError, BundleError, InputSpecError, TensorSpec, load
from tests.runtime.factory import (
    INPUT_SCALE,
    INPUT_ZERO_POINT,
    OUTPUT_SCALE,
    OUTPUT_ZERO_POINT,
    conv_model,
    conv_tflite,
    float_bundle,
    tiny_float_model,
    tiny_float_reference,
    tiny_int8_io_model,
    tiny_tflite,
    two_input_model,
    write_bundle,
)

X = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_float_model().SerializeToString())
    return path


def test_a_bare_onnx_file_runs_on_onnxruntime(onnx_file: Path) -> None:
    with load(onnx_file) as model:
        assert model.backend == "onnxruntime"
        assert model.inputs == (TensorSpec("x", (1, 4), "float32"),)
        assert model.outputs == (TensorSpec("y", (1, 3), "float32"),)
        np.testing.assert_allclose(model.predict({"x": X})["y"], tiny_float_reference(X), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(model(X), tiny_float_reference(X), rtol=1e-6, atol=1e-6)


def test_an_openvino_ir_runs_on_openvino_and_matches_onnxruntime(onnx_file: Path, tmp_path: Path) -> None:
    import openvino

    xml = tmp_path / "tiny.xml"
    openvino.save_model(openvino.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
    with load(xml, options={"inference_precision": "f32"}) as model, load(onnx_file) as reference:
        assert model.backend == "openvino"
        assert [s.name for s in model.inputs] == ["x"] and model.outputs[0].shape == (1, 3)
        np.testing.assert_allclose(model(X), reference(X), rtol=1e-5, atol=1e-6)
        assert model.backend_facts()["device"] == "CPU"


def test_a_float_tflite_runs_on_litert(tmp_path: Path) -> None:
    path = tmp_path / "add.tflite"
    path.write_bytes(tiny_tflite())
    with load(path, threads=1) as model:
        assert model.backend == "tflite"
        assert model.inputs[0].quantization is None
        np.testing.assert_allclose(model(X), X + np.array([[1.0, -2.0, 0.5, 3.0]], np.float32), rtol=1e-6)


def test_an_int8_tflite_reads_its_scales_from_the_artifact(tmp_path: Path) -> None:
    path = tmp_path / "add_int8.tflite"
    path.write_bytes(tiny_tflite(int8=True))
    x = np.array([[0.5, 1.0, -1.0, 0.2]], np.float32)
    with load(path) as model:
        spec = model.inputs[0]
        assert spec.dtype == "int8"
        assert spec.quantization == {"scale": pytest.approx(0.1), "zero_point": 2}
        y = model.predict({"x": x})["y"]
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, x + np.array([[1.0, -2.0, 0.5, 3.0]]), atol=0.1 + 1e-6)
        raw = model.predict({"x": (np.rint(x / 0.1) + 2).astype(np.int8)}, raw=True)["y"]
        assert raw.dtype == np.int8
        np.testing.assert_array_equal((raw.astype(np.float32) - 2) * np.float32(0.1), y)


def _int8_bundle(root: Path) -> Path:
    return write_bundle(
        root,
        model_file="model.onnx",
        model_bytes=tiny_int8_io_model().SerializeToString(),
        backend="onnxruntime",
        precision="int8",
        inputs=[TensorSpec("xq", (1, 4), "int8", None, {"scale": INPUT_SCALE, "zero_point": INPUT_ZERO_POINT})],
        outputs=[TensorSpec("yq", (1, 3), "int8", None, {"scale": OUTPUT_SCALE, "zero_point": OUTPUT_ZERO_POINT})],
    )


def test_int8_io_takes_and_returns_floats_with_the_manifest_scales(tmp_path: Path) -> None:
    x = np.array([[0.5, -0.3, 1.1, 0.04]], np.float32)
    with load(_int8_bundle(tmp_path / "int8")) as model:
        y = model.predict({"xq": x})["yq"]
        assert y.dtype == np.float32
        x_seen = (np.clip(np.rint(x / np.float32(INPUT_SCALE)) + INPUT_ZERO_POINT, -128, 127) - INPUT_ZERO_POINT) * np.float32(INPUT_SCALE)
        y_float = tiny_float_reference(x_seen.astype(np.float32))
        # one output quantization step (plus rounding of the input) is the whole error budget
        np.testing.assert_allclose(y, y_float, atol=OUTPUT_SCALE / 2 + 1e-6)
        raw = model.predict({"xq": (np.rint(x / INPUT_SCALE) + INPUT_ZERO_POINT).astype(np.int8)}, raw=True)["yq"]
        assert raw.dtype == np.int8
        np.testing.assert_allclose((raw.astype(np.float32) - OUTPUT_ZERO_POINT) * OUTPUT_SCALE, y, rtol=1e-6)


def test_int8_inputs_clip_to_the_integer_range(tmp_path: Path) -> None:
    with load(_int8_bundle(tmp_path / "int8")) as model:
        huge = model.predict({"xq": np.full((1, 4), 1e6, np.float32)})["yq"]
        clipped = model.predict({"xq": np.full((1, 4), (127 - INPUT_ZERO_POINT) * INPUT_SCALE, np.float32)})["yq"]
        np.testing.assert_array_equal(huge, clipped)


def test_raw_int8_input_must_be_the_artifacts_dtype(tmp_path: Path) -> None:
    with load(_int8_bundle(tmp_path / "int8")) as model:
        with pytest.raises(InputSpecError, match="input 'xq' is float32"):
            model.predict({"xq": np.zeros((1, 4), np.float32)}, raw=True)
        with pytest.raises(InputSpecError, match="takes float values"):
            model.predict({"xq": np.zeros((1, 4), np.int8)})


def test_a_wrong_input_name_names_the_expected_inputs(onnx_file: Path) -> None:
    with load(onnx_file) as model:
        with pytest.raises(InputSpecError, match=r"missing x, unknown input.*expected x: \[1, 4\] float32"):
            model.predict({"input": X})


def test_a_wrong_shape_names_the_expected_shape(onnx_file: Path) -> None:
    with load(onnx_file) as model:
        with pytest.raises(InputSpecError, match=r"input 'x' has shape \(4,\); expected shape \[1, 4\] dtype float32"):
            model.predict({"x": X[0]})


def test_a_wrong_dtype_kind_is_refused_and_float64_is_cast(onnx_file: Path) -> None:
    with load(onnx_file) as model:
        with pytest.raises(InputSpecError, match=r"input 'x' is int32; expected shape \[1, 4\] dtype float32"):
            model.predict({"x": np.zeros((1, 4), np.int32)})
        y64 = model.predict({"x": X.astype(np.float64)})["y"]
        np.testing.assert_array_equal(y64, model.predict({"x": X})["y"])


def test_dynamic_batch_accepts_any_batch(tmp_path: Path) -> None:
    path = tmp_path / "dyn.onnx"
    path.write_bytes(tiny_float_model(batch="N").SerializeToString())
    with load(path) as model:
        assert model.inputs[0].shape == ("N", 4)
        batch = np.ones((5, 4), np.float32)
        assert model(batch).shape == (5, 3)
        with pytest.raises(InputSpecError, match=r"expected shape \['N', 4\]"):
            model(np.ones((5, 5), np.float32))


def test_a_two_input_model_needs_a_dict_and_keeps_integer_inputs_exact(tmp_path: Path) -> None:
    path = tmp_path / "two.onnx"
    path.write_bytes(two_input_model().SerializeToString())
    with load(path) as model:
        with pytest.raises(InputSpecError, match="this model has 2 inputs"):
            model.predict(np.zeros((1, 2), np.float32))
        with pytest.raises(InputSpecError, match="input 'ids' is int32"):
            model.predict({"a": np.zeros((1, 2), np.float32), "ids": np.zeros((1, 2), np.int32)})
        z = model.predict({"a": np.ones((1, 2), np.float32), "ids": np.array([[2, 3]], np.int64)})["z"]
        np.testing.assert_array_equal(z, [[3.0, 4.0]])


def test_an_explicit_backend_overrides_the_manifest(tmp_path: Path) -> None:
    """The build host verifies a jetson-orin bundle's model.onnx on ONNX Runtime."""
    bundle = float_bundle(tmp_path / "orin")
    manifest = (bundle / "manifest.json").read_text().replace('"backend": "onnxruntime"', '"backend": "tensorrt"')
    (bundle / "manifest.json").write_text(manifest)
    with pytest.raises(BackendUnavailableError):
        load(bundle)
    with load(bundle, backend="onnxruntime") as model:
        assert model.backend == "onnxruntime"
        assert model.verify().passed


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the off-macOS error; on macOS Core ML runs")
def test_core_ml_off_macos_says_prediction_needs_macos(tmp_path: Path) -> None:
    package = tmp_path / "model.mlpackage"
    (package / "Data").mkdir(parents=True)
    (package / "Manifest.json").write_text("{}")
    with pytest.raises(BackendUnavailableError, match="Core ML prediction needs macOS") as caught:
        load(package)
    assert "Mac" in caught.value.hint


def test_a_missing_backend_library_names_the_manifest_install_command(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; this checks the error on machines without it")
    bundle = write_bundle(
        tmp_path / "orin",
        model_file="model.onnx",
        model_bytes=tiny_float_model().SerializeToString(),
        backend="tensorrt",
        target="jetson-orin",
        install="sudo apt install nvidia-jetpack",
        inputs=[TensorSpec("x", (1, 4), "float32")],
        outputs=[TensorSpec("y", (1, 3), "float32")],
    )
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' needs tensorrt") as caught:
        load(bundle)
    assert caught.value.hint == "sudo apt install nvidia-jetpack"
    assert caught.value.exit_code == 2


def test_an_unknown_file_type_and_an_unknown_backend_are_clear(tmp_path: Path, onnx_file: Path) -> None:
    weird = tmp_path / "model.pt"
    weird.write_bytes(b"\0")
    with pytest.raises(BundleError, match=r"no backend loads '\.pt' files"):
        load(weird)
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        load(onnx_file, backend="tvm")


def test_close_frees_the_backend_and_the_first_inference_is_timed(onnx_file: Path) -> None:
    model = load(onnx_file)
    assert model.first_inference_seconds is None and model.load_seconds > 0
    model(X)
    assert model.first_inference_seconds is not None
    model.close()
    model.close()  # idempotent


def test_a_tflite_conv_stack_matches_its_onnx_twin_on_onnxruntime(tmp_path: Path) -> None:
    (tmp_path / "conv.tflite").write_bytes(conv_tflite(channels=8, size=12, layers=2))
    (tmp_path / "conv.onnx").write_bytes(conv_model(channels=8, size=12, layers=2).SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)
    with load(tmp_path / "conv.tflite") as litert, load(tmp_path / "conv.onnx") as ort:
        nhwc = litert(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(nhwc.transpose(0, 3, 1, 2), ort(x), rtol=1e-4, atol=1e-5)


def test_a_different_backend_version_than_the_bundle_was_built_with_is_a_warning(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    manifest = (bundle / "manifest.json").read_text().replace('"toolchain": {', '"toolchain": {"onnxruntime": "0.9.0", ')
    (bundle / "manifest.json").write_text(manifest)
    with load(bundle) as model:
        assert model.warnings == [
            f"the bundle was built with onnxruntime 0.9.0; this machine runs {model.backend_version} (run verify to check parity)"
        ]
        result = model.benchmark(warmup=0, runs=2)
        assert result.warnings == model.warnings
        assert f"warning: {model.warnings[0]}" in result.format_text()


def test_a_file_the_library_cannot_parse_is_a_bundle_error_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    with pytest.raises(BundleError, match=r"broken\.onnx: onnxruntime could not load it"):
        load(broken)


def test_asking_onnxruntime_for_cuda_on_a_cpu_build_falls_back_to_cpu(onnx_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA; the fallback is checked on CPU-only builds")
    # Some libraries raise the root logger's level on import; ask for warnings explicitly.
    with caplog.at_level(logging.WARNING), load(onnx_file, device="cuda") as model:
        assert model.backend_facts()["providers"] == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider" in caplog.text


def test_openvino_auto_device_and_threads(onnx_file: Path, tmp_path: Path) -> None:
    import openvino

    xml = tmp_path / "tiny.xml"
    openvino.save_model(openvino.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
    with load(xml, device="AUTO", threads=1) as model:
        assert model.backend_facts()["device"] == "AUTO"
        assert model(X).shape == (1, 3)


def test_manifest_names_map_to_the_artifacts_tensors_by_position(tmp_path: Path) -> None:
    """TFLite renames tensors (e.g. serving_default_x:0); the manifest's names are what users use."""
    bundle = write_bundle(
        tmp_path / "pi",
        model_file="model.tflite",
        model_bytes=tiny_tflite(),
        backend="tflite",
        target="raspberry-pi",
        inputs=[TensorSpec("image", (1, 4), "float32", "NC")],
        outputs=[TensorSpec("scores", (1, 4), "float32")],
    )
    with load(bundle) as model:
        assert [s.name for s in model.inputs] == ["image"] and model.inputs[0].layout == "NC"
        outputs = model.predict({"image": X})
        assert list(outputs) == ["scores"]
        np.testing.assert_allclose(outputs["scores"], X + np.array([[1.0, -2.0, 0.5, 3.0]], np.float32), rtol=1e-6)


def test_per_channel_output_scales_dequantize_along_their_axis(tmp_path: Path) -> None:
    scales = [0.1, 0.2, 0.4]
    bundle = write_bundle(
        tmp_path / "pc",
        model_file="model.onnx",
        model_bytes=tiny_int8_io_model().SerializeToString(),
        backend="onnxruntime",
        inputs=[TensorSpec("xq", (1, 4), "int8", None, {"scale": INPUT_SCALE, "zero_point": INPUT_ZERO_POINT})],
        outputs=[TensorSpec("yq", (1, 3), "int8", None, {"scale": scales, "zero_point": [0, 0, 0], "axis": 1})],
    )
    with load(bundle) as model:
        raw = model.predict({"xq": np.full((1, 4), 10, np.int8)}, raw=True)["yq"]
        y = model.predict({"xq": np.full((1, 4), (10 - INPUT_ZERO_POINT) * INPUT_SCALE, np.float32)})["yq"]
        np.testing.assert_allclose(y, raw.astype(np.float32) * np.array(scales, np.float32), rtol=1e-6)
