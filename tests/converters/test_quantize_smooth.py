"""SmoothQuant: activation outliers of MatMul/Gemm inputs migrate into the weights, exactly in fp32,
folded where it is free, only where the simulated int8 error drops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.data import Dataset, model_input_specs, open_dataset
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.passes import simplify
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.converters.quantize.smooth import SmoothQuantOptions, smooth_quant
from edgeopt.targets import get_target
from tests import zoo

SCHEME = get_target("onnxruntime-cpu").quant_scheme
TOKENS, HIDDEN = 16, 32
OUTLIER_DIMS = (3, 17)


def _model(nodes: list[onnx.NodeProto], initializers: dict[str, np.ndarray], input_shape=(1, TOKENS, HIDDEN)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "smooth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weights(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {f"w{i}": rng.normal(0, 0.2, (HIDDEN, HIDDEN)) for i in range(count)}


def _pre_norm_attention(outliers: bool = True) -> onnx.ModelProto:
    """LayerNorm -> Q, K, V MatMuls (the norm feeds nothing else), as in a pre-LN transformer; without
    outliers the norm's channels are even (unit gain, no bias)."""
    rng = np.random.default_rng(0)
    gamma, beta = np.ones(HIDDEN), np.zeros(HIDDEN)
    if outliers:
        gamma, beta = rng.uniform(0.5, 1.5, HIDDEN), rng.normal(0, 0.1, HIDDEN)
        gamma[list(OUTLIER_DIMS)] *= 40.0
        beta[list(OUTLIER_DIMS)] += 4.0
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
        *(helper.make_node("MatMul", ["h", f"w{i}"], [f"p{i}"]) for i in range(3)),
        helper.make_node("Add", ["p0", "p1"], ["s01"]),
        helper.make_node("Add", ["s01", "p2"], ["y"]),
    ]
    return _model(nodes, {"gamma": gamma, "beta": beta, **_weights(rng, 3)})


def _linear_chain() -> onnx.ModelProto:
    """MatMul + bias whose output columns carry outliers -> MatMul."""
    rng = np.random.default_rng(1)
    first = rng.normal(0, 0.2, (HIDDEN, HIDDEN))
    first[:, list(OUTLIER_DIMS)] *= 40.0
    nodes = [
        helper.make_node("MatMul", ["x", "w_first"], ["m"]),
        helper.make_node("Add", ["m", "b_first"], ["h"]),
        helper.make_node("MatMul", ["h", "w0"], ["y"]),
    ]
    return _model(nodes, {"w_first": first, "b_first": rng.normal(0, 0.1, HIDDEN), **_weights(rng, 1)})


def _dataset(model: onnx.ModelProto, count: int = 32, outlier_input: bool = False, seed: int = 0) -> Dataset:
    x = np.random.default_rng(seed).normal(0, 1, (count, TOKENS, HIDDEN)).astype(np.float32)
    if outlier_input:
        x[..., list(OUTLIER_DIMS)] *= 50.0
    return open_dataset({"x": x}, model_input_specs(model))


def _max_difference(first: onnx.ModelProto, second: onnx.ModelProto, data: Dataset) -> float:
    return max(float(np.max(np.abs(a["y"] - b["y"]))) for a, b in zip(run_model(first, data), run_model(second, data)))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _sqnr_db(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: Dataset, names: list[str]) -> float:
    signal = noise = 0.0
    for ref, cand in zip(run_model(reference, data, names), run_model(candidate, data, names)):
        for name in names:
            signal += float(np.sum(ref[name].astype(np.float64) ** 2))
            noise += float(np.sum((ref[name].astype(np.float64) - cand[name]) ** 2))
    return 10.0 * np.log10(signal / noise)


def test_smoothing_folds_into_the_layernorm_without_a_new_op_and_is_exact_in_fp32() -> None:
    model = _pre_norm_attention()
    original = model.SerializeToString()
    data = _dataset(model)
    smoothed, report = smooth_quant(model, data, SCHEME)

    assert report["changed"] and model.SerializeToString() == original  # the argument is not changed
    (group,) = report["groups"]
    assert len(group["layers"]) == 3  # Q, K and V share one factor
    assert group["folded_into"].startswith("LayerNormalization") and group["added_ops"] == 0
    assert _ops(smoothed) == _ops(model)
    assert len(smoothed.graph.initializer) == len(model.graph.initializer)  # the replaced weights are gone
    assert _max_difference(model, smoothed, data) < 1e-4


def test_outliers_are_reduced_and_the_simulated_int8_error_drops() -> None:
    model = _pre_norm_attention()
    _, report = smooth_quant(model, _dataset(model), SCHEME)

    (group,) = report["groups"]
    assert group["outlier_ratio_before"] > 20.0
    assert group["outlier_ratio_after"] < group["outlier_ratio_before"] / 4
    assert group["alpha"] > 0.0
    assert group["error_after"] < group["error_before"] / 4
    assert group["error_after"] == min(group["errors_by_alpha"].values())


def test_smoothing_folds_into_the_producing_matmul_and_bias() -> None:
    model = _linear_chain()
    data = _dataset(model)
    smoothed, report = smooth_quant(model, data, SCHEME)

    (group,) = report["groups"]
    assert group["folded_into"].startswith("MatMul + Add") and group["added_ops"] == 0
    assert _ops(smoothed) == _ops(model)
    assert _max_difference(model, smoothed, data) < 1e-3


def test_gemm_pairs_with_transposed_weights_fold_into_the_first_gemm() -> None:
    rng = np.random.default_rng(4)
    first = rng.normal(0, 0.2, (HIDDEN, HIDDEN))  # [out, in] with transB
    first[list(OUTLIER_DIMS), :] *= 40.0
    nodes = [
        helper.make_node("Gemm", ["x", "w_first", "b_first"], ["h"], transB=1),
        helper.make_node("Gemm", ["h", "w0", "b0"], ["y"], transB=1),
    ]
    initializers = {"w_first": first, "b_first": rng.normal(0, 0.1, HIDDEN), "w0": rng.normal(0, 0.2, (HIDDEN, HIDDEN)), "b0": np.zeros(HIDDEN)}
    model = _model(nodes, initializers, input_shape=(TOKENS, HIDDEN))
    data = open_dataset({"x": rng.normal(0, 1, (32 * TOKENS, HIDDEN)).astype(np.float32)}, model_input_specs(model))
    smoothed, report = smooth_quant(model, data, SCHEME)

    (group,) = report["groups"]
    assert group["folded_into"].startswith("Gemm") and group["added_ops"] == 0
    assert _ops(smoothed) == ["Gemm", "Gemm"]
    assert _max_difference(model, smoothed, data) < 1e-3


def test_a_graph_input_with_outliers_gets_a_mul_and_the_report_says_so() -> None:
    rng = np.random.default_rng(2)
    model = _model([helper.make_node("MatMul", ["x", "w0"], ["y"])], _weights(rng, 1))
    data = _dataset(model, outlier_input=True)
    smoothed, report = smooth_quant(model, data, SCHEME)

    assert report["added_ops"] == 1 and report["groups"][0]["folded_into"].startswith("Mul (new op")
    assert _ops(smoothed) == ["Mul", "MatMul"]
    assert _max_difference(model, smoothed, data) < 1e-3


def test_alpha_zero_is_kept_where_smoothing_does_not_lower_the_error() -> None:
    """Without outlier channels every α only rescales an even activation: nothing to gain."""
    model = _pre_norm_attention(outliers=False)
    data = _dataset(model)
    smoothed, report = smooth_quant(model, data, SCHEME, SmoothQuantOptions(min_outlier_ratio=0.0))

    assert not report["changed"] and report["groups"] == [] and smoothed is model
    (skipped,) = report["skipped"]
    assert "does not lower the simulated int8 error" in skipped["why"]


def test_a_conv_model_without_matmul_is_left_alone() -> None:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "k1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, {"k1": rng.normal(0, 0.3, (8, 3, 3, 3)), "k2": rng.normal(0, 0.3, (4, 8, 3, 3))}, input_shape=(1, 3, 16, 16))
    data = open_dataset({"x": rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)}, model_input_specs(model))
    smoothed, report = smooth_quant(model, data, SCHEME)

    assert smoothed is model and not report["changed"] and report["groups"] == [] and report["skipped"] == []


@pytest.fixture(scope="module")
def outlier_encoder() -> tuple[onnx.ModelProto, Dataset, Dataset]:
    model, _ = simplify(zoo.bert_encoder(outliers=True))
    specs = model_input_specs(model)

    def dataset(count: int, seed: int) -> Dataset:
        feeds = zoo.encoder_inputs(count, seed)
        return open_dataset({name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}, specs)

    return model, dataset(64, 0), dataset(32, 1)


def test_the_outlier_encoder_is_smoothed_exactly_through_its_layernorms(outlier_encoder) -> None:
    model, calibration, evaluation = outlier_encoder
    smoothed, report = smooth_quant(model, calibration, SCHEME)

    # the FFN-output LayerNorm with outlier gains feeds the next layer's Q, K, V and its residual Add
    smoothed_inputs = [g["activation"] for g in report["groups"]]
    assert "/bert/encoder/layer.0/output/LayerNorm/LayerNormalization_output_0" in smoothed_inputs
    # post-LN: the norm also feeds the next residual Add, whose other operand (a projection + bias)
    # is divided too; one Mul restores the sum before the next norm
    assert all(g["folded_into"].startswith("LayerNormalization") and "residual Add" in g["folded_into"] for g in report["groups"])
    assert report["added_ops"] == len(report["groups"])
    reference = [s["embedding"] for s in run_model(model, evaluation.take(8))]
    candidate = [s["embedding"] for s in run_model(smoothed, evaluation.take(8))]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(reference, candidate)) < 1e-5


def test_the_outlier_encoder_gains_int8_fidelity_where_it_was_smoothed(outlier_encoder) -> None:
    """The projections after the smoothed norms gain 8-9 dB; the embedding stays within noise.

    The embedding's SQNR (31 dB) is bound by the first residual Add (layer 0, before any outlier):
    its int8 noise reaches the embedding through the 30-60x LayerNorm gains of the outlier channels
    (32 dB with only that Add in int8, 49 dB with all five residual Adds float).
    """
    model, calibration, evaluation = outlier_encoder
    smoothed, _ = smooth_quant(model, calibration, SCHEME)
    options = QuantizeOptions(debug_samples=0)
    plain = quantize(model, SCHEME, calibration, options).model
    migrated = quantize(smoothed, SCHEME, calibration, options).model

    projections = [f"/bert/encoder/layer.1/attention/self/{p}/MatMul_output_0" for p in ("query", "key", "value")]
    projections.append("/bert/encoder/layer.1/intermediate/dense/MatMul_output_0")
    assert _sqnr_db(smoothed, migrated, evaluation, projections) > _sqnr_db(model, plain, evaluation, projections) + 5.0
    embedding_before = _sqnr_db(model, plain, evaluation, ["embedding"])
    assert _sqnr_db(model, migrated, evaluation, ["embedding"]) > embedding_before - 1.0  # ±0.5 dB between sample sets
