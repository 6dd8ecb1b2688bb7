"""`inspect_model`: the report a user reads before building, as data and as text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.errors import ModelLoadError
from edgeopt.errors import EdgeoptError
from edgeopt.inspect import InspectReport, inspect_model
from edgeopt.targets import get_target
from tests import zoo

DIGITS = zoo.DIGITS_DIR / "model.onnx"
CALIBRATION = zoo.DIGITS_DIR / "calib.npz"
LIGHT_ALEXNET = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_bvlc_alexnet.onnx"


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _ort_quantized_digits(tmp_path: Path) -> Path:
    """The digits CNN through ONNX Runtime's default static quantization (uint8, asymmetric)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    images = np.load(CALIBRATION)["image"][:8]
    feeds = iter([{"image": images[i : i + 1]} for i in range(len(images))])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    path = tmp_path / "digits_qdq.onnx"
    quantize_static(str(DIGITS), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return path


def test_float_model_report_for_tensorrt(tmp_path: Path):
    path = _save(zoo.mobilenet_v2_style(), tmp_path / "mnv2.onnx")
    report = inspect_model(path, get_target("jetson-orin"))
    assert isinstance(report, InspectReport)
    assert [(s.name, s.shape, s.dtype) for s in report.inputs] == [("input", (1, 3, 64, 64), "float32")]
    assert [(s.name, s.shape) for s in report.outputs] == [("logits", (1, 10))]
    assert report.target == "jetson-orin" and not report.is_qdq
    assert report.unsupported == [] and report.lint is None
    assert report.stats.macs > 0 and report.stats.parameters > 0
    assert any(a.rule == "swish-before-int8" for a in report.advice)

    text = report.format_text()
    for heading in ("Inputs", "Outputs", "Ops (", "Unsupported nodes", "Quantization advice ("):
        assert heading in text
    assert "none: every node runs on jetson-orin" in text
    assert "input  1x3x64x64  float32" in text
    assert "HardSwish output lies in" in text

    data = json.loads(json.dumps(report.to_dict()))
    assert data["target"] == "jetson-orin" and data["lint"] is None
    assert data["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert data["stats"]["op_histogram"]["Conv"] == report.stats.op_histogram["Conv"]


def test_without_a_target_only_the_model_is_described(tmp_path: Path):
    report = inspect_model(DIGITS)
    assert report.target is None and report.unsupported == [] and report.lint is None
    text = report.format_text()
    assert "Unsupported nodes" not in text and "Q/DQ lint" not in text
    assert "image  1x1x8x8  float32" in text


def test_every_unsupported_node_is_listed_with_its_reason(tmp_path: Path):
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("TopK", ["r", "k"], ["v", "i"], name="topk", axis=-1),
                helper.make_node("ReduceLogSumExp", ["v"], ["y"], name="norm", keepdims=1),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
            [numpy_helper.from_array(np.array([3], np.int64), "k")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    report = inspect_model(_save(model, tmp_path / "m.onnx"), "raspberry-pi")
    assert [(node, op) for node, op, _ in report.unsupported] == [("topk", "TopK"), ("norm", "ReduceLogSumExp")]
    text = report.format_text()
    assert "Unsupported nodes (2) on raspberry-pi" in text
    assert "edgeopt's tflite lowering for raspberry-pi does not write ReduceLogSumExp yet" in text
    assert report.to_dict()["unsupported"][0] == {"node": "topk", "op": "TopK", "why": report.unsupported[0][2]}


def test_a_qdq_model_is_linted_against_the_target(tmp_path: Path):
    path = _ort_quantized_digits(tmp_path)
    report = inspect_model(path, get_target("jetson-orin"))
    assert report.is_qdq
    rules = {f.rule for f in report.lint}
    assert {"trt-zero-point", "trt-int8-only"} <= rules  # uint8, asymmetric, int32 biases
    assert inspect_model(path, get_target("onnxruntime-cpu")).lint == []
    text = report.format_text()
    errors = sum(f.severity == "error" for f in report.lint)
    assert f"Q/DQ lint for jetson-orin: {errors} error(s)" in text
    assert "trt-zero-point" in text
    assert report.to_dict()["lint"][0]["severity"] in ("error", "warning")


def test_old_opsets_are_reported_as_converted():
    report = inspect_model(LIGHT_ALEXNET)
    assert report.stats.opset == 13 and report.opset_converted_from == 9
    assert "opset 13 (converted from 9)" in report.format_text()


def test_bad_input_surfaces_as_a_model_load_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not found"):
        inspect_model(tmp_path / "missing.onnx")


def test_quant_debug_quantizes_a_float_model_in_the_target_scheme():
    report = inspect_model(DIGITS, "raspberry-pi", quant_debug_data=CALIBRATION)
    layers = [e for e in report.quant_debug if e["kind"] == "layer"]
    assert {e["op"] for e in layers} >= {"Conv", "Gemm"}
    assert all(e["sqnr_db"] > 20 for e in layers)  # int8 on a small CNN keeps > 20 dB everywhere
    text = report.format_text()
    assert "Per-layer SQNR (" in text and "layer (lowest SQNR first)" in text
    json.dumps(report.to_dict())


def test_quant_debug_of_a_qdq_model_compares_with_its_float_form(tmp_path: Path):
    report = inspect_model(_ort_quantized_digits(tmp_path), quant_debug_data=CALIBRATION)
    assert report.quant_debug and all(np.isfinite(e["sqnr_db"]) for e in report.quant_debug)


def test_quant_debug_of_a_float_model_needs_a_target():
    with pytest.raises(EdgeoptError, match="needs --target") as info:
        inspect_model(DIGITS, quant_debug_data=CALIBRATION)
    assert info.value.exit_code == 2
