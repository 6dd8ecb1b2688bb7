"""Mixed precision: the fewest sensitive layers stay float under a goal, each target runs them in its
float type, and the latency they cost is measured where this machine runs the backend."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.data import Dataset, model_input_specs, open_dataset
from edgeopt.converters.lower import LoweringOptions, lower
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.converters.quantize.mixed_precision import choose_fallback, mac_share, measure_fallback_cost
from edgeopt.converters.quantize.placement import QuantPlan, plan_quantization
from edgeopt.converters.quantize.sensitivity import Ranking
from edgeopt.runtime.isa import host_isa_flags
from edgeopt.runtime.kinds import Precision
from edgeopt.targets import get_target
from tests.converters.test_quantize_budget import outlier_mlp

# fc3's MACs over the MLP's: 32·32 / (16·32 + 32·32 + 32·32 + 32·10)
FC3_MAC_SHARE = 1024 / 2880


def _data(model: onnx.ModelProto, count: int, seed: int) -> Dataset:
    return open_dataset(np.random.default_rng(seed).normal(size=(count, 16)).astype(np.float32), model_input_specs(model))


class Quantizer:
    """Builds the QDQ model for any set of float layers, and its quantization plan."""

    def __init__(self, model: onnx.ModelProto, target: str, calibration: Dataset) -> None:
        self.model, self.scheme, self.calibration = model, get_target(target).quant_scheme, calibration

    def build(self, excluded: Iterable[str]) -> onnx.ModelProto:
        options = QuantizeOptions(method="minmax", debug_samples=0, exclude_nodes=tuple(excluded))
        return quantize(self.model, self.scheme, self.calibration, options).model

    def plan(self, excluded: Iterable[str]) -> QuantPlan:
        return plan_quantization(ir.from_proto(self.model), self.scheme, excluded)


@pytest.fixture(scope="module")
def mlp() -> tuple[onnx.ModelProto, Quantizer, Dataset]:
    """The outlier MLP, its quantizer and held-out data."""
    model = outlier_mlp()
    return model, Quantizer(model, "jetson-orin", _data(model, 64, 1)), _data(model, 200, 2)


@pytest.mark.parametrize("ranking", list(Ranking))
def test_the_fewest_layers_that_meet_the_goal_stay_float(mlp, ranking: Ranking) -> None:
    model, quantizer, held_out = mlp
    qdq, layers, report = choose_fallback(
        model, quantizer.build, (), held_out, quantizer.plan, goal_drop=5.0, max_layers=4, rankings=(ranking,), cost_on=get_target("onnxruntime-cpu"), runs=3
    )
    assert layers == ["fc3"] and report["met"] and report["ranked_by"] == ranking.value
    assert [cost["backend"] for cost in report["costs"]] == ["onnxruntime"]
    assert report["drop_int8"] > 5.0 >= report["drop"] and report["fidelity_gained"] == report["drop_int8"] - report["drop"]
    assert report["mac_share"] == pytest.approx(FC3_MAC_SHARE)
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    fc3 = next(n for n in qdq.graph.node if n.name == "fc3")
    assert all(producers.get(name) != "DequantizeLinear" for name in fc3.input)


def test_a_goal_int8_already_meets_keeps_every_layer_int8(mlp) -> None:
    model, quantizer, held_out = mlp
    _, layers, report = choose_fallback(model, quantizer.build, (), held_out, quantizer.plan, goal_drop=100.0, max_layers=4, cost_on=get_target("onnxruntime-cpu"))
    assert layers == [] and report["met"] and report["drop"] == report["drop_int8"] and report["mac_share"] == 0.0
    assert "costs" not in report  # nothing fell back, nothing to time


@pytest.mark.parametrize("limits", [{"max_layers": 0}, {"max_layers": 4, "max_mac_share": FC3_MAC_SHARE / 2}], ids=["layers", "macs"])
def test_a_goal_out_of_reach_returns_the_best_found_and_says_so(mlp, limits: dict) -> None:
    model, quantizer, held_out = mlp
    _, layers, report = choose_fallback(model, quantizer.build, (), held_out, quantizer.plan, goal_drop=5.0, **limits)
    assert not report["met"] and "fc3" not in layers and report["drop"] > 5.0
    assert report["drop"] == min(trial["drop"] for trials in report["trials"].values() for trial in trials)
    assert sorted(report["trials"]) == ["output", "sqnr"]


def test_mac_share_counts_the_named_layers(mlp) -> None:
    model = mlp[0]
    assert mac_share(model, ["fc3"]) == pytest.approx(FC3_MAC_SHARE)
    assert mac_share(model, ["fc1", "fc2", "fc3", "fc4"]) == pytest.approx(1.0)


def three_convs() -> onnx.ModelProto:
    """conv1 -> Relu -> conv2 -> Relu -> conv3; conv2 is the one a test keeps float."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for index in (1, 2, 3):
        weights += [numpy_helper.from_array(rng.normal(size=(16, 16, 3, 3)).astype(np.float32) * 0.1, f"w{index}")]
        weights += [numpy_helper.from_array(rng.normal(size=16).astype(np.float32) * 0.1, f"b{index}")]
        nodes.append(helper.make_node("Conv", [previous, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}", pads=[1, 1, 1, 1]))
        previous = f"c{index}"
        if index < 3:
            nodes.append(helper.make_node("Relu", [previous], [f"r{index}"], name=f"relu{index}"))
            previous = f"r{index}"
    graph = helper.make_graph(
        nodes, "three_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, 16, 16, 16])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mixed(target: str) -> tuple[onnx.ModelProto, onnx.ModelProto, Dataset]:
    model = three_convs()
    data = open_dataset(np.random.default_rng(3).normal(size=(16, 16, 16, 16)).astype(np.float32), model_input_specs(model))
    scheme = get_target(target).quant_scheme
    int8 = quantize(model, scheme, data, QuantizeOptions(method="minmax", debug_samples=0)).model
    mixed = quantize(model, scheme, data, QuantizeOptions(method="minmax", debug_samples=0, exclude_nodes=("conv2",))).model
    return int8, mixed, data


def _openvino_conv_precisions(xml: Path, config: dict[str, str]) -> dict[str, str]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = {key: value.astype(str) for key, value in op.get_rt_info().items()}
        if info.get("layerType") == "Convolution":
            for name in ("conv1", "conv2", "conv3"):
                if any(original.split("/")[0] == name for original in info["originalLayersNames"].split(",")):
                    precisions[name] = info["runtimePrecision"]
    return precisions


def test_openvino_runs_the_float_island_in_the_bundles_inference_precision(tmp_path: Path) -> None:
    """intel-openvino pins f32 (the verified precision); with no hint the CPU plugin picks bf16 on
    AVX512_BF16/AMX CPUs. The int8 layers run u8 either way."""
    target = get_target("intel-openvino")
    _, mixed, _ = _mixed(target.name)
    result = lower(mixed, target, Precision.INT8, tmp_path, LoweringOptions())
    hint = result.runtime_options["inference_precision"]
    precisions = _openvino_conv_precisions(tmp_path / result.model_file, {"INFERENCE_PRECISION_HINT": hint})
    assert precisions == {"conv1": "u8", "conv2": hint, "conv3": "u8"}
    device_default = _openvino_conv_precisions(tmp_path / result.model_file, {})["conv2"]
    assert device_default == ("bf16" if {"avx512_bf16", "amx_bf16"} & host_isa_flags() else "f32")


def test_litert_runs_the_float_island_in_float32_inside_the_int8_graph(tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    target = get_target("raspberry-pi")
    _, mixed, _ = _mixed(target.name)
    result = lower(mixed, target, Precision.INT8, tmp_path, LoweringOptions())
    interpreter = Interpreter(model_path=str(tmp_path / result.model_file))
    interpreter.allocate_tensors()
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    convs = [(dtypes[op["inputs"][0]], dtypes[op["inputs"][1]]) for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    assert collections.Counter(convs) == {(np.int8, np.int8): 2, (np.float32, np.float32): 1}


def test_core_ml_runs_the_float_island_in_fp16(tmp_path: Path) -> None:
    """The int8 program computes in fp16: the kept-float conv reads an fp16 constant weight and
    writes fp16; the int8 convs read dequantized weights (TensorRT's --int8 --fp16 is the same
    choice, left to the engine builder on the device)."""
    import coremltools as ct

    target = get_target("apple-ane")
    _, mixed, _ = _mixed(target.name)
    result = lower(mixed, target, Precision.INT8, tmp_path, LoweringOptions())
    program = ct.models.MLModel(str(tmp_path / result.model_file), skip_model_load=True).get_spec().mlProgram
    function = program.functions["main"]
    operations = list(function.block_specializations[function.opset].operations)
    producers = {output.name: op.type for op in operations for output in op.outputs}
    fp16 = ct.proto.MIL_pb2.DataType.Value("FLOAT16")
    convs = [op for op in operations if op.type == "conv"]
    assert [op.outputs[0].type.tensorType.dataType for op in convs] == [fp16] * 3
    weights = [producers[op.inputs["weight"].arguments[0].name] for op in convs]
    assert weights[1] == "const" and weights[0] != "const" and weights[2] != "const"


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "intel-openvino", "raspberry-pi"])
def test_the_fallback_cost_is_timed_on_each_backend_this_machine_runs(target: str) -> None:
    int8, mixed, data = _mixed(target)
    costs = measure_fallback_cost(three_convs(), int8, mixed, next(iter(data)), get_target(target), runs=5, threads=1)
    expected = {"onnxruntime-cpu": ["onnxruntime"], "intel-openvino": ["onnxruntime", "openvino"], "raspberry-pi": ["onnxruntime", "litert"]}
    assert [cost["backend"] for cost in costs] == expected[target]
    for cost in costs:
        assert cost["runs"] == 5 and cost["threads"] == 1
        assert min(cost["fp32_ms"], cost["int8_ms"], cost["mixed_ms"]) > 0
        assert cost["mixed_over_int8"] == pytest.approx(cost["mixed_ms"] / cost["int8_ms"])
        assert cost["int8_min_ms"] <= cost["int8_ms"] and cost["mixed_min_ms"] <= cost["mixed_ms"]
    if target == "intel-openvino":
        assert costs[1]["float_type"] == "f32"  # the profile's pinned inference precision
