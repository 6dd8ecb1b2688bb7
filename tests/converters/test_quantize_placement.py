"""Where Q/DQ go, per target scheme: which convs a backend runs faster in float than in int8."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.data import Dataset, model_input_specs, open_dataset
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS
from edgeopt.targets import QuantScheme, get_target


def inverted_residual(activation: str = "HardSwish", depthwise_convs: int = 1, channels: int = 16, hidden: int = 48, size: tuple[int, int] = (24, 96)) -> onnx.ModelProto:
    """MobileNet block: 1x1 expand -> Relu -> `depthwise_convs` x (depthwise 3x3 -> `activation`) -> 1x1 project
    (HardSwish: MobileNetV3; Relu: MobileNetV2)."""
    attributes = {"alpha": 0.1} if activation == "LeakyRelu" else {}
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w_expand", "b_expand"], ["e"], name="expand"), helper.make_node("Relu", ["e"], ["h0"], name="relu_expand")]
    weights = {"w_expand": (hidden, channels, 1, 1), "b_expand": (hidden,), "w_project": (channels, hidden, 1, 1), "b_project": (channels,)}
    for i in range(depthwise_convs):
        nodes += [
            helper.make_node("Conv", [f"h{i}", f"w_dw{i}", f"b_dw{i}"], [f"d{i}"], name=f"depthwise{i}", group=hidden, pads=[1, 1, 1, 1]),
            helper.make_node(activation, [f"d{i}"], [f"h{i + 1}"], name=f"act_dw{i}", **attributes),
        ]
        weights |= {f"w_dw{i}": (hidden, 1, 3, 3), f"b_dw{i}": (hidden,)}
    nodes.append(helper.make_node("Conv", [f"h{depthwise_convs}", "w_project", "b_project"], ["y"], name="project"))
    initializers = [numpy_helper.from_array((rng.normal(size=shape) * 0.3).astype(np.float32), name) for name, shape in weights.items()]
    graph = helper.make_graph(
        nodes, "inverted_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, *size])],
        initializers,
    )  # fmt: skip
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    return model


def _calibration(model: onnx.ModelProto, count: int = 8) -> Dataset:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return open_dataset(np.random.default_rng(1).normal(size=(count, *shape[1:])).astype(np.float32), model_input_specs(model))


def _int8_weighted(model: onnx.ModelProto) -> set[str]:
    """Names of the Convs whose weight comes from a DequantizeLinear."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and producers.get(n.input[1]) == "DequantizeLinear"}


def _ort_kernels(model: onnx.ModelProto, tmp_path, disabled: tuple[str, ...] = DISABLED_OPTIMIZERS) -> list[str]:
    """The kernels ONNX Runtime runs for the graph, optimized as edgeopt's runtime optimizes it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


@pytest.mark.parametrize("isa", ["avx2", "vnni", "amx"])
def test_onnxruntime_cpu_keeps_depthwise_convs_float_on_x86(isa: str, tmp_path) -> None:
    model = inverted_residual("LeakyRelu")  # not a float-island activation: this is float_depthwise alone
    scheme = get_target("onnxruntime-cpu").scheme_for(isa)
    assert scheme.float_depthwise
    result = quantize(model, scheme, _calibration(model), QuantizeOptions(debug_samples=0))
    assert _int8_weighted(result.model) == {"expand", "project"}
    why = {s["node"]: s["why"] for s in result.report["not_quantized"]}
    assert "depthwise" in why["depthwise0"] and "slower" in why["depthwise0"]
    kernels = _ort_kernels(result.model, tmp_path)
    assert kernels.count("QLinearConv") == 2 and "Conv" in kernels  # the depthwise conv runs on ORT's float kernel


def test_a_conv_kept_float_before_relu_and_quantize_stays_float_in_edgeopts_onnxruntime_sessions(tmp_path) -> None:
    """ONNX Runtime's WeightBiasQuantization would quantize, per tensor, the float weight of a Conv between
    a DequantizeLinear and a Relu -> QuantizeLinear and run it as an int8 kernel: a depthwise conv kept
    float for speed, or any conv kept float on purpose, would run int8 on a grid no one chose. edgeopt's
    sessions turn that transformer off, so both stay on ORT's float kernel."""
    model = inverted_residual("Relu")
    scheme = get_target("onnxruntime-cpu").scheme_for("vnni")
    result = quantize(model, scheme, _calibration(model), QuantizeOptions(debug_samples=0))
    assert _int8_weighted(result.model) == {"expand", "project"}
    import onnxruntime as ort

    if tuple(int(part) for part in ort.__version__.split(".")[:2]) >= (1, 21):  # the transformer came with 1.21
        assert _ort_kernels(result.model, tmp_path, disabled=()).count("QLinearConv") == 3  # what ORT does on its own
    assert _ort_kernels(result.model, tmp_path).count("QLinearConv") == 2
    excluded = quantize(model, scheme, _calibration(model), QuantizeOptions(debug_samples=0, exclude_nodes=("project",)))
    assert _int8_weighted(excluded.model) == {"expand"}
    assert _ort_kernels(excluded.model, tmp_path).count("QLinearConv") == 1


def test_onnxruntime_cpu_keeps_depthwise_convs_int8_on_arm64_and_other_targets_keep_them_int8() -> None:
    model = inverted_residual("LeakyRelu")  # neither an island activation nor one ONNX Runtime fuses
    calibration = _calibration(model)
    every_conv = {"expand", "depthwise0", "project"}
    assert not get_target("onnxruntime-cpu").scheme_for("arm64").float_depthwise
    assert _int8_weighted(quantize(model, get_target("onnxruntime-cpu").scheme_for("arm64"), calibration, QuantizeOptions(debug_samples=0)).model) == every_conv
    for target in ("intel-openvino", "raspberry-pi", "jetson-orin"):
        scheme: QuantScheme = get_target(target).quant_scheme
        assert not scheme.float_depthwise, target
        assert _int8_weighted(quantize(model, scheme, calibration, QuantizeOptions(debug_samples=0)).model) == every_conv, target


def silu_net() -> onnx.ModelProto:
    """Conv 3x3 -> SiLU (x * Sigmoid(x)) -> Conv 1x1 -> Sigmoid (a final score, not a gate)."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["g"], name="gate"),
        helper.make_node("Mul", ["c1", "g"], ["s"], name="silu"),
        helper.make_node("Conv", ["s", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Sigmoid", ["c2"], ["y"], name="score"),
    ]
    weights = {"w1": (32, 16, 3, 3), "b1": (32,), "w2": (8, 32, 1, 1), "b2": (8,)}
    initializers = [numpy_helper.from_array((rng.normal(size=shape) * 0.2).astype(np.float32), name) for name, shape in weights.items()]
    graph = helper.make_graph(
        nodes, "silu_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 20, 20])],
        initializers,
    )  # fmt: skip
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_onnxruntime_cpu_runs_silu_in_int8_and_leaves_a_final_sigmoid_float(tmp_path) -> None:
    """A SiLU between int8 convs is fused by ONNX Runtime into QLinearSigmoid + QLinearMul (no float
    island); a Sigmoid that is not a gate keeps the scheme's rule (float: yolov8n's class scores)."""
    model = silu_net()
    calibration = _calibration(model)
    scheme = get_target("onnxruntime-cpu").quant_scheme
    assert scheme.int8_silu and "Sigmoid" not in scheme.quantized_ops and "Mul" not in scheme.quantized_ops
    result = quantize(model, scheme, calibration, QuantizeOptions(debug_samples=0))
    quantized_outputs = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert {"g", "s"} <= quantized_outputs and "y" not in quantized_outputs
    kernels = _ort_kernels(result.model, tmp_path)
    assert kernels.count("QLinearSigmoid") == 1 and kernels.count("QLinearMul") == 1 and kernels.count("Sigmoid") == 1
    off = quantize(model, replace(scheme, int8_silu=False), calibration, QuantizeOptions(debug_samples=0))
    assert "QLinearMul" not in _ort_kernels(off.model, tmp_path)
    from edgeopt.converters.metrics import fidelity
    from edgeopt.converters.graph.session import run_model

    assert fidelity(list(run_model(model, calibration)), list(run_model(result.model, calibration)))["min_cosine"] > 0.99


def test_silu_gates_stay_float_in_a_model_with_attention() -> None:
    """A transformer's Sigmoid/Mul keep the scheme's rule (float on onnxruntime-cpu): the gate rule is
    for conv nets, where SiLU sits between int8 convs."""
    import onnx_ir as ir

    from edgeopt.converters.quantize.placement import silu_gates

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
        helper.make_node("Transpose", ["x"], ["xt"], name="keys", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["a"], name="attend"),
        helper.make_node("Sigmoid", ["a"], ["g"], name="gate"),
        helper.make_node("Mul", ["a", "g"], ["y"], name="silu"),
    ]
    graph = helper.make_graph(
        nodes, "attention_silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "wq")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert silu_gates(ir.from_proto(model)) == set()
    without_attention = silu_net()
    assert silu_gates(ir.from_proto(without_attention)) == {"gate", "silu"}


def detection_head() -> onnx.ModelProto:
    """YOLO-style output: Concat(box coordinates in pixels (Conv * 64), class scores Sigmoid(Conv)) on the channel axis."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "wb", "bb"], ["cb"], name="box_conv"),
        helper.make_node("Mul", ["cb", "stride"], ["box"], name="box_scale"),
        helper.make_node("Conv", ["x", "wc", "bc"], ["cc"], name="cls_conv"),
        helper.make_node("Sigmoid", ["cc"], ["cls"], name="cls_score"),
        helper.make_node("Concat", ["box", "cls"], ["y"], name="head", axis=1),
    ]
    initializers = [
        numpy_helper.from_array((rng.normal(size=(4, 8, 1, 1)) * 0.3).astype(np.float32), "wb"),
        numpy_helper.from_array(np.full(4, 4.0, np.float32), "bb"),
        numpy_helper.from_array(np.array(64.0, np.float32), "stride"),
        numpy_helper.from_array((rng.normal(size=(3, 8, 1, 1)) * 0.3).astype(np.float32), "wc"),
        numpy_helper.from_array(np.zeros(3, np.float32), "bc"),
    ]
    graph = helper.make_graph(
        nodes, "detection_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 4, 4])], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_a_concat_of_a_fixed_scale_sigmoid_and_wide_values_stays_float_under_tflites_one_scale_rule() -> None:
    """TFLite's CONCATENATION takes one scale in and out and its LOGISTIC output has the fixed scale 1/256:
    shared, every box coordinate would be clipped to 0.996. The Concat stays float; each input keeps its
    own scale, so the boxes come through at their int8 step and the scores at theirs."""
    from edgeopt.converters.graph.session import run_model

    model = detection_head()
    calibration = _calibration(model, 16)
    result = quantize(model, get_target("raspberry-pi").quant_scheme, calibration, QuantizeOptions(debug_samples=0))
    why = {s["node"]: s["why"] for s in result.report["not_quantized"]}
    assert "fixed scale" in why["head"]
    samples = list(_calibration(model, 4))
    reference = np.concatenate([out["y"] for out in run_model(model, samples)])
    quantized = np.concatenate([out["y"] for out in run_model(result.model, samples)])
    boxes, scores = slice(0, 4), slice(4, 7)
    assert reference[:, boxes].max() > 100
    box_error = np.abs(quantized[:, boxes] - reference[:, boxes]).max() / np.abs(reference[:, boxes]).max()
    assert box_error < 0.02, box_error
    assert np.abs(quantized[:, scores] - reference[:, scores]).max() < 0.01


def conv_activation_conv(activation: str) -> onnx.ModelProto:
    """Conv 3x3 -> an activation written with a Mul -> Conv 1x1, as exporters write them: "silu"
    x * Sigmoid(x) (YOLOv8), "hardswish" x * Clip(x + 3, 0, 6) / 6 (paddle2onnx, PP-OCR), "hardsigmoid"
    x * HardSigmoid(x); "se" is a squeeze-excitation gate x * HardSigmoid(Conv(GlobalAveragePool(x))),
    a Mul that is not an activation of its other operand."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    gate = {
        "silu": [helper.make_node("Sigmoid", ["c1"], ["g"], name="sigmoid")],
        "hardsigmoid": [helper.make_node("HardSigmoid", ["c1"], ["g"], name="hardsigmoid", alpha=1 / 6)],
        "hardswish": [helper.make_node("Add", ["c1", "three"], ["p"], name="plus3"), helper.make_node("Clip", ["p", "zero", "six"], ["g"], name="relu6")],
        "se": [helper.make_node("GlobalAveragePool", ["c1"], ["pooled"], name="squeeze"), helper.make_node("Conv", ["pooled", "w_se", "b_se"], ["e"], name="excite"),
               helper.make_node("HardSigmoid", ["e"], ["g"], name="hardsigmoid", alpha=1 / 6)],
    }[activation]  # fmt: skip
    nodes += [*gate, helper.make_node("Mul", ["c1", "g"], ["m"], name="act_mul")]
    if activation == "hardswish":
        nodes.append(helper.make_node("Div", ["m", "six"], ["a"], name="div6"))
    else:
        nodes.append(helper.make_node("Identity", ["m"], ["a"], name="same"))
    nodes.append(helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2"))
    weights = {"w1": (32, 16, 3, 3), "b1": (32,), "w2": (16, 32, 1, 1), "b2": (16,), "w_se": (32, 32, 1, 1), "b_se": (32,)}
    constants = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
    return _block_model(f"conv_{activation}_conv", nodes, weights, constants, rng)


def _block_model(name: str, nodes: list, weights: dict[str, tuple[int, ...]], constants: list, rng: np.random.Generator) -> onnx.ModelProto:
    """A checked model of `nodes` from x [1, 16, 20, 20] to y [1, 16, 20, 20], random `weights` and the given constants."""
    initializers = [numpy_helper.from_array((rng.normal(size=shape) * 0.2).astype(np.float32), n) for n, shape in weights.items()]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 20, 20])],
        initializers + constants,
    )  # fmt: skip
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    return model


def _read_through_dequantize(model: onnx.ModelProto, node_name: str) -> list[bool]:
    """Per input of the node: whether it reads a DequantizeLinear's output."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return [producers.get(name) == "DequantizeLinear" for name in node.input]


def _openvino_runtime_precisions(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(layer type, runtime precision) of the CPU plugin's executed graph for the ONNX model, f32 pinned."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    infos = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
    return [(info["layerType"].astype(str), info["runtimePrecision"].astype(str)) for info in infos]


def test_activation_muls_are_the_muls_of_silu_and_hardswish_not_a_squeeze_excitation_gate() -> None:
    import onnx_ir as ir

    from edgeopt.converters.quantize.placement import activation_muls

    for activation in ("silu", "hardswish", "hardsigmoid"):
        assert activation_muls(ir.from_proto(conv_activation_conv(activation))) == {"act_mul"}, activation
    assert activation_muls(ir.from_proto(conv_activation_conv("se"))) == set()


@pytest.mark.parametrize("activation", ["silu", "hardswish"])
def test_openvino_leaves_a_mul_written_activation_without_qdq_and_fuses_it_into_the_int8_conv(activation: str) -> None:
    """With Q/DQ on the Mul's inputs the CPU plugin ran the activation as a float subgraph between
    u8 convs (ppocr_det: 26, yolov8n: 70). Without them the activation fuses into the first conv; the
    Mul's output still gets its Q/DQ where the next conv reads it. Targets that quantize every tensor
    between int8 ops (raspberry-pi's LiteRT) keep the Mul quantized."""
    model = conv_activation_conv(activation)
    calibration = _calibration(model)
    scheme = get_target("intel-openvino").scheme_for("vnni")
    assert scheme.activation_muls_float
    result = quantize(model, scheme, calibration, QuantizeOptions(debug_samples=0))
    assert _read_through_dequantize(result.model, "act_mul") == [False, False]
    assert _read_through_dequantize(result.model, "conv2")[0]
    assert _int8_weighted(result.model) == {"conv1", "conv2"}
    why = {s["node"]: s["why"] for s in result.report["not_quantized"]}
    assert "activation" in why["act_mul"]
    fused = _openvino_runtime_precisions(result.model)
    assert fused.count(("Convolution", "u8")) == 2
    assert fused.count(("Subgraph", "f32")) == 1  # the graph input's quantizer; the activation and its FakeQuantize run inside conv1

    inside = quantize(model, replace(scheme, activation_muls_float=False), calibration, QuantizeOptions(debug_samples=0))
    assert _read_through_dequantize(inside.model, "act_mul") == [True, True]
    assert _openvino_runtime_precisions(inside.model).count(("Subgraph", "f32")) == 2  # + the activation as a float subgraph

    from edgeopt.converters.metrics import fidelity
    from edgeopt.converters.graph.session import run_model

    assert fidelity(list(run_model(model, calibration)), list(run_model(result.model, calibration)))["min_cosine"] > 0.99

    litert = quantize(model, get_target("raspberry-pi").quant_scheme, calibration, QuantizeOptions(debug_samples=0))
    assert _read_through_dequantize(litert.model, "act_mul") == [True, True]


def test_raspberry_pi_quantizes_a_transformers_bias_adds_gelu_and_layernorm_where_litert_runs_them_int8() -> None:
    """The bias Add's output carries the Q/DQ, not the MatMul's (FULLY_CONNECTED adds the bias in int32);
    the erf GELU only at its output; LayerNorm decomposed with each step quantized. ONNX Runtime's scheme
    is untouched: MatMul outputs quantized, LayerNormalization kept whole."""
    from tests.converters.test_tflite import transformer_block

    model = transformer_block()
    quantized_tensors = {}
    for target in ("raspberry-pi", "onnxruntime-cpu"):
        result = quantize(model, get_target(target).quant_scheme, _calibration(model), QuantizeOptions(debug_samples=0))
        quantized_tensors[target] = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
        ops = {n.op_type for n in result.model.graph.node}
        if target == "raspberry-pi":
            assert "LayerNormalization" not in ops and {"ReduceMean", "Pow"} <= ops
            inside = {s["node"] for s in result.report["not_quantized"] if "erf GELU" in s["why"]}
            assert len(inside) == 4  # Div, Erf, Add, Mul; the last Mul (x 0.5) is the GELU's output
        else:
            assert "LayerNormalization" in ops
    pi, ort = quantized_tensors["raspberry-pi"], quantized_tensors["onnxruntime-cpu"]
    assert {"q", "f", "o", "g"} <= pi and not {"q0", "f0", "o0", "fs", "fe", "fp", "fm"} & pi
    assert {"q0", "f0", "o0"} <= ort


def split_block() -> onnx.ModelProto:
    """YOLOv8's C2f: Conv -> Split in two -> the second half through a Conv -> Concat of all three -> Conv."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Split", ["r1", "halves"], ["s0", "s1"], name="split", axis=1),
        helper.make_node("Conv", ["s1", "wm", "bm"], ["m"], name="bottleneck", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["s0", "s1", "m"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w2", "b2"], ["y"], name="conv2"),
    ]
    weights = {"w1": (32, 16, 3, 3), "b1": (32,), "wm": (16, 16, 3, 3), "bm": (16,), "w2": (16, 48, 1, 1), "b2": (16,)}
    return _block_model("split_block", nodes, weights, [numpy_helper.from_array(np.array([16, 16], np.int64), "halves")], rng)


def test_openvino_quantizes_a_split_read_by_quantized_ops_once_at_its_input() -> None:
    """A FakeQuantize on each Split output ran as a float subgraph on the CPU plugin (yolov8n: 16 of
    its 21); one Q/DQ before the Split is what the Concat and the conv behind it read."""
    model = split_block()
    calibration = _calibration(model)
    scheme = get_target("intel-openvino").scheme_for("vnni")
    assert scheme.split_input_quantized
    result = quantize(model, scheme, calibration, QuantizeOptions(debug_samples=0))
    assert _read_through_dequantize(result.model, "split")[0]
    assert _read_through_dequantize(result.model, "concat") == [False, False, True]
    assert not _read_through_dequantize(result.model, "bottleneck")[0]
    once = _openvino_runtime_precisions(result.model)
    per_output = quantize(model, replace(scheme, split_input_quantized=False), calibration, QuantizeOptions(debug_samples=0))
    assert _read_through_dequantize(per_output.model, "concat") == [True, True, True]
    assert once.count(("Subgraph", "f32")) < _openvino_runtime_precisions(per_output.model).count(("Subgraph", "f32"))
    assert once.count(("Convolution", "u8")) == 3 and ("Split", "u8") in once  # per output: the Split runs f32

    from edgeopt.converters.metrics import fidelity
    from edgeopt.converters.graph.session import run_model

    assert fidelity(list(run_model(model, calibration)), list(run_model(result.model, calibration)))["min_cosine"] > 0.99



def test_onnxruntime_splits_the_uint8_tensor_where_quantized_ops_read_every_split_output(tmp_path) -> None:
    """With each Split output on its own scale ONNX Runtime ran dequantize, a float Split and a quantize per
    output (yolov8n: 8 C2f blocks, 20 Q + 12 DQ in its optimized graph); on the input's scale its DropQDQ rule
    splits the uint8 tensor. A Split with a float reader stays float (YOLOv8's head: the class Sigmoid)."""
    model = split_block()
    calibration = _calibration(model)
    scheme = get_target("onnxruntime-cpu").scheme_for("vnni")
    assert "Split" in scheme.quantized_ops
    result = quantize(model, scheme, calibration, QuantizeOptions(debug_samples=0))
    assert _read_through_dequantize(result.model, "split")[0]
    assert _read_through_dequantize(result.model, "concat") == [True, True, True]
    values = {i.name: tuple(numpy_helper.to_array(i).ravel().tolist()) for i in result.model.graph.initializer}
    params = {o: (values[n.input[1]], values[n.input[2]]) for n in result.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for o in (n.input[0], *n.output)}
    assert params["s0"] == params["s1"] == params[next(n.input[0] for n in result.model.graph.node if n.name == "split")]  # one grid
    kernels = _ort_kernels(result.model, tmp_path)
    assert kernels.count("Split") == 1 and kernels.count("QLinearConv") == 3
    assert kernels.count("QuantizeLinear") == 1 and kernels.count("DequantizeLinear") == 1  # the graph's input and output

    before = quantize(model, replace(scheme, quantized_ops=tuple(op for op in scheme.quantized_ops if op != "Split")), calibration, QuantizeOptions(debug_samples=0))
    before_kernels = _ort_kernels(before.model, tmp_path)
    assert before_kernels.count("QuantizeLinear") == 3 and before_kernels.count("DequantizeLinear") == 2  # + a float Split between

    from edgeopt.converters.metrics import fidelity
    from edgeopt.converters.graph.session import run_model

    assert fidelity(list(run_model(model, calibration)), list(run_model(result.model, calibration)))["min_cosine"] > 0.99

    gated = onnx.ModelProto()
    gated.CopyFrom(model)
    concat = next(n for n in gated.graph.node if n.name == "concat")
    concat.input[0] = "g0"
    gated.graph.node.insert(list(gated.graph.node).index(concat), helper.make_node("Sigmoid", ["s0"], ["g0"], name="gate"))
    float_reader = quantize(gated, scheme, calibration, QuantizeOptions(debug_samples=0))
    assert "s0" not in {n.input[0] for n in float_reader.model.graph.node if n.op_type == "QuantizeLinear"}  # the Sigmoid reads it float



def resize_block() -> onnx.ModelProto:
    """An FPN step: Conv -> Relu -> nearest 2x Resize -> stride-2 Conv (ppocr_det has 6 such Resizes, yolov8n 2)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Resize", ["r1", "", "scales"], ["up"], name="upsample", mode="nearest"),
        helper.make_node("Conv", ["up", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    weights = {"w1": (16, 16, 3, 3), "b1": (16,), "w2": (16, 16, 3, 3), "b2": (16,)}
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    return _block_model("resize_block", nodes, weights, [scales], np.random.default_rng(8))


def test_openvino_quantizes_a_resize_input_so_the_cpu_plugin_interpolates_in_u8() -> None:
    """Without a Q/DQ at its input the CPU plugin ran each Interpolate in f32 (ppocr_det: 6, NNCF's IR: u8/i8);
    with it, u8 on a quarter of the bytes (ppocr_det's 6: 0.39 -> 0.23 ms per inference, outputs unchanged:
    a nearest Resize moves values on the grid it reads)."""
    model = resize_block()
    calibration = _calibration(model)
    scheme = get_target("intel-openvino").scheme_for("vnni")
    assert "Resize" in scheme.quantized_ops
    result = quantize(model, scheme, calibration, QuantizeOptions(debug_samples=0))
    assert _read_through_dequantize(result.model, "upsample")[0]
    assert ("Interpolate", "u8") in _openvino_runtime_precisions(result.model)
    float_resize = quantize(model, replace(scheme, quantized_ops=tuple(op for op in scheme.quantized_ops if op != "Resize")), calibration, QuantizeOptions(debug_samples=0))
    assert not _read_through_dequantize(float_resize.model, "upsample")[0]
    assert ("Interpolate", "f32") in _openvino_runtime_precisions(float_resize.model)

    from edgeopt.converters.metrics import fidelity
    from edgeopt.converters.graph.session import run_model

    assert fidelity(list(run_model(model, calibration)), list(run_model(result.model, calibration)))["min_cosine"] > 0.99


def attention_block(heads: int = 4, tokens: int = 24, dims: int = 16, flattened_softmax: bool = False) -> onnx.ModelProto:
    """x -> QKV projection -> heads -> softmax(Q * scale . K^T) . V -> output projection. With
    `flattened_softmax` the Softmax sits between a Flatten and a Reshape, as an opset-11 Softmax
    converted to opset 13 does (ppocr_rec)."""
    rng = np.random.default_rng(7)
    width = heads * dims
    nodes = [
        helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="qkv"),
        helper.make_node("Reshape", ["qkv", "shape5"], ["r"], name="r"),
        helper.make_node("Transpose", ["r"], ["t"], name="t", perm=[2, 0, 3, 1, 4]),
        helper.make_node("Split", ["t"], ["q5", "k5", "v5"], name="split", axis=0, num_outputs=3),
        helper.make_node("Squeeze", ["q5", "zero"], ["q"], name="sq"),
        helper.make_node("Squeeze", ["k5", "zero"], ["k"], name="sk"),
        helper.make_node("Squeeze", ["v5", "zero"], ["v"], name="sv"),
        helper.make_node("Mul", ["q", "scale"], ["qs"], name="qscale"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qs", "kt"], ["scores"], name="scores"),
        *(
            [
                helper.make_node("Flatten", ["scores"], ["flat"], name="flatten", axis=3),
                helper.make_node("Softmax", ["flat"], ["pf"], name="softmax", axis=-1),
                helper.make_node("Reshape", ["pf", "shape4"], ["p"], name="unflatten"),
            ]
            if flattened_softmax
            else [helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1)]
        ),
        helper.make_node("MatMul", ["p", "v"], ["a"], name="attend"),
        helper.make_node("Transpose", ["a"], ["at"], name="at", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["at", "shape3"], ["ar"], name="ar"),
        helper.make_node("MatMul", ["ar", "wo"], ["y"], name="proj"),
    ]
    initializers = [
        numpy_helper.from_array((rng.normal(size=(width, 3 * width)) * 0.1).astype(np.float32), "wqkv"),
        numpy_helper.from_array((rng.normal(size=(width, width)) * 0.1).astype(np.float32), "wo"),
        numpy_helper.from_array(np.array([1, tokens, 3, heads, dims], np.int64), "shape5"),
        numpy_helper.from_array(np.array([1, tokens, width], np.int64), "shape3"),
        numpy_helper.from_array(np.array([1, heads, tokens, tokens], np.int64), "shape4"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array(dims**-0.5, np.float32), "scale"),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, width])],
        initializers,
    )  # fmt: skip
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    onnx.checker.check_model(model)
    return model


def _input_zero_points(model: onnx.ModelProto, node_name: str) -> list[np.ndarray | None]:
    """Per input of the node: the zero point of the DequantizeLinear it reads, None when it reads none."""
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    dequantizers = [producers.get(name) for name in node.input]
    return [initializers[dq.input[2]] if dq is not None and dq.op_type == "DequantizeLinear" else None for dq in dequantizers]


def _openvino_low_precision(model: onnx.ModelProto, node_name: str) -> bool:
    """Whether the CPU plugin runs the node on its int8 inputs: OpenVINO's low-precision transformations
    moved the DequantizeLinears the node reads behind it, so none of them runs in the executed graph
    (when they run, the node multiplies dequantized f32 values)."""
    import openvino as ov

    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    dequantizers = {producers[name].name for name in node.input if name in producers and producers[name].op_type == "DequantizeLinear"}
    assert dequantizers, f"{node_name} reads no DequantizeLinear"
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    executed = {name for op in compiled.get_runtime_model().get_ordered_ops() for name in op.get_rt_info()["originalLayersNames"].astype(str).split(",")}
    return not dequantizers & executed


@pytest.mark.parametrize("flattened_softmax", [False, True])
def test_openvino_gives_attentions_score_matmul_int8_symmetric_inputs_and_runs_it_on_them(flattened_softmax: bool) -> None:
    """With edgeopt's uint8 asymmetric Q/DQ on Q.K^T the CPU plugin ran scores, Softmax and .V as one
    f32 subgraph (ppocr_rec's SVTR neck); with int8 symmetric Q/DQ on Q and K^T and P.V float, as NNCF
    quantizes OpenVINO's ScaledDotProductAttention, it runs that subgraph in i8. ONNX Runtime's and
    raspberry-pi's schemes are unchanged: their own activation type on both attention MatMuls."""
    model = attention_block(flattened_softmax=flattened_softmax)
    calibration = _calibration(model)
    scheme = get_target("intel-openvino").scheme_for("vnni")
    assert scheme.attention_matmul_symmetric and scheme.activation_dtype == "uint8"
    result = quantize(model, scheme, calibration, QuantizeOptions(debug_samples=0))
    scores = _input_zero_points(result.model, "scores")
    assert all(zp is not None and zp.dtype == np.int8 and not zp.any() for zp in scores)
    assert _input_zero_points(result.model, "attend") == [None, None]
    assert _input_zero_points(result.model, "proj")[0].dtype == np.uint8  # the rest keeps the scheme's type
    why = {s["node"]: s["why"] for s in result.report["not_quantized"]}
    assert "attention" in why["attend"]
    assert _openvino_low_precision(result.model, "scores")

    unsigned = quantize(model, replace(scheme, attention_matmul_symmetric=False), calibration, QuantizeOptions(debug_samples=0))
    assert all(zp is not None and zp.dtype == np.uint8 for zp in _input_zero_points(unsigned.model, "scores") + _input_zero_points(unsigned.model, "attend"))
    assert not _openvino_low_precision(unsigned.model, "scores")

    from edgeopt.converters.graph.session import run_model
    from edgeopt.converters.metrics import fidelity

    reference = list(run_model(model, calibration))
    assert fidelity(reference, list(run_model(result.model, calibration)))["min_cosine"] > 0.99

    for target in ("onnxruntime-cpu", "raspberry-pi"):
        other = get_target(target).scheme_for("vnni") if target == "onnxruntime-cpu" else get_target(target).quant_scheme
        assert not other.attention_matmul_symmetric
        quantized = quantize(model, other, calibration, QuantizeOptions(debug_samples=0))
        for name in ("scores", "attend"):
            zero_points = _input_zero_points(quantized.model, name)
            assert all(zp is not None and zp.dtype == np.dtype(other.activation_dtype) for zp in zero_points), (target, name)


def test_raspberry_pi_keeps_a_layernorm_whole_in_a_model_without_attention() -> None:
    """The int8 LayerNorm decomposition is measured on transformers only (bench/litert_bert_int8.py);
    a conv model's LayerNormalization stays one node, which the lowering runs in float."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("LayerNormalization", ["c", "gamma", "beta"], ["n"], name="norm", axis=-1),
        helper.make_node("Conv", ["n", "w2", "b2"], ["y"], name="conv2"),
    ]
    weights = {"w1": (16, 16, 3, 3), "b1": (16,), "gamma": (20,), "beta": (20,), "w2": (16, 16, 1, 1), "b2": (16,)}
    model = _block_model("conv_layernorm_conv", nodes, weights, [], rng)
    result = quantize(model, get_target("raspberry-pi").quant_scheme, _calibration(model), QuantizeOptions(debug_samples=0))
    assert "LayerNormalization" in {n.op_type for n in result.model.graph.node}
    assert _int8_weighted(result.model) == {"conv1", "conv2"}
