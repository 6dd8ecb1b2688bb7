"""Accuracy budget: the most sensitive layers fall back to float until the budget holds; exit 3 when it cannot."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.data import Dataset, model_input_specs, open_dataset
from edgeopt.converters.errors import CalibrationDataError, QualityBudgetError
from edgeopt.converters.metrics import fidelity, quality_drop
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.converters.graph.session import run_model
from edgeopt.runtime.kinds import Technique
from edgeopt.targets import get_target


def outlier_mlp() -> onnx.ModelProto:
    """fc1 -> fc2 (one output channel 1000x larger) -> fc3 (ignores that channel) -> fc4.

    Per-tensor int8 on fc3's input spends its whole range on the outlier channel and rounds the
    channels fc3 reads to zero: fc3 is the layer to keep in float.
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 32)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(32, 32)).astype(np.float32) * 0.2
    w2[:, 0] *= 1000.0
    w3 = rng.normal(size=(32, 32)).astype(np.float32) * 0.2
    w3[0, :] = 0.0
    w4 = rng.normal(size=(32, 10)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="fc2"),
        helper.make_node("MatMul", ["h2", "w3"], ["h3"], name="fc3"),
        helper.make_node("MatMul", ["h3", "w4"], ["logits"], name="fc4"),
    ]
    graph = helper.make_graph(
        nodes, "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (w4, "w4"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return outlier_mlp()


def _data(model: onnx.ModelProto, count: int, seed: int) -> Dataset:
    return open_dataset(np.random.default_rng(seed).normal(size=(count, 16)).astype(np.float32), model_input_specs(model))


def _drop(model: onnx.ModelProto, qdq: onnx.ModelProto, dataset: Dataset) -> float:
    return quality_drop(fidelity(list(run_model(model, dataset)), list(run_model(qdq, dataset))))[0]


def test_full_int8_misses_a_five_point_budget(model: onnx.ModelProto) -> None:
    calibration, evaluation = _data(model, 64, 1), _data(model, 200, 2)
    qdq = quantize(model, get_target("jetson-orin").quant_scheme, calibration, QuantizeOptions(debug_samples=0)).model
    assert _drop(model, qdq, evaluation) > 5.0


def test_budget_keeps_the_sensitive_layer_in_float_and_is_met(model: onnx.ModelProto) -> None:
    """Full int8 flips 82% of the top-1 classes; keeping fc3 in float brings that to 3.5%."""
    calibration, evaluation = _data(model, 64, 1), _data(model, 200, 2)
    options = QuantizeOptions(max_accuracy_drop=5.0, evaluation=evaluation, debug_samples=0)
    result = quantize(model, get_target("jetson-orin").quant_scheme, calibration, options)
    report = result.report
    assert report["float_fallback"] == ["fc3"]
    assert report["budget"]["met"] and report["budget"]["drop"] <= 5.0
    assert report["budget"]["metric"] == "top-1 disagreement (%)"
    assert report["budget"]["trials"][0]["float_layers"] == 0 and report["budget"]["trials"][0]["drop"] > 5.0
    assert _drop(model, result.model, evaluation) <= 5.0
    fc3 = next(n for n in result.model.graph.node if n.name == "fc3")
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers.get(fc3.input[0]) != "DequantizeLinear" and producers.get(fc3.input[1]) != "DequantizeLinear"


def test_budget_met_by_full_int8_falls_back_nothing(model: onnx.ModelProto) -> None:
    calibration, evaluation = _data(model, 64, 1), _data(model, 100, 2)
    options = QuantizeOptions(max_accuracy_drop=100.0, evaluation=evaluation, debug_samples=0)
    result = quantize(model, get_target("onnxruntime-cpu").quant_scheme, calibration, options)
    assert result.report["float_fallback"] == [] and result.report["budget"]["met"]


def test_unreachable_budget_exits_3_with_the_best_figure(model: onnx.ModelProto) -> None:
    calibration, evaluation = _data(model, 32, 1), _data(model, 50, 2)
    options = QuantizeOptions(max_accuracy_drop=-1.0, evaluation=evaluation, debug_samples=0)
    with pytest.raises(QualityBudgetError) as error:
        quantize(model, get_target("jetson-orin").quant_scheme, calibration, options)
    assert error.value.exit_code == 3
    assert "best top-1 disagreement (%) reached is 0.000" in str(error.value) and "-1" in str(error.value)


def test_a_budget_without_evaluation_data_is_a_clear_error(model: onnx.ModelProto) -> None:
    with pytest.raises(CalibrationDataError, match="--eval"):
        quantize(model, get_target("jetson-orin").quant_scheme, _data(model, 8, 1), QuantizeOptions(max_accuracy_drop=1.0))


def test_a_budget_met_only_with_every_layer_in_float_says_so(model: onnx.ModelProto) -> None:
    """A zero budget on the outlier MLP holds only once all four layers are float: the report must say
    the result is float, not leave it to look like int8."""
    calibration, evaluation = _data(model, 64, 1), _data(model, 200, 2)
    options = QuantizeOptions(max_accuracy_drop=0.0, evaluation=evaluation, debug_samples=0)
    report = quantize(model, get_target("onnxruntime-cpu").quant_scheme, calibration, options).report
    assert sorted(report["float_fallback"]) == ["fc1", "fc2", "fc3", "fc4"]
    assert report["budget"]["all_float"] and report["budget"]["drop"] == 0.0
    assert report["quantized_op_share"] == 0.0


def test_a_budget_met_with_some_layers_in_int8_is_not_all_float(model: onnx.ModelProto) -> None:
    calibration, evaluation = _data(model, 64, 1), _data(model, 200, 2)
    options = QuantizeOptions(max_accuracy_drop=5.0, evaluation=evaluation, debug_samples=0)
    assert quantize(model, get_target("jetson-orin").quant_scheme, calibration, options).report["budget"]["all_float"] is False


def test_the_quantizer_serves_a_repeated_build_from_memory_and_rebuilds_for_other_exclusions(model: onnx.ModelProto) -> None:
    """The technique search builds the chosen recipe, then `quantize` asks for it again: the second
    ask is a copy of the first (bias correction is not run again), while a budget's builds with
    other float layers are made afresh."""
    from edgeopt.converters.quantize import _Quantizer

    scheme = get_target("onnxruntime-cpu").scheme_for(None)
    quantizer = _Quantizer(model, scheme, _data(model, 64, seed=1), QuantizeOptions(method="minmax", debug_samples=0), None, frozenset({Technique.BIAS_CORRECTION}))
    first = quantizer.build(())
    report = quantizer.bias_report
    again = quantizer.build([])
    assert again is not first and again.SerializeToString() == first.SerializeToString()
    assert quantizer.bias_report is report  # not measured again
    fc3_float = quantizer.build(["fc3"])
    assert "fc3" not in quantizer.last_plan.quantized_nodes and fc3_float.SerializeToString() != first.SerializeToString()
    assert quantizer.bias_report is not report
    assert quantizer.build(()).SerializeToString() == first.SerializeToString() and "fc3" in quantizer.last_plan.quantized_nodes
