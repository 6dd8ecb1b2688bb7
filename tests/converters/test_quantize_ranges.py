"""Range selection by output error ("auto"): per scale group, the candidate range (min-max,
percentiles, entropy, MSE) that hurts the consumers' outputs least on held-out calibration samples."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.data import model_input_specs, open_dataset
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.quantize import QuantizeOptions, _Quantizer, quantize
from edgeopt.runtime.kinds import Effort, Technique
from edgeopt.converters.quantize.calibration import calibrate
from edgeopt.converters.quantize.observers import METHODS
from edgeopt.converters.quantize.placement import plan_quantization
from edgeopt.converters.quantize.range_search import FALLBACK, UNIFORM_PLANS, RangeSearch, RangeSearchOptions, _score_tensors, choose_ranges, split_samples
from edgeopt.targets import get_target

#: uint8 activations (ONNX Runtime) and int8 activations (LiteRT), both with a Q/DQ pair on every tensor.
SCHEMES = ("onnxruntime-cpu", "raspberry-pi")
CHANNELS = 32
ROWS = 32  # one outlier per sample: 0.1% of the values


def _two_matmuls(first: np.ndarray, second: np.ndarray, reshape: bool = False) -> onnx.ModelProto:
    """x -> MatMul(first) -> h [-> Reshape -> r] -> MatMul(second) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1")]
    inits = [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")]
    middle = "h"
    if reshape:
        nodes.append(helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"))
        inits.append(numpy_helper.from_array(np.array([1, ROWS, first.shape[1]], np.int64), "shape"))
        middle = "r"
    nodes.append(helper.make_node("MatMul", [middle, "w2"], ["y"], name="mm2"))
    graph = helper.make_graph(
        nodes,
        "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS, CHANNELS] if reshape else [ROWS, CHANNELS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ROWS, second.shape[1]] if reshape else [ROWS, second.shape[1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _samples(count: int, outlier: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Gaussian rows, with channel 0 of the first row at ±`outlier` (one value in a thousand)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        x = rng.normal(size=(ROWS, CHANNELS)).astype(np.float32)
        x[0, 0] = outlier * rng.choice([-1.0, 1.0])
        samples.append({"x": x})
    return samples


def _search(model: onnx.ModelProto, target: str, samples: list[dict[str, np.ndarray]]):
    scheme = get_target(target).scheme_for(None)
    dataset = open_dataset(samples, model_input_specs(model))
    fit, held_out = split_samples(dataset, RangeSearchOptions().samples)
    plan = plan_quantization(ir.from_proto(model), scheme)
    observers = calibrate(model, fit, plan.sites, method="auto", percentile=99.99, activation_dtype=scheme.activation_dtype)
    ranges, report = choose_ranges(model, held_out, plan, scheme, observers, range_samples=len(fit))
    return ranges, report, observers, plan


def _weights(outlier_weight: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    first = (rng.normal(size=(CHANNELS, 16)) / np.sqrt(CHANNELS)).astype(np.float32)
    first[0, :] = outlier_weight  # how much the outlier channel matters to the consumer
    return first, rng.normal(size=(16, 8)).astype(np.float32)


def _output_error(model: onnx.ModelProto, target: str, method: str, calibration: list, evaluation: list) -> float:
    scheme = get_target(target).scheme_for(None)
    dataset = open_dataset(calibration, model_input_specs(model))
    result = quantize(model, scheme, dataset, QuantizeOptions(method=method, techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0))
    want = [o["y"] for o in run_model(model, evaluation)]
    got = [o["y"] for o in run_model(result.model, evaluation)]
    return float(sum(np.sum((g - w) ** 2) for g, w in zip(got, want)))


def test_auto_is_a_calibration_method_the_cli_offers() -> None:
    assert "auto" in METHODS


@pytest.mark.parametrize("target", SCHEMES)
def test_auto_clips_an_outlier_that_its_consumer_ignores(target: str) -> None:
    """Channel 0 carries ±40 but the consumer's weights on it are zero: min-max would spend the int8
    grid on it (step 0.3 for values of ±1), clipping costs nothing downstream. The tensor's own MSE
    would keep most of the outlier; the consumer's output says clip."""
    model = _two_matmuls(*_weights(outlier_weight=0.0))
    calibration = _samples(64, outlier=40.0)
    ranges, report, observers, _ = _search(model, target, calibration)
    assert report["plan"] == "per_tensor", report["output_error"]
    low, high = ranges["x"]
    assert high < 0.25 * observers["x"].high and low > 0.25 * observers["x"].low, ranges["x"]
    assert observers["x"].range_by("mse", symmetric=False)[1] > 0.5 * observers["x"].high  # what the tensor's own error picks
    evaluation = _samples(16, outlier=40.0, seed=7)
    assert _output_error(model, target, "auto", calibration, evaluation) < 0.2 * _output_error(model, target, "minmax", calibration, evaluation)


@pytest.mark.parametrize("target", SCHEMES)
def test_auto_keeps_the_full_range_where_the_outlier_is_the_signal(target: str) -> None:
    """The same tensor, but the consumer weighs channel 0 heavily: clipping it would wreck the output."""
    model = _two_matmuls(*_weights(outlier_weight=1.0))
    ranges, report, observers, _ = _search(model, target, _samples(64, outlier=40.0))
    low, high = ranges["x"]
    assert high >= 0.95 * observers["x"].high and low <= 0.95 * observers["x"].low, ranges["x"]
    row = next(row for row in report["worst"] if row["tensors"] == ["x"])
    assert row["error_chosen"] <= row["error_minmax"]


@pytest.mark.parametrize("target", SCHEMES)
def test_a_scale_group_gets_one_range_and_the_report_is_filled(target: str) -> None:
    """h and its Reshape r must share a scale: one choice for both, judged on both consumers."""
    first, second = _weights(outlier_weight=0.5)
    model = _two_matmuls(first, second, reshape=True)
    samples = [{"x": s["x"].reshape(1, ROWS, CHANNELS)} for s in _samples(48, outlier=40.0)]
    ranges, report, _, plan = _search(model, target, samples)
    assert ranges["h"] == ranges["r"]
    assert report["groups"] == len(plan.groups()) < len(plan.sites)
    assert sum(report["chosen"].values()) == len(plan.sites)
    assert set(report["chosen"]) <= set(report["candidates"])
    assert report["samples"] == 24 and report["consumer_samples"] == 8 and report["range_samples"] == 24 and report["seconds"] > 0
    assert report["fallback"] == FALLBACK and report["fallback_tensors"] == []
    assert set(report["output_error"]) == {"per_tensor", *UNIFORM_PLANS}
    assert report["output_error"][report["plan"]] == min(report["output_error"].values())
    assert 0.0 <= report["error_reduction"] <= 1.0 and report["error_chosen"] <= report["error_minmax"]
    assert report["worst"] and all(row["error_chosen"] <= row["error_minmax"] for row in report["worst"])


@pytest.mark.parametrize("target", SCHEMES)
def test_quantize_with_auto_keeps_its_report_on_the_quantizer(target: str) -> None:
    model = _two_matmuls(*_weights(outlier_weight=0.0))
    scheme = get_target(target).scheme_for(None)
    dataset = open_dataset(_samples(40, outlier=40.0), model_input_specs(model))
    quantizer = _Quantizer(model, scheme, dataset, QuantizeOptions(method="auto", debug_samples=0), None, frozenset())
    qdq = quantizer.build(())
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    assert quantizer.range_report["samples"] == 20 and quantizer.range_report["range_samples"] == 20
    search = quantizer.range_search
    assert search is not None
    measured: list[int] = []
    measure = search._measure
    search._measure = lambda plan, pending, *rest: (measured.append(len(pending)), measure(plan, pending, *rest))[1]
    again = quantizer.build(("not_a_node",))  # another exclusion (not served from the last build), the same plan
    assert measured == [] and len(search._choices) > 0  # the range search measured nothing again
    assert [n for n in again.graph.node] == [n for n in qdq.graph.node]


def _branching_conv() -> onnx.ModelProto:
    """x -> Conv(w) -> c -> Relu -> r; Add(c, r) -> s -> Conv(w) -> y: an Add reading two scale
    groups (one piece per group) and a weight shared by two convolutions."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["c", "r"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w", "b"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array((rng.normal(size=(4, 4, 3, 3)) / 6).astype(np.float32), "w"), numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")]
    graph = helper.make_graph(
        nodes, "branching", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", SCHEMES)
def test_one_session_gives_each_consumer_the_error_it_has_alone(target: str) -> None:
    """The search measures every consumer of every group in one ONNX Runtime graph, one run per
    sample and candidate; each consumer's error must be what it computes in a graph of its own,
    for every candidate (a piece reading another piece's scale or weight would differ)."""
    from edgeopt.converters.quantize.range_search import RangeSearch, _Consumer, _ConsumersGraph, candidate_names

    model = _branching_conv()
    scheme = get_target(target).scheme_for(None)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32) * np.float32(rng.uniform(0.5, 3))} for _ in range(24)]
    dataset = open_dataset(samples, model_input_specs(model))
    plan = plan_quantization(ir.from_proto(model), scheme)
    observers = calibrate(model, dataset, plan.sites, method="auto", percentile=99.99, activation_dtype=scheme.activation_dtype)
    search = RangeSearch(model, dataset, scheme)
    initializers = {i.name: i for i in model.graph.initializer}
    types = {**{v.name: TensorProto.FLOAT for v in model.graph.input}, **{o: TensorProto.FLOAT for n in model.graph.node for o in n.output}}
    consumers, groups = [], []
    for members in plan.groups().values():
        found = search._candidates(plan, members, observers, lambda _name, span: span)
        for node in model.graph.node:
            if read := frozenset(members) & set(node.input):
                consumers.append(_Consumer(f"c{len(consumers)}/", node, read, initializers, plan, scheme, types))
                groups.append(found)
    assert {c.node for c in consumers} >= {"conv1", "relu", "add", "conv2"} and sum(c.node == "add" for c in consumers) == 2
    together = _ConsumersGraph(consumers, model, threads=1)
    alone = [_ConsumersGraph([c], model, threads=1) for c in consumers]
    tensors = sorted({t for c in consumers for t in [*c.inputs, *c.outputs]} - {"x"})
    errors = set()
    for sample, values in zip(samples[:4], run_model(model, samples[:4], tensors)):
        values["x"] = sample["x"]
        for name in candidate_names(RangeSearchOptions()):
            params = [found[name][0] for found in groups]
            got = together.squared_errors(values, params)
            want = [runner.squared_errors(values, [p])[0] for runner, p in zip(alone, params)]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
            errors.add(tuple(got))
    assert len(errors) > 4  # the candidates' scales reach the pieces: errors change with them


def _detection_head() -> onnx.ModelProto:
    """x -> MatMul -> Add(-8) = logits -> Sigmoid = scores; x -> MatMul = boxes (x 100);
    y = Concat(boxes, scores): background scores near 0, a detection where a row's channel 0 is high."""
    rng = np.random.default_rng(3)
    w_score = np.zeros((CHANNELS, 4), np.float32)
    w_score[0, :] = 0.3  # channel 0 (the outlier) is the detection signal
    w_box = (rng.normal(size=(CHANNELS, 4)) * 100.0 / np.sqrt(CHANNELS)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w_score"], ["m"], name="score_mm"),
        helper.make_node("Add", ["m", "shift"], ["logits"], name="score_shift"),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="score"),
        helper.make_node("MatMul", ["x", "w_box"], ["boxes"], name="box_mm"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], name="head", axis=1),
    ]
    inits = [numpy_helper.from_array(w_score, "w_score"), numpy_helper.from_array(np.array(-8.0, np.float32), "shift"), numpy_helper.from_array(w_box, "w_box")]
    graph = helper.make_graph(
        nodes, "detection_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, CHANNELS])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, 8])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_output_scores_and_their_logits_keep_their_calibrated_range() -> None:
    """A detector's scores are near 0 except at the rare detections: a plan judged by the whole output's
    error (ruled by the box coordinates) clipped them (yolov8n_nudenet on OpenVINO: every class score
    capped at 0.16, fp32 up to 0.83; box F1 0.77 -> 0). The scores, their logits and the data movement
    to the output keep the calibrated range; a Sigmoid that gates a value inside the network does not."""
    model = _detection_head()
    gate = helper.make_node("Sigmoid", ["x"], ["gate"], name="gate")
    gated = helper.make_node("Mul", ["x", "gate"], ["x_gated"], name="gated")
    inner = onnx.ModelProto()
    inner.CopyFrom(model)
    del inner.graph.node[:]
    inner.graph.node.extend([gate, gated, *[n for n in model.graph.node]])
    for node in inner.graph.node[2:]:
        node.input[:] = ["x_gated" if name == "x" else name for name in node.input]
    assert _score_tensors(inner) == {"logits", "scores", "y"}
    ranges, _, observers, plan = _search(model, "intel-openvino", _samples(64, outlier=40.0))
    assert "scores" in plan.sites
    assert ranges["scores"] == observers["scores"].range(get_target("intel-openvino").scheme_for(None).activation_symmetric)
    assert ranges["scores"][1] > 0.95


@pytest.mark.parametrize("target", SCHEMES)
def test_refit_keeps_each_groups_chosen_method_and_takes_its_range_from_more_samples(target: str) -> None:
    """`refit` with the observers the choice saw gives the choice's ranges; with observers that saw more
    samples, each group's range is its chosen method's on those observers (the search is not run again)."""
    model = _two_matmuls(*_weights(outlier_weight=0.0))
    samples = _samples(64, outlier=40.0)
    scheme = get_target(target).scheme_for(None)
    dataset = open_dataset(samples, model_input_specs(model))
    fit, held_out = split_samples(dataset, RangeSearchOptions().samples)
    plan = plan_quantization(ir.from_proto(model), scheme)
    observers = calibrate(model, fit, plan.sites, method="auto", percentile=99.99, activation_dtype=scheme.activation_dtype)
    search = RangeSearch(model, held_out, scheme)
    ranges, report = search.choose(plan, observers)
    assert search.refit(plan, observers) == ranges

    wider = open_dataset(samples + [{"x": 2 * s["x"]} for s in samples], model_input_specs(model))  # the later samples twice as wide
    everything = calibrate(model, wider, plan.sites, method="auto", percentile=99.99, activation_dtype=scheme.activation_dtype)
    refit = search.refit(plan, everything)
    methods = {m: g["method"] for g in report["worst"] for m in g["tensors"]}
    assert methods["x"] != "minmax"  # the outlier is clipped: a method whose range moves with the data
    method = methods["x"]
    name, _, percentile = method.partition("_")
    symmetric = scheme.activation_symmetric
    want = everything["x"].range_by(name, symmetric, float(percentile)) if percentile else everything["x"].range_by(name, symmetric)
    assert refit["x"] == want and refit["x"] != ranges["x"]


def test_a_searched_build_takes_its_final_ranges_from_every_calibration_sample() -> None:
    """The technique search fits ranges on part of the calibration set and judges on the rest; the
    chosen recipe's ranges are then estimated again on all of it. The last sample holds the largest
    input: min-max over every sample (range search off) must include it."""
    model = _two_matmuls(*_weights(outlier_weight=1.0))
    samples = _samples(64, outlier=4.0)
    samples[-1]["x"][1, 1] = 50.0
    scheme = get_target("onnxruntime-cpu").scheme_for(None)
    dataset = open_dataset(samples, model_input_specs(model))
    options = QuantizeOptions(effort=Effort.DEFAULT, techniques={Technique.RANGE_SEARCH: False}, debug_samples=0)
    result = quantize(model, scheme, dataset, options)
    assert result.report["techniques"]["search"] is not None and result.report["techniques"]["refit_samples"] == 64
    assert result.report["samples"] == 64
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    quantize_x = next(n for n in result.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    low = min(0.0, min(float(s["x"].min()) for s in samples))
    assert float(inits[quantize_x.input[1]]) == pytest.approx((50.0 - low) / 255, rel=1e-3)
