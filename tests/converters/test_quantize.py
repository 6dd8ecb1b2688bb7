"""Post-training quantization: the QDQ graph follows each target's scheme and stays close to fp32 on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.data import Dataset, model_input_specs, open_dataset
from edgeopt.converters.errors import CalibrationDataError
from edgeopt.converters.metrics import fidelity
from edgeopt.converters.graph.session import has_qdq, ort_session, run_model
from edgeopt.converters.quantize import QuantizeOptions, layer_sqnr, quantize
from edgeopt.runtime.kinds import Technique
from edgeopt.runtime.errors import OptionError
from edgeopt.targets import get_target
from tests import zoo

RNG = np.random.default_rng(0)


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.normal(size=shape) * 0.2).astype(np.float32), name)


def residual_net() -> onnx.ModelProto:
    """Conv-ReLU -> Conv-Clip(0,6) -> depthwise Conv, residual Add, ConvTranspose, MaxPool,
    Reshape, Gemm(transB=1) -> MatMul -> Gemm(transB=0) -> Softmax: every weighted op and axis."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Add", ["c3", "r1"], ["sum"], name="residual"),
        helper.make_node("ConvTranspose", ["sum", "wt", "bt"], ["up"], name="deconv", strides=[2, 2]),
        helper.make_node("MaxPool", ["up"], ["pooled"], name="pool", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["h1"], name="relu_fc"),
        helper.make_node("MatMul", ["h1", "wm"], ["m1"], name="matmul"),
        helper.make_node("Gemm", ["m1", "wg2", "bg2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    initializers = [
        _weight("w1", 8, 3, 3, 3), _weight("b1", 8), _weight("w2", 8, 8, 3, 3), _weight("b2", 8),
        _weight("w3", 8, 1, 3, 3), _weight("wt", 8, 4, 2, 2), _weight("bt", 4),
        _weight("wg", 16, 4 * 4 * 4), _weight("bg", 16), _weight("wm", 16, 12), _weight("wg2", 12, 10), _weight("bg2", 10),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"),
    ]
    graph = helper.make_graph(
        nodes, "residual_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return residual_net()


@pytest.fixture(scope="module")
def calibration(model: onnx.ModelProto) -> Dataset:
    data = np.random.default_rng(1).normal(size=(48, 3, 8, 8)).astype(np.float32)
    return open_dataset(data, model_input_specs(model))


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def _dq_feeding(model: onnx.ModelProto, node_name: str, index: int) -> onnx.NodeProto | None:
    node = next(n for n in model.graph.node if n.name == node_name)
    producer = _nodes(model).get(node.input[index])
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _close_to_fp32(fp32: onnx.ModelProto, qdq: onnx.ModelProto, dataset: Dataset) -> dict:
    return fidelity(list(run_model(fp32, dataset)), list(run_model(qdq, dataset)))


def test_jetson_orin_output_follows_tensorrt_rules(model: onnx.ModelProto, calibration: Dataset) -> None:
    from edgeopt.converters.lint import lint_qdq

    target = get_target("jetson-orin")
    result = quantize(model, target.quant_scheme, calibration)
    qdq = result.model
    assert [f for f in lint_qdq(qdq, target) if f.severity == "error"] == []
    zero_points = [_array(qdq, n.input[2]) for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(np.all(z == 0) and z.dtype == np.int8 for z in zero_points)
    expected_axes = {"conv1": 0, "depthwise": 0, "deconv": 1, "fc1": 0, "matmul": 1, "fc2": 1}
    for node, axis in expected_axes.items():
        weight_dq = _dq_feeding(qdq, node, 1)
        assert weight_dq is not None and _axis(weight_dq) == axis, node
        assert _array(qdq, weight_dq.input[1]).size > 1, f"{node} weights are per channel"
    assert _dq_feeding(qdq, "residual", 0) is not None and _dq_feeding(qdq, "residual", 1) is not None
    assert _dq_feeding(qdq, "softmax", 0) is None, "TensorRT placement quantizes op inputs, not every output"
    assert _close_to_fp32(model, qdq, calibration)["min_cosine"] > 0.999
    assert result.report["adaptations"] == [] and result.report["qat_imported"] is False


def test_raspberry_pi_output_is_explicit_full_integer(model: onnx.ModelProto, calibration: Dataset) -> None:
    from edgeopt.converters.lint import lint_qdq

    target = get_target("raspberry-pi")
    qdq = quantize(model, target.quant_scheme, calibration).model
    assert [f for f in lint_qdq(qdq, target) if f.severity == "error"] == []
    producers = _nodes(qdq)
    # every tensor between quantized ops is an int8 Q -> DQ pair; absorbed ReLU/ReLU6 are gone
    ops = [n.op_type for n in qdq.graph.node]
    assert "Relu" not in ops and "Clip" not in ops
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "Reshape", "Softmax"):
            assert producers[node.input[0]].op_type == "DequantizeLinear", node.name
            consumer_ops = [n.op_type for n in qdq.graph.node if node.output[0] in n.input]
            assert consumer_ops == ["QuantizeLinear"], node.name
    # int32 bias with scale = input scale x weight scale
    conv2 = next(n for n in qdq.graph.node if n.name == "conv2")
    bias_dq, input_dq, weight_dq = producers[conv2.input[2]], producers[conv2.input[0]], producers[conv2.input[1]]
    assert _array(qdq, bias_dq.input[0]).dtype == np.int32
    np.testing.assert_allclose(_array(qdq, bias_dq.input[1]), _array(qdq, input_dq.input[1]) * _array(qdq, weight_dq.input[1]), rtol=1e-6)
    # activations asymmetric int8; fixed softmax output; shared max-pool and reshape scales
    softmax = next(n for n in qdq.graph.node if n.name == "softmax")
    softmax_q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == softmax.output[0])
    assert float(_array(qdq, softmax_q.input[1])) == pytest.approx(1 / 256) and int(_array(qdq, softmax_q.input[2])) == -128
    pool = next(n for n in qdq.graph.node if n.name == "pool")
    pool_in, pool_out = producers[pool.input[0]], next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    assert float(_array(qdq, pool_in.input[1])) == float(_array(qdq, pool_out.input[1]))
    assert _close_to_fp32(model, qdq, calibration)["min_cosine"] > 0.995
    assert [o.name for o in qdq.graph.output] == ["probs"]


def test_onnxruntime_cpu_output_fuses_into_integer_kernels(model: onnx.ModelProto, calibration: Dataset, tmp_path) -> None:
    import onnxruntime as ort

    qdq = quantize(model, get_target("onnxruntime-cpu").quant_scheme, calibration).model
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized_ops = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert "QLinearConv" in optimized_ops
    assert _close_to_fp32(model, qdq, calibration)["min_cosine"] > 0.995


def _weight_extremes(qdq: onnx.ModelProto) -> dict[str, int]:
    """Weighted node -> largest |stored int8 weight|."""
    return {
        name: int(np.abs(_array(qdq, dq.input[0]).astype(int)).max())
        for name in ("conv1", "conv2", "depthwise", "deconv", "fc1", "matmul", "fc2")
        if (dq := _dq_feeding(qdq, name, 1)) is not None
    }


def test_avx2_class_narrows_pairwise_summed_weights_to_7_bits_and_keeps_depthwise_at_8(model: onnx.ModelProto, calibration: Dataset) -> None:
    from dataclasses import replace

    target = get_target("onnxruntime-cpu")
    avx2, vnni = (
        _weight_extremes(quantize(model, replace(target.scheme_for(isa), float_depthwise=False), calibration, QuantizeOptions(debug_samples=0)).model)
        for isa in ("avx2", "vnni")
    )  # depthwise int8 here (onnxruntime-cpu keeps it float on x86: test_quantize_placement.py)
    assert avx2 == {"conv1": 64, "conv2": 64, "depthwise": 127, "deconv": 64, "fc1": 64, "matmul": 64, "fc2": 64}
    assert vnni == dict.fromkeys(avx2, 127)


def test_avx2_class_int8_kernels_compute_the_qdq_graph_exactly(model: onnx.ModelProto, calibration: Dataset) -> None:
    """ONNX Runtime's fused int8 kernels against the QDQ graph's own semantics, on inputs that fill
    the uint8 range: with 7-bit pairwise weights no CPU class can saturate (2 x 255 x 64 < 32767)."""
    import onnxruntime as ort

    qdq = quantize(model, get_target("onnxruntime-cpu").scheme_for("avx2"), calibration, QuantizeOptions(debug_samples=0)).model
    fused = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    exact = ort_session(qdq)
    tolerance = 2 / 256  # Softmax stays float here; kernels may round a requantized logit to the other neighbour
    for sample in list(calibration)[:8]:
        feed = {"x": sample["x"] * 3.0}  # beyond the calibrated range: every activation Q saturates at 0/255
        (want,), (got,) = exact.run(None, feed), fused.run(None, feed)
        assert np.abs(want - got).max() <= tolerance  # 8-bit weights on this CPU class saturate: 0.073 on AVX2


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_gives_a_close_model(model: onnx.ModelProto, calibration: Dataset, method: str) -> None:
    result = quantize(model, get_target("onnxruntime-cpu").quant_scheme, calibration, QuantizeOptions(method=method, debug_samples=0))
    assert result.report["method"] == method and result.report["samples"] == len(calibration)
    assert _close_to_fp32(model, result.model, calibration)["min_cosine"] > 0.99


def _matmul_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [_weight("w", 64, 8)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _input_scales(data: np.ndarray, methods: tuple[str, ...]) -> dict[str, float]:
    model = _matmul_model()
    dataset = open_dataset(data, model_input_specs(model))
    scales = {}
    for method in methods:
        options = QuantizeOptions(method=method, techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0)
        qdq = quantize(model, get_target("jetson-orin").quant_scheme, dataset, options).model
        q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
        scales[method] = float(_array(qdq, q.input[1]))
    return scales


def test_percentile_and_entropy_ignore_a_rare_outlier_that_minmax_keeps() -> None:
    data = np.random.default_rng(2).normal(size=(200, 64)).astype(np.float32)
    data[7, 3] = 500.0
    scales = _input_scales(data, ("minmax", "percentile", "entropy"))
    assert scales["minmax"] == pytest.approx(500.0 / 127, rel=1e-3)
    assert scales["percentile"] < scales["minmax"] / 10 and scales["entropy"] < scales["minmax"] / 10, scales


def test_mse_range_has_lower_quantization_error_than_minmax() -> None:
    data = np.random.default_rng(3).laplace(size=(200, 64)).astype(np.float32)
    scales = _input_scales(data, ("minmax", "mse"))

    def error(scale: float) -> float:
        return float(np.mean((np.clip(np.round(data / scale), -128, 127) * scale - data) ** 2))

    assert scales["mse"] < scales["minmax"] and error(scales["mse"]) < error(scales["minmax"]), scales


def test_bias_correction_never_makes_outputs_worse(model: onnx.ModelProto, calibration: Dataset) -> None:
    scheme = get_target("raspberry-pi").quant_scheme
    plain = quantize(model, scheme, calibration, QuantizeOptions(techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0)).model
    corrected = quantize(model, scheme, calibration, QuantizeOptions(techniques={Technique.BIAS_CORRECTION: True}, debug_samples=0))
    report = corrected.report["bias_correction"]
    assert report["output_noise_after" if report["applied"] else "output_noise_before"] <= report["output_noise_before"]
    assert _close_to_fp32(model, corrected.model, calibration)["min_sqnr_db"] >= _close_to_fp32(model, plain, calibration)["min_sqnr_db"] - 1e-6


def test_bias_correction_is_judged_on_samples_it_was_not_measured_on() -> None:
    """A Gemm whose rounded weights shift its output by +e on inputs near +1 and by -e near -1. Measured
    on the first 16 samples (all near +1), the shift -e fits them perfectly; on the next 16 (near -1) it
    doubles the error. Judged where it was measured it would be kept; it must be rejected."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(8, 4)).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")],
            "fc",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    near = [np.full((1, 8), sign, np.float32) + rng.normal(scale=0.01, size=(1, 8)).astype(np.float32) for sign in [1.0] * 16 + [-1.0] * 16]
    dataset = open_dataset([{"x": x} for x in near], model_input_specs(model))
    result = quantize(model, get_target("raspberry-pi").quant_scheme, dataset, QuantizeOptions(techniques={Technique.BIAS_CORRECTION: True}, debug_samples=0))
    report = result.report["bias_correction"]
    assert report["samples"] == 16 and report["judged_on"] == 16
    assert report["applied"] is False and report["output_noise_after"] > report["output_noise_before"], report


def test_report_is_json_and_lists_per_layer_sqnr(model: onnx.ModelProto, calibration: Dataset) -> None:
    import json

    result = quantize(model, get_target("raspberry-pi").quant_scheme, calibration)
    report = json.loads(json.dumps(result.report))
    assert {"method", "samples", "scheme", "qat_imported", "adaptations", "float_fallback", "per_layer_sqnr", "quantized_op_share"} <= set(report)
    assert report["quantized_op_share"] == 1.0
    activations = [e for e in report["per_layer_sqnr"] if e["kind"] == "activation"]
    layers = {e["node"] for e in report["per_layer_sqnr"] if e["kind"] == "layer"}
    assert {"conv1", "conv2", "depthwise", "residual", "fc1", "matmul", "fc2"} <= layers
    assert all(e["sqnr_db"] > 15 and e["quantization_sqnr_db"] >= e["sqnr_db"] - 1e-6 for e in activations if e["tensor"] == "x")
    assert sorted(report["absorbed_activations"]) == ["relu1", "relu6", "relu_fc"]


def test_layer_sqnr_of_an_exact_model_is_capped_and_of_a_quantized_one_finite(model: onnx.ModelProto, calibration: Dataset) -> None:
    qdq = quantize(model, get_target("jetson-orin").quant_scheme, calibration, QuantizeOptions(debug_samples=0)).model
    entries = layer_sqnr(model, qdq, calibration.take(4))
    assert entries and all(10 < e["sqnr_db"] < 200 for e in entries)


def test_excluded_nodes_stay_float(model: onnx.ModelProto, calibration: Dataset) -> None:
    qdq = quantize(model, get_target("jetson-orin").quant_scheme, calibration, QuantizeOptions(exclude_nodes=("fc1",), debug_samples=0)).model
    assert _dq_feeding(qdq, "fc1", 0) is None and _dq_feeding(qdq, "fc1", 1) is None
    assert _dq_feeding(qdq, "fc2", 1) is not None


def test_weights_only_needs_no_calibration(model: onnx.ModelProto) -> None:
    result = quantize(model, get_target("apple-ane").quant_scheme, None, QuantizeOptions(weights_only=True))
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    assert _dq_feeding(result.model, "conv1", 1) is not None
    ort_session(result.model)


def test_missing_calibration_is_a_clear_error(model: onnx.ModelProto) -> None:
    with pytest.raises(CalibrationDataError, match="calibration"):
        quantize(model, get_target("raspberry-pi").quant_scheme, None)


def test_has_qdq(model: onnx.ModelProto, calibration: Dataset) -> None:
    assert not has_qdq(model)
    assert has_qdq(quantize(model, get_target("jetson-orin").quant_scheme, calibration, QuantizeOptions(debug_samples=0)).model)


def test_an_unknown_calibration_method_is_an_option_error(model: onnx.ModelProto, calibration: Dataset) -> None:
    with pytest.raises(OptionError, match="unknown calibration method 'kmeans'") as info:
        quantize(model, get_target("raspberry-pi").quant_scheme, calibration, QuantizeOptions(method="kmeans"))
    assert info.value.exit_code == 2 and "minmax" in str(info.value)


@pytest.mark.parametrize("target", ["jetson-orin", "raspberry-pi", "onnxruntime-cpu"])
def test_mobilenet_v2_style_and_transformer_on_every_scheme(target: str) -> None:
    from edgeopt.converters.lint import lint_qdq

    profile = get_target(target)
    for fp32 in (zoo.mobilenet_v2_style(), zoo.transformer_encoder()):
        dataset = open_dataset(zoo.random_inputs(fp32, 16), model_input_specs(fp32))
        qdq = quantize(fp32, profile.quant_scheme, dataset, QuantizeOptions(debug_samples=0)).model
        assert [f for f in lint_qdq(qdq, profile) if f.severity == "error"] == []
        assert _close_to_fp32(fp32, qdq, dataset)["min_cosine"] > 0.98


def test_constant_operands_of_elementwise_ops_can_be_quantized_per_tensor() -> None:
    """MatMul + Add(bias initializer): with `constant_operands` the bias becomes an int8 constant -> DQ
    and the Add runs on quantized inputs; without it the Add stays float."""
    import dataclasses

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "bias"], ["y"], name="add_bias")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        [_weight("w", 16, 8), _weight("bias", 8)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    dataset = open_dataset(np.random.default_rng(4).normal(size=(16, 4, 16)).astype(np.float32), model_input_specs(model))
    scheme = get_target("raspberry-pi").quant_scheme
    assert _dq_feeding(quantize(model, scheme, dataset, QuantizeOptions(debug_samples=0)).model, "add_bias", 1) is None
    with_constants = dataclasses.replace(scheme, constant_operands=True)
    qdq = quantize(model, with_constants, dataset, QuantizeOptions(debug_samples=0)).model
    bias_dq = _dq_feeding(qdq, "add_bias", 1)
    assert bias_dq is not None and _array(qdq, bias_dq.input[0]).dtype == np.int8 and int(_array(qdq, bias_dq.input[2])) == 0
    assert _dq_feeding(qdq, "add_bias", 0) is not None
    assert _close_to_fp32(model, qdq, dataset)["min_cosine"] > 0.999


def masked_attention() -> onnx.ModelProto:
    """scores = x @ W; + (1 - mask) x float32.min (Hugging Face's additive mask); Softmax; @ V."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["scores"], name="scores"),
        helper.make_node("Cast", ["mask"], ["mask_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"], name="invert"),
        helper.make_node("Mul", ["inverted", "fmin"], ["additive"], name="fill"),
        helper.make_node("Add", ["scores", "additive"], ["masked"], name="apply_mask"),
        helper.make_node("Softmax", ["masked"], ["weights"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["weights", "wv"], ["y"], name="values"),
    ]
    initializers = [
        numpy_helper.from_array((rng.normal(size=(16, 12)) * 0.8).astype(np.float32), "wq"),
        numpy_helper.from_array((rng.normal(size=(12, 8)) * 0.3).astype(np.float32), "wv"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fmin"),
    ]
    graph = helper.make_graph(
        nodes, "masked_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, 16]), helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 1, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 8])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["raspberry-pi", "onnxruntime-cpu", "intel-openvino", "jetson-orin"])
def test_an_additive_attention_mask_never_sets_a_calibrated_range(target: str) -> None:
    model = masked_attention()
    rng = np.random.default_rng(4)
    samples = []
    for _ in range(24):
        mask = np.zeros((1, 1, 12), np.int64)
        mask[..., : rng.integers(3, 13)] = 1  # padded batches: trailing zeros in the mask
        samples.append({"x": rng.normal(size=(1, 12, 16)).astype(np.float32), "mask": mask})
    dataset = open_dataset(samples, model_input_specs(model))
    result = quantize(model, get_target(target).quant_scheme, dataset, QuantizeOptions(debug_samples=0))
    qdq = result.model
    arrays = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    scales = [float(arrays[n.input[1]]) for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in arrays]
    assert max(scales) < 1.0, "no activation grid spans the −3.4e38 fill"
    scheme = get_target(target).quant_scheme
    if scheme.transformer_elementwise_float:  # OpenVINO: every Add of a model with attention stays float
        assert not result.report.get("kept_float_swamped")
    elif scheme.int8_transformer:  # LiteRT: the mask gets fixed params (0 exact, the fill saturates), the Add runs int8
        assert not result.report.get("kept_float_swamped")
        mask_q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "additive")
        assert (float(arrays[mask_q.input[1]]), int(arrays[mask_q.input[2]])) == (0.5, 127)
    elif "Add" in scheme.quantized_ops:
        assert result.report["kept_float_swamped"] == ["apply_mask"]
    assert _close_to_fp32(model, qdq, dataset)["min_cosine"] > 0.99


def hardswish_blocks() -> onnx.ModelProto:
    """1x1 conv at 32x32 -> HardSwish -> depthwise 3x3 -> HardSwish -> stride-4 1x1 conv (8x8) -> HardSwish."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w_big"], ["c1"], name="big_spatial"),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="hs1"),
        helper.make_node("Conv", ["h1", "w_dw"], ["c2"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c2"], ["h2"], name="hs2"),
        helper.make_node("Conv", ["h2", "w_small"], ["c3"], name="small_spatial", strides=[4, 4]),
        helper.make_node("HardSwish", ["c3"], ["y"], name="hs3"),
    ]
    initializers = [
        numpy_helper.from_array((rng.normal(size=(16, 8, 1, 1)) * 0.3).astype(np.float32), "w_big"),
        numpy_helper.from_array((rng.normal(size=(16, 1, 3, 3)) * 0.3).astype(np.float32), "w_dw"),
        numpy_helper.from_array((rng.normal(size=(32, 16, 1, 1)) * 0.3).astype(np.float32), "w_small"),
    ]
    graph = helper.make_graph(
        nodes, "hardswish_blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])],
        initializers,
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "raspberry-pi"])
def test_convs_that_would_pay_a_float_island_larger_than_their_gain_stay_float(target: str) -> None:
    """HardSwish runs in float on ONNX Runtime and (delegated) on LiteRT: int8 before it costs a
    dequantize/quantize island, which outweighs int8 for depthwise convs and large outputs."""
    model = hardswish_blocks()
    dataset = open_dataset(np.random.default_rng(6).normal(size=(8, 8, 32, 32)).astype(np.float32), model_input_specs(model))
    result = quantize(model, get_target(target).quant_scheme, dataset, QuantizeOptions(debug_samples=0))
    quantized = {n for n in ("big_spatial", "depthwise", "small_spatial") if _dq_feeding(result.model, n, 1) is not None}
    assert quantized == {"small_spatial"}
    islands = [s["node"] for s in result.report["not_quantized"] if "float island" in s["why"]]
    assert islands == (["big_spatial"] if target == "onnxruntime-cpu" else ["big_spatial", "depthwise"])  # ORT: every depthwise is float
    openvino = quantize(model, get_target("intel-openvino").quant_scheme, dataset, QuantizeOptions(debug_samples=0)).model
    assert all(_dq_feeding(openvino, n, 1) is not None for n in ("big_spatial", "depthwise", "small_spatial")), "OpenVINO fuses HardSwish"


def _channel_spread_depthwise() -> onnx.ModelProto:
    """x -> HardSwish -> depthwise 3x3 (16 channels) -> y, for inputs whose channels differ 100x in range."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("HardSwish", ["x"], ["h"], name="hs"),
        helper.make_node("Conv", ["h", "w_dw"], ["y"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
    ]
    weights = [numpy_helper.from_array((rng.normal(size=(16, 1, 3, 3)) * 0.3).astype(np.float32), "w_dw")]
    graph = helper.make_graph(
        nodes, "channel_spread_depthwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])],
        weights,
    )  # fmt: skip
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_openvino_quantizes_depthwise_inputs_per_channel_and_runs_them_in_int8() -> None:
    """Channels of a HardSwish output differ in range by 10x and more (MobileNetV3); one grid per
    channel keeps the small ones. OpenVINO reads the per-channel Q/DQ as a FakeQuantize with
    per-channel ranges and still runs the depthwise conv on u8 inputs."""
    from dataclasses import replace

    import openvino as ov

    model = _channel_spread_depthwise()
    spread = np.geomspace(0.05, 5.0, 16, dtype=np.float32).reshape(1, 16, 1, 1)
    data = np.random.default_rng(8).normal(size=(24, 16, 16, 16)).astype(np.float32) * spread
    dataset = open_dataset(data, model_input_specs(model))
    scheme = get_target("intel-openvino").quant_scheme
    assert scheme.depthwise_input_per_channel
    qdq = quantize(model, scheme, dataset, QuantizeOptions(debug_samples=0, bias_correction_samples=0)).model
    q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear")
    assert _axis(q) == 1 and _array(qdq, q.input[1]).shape == (16,)
    per_tensor = quantize(model, replace(scheme, depthwise_input_per_channel=False), dataset, QuantizeOptions(debug_samples=0, bias_correction_samples=0)).model
    assert _close_to_fp32(model, qdq, dataset)["min_sqnr_db"] > _close_to_fp32(model, per_tensor, dataset)["min_sqnr_db"] + 5  # measured 42.5 vs 35.5 dB

    compiled = ov.Core().compile_model(ov.Core().read_model(qdq.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    conv = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert [info["runtimePrecision"].astype(str) for info in conv] == ["u8"]
    expected = next(iter(run_model(qdq, open_dataset(data[:1], model_input_specs(model)))))["y"]
    np.testing.assert_allclose(compiled([data[:1]])[0], expected, atol=1e-3 * float(np.abs(expected).max()))


def test_openvino_leaves_a_transformers_elementwise_ops_float_and_a_cnns_quantized() -> None:
    """NNCF's model_type=transformer: residual Adds and GELU/mask Muls carry outlier channels; in a
    model with attention they stay float on OpenVINO while its MatMuls are int8. A CNN's residual
    Add keeps its Q/DQ (the conv before it fuses the FakeQuantize)."""
    from edgeopt.converters.passes import simplify

    scheme = get_target("intel-openvino").quant_scheme
    transformer, _ = simplify(zoo.transformer_encoder(), {})  # as the build does: shapes and dtypes known
    dataset = open_dataset(zoo.random_inputs(transformer, 16), model_input_specs(transformer))
    result = quantize(transformer, scheme, dataset, QuantizeOptions(debug_samples=0))
    qdq = result.model
    elementwise = [n for n in qdq.graph.node if n.op_type in ("Add", "Mul", "Sub")]
    assert elementwise and all(_dq_feeding(qdq, n.name, i) is None for n in elementwise for i in range(len(n.input)))
    assert any(_dq_feeding(qdq, n.name, 1) is not None for n in qdq.graph.node if n.op_type == "MatMul")
    skipped = {s["node"] for s in result.report["not_quantized"] if s["why"] == "elementwise op of a transformer: stays float"}
    assert skipped == {n.name for n in transformer.graph.node if n.op_type in ("Add", "Mul", "Sub")}
    assert _close_to_fp32(transformer, qdq, dataset)["min_cosine"] > 0.98

    cnn = residual_net()
    cnn_qdq = quantize(cnn, scheme, open_dataset(np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32), model_input_specs(cnn)), QuantizeOptions(debug_samples=0)).model
    assert _dq_feeding(cnn_qdq, "residual", 0) is not None


@pytest.mark.parametrize("target", ["raspberry-pi", "onnxruntime-cpu"])
def test_a_bias_too_large_for_its_int32_scale_raises_the_weight_scale_instead_of_clipping(target: str) -> None:
    """A conv after a near-constant map (inputs ~1e-3, weights ~1e-3) with a bias of 0.5: at input scale x
    weight scale ~1e-10 the bias needs 6e9 > 2^31 - 1. The channel's weight scale is raised until it fits
    (TFLite's converter does the same), so the bias is kept and only that channel's weights get coarser."""
    rng = np.random.default_rng(8)
    weight = (rng.uniform(-1, 1, (4, 3, 3, 3)) * 1e-3).astype(np.float32)
    bias = np.array([0.5, -0.3, 1e-4, 0.0], np.float32)  # channels 0-1 overflow at the natural scale, 2-3 do not
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    ), opset_imports=[helper.make_opsetid("", 17)])
    samples = (rng.uniform(0, 2.5e-3, (16, 3, 8, 8))).astype(np.float32)
    dataset = open_dataset(samples, model_input_specs(model))
    qdq = quantize(model, get_target(target).quant_scheme, dataset, QuantizeOptions(techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0)).model
    arrays = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    dq_bias = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and arrays.get(n.input[0], np.zeros(0)).dtype == np.int32)
    stored = arrays[dq_bias.input[0]].astype(np.float64) * arrays[dq_bias.input[1]]
    assert np.all(np.abs(arrays[dq_bias.input[0]]) < 2**31 - 1)
    np.testing.assert_allclose(stored, bias, rtol=1e-6, atol=1e-9)  # before: channel 0 clipped to ~0.17
    dq_weight = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and arrays.get(n.input[0], np.zeros(0)).ndim == 4)
    weight_scale = arrays[dq_weight.input[1]]
    amax = np.abs(weight).max(axis=(1, 2, 3))
    natural = amax / round(float(amax[3] / weight_scale[3]))  # 127 levels (64 for onnxruntime-cpu's 7-bit avx2 default)
    input_q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    needed = np.abs(bias) / (float(arrays[input_q.input[1]]) * (2**31 - 1))
    raised = needed > natural
    assert raised[0] and not raised[2:].any()
    assert np.all(weight_scale >= needed) and np.allclose(weight_scale[~raised], natural[~raised], rtol=1e-6)
    assert _close_to_fp32(model, qdq, dataset)["min_cosine"] > 0.999
