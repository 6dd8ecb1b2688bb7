"""ONNX → OpenVINO IR: fp32, fp16 and int8 (from QDQ) match ONNX Runtime on the CPU plugin.

Tolerances, relative to the largest |output| of ONNX Runtime fp32:
  fp32  1e-4  (same math, different kernels; the plugin's f32 precision hint pinned)
  fp16  1e-2  (weights stored as fp16, computed in f32)
int8 is compared with ONNX Runtime running the *same* QDQ graph by its exact semantics (graph
optimizations off, so no int8 kernel whose result depends on the CPU): OpenVINO's SQNR against fp32 is
within 2 dB of ONNX Runtime's, and outputs agree within 4 quantization steps (the output's range /
255). The two runtimes may round an intermediate value to neighbouring integers; over the 50+
quantized layers of ResNet-50/DenseNet-121/Inception such differences grow chaotically, so those
deep models are held to the SQNR bound only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import openvino as ov
import pytest
from onnx import helper, numpy_helper

from edgeopt.converters.data import model_input_specs, open_dataset
from edgeopt.converters.errors import LoweringError, UnsupportedOpsError
from edgeopt.converters.lower import LoweringOptions, LoweringResult, lower
from edgeopt.converters.passes import simplify
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.runtime.kinds import Technique
from edgeopt.converters.graph.session import ort_session as session
from edgeopt.targets import get_target
from tests import zoo

TARGET = get_target("intel-openvino")
FP32_REL = 1e-4
FP16_REL = 1e-2
INT8_STEPS = 4.0
INT8_SQNR_DB = 2.0
# Past this both runtimes reproduce fp32 (e.g. ShuffleNet's saturated softmax); differences are denormals.
EXACT_SQNR_DB = 60.0

Feed = dict[str, np.ndarray]


def logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its final Softmax: with random weights the probabilities saturate, and
    SQNR on saturated probabilities measures noise in a handful of elements, not quantization."""
    last = model.graph.node[-1]
    if last.op_type != "Softmax" or last.output[0] != model.graph.output[0].name:
        return model
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[-1]
    cut.graph.output[0].name = last.input[0]
    return cut


def light(name: str) -> Callable[[], onnx.ModelProto]:
    return lambda: logits(zoo.light_model(name))


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "digits": zoo.digits_cnn,
    "squeezenet": light("squeezenet"),
    "shufflenet": light("shufflenet"),
    "mobilenet_v2_style": zoo.mobilenet_v2_style,
    "unet_style": zoo.unet_style,
    "transformer_encoder": zoo.transformer_encoder,
    "resnet50": light("resnet50"),
    "densenet121": light("densenet121"),
    "inception_v1": light("inception_v1"),
}
SLOW = {"resnet50", "densenet121", "inception_v1"}
# Quantizing these takes 15-35 s here (calibration runs every intermediate tensor); CI runs them as slow.
SLOW_INT8 = SLOW | {"shufflenet", "squeezenet"}


def params(slow: set[str]) -> list[Any]:
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in MODELS]


def feeds_for(name: str, model: onnx.ModelProto, count: int, seed: int) -> list[Feed]:
    if name == "digits":
        with np.load(zoo.DIGITS_DIR / ("calib.npz" if seed == 1 else "eval.npz"), allow_pickle=False) as data:
            return [{"image": data["image"][i : i + 1]} for i in range(count)]
    return zoo.random_inputs(model, count, seed=seed)


def ort_run(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """ONNX Runtime on the graph: fp32 as is, a QDQ graph by its exact semantics (no int8 kernels)."""
    runner = session(model)
    return [runner.run(None, feed) for feed in feeds]


def ov_run(result: LoweringResult, out_dir: Path, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Run the IR itself on the CPU plugin, f32 pinned (the plugin's default here may be bf16)."""
    compiled = ov.Core().compile_model(str(out_dir / result.model_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return [[np.asarray(compiled(feed)[port]) for port in compiled.outputs] for feed in feeds]


def max_rel_error(expected: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for exp_outputs, act_outputs in zip(expected, actual):
        for exp, act in zip(exp_outputs, act_outputs):
            scale = max(float(np.abs(exp).max()), 1e-12)
            worst = max(worst, float(np.abs(exp - act.reshape(exp.shape)).max()) / scale)
    return worst


def max_steps(expected: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    """Largest difference in quantization steps of each output (its range over 255 levels)."""
    worst = 0.0
    for exp_outputs, act_outputs in zip(expected, actual):
        for exp, act in zip(exp_outputs, act_outputs):
            step = max(float(np.ptp(exp)), 1e-12) / 255.0
            worst = max(worst, float(np.abs(exp - act.reshape(exp.shape)).max()) / step)
    return worst


def quantize_for_openvino(model: onnx.ModelProto, calibration: Sequence[Feed]) -> onnx.ModelProto:
    """simplify → edgeopt's quantizer with the intel-openvino scheme, as the build pipeline runs them."""
    simplified = simplify(model)[0]
    dataset = open_dataset(list(calibration), model_input_specs(simplified))
    return quantize(simplified, TARGET.quant_scheme, dataset, QuantizeOptions(techniques={Technique.BIAS_CORRECTION: False}, threads=2)).model


@functools.cache
def case(name: str) -> tuple[onnx.ModelProto, list[Feed], list[list[np.ndarray]]]:
    """The model, two held-out inputs and ONNX Runtime fp32's outputs for them."""
    model = MODELS[name]()
    feeds = feeds_for(name, model, 2, seed=2)
    return model, feeds, ort_run(model, feeds)


def sqnr_db(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    ref = np.concatenate([np.ravel(outputs[0]) for outputs in reference]).astype(np.float64)
    got = np.concatenate([np.ravel(outputs[0]) for outputs in actual]).astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    return float(10 * np.log10(np.sum(ref**2) / noise)) if noise else float("inf")


# ------------------------------------------------------------------------------------------------
# Numerics, every model, every precision
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", params(SLOW))
def test_fp32_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    model, feeds, reference = case(name)
    result = lower(model, TARGET, "fp32", tmp_path, LoweringOptions())
    assert max_rel_error(reference, ov_run(result, tmp_path, feeds)) <= FP32_REL


@pytest.mark.parametrize("name", params(SLOW))
def test_fp16_weights_match_onnxruntime(name: str, tmp_path: Path) -> None:
    model, feeds, reference = case(name)
    result = lower(model, TARGET, "fp16", tmp_path, LoweringOptions())
    assert result.summary["compress_to_fp16"] is True
    assert max_rel_error(reference, ov_run(result, tmp_path, feeds)) <= FP16_REL


@pytest.mark.parametrize("name", params(SLOW_INT8))
def test_int8_runs_the_qdq_graph_like_onnxruntime(name: str, tmp_path: Path) -> None:
    model, feeds, reference = case(name)
    qdq = quantize_for_openvino(model, feeds_for(name, model, 4, seed=1))
    result = lower(qdq, TARGET, "int8", tmp_path, LoweringOptions())
    expected, actual = ort_run(qdq, feeds), ov_run(result, tmp_path, feeds)
    assert min(sqnr_db(reference, actual), EXACT_SQNR_DB) >= min(sqnr_db(reference, expected), EXACT_SQNR_DB) - INT8_SQNR_DB
    if name not in SLOW:
        assert max_steps(expected, actual) <= INT8_STEPS
    assert result.summary["fake_quantize"] > 0
    assert result.summary["warnings"] == []


# ------------------------------------------------------------------------------------------------
# What the IR holds
# ------------------------------------------------------------------------------------------------


def conv_model(channels: int = 16) -> onnx.ModelProto:
    """Conv → Relu → Conv → GlobalAveragePool, input x [1, 3, 16, 16]."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32), "w2")
    b2 = numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(np.float32), "b2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c2"], ["y"]),
        ],
        "convs",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, channels, 1, 1])],
        [w1, w2, b2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def convs() -> tuple[onnx.ModelProto, onnx.ModelProto, list[Feed]]:
    model = conv_model()
    calibration = zoo.random_inputs(model, 8, seed=1)
    return model, quantize_for_openvino(model, calibration), zoo.random_inputs(model, 2, seed=2)


def weight_types(xml: Path) -> set[str]:
    """Element types of the IR's convolution kernels (constants with more than one non-unit dim)."""
    model = ov.Core().read_model(str(xml))
    return {
        node.get_element_type().get_type_name()
        for node in model.get_ordered_ops()
        if node.get_type_name() == "Constant" and sum(d > 1 for d in node.get_output_shape(0)) > 1
    }


def test_writes_model_xml_and_bin_listed_as_model_and_weights(convs: Any, tmp_path: Path) -> None:
    model, _, _ = convs
    result = lower(model, TARGET, "fp32", tmp_path, LoweringOptions())
    assert [(a.path, a.format, a.role) for a in result.artifacts] == [
        ("model.xml", "openvino-ir", "model"),
        ("model.bin", "openvino-ir", "weights"),
    ]
    assert result.model_file == "model.xml"
    assert all((tmp_path / a.path).is_file() for a in result.artifacts)
    assert (result.runtime_backend, result.verify_backend) == ("openvino", "openvino")
    assert [(s.name, s.shape, s.dtype, s.layout) for s in result.inputs] == [("x", (1, 3, 16, 16), "float32", "NCHW")]
    assert [(s.name, s.shape, s.dtype) for s in result.outputs] == [("y", (1, 16, 1, 1), "float32")]


def test_runner_checks_the_ir_on_this_cpu_in_f32(convs: Any, tmp_path: Path) -> None:
    model, _, feeds = convs
    result = lower(model, TARGET, "fp32", tmp_path, LoweringOptions(extra={"device": "GPU"}))
    assert result.runner is not None
    (expected,) = ort_run(model, feeds[:1])
    assert max_rel_error([expected], [[result.runner(feeds[0])["y"]]]) <= FP32_REL


def test_fp32_keeps_float32_weights_and_fp16_halves_them(convs: Any, tmp_path: Path) -> None:
    model, _, _ = convs
    lower(model, TARGET, "fp32", tmp_path / "fp32", LoweringOptions())
    lower(model, TARGET, "fp16", tmp_path / "fp16", LoweringOptions())
    assert weight_types(tmp_path / "fp32" / "model.xml") == {"f32"}
    assert weight_types(tmp_path / "fp16" / "model.xml") == {"f16"}
    ratio = (tmp_path / "fp16" / "model.bin").stat().st_size / (tmp_path / "fp32" / "model.bin").stat().st_size
    assert 0.45 <= ratio <= 0.55


def test_int8_stores_int8_weights_and_runs_int8_convolutions(convs: Any, tmp_path: Path) -> None:
    model, qdq, _ = convs
    lower(model, TARGET, "fp32", tmp_path / "fp32", LoweringOptions())
    result = lower(qdq, TARGET, "int8", tmp_path / "int8", LoweringOptions())
    assert weight_types(tmp_path / "int8" / "model.xml") == {"i8"}
    assert (tmp_path / "int8" / "model.bin").stat().st_size <= 0.35 * (tmp_path / "fp32" / "model.bin").stat().st_size
    assert result.summary["int8_weight_constants"] == 2
    executed = result.summary["cpu_execution"]["Convolution"]
    assert set(executed) <= {"u8", "i8"} and sum(executed.values()) == 2


def test_int8_fake_quantize_carries_the_qdq_scales(convs: Any, tmp_path: Path) -> None:
    _, qdq, _ = convs
    lower(qdq, TARGET, "int8", tmp_path, LoweringOptions())
    initializers = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    expected = []
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear":
            scale, zero_point = float(initializers[node.input[1]]), initializers[node.input[2]]
            info = np.iinfo(zero_point.dtype)
            expected.append(((info.min - int(zero_point)) * scale, (info.max - int(zero_point)) * scale))
    found = []
    for node in ov.Core().read_model(str(tmp_path / "model.xml")).get_ordered_ops():
        if node.get_type_name() == "FakeQuantize":
            found.append(tuple(float(node.input_value(i).get_node().get_data().ravel()[0]) for i in (3, 4)))
    assert len(found) == len(expected)
    assert np.allclose(sorted(found), sorted(expected), rtol=1e-6, atol=0)


def test_records_profile_options_for_the_device(convs: Any, tmp_path: Path) -> None:
    model, _, _ = convs
    result = lower(model, TARGET, "fp16", tmp_path, LoweringOptions())
    summary = result.summary
    assert (summary["device"], summary["performance_hint"], summary["inference_precision"]) == ("CPU", "LATENCY", "f32")
    assert result.runtime_options == {"device": "CPU", "performance_hint": "LATENCY", "inference_precision": "f32"}


def test_user_options_choose_another_device_and_hint(convs: Any, tmp_path: Path) -> None:
    model, _, _ = convs
    extra = {"device": "npu", "performance_hint": "throughput", "inference_precision": "f16"}
    result = lower(model, TARGET, "fp16", tmp_path, LoweringOptions(extra=extra))
    assert result.runtime_options == {"device": "NPU", "performance_hint": "THROUGHPUT", "inference_precision": "f16"}
    assert result.verify_backend == "openvino"
    assert "CPU plugin, INFERENCE_PRECISION_HINT f32" in result.verified_with


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"device": "TPU"}, "unknown OpenVINO device 'TPU'"),
        ({"performance_hint": "FASTEST"}, "unknown OpenVINO performance hint 'FASTEST'"),
        ({"inference_precision": "int4"}, "unknown OpenVINO inference precision 'int4'"),
    ],
)
def test_rejects_options_openvino_does_not_know(convs: Any, tmp_path: Path, extra: dict[str, str], message: str) -> None:
    model, _, _ = convs
    with pytest.raises(LoweringError, match=message) as error:
        lower(model, TARGET, "fp32", tmp_path, LoweringOptions(extra=extra))
    assert error.value.hint


def test_int8_needs_a_qdq_graph(convs: Any, tmp_path: Path) -> None:
    model, _, _ = convs
    with pytest.raises(LoweringError, match="needs a QDQ ONNX graph") as error:
        lower(model, TARGET, "int8", tmp_path, LoweringOptions())
    assert "--calibration" in (error.value.hint or "")
    assert not (tmp_path / "model.xml").exists()


def test_rejects_a_precision_the_target_does_not_offer(convs: Any, tmp_path: Path) -> None:
    model, _, _ = convs
    with pytest.raises(LoweringError, match="precision 'int4' is not offered by target intel-openvino"):
        lower(model, TARGET, "int4", tmp_path, LoweringOptions())


def test_input_shapes_fix_the_batch(tmp_path: Path) -> None:
    model = zoo.digits_cnn()
    result = lower(model, TARGET, "fp32", tmp_path, LoweringOptions(input_shapes={"image": (3, 1, 8, 8)}))
    assert result.inputs[0].shape == (3, 1, 8, 8)
    assert result.outputs[0].shape == (3, 10)
    with np.load(zoo.DIGITS_DIR / "eval.npz", allow_pickle=False) as data:
        batch = data["image"][:3]
    expected = ort_run(model, [{"image": batch[i : i + 1]} for i in range(3)])
    (got,) = ov_run(result, tmp_path, [{"image": batch}])
    assert np.allclose(got[0], np.concatenate([e[0] for e in expected]), rtol=0, atol=FP32_REL * np.abs(got[0]).max())


def test_input_shapes_naming_an_unknown_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LoweringError, match="--input-shape names pixels"):
        lower(zoo.digits_cnn(), TARGET, "fp32", tmp_path, LoweringOptions(input_shapes={"pixels": (1, 1, 8, 8)}))


def test_input_shapes_the_layers_cannot_take_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(LoweringError, match="OpenVINO cannot reshape the model to .*rank do not match"):
        lower(zoo.digits_cnn(), TARGET, "fp32", tmp_path, LoweringOptions(input_shapes={"image": (1, 8, 8)}))


def test_ops_openvino_cannot_convert_are_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example", name="custom_layer")],
        "custom",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpsError) as error:
        lower(model, TARGET, "fp32", tmp_path, LoweringOptions())
    assert error.value.target == "intel-openvino"
    assert error.value.nodes == [("custom_layer", "NoSuchOp", "OpenVINO's ONNX frontend has no conversion rule for it")]
