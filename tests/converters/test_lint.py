"""QDQ lint: each target rule, broken on purpose in a small hand-made graph, gives exactly the
expected finding; a graph built the way each target wants gives none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.analysis import io_specs
from edgeopt.converters.data import open_dataset
from edgeopt.converters.lint import Finding, lint_qdq
from edgeopt.converters.passes import simplify
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.runtime.kinds import Technique
from edgeopt.targets import get_target
from tests import zoo

ALL_TARGETS = ("jetson-orin", "raspberry-pi", "onnxruntime-cpu", "intel-openvino", "apple-ane")
TRT = get_target("jetson-orin")
PI = get_target("raspberry-pi")
ORT = get_target("onnxruntime-cpu")


class QdqGraph:
    """A tiny builder for QDQ graphs; names are derived from the tensor being quantized."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(0)

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def qdq(self, tensor: str, scale=0.05, zero_point=0, dtype=np.int8, axis: int | None = None,
            dq_scale=None) -> str:
        """Q then DQ on an activation; returns the dequantized name."""
        scale_name = self.const(f"{tensor}_scale", np.asarray(scale, np.float32))
        zero_name = self.const(f"{tensor}_zp", np.asarray(zero_point, dtype))
        extra = {} if axis is None else {"axis": axis}
        self.node("QuantizeLinear", [tensor, scale_name, zero_name], f"{tensor}_q", **extra)
        dq_scale_name = scale_name if dq_scale is None else self.const(f"{tensor}_dq_scale", np.asarray(dq_scale, np.float32))
        return self.node("DequantizeLinear", [f"{tensor}_q", dq_scale_name, zero_name], f"{tensor}_dq", **extra)

    def weight(self, name: str, shape: tuple[int, ...], axis: int | None = 0, zero_point: int = 0,
               dtype=np.int8, scale: float = 0.01) -> str:
        """A stored-integer weight and its DQ: per channel on `axis`, or per tensor when axis is None."""
        info = np.iinfo(dtype)
        self.const(f"{name}_int", self.rng.integers(max(info.min, -127), min(info.max, 127) + 1, shape).astype(dtype))
        if axis is None:
            scales, zeros, extra = np.asarray(scale, np.float32), np.asarray(zero_point, dtype), {}
        else:
            channels = shape[axis]
            scales = np.full(channels, scale, np.float32) * (1 + np.arange(channels, dtype=np.float32) / 10)
            zeros, extra = np.full(channels, zero_point, dtype), {"axis": axis}
        self.const(f"{name}_scale", scales)
        self.const(f"{name}_zp", zeros)
        return self.node("DequantizeLinear", [f"{name}_int", f"{name}_scale", f"{name}_zp"], f"{name}_dq", **extra)

    def model(self, inputs: dict[str, list[int]], outputs: list[str], opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "qdq",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_empty_tensor_value_info(n) for n in outputs],
            self.initializers,
        )
        # Shape inference types the outputs; the checker then proves the graph is valid ONNX.
        model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
        onnx.checker.check_model(model, full_check=True)
        return model


def residual_block() -> onnx.ModelProto:
    """The layout TensorRT recommends: Q/DQ on every Conv input and on the residual input of the Add,
    none on the Conv output; int8, zero point 0, per-channel weights on axis 0, float bias."""
    g = QdqGraph()
    x = g.qdq("x")
    conv = g.node("Conv", [x, g.weight("w", (4, 4, 3, 3)), g.const("b", np.zeros(4, np.float32))], "conv", pads=[1, 1, 1, 1])
    added = g.node("Add", [conv, x], "add")
    relu = g.node("Relu", [added], "relu")
    pooled = g.node("MaxPool", [g.qdq(relu)], "pool", kernel_shape=[2, 2], strides=[2, 2])
    return g.model({"x": [1, 4, 8, 8]}, [pooled])


def rules(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.severity, f.rule, f.node) for f in findings]


# ------------------------------------------------------------------------------------ clean graphs


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_a_well_formed_qdq_block_has_no_findings_on_any_target(target: str):
    assert lint_qdq(residual_block(), get_target(target)) == []


def test_a_float_model_has_nothing_to_lint():
    g = QdqGraph()
    model = g.model({"x": [1, 4]}, [g.node("Relu", ["x"], "y")])
    assert lint_qdq(model, TRT) == []


# ------------------------------------------------------------------------------------ generic rules


def test_negative_or_infinite_scales_are_errors_everywhere():
    g = QdqGraph()
    y = g.node("Relu", [g.qdq("x", scale=-0.1)], "y")
    model = g.model({"x": [1, 4]}, [y])
    for target in ALL_TARGETS:
        assert ("error", "scale-invalid", "x_q") in rules(lint_qdq(model, get_target(target)))


def test_per_channel_scale_count_must_match_the_axis():
    g = QdqGraph()
    g.const("w_int", np.ones((4, 2, 1, 1), np.int8))
    g.const("w_scale", np.full(3, 0.1, np.float32))
    g.const("w_zp", np.zeros(3, np.int8))
    w = g.node("DequantizeLinear", ["w_int", "w_scale", "w_zp"], "w_dq", axis=0)
    y = g.node("Conv", [g.qdq("x"), w], "y")
    findings = lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), ORT)
    assert rules(findings) == [("error", "axis-invalid", "w_dq")]
    assert "3 per-channel scales for axis 0, which has 4 channels" in findings[0].message


def test_each_scale_needs_its_own_zero_point():
    g = QdqGraph()
    g.const("w_int", np.ones((4, 2, 1, 1), np.int8))
    g.const("w_scale", np.full(4, 0.1, np.float32))
    g.const("w_zp", np.zeros(2, np.int8))
    w = g.node("DequantizeLinear", ["w_int", "w_scale", "w_zp"], "w_dq", axis=0)
    y = g.node("Conv", [g.qdq("x"), w], "y")
    model = helper.make_model(
        helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 4, 4])], g.initializers),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    assert rules(lint_qdq(model, ORT)) == [("error", "zero-point-shape", "w_dq")]


def test_a_dq_with_other_parameters_than_its_q_is_flagged():
    g = QdqGraph()
    y = g.node("Relu", [g.qdq("x", scale=0.05, dq_scale=0.07)], "y")
    assert rules(lint_qdq(g.model({"x": [1, 4]}, [y]), ORT)) == [("warning", "qdq-pair-mismatch", "x_dq")]


def test_int32_bias_with_a_nonzero_zero_point_is_an_error():
    g = QdqGraph()
    g.const("b_int", np.zeros(4, np.int32))
    g.const("b_scale", np.full(4, 5e-4, np.float32))
    g.const("b_zp", np.full(4, 3, np.int32))
    b = g.node("DequantizeLinear", ["b_int", "b_scale", "b_zp"], "b_dq", axis=0)
    y = g.node("Conv", [g.qdq("x"), g.weight("w", (4, 2, 1, 1)), b], "y")
    assert ("error", "bias-zero-point", "b_dq") in rules(lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), ORT))


# ------------------------------------------------------------------------------------ TensorRT


def test_tensorrt_rejects_nonzero_zero_points():
    g = QdqGraph()
    y = g.node("Conv", [g.qdq("x", zero_point=5), g.weight("w", (4, 2, 1, 1))], "y")
    findings = lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), TRT)
    assert rules(findings) == [("error", "trt-zero-point", "x_q")]
    assert "symmetric" in findings[0].message
    assert lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), ORT) == []  # ONNX Runtime runs asymmetric int8


def test_tensorrt_rejects_uint8():
    g = QdqGraph()
    y = g.node("Conv", [g.qdq("x", zero_point=0, dtype=np.uint8), g.weight("w", (4, 2, 1, 1))], "y")
    findings = lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), TRT)
    assert rules(findings) == [("error", "trt-int8-only", "x_q")]
    assert "signed int8" in findings[0].message


def test_tensorrt_rejects_an_int32_bias_dequantize():
    g = QdqGraph()
    g.const("b_int", np.zeros(4, np.int32))
    g.const("b_scale", np.full(4, 5e-4, np.float32))
    b = g.node("DequantizeLinear", ["b_int", "b_scale"], "b_dq", axis=0)
    y = g.node("Conv", [g.qdq("x"), g.weight("w", (4, 2, 1, 1)), b], "y")
    findings = lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), TRT)
    assert rules(findings) == [("error", "trt-int8-only", "b_dq")]
    assert "keep the bias float" in findings[0].message


def test_tensorrt_rejects_per_channel_activations():
    g = QdqGraph()
    x = g.qdq("x", scale=np.full(2, 0.05, np.float32), zero_point=np.zeros(2, np.int8), axis=1)
    y = g.node("Conv", [x, g.weight("w", (4, 2, 1, 1))], "y")
    assert rules(lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), TRT)) == [("error", "trt-activation-per-channel", "x_q")]


@pytest.mark.parametrize(
    ("op", "weight_shape", "good_axis", "bad_axis", "attributes"),
    [
        ("Conv", (4, 2, 1, 1), 0, 1, {}),
        ("ConvTranspose", (2, 4, 1, 1), 1, 0, {}),
        ("Gemm", (6, 3), 0, 1, {"transB": 1}),  # B is [N, K]
        ("Gemm", (3, 6), 1, 0, {}),  # B is [K, N]
        ("MatMul", (3, 6), -1, 0, {}),  # the last axis is N
    ],
)
def test_tensorrt_wants_weights_per_channel_on_the_output_axis(op, weight_shape, good_axis, bad_axis, attributes):
    def model(axis: int | None) -> onnx.ModelProto:
        g = QdqGraph()
        if op.startswith("Conv"):
            x, shape = g.qdq("x"), [1, 2, 4, 4]
        else:
            x, shape = g.qdq("x"), [5, 3]
        y = g.node(op, [x, g.weight("w", weight_shape, axis=axis)], "y", **attributes)
        return g.model({"x": shape}, [y])

    assert lint_qdq(model(good_axis), TRT) == []
    [wrong] = lint_qdq(model(bad_axis), TRT)
    assert (wrong.severity, wrong.rule, wrong.node) == ("error", "trt-weight-axis", "w_dq")
    assert f"on axis {bad_axis}" in wrong.message
    [per_tensor] = lint_qdq(model(None), TRT)
    assert (per_tensor.severity, per_tensor.rule) == ("warning", "trt-weight-per-tensor")


def test_tensorrt_warns_when_a_conv_input_has_no_qdq():
    g = QdqGraph()
    g.const("w", np.ones((4, 2, 1, 1), np.float32))
    y = g.node("Conv", [g.qdq("x"), "w"], "conv")
    findings = lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), TRT)
    assert rules(findings) == [("warning", "trt-missing-qdq", "conv")]
    assert "'w'" in findings[0].message


def test_tensorrt_warns_when_a_residual_add_has_one_quantized_input():
    g = QdqGraph()
    x = g.qdq("x")
    branch = g.node("Relu", ["x"], "branch")  # a float op, not a Conv TensorRT could fuse into
    y = g.node("Add", [x, branch], "add")
    findings = lint_qdq(g.model({"x": [1, 4]}, [y]), TRT)
    assert rules(findings) == [("warning", "trt-residual-add", "add")]
    assert "'branch' stays float" in findings[0].message


def test_tensorrt_warns_when_the_residual_of_an_int8_conv_is_not_quantized():
    g = QdqGraph()
    conv = g.node("Conv", [g.qdq("x"), g.weight("w", (4, 4, 1, 1))], "conv")
    y = g.node("Add", [conv, "x"], "add")
    findings = lint_qdq(g.model({"x": [1, 4, 4, 4]}, [y]), TRT)
    assert rules(findings) == [("warning", "trt-residual-add", "add")]
    assert "residual input 'x'" in findings[0].message


def test_tensorrt_warns_about_qdq_that_feeds_only_ops_it_cannot_run_in_int8():
    g = QdqGraph()
    y = g.node("Softmax", [g.qdq("x")], "softmax")
    findings = lint_qdq(g.model({"x": [1, 4]}, [y]), TRT)
    assert rules(findings) == [("warning", "trt-unfused-qdq", "x_q")]
    assert "Softmax" in findings[0].message


# ------------------------------------------------------------------------------------ TFLite


def test_tflite_rejects_per_channel_activations_and_asymmetric_weights():
    g = QdqGraph()
    x = g.qdq("x", scale=np.full(2, 0.05, np.float32), zero_point=np.zeros(2, np.int8), axis=1)
    y = g.node("Conv", [x, g.weight("w", (4, 2, 1, 1), zero_point=3)], "y")
    assert rules(lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), PI)) == [
        ("error", "tflite-activation-per-channel", "x_q"),
        ("error", "tflite-weight-zero-point", "w_dq"),
    ]


def test_tflite_accepts_asymmetric_activations_but_not_uint8():
    g = QdqGraph()
    y = g.node("Conv", [g.qdq("x", zero_point=-20), g.weight("w", (4, 2, 1, 1))], "y")
    assert lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), PI) == []
    g = QdqGraph()
    y = g.node("Conv", [g.qdq("x", zero_point=128, dtype=np.uint8), g.weight("w", (4, 2, 1, 1))], "y")
    assert rules(lint_qdq(g.model({"x": [1, 2, 4, 4]}, [y]), PI)) == [("error", "tflite-int8-only", "x_q")]


def _conv_with_int32_bias(bias_scale: np.ndarray) -> onnx.ModelProto:
    g = QdqGraph()
    x = g.qdq("x", scale=0.05)
    w = g.weight("w", (4, 2, 1, 1), scale=0.01)  # per-channel scales 0.01 * (1, 1.1, 1.2, 1.3)
    g.const("b_int", np.arange(4, dtype=np.int32))
    g.const("b_scale", bias_scale.astype(np.float32))
    g.const("b_zp", np.zeros(4, np.int32))
    b = g.node("DequantizeLinear", ["b_int", "b_scale", "b_zp"], "b_dq", axis=0)
    return g.model({"x": [1, 2, 4, 4]}, [g.node("Conv", [x, w, b], "y")])


def test_tflite_bias_scale_must_be_input_scale_times_weight_scale():
    weight_scales = np.float32(0.01) * (1 + np.arange(4, dtype=np.float32) / 10)
    exact = np.float32(0.05) * weight_scales
    assert lint_qdq(_conv_with_int32_bias(exact), PI) == []
    findings = lint_qdq(_conv_with_int32_bias(exact * np.float32(1.001)), PI)
    assert rules(findings) == [("warning", "tflite-bias-scale", "b_dq")]


def test_tflite_softmax_output_must_be_one_256th_with_zero_point_minus_128():
    def model(scale: float, zero_point: int) -> onnx.ModelProto:
        g = QdqGraph()
        softmax = g.node("Softmax", [g.qdq("x")], "softmax")
        return g.model({"x": [1, 4]}, [g.qdq(softmax, scale=scale, zero_point=zero_point)])

    assert lint_qdq(model(1 / 256, -128), PI) == []
    findings = lint_qdq(model(0.01, 0), PI)
    assert rules(findings) == [("error", "fixed-output-params", "softmax")]
    assert "0.00390625" in findings[0].message and "-128" in findings[0].message


def test_tflite_maxpool_and_concat_keep_their_input_scale():
    g = QdqGraph()
    a, b = g.qdq("a", scale=0.05), g.qdq("b", scale=0.05)
    pooled = g.node("MaxPool", [a], "pool", kernel_shape=[2, 2])
    joined = g.node("Concat", [a, b], "concat", axis=1)
    model = g.model({"a": [1, 2, 4, 4], "b": [1, 2, 4, 4]}, [g.qdq(pooled, scale=0.08), g.qdq(joined, scale=0.05)])
    findings = lint_qdq(model, PI)
    assert rules(findings) == [("error", "same-scale", "pool")]
    assert "input 'a_dq' has [0.05], 0, the output [0.08], 0" in findings[0].message


# ------------------------------------------------------------------------------------ a real quantizer's output


def test_onnxruntime_default_static_quantization_is_flagged_for_tensorrt(tmp_path: Path):
    """ONNX Runtime's quantize_static defaults (uint8 asymmetric activations, int32 biases) run on ONNX
    Runtime but break TensorRT's rules; the symmetric int8 options fix everything except the bias."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    g = QdqGraph()
    g.const("w", g.rng.standard_normal((8, 3, 3, 3)).astype(np.float32))
    g.const("b", g.rng.standard_normal(8).astype(np.float32))
    y = g.node("Relu", [g.node("Conv", ["x", "w", "b"], "conv", pads=[1, 1, 1, 1])], "y")
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(g.model({"x": [1, 3, 8, 8]}, [y]), float_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)} for i in range(4)])

        def get_next(self):
            return next(self.samples, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    default = rules(lint_qdq(onnx.load(qdq_path), TRT))
    assert lint_qdq(onnx.load(qdq_path), ORT) == []
    assert {rule for _, rule, _ in default} >= {"trt-zero-point", "trt-int8-only"}

    quantize_static(
        str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True},
    )
    symmetric = lint_qdq(onnx.load(qdq_path), TRT)
    assert [(f.severity, f.rule) for f in symmetric] == [("error", "trt-int8-only")]
    assert "bias" in symmetric[0].message


# ------------------------------------------------------------------------------------ edgeopt's own quantizer


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_edgeopt_quantizer_output_follows_every_rule_of_its_target(target: str):
    """The quantizer and the lint read the same profile; a model quantized for a target lints clean."""
    model = zoo.mobilenet_v2_style()
    inputs, _ = io_specs(model)
    simplified, _ = simplify(model)
    calibration = open_dataset(zoo.random_inputs(model, n=2), inputs)
    profile = get_target(target)
    options = QuantizeOptions(techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0)
    qdq = quantize(simplified, profile.quant_scheme, calibration, options).model
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) > 10
    assert lint_qdq(qdq, profile) == []
