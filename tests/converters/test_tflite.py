"""ONNX → TFLite (raspberry-pi): the written .tflite runs on LiteRT's interpreter and matches ONNX Runtime.

Tolerances, with ref = ONNX Runtime's output and Δ = LiteRT - ref:
  fp32          max|Δ| <= 1e-4 * max|ref| + 1e-5   (same math, XNNPACK kernels)
  fp16          max|Δ| <= 1e-2 * max|ref|           (weights rounded to half, computed in float)
  int8-weights  max|Δ| <= 6e-2 * max|ref|           (dynamic range: weights and each input rounded to 8 bits)
  int8          max|Δ| <= 2 output steps            (against ORT running the *same* QDQ graph; the two
                                                     runtimes round ties and LUT activations differently)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper, numpy_helper

from edgeopt.checks import check_parity, parity_tolerances
from edgeopt.converters.data import model_input_specs, open_dataset
from edgeopt.converters.errors import LoweringError, UnsupportedOpsError
from edgeopt.converters.lower import LoweringOptions, LoweringResult, lower
from edgeopt.converters.lower.tflite import INSTALL_HINT, lower_to_bytes
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.passes import simplify
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.runtime.kinds import Precision, Technique
from edgeopt.converters.graph.session import ort_session as session
from edgeopt.targets import get_target
from tests import zoo

TARGET = get_target("raspberry-pi")
ort.set_default_logger_severity(3)
CONV_LIKE = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD", "PADV2",
             "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "ADD", "MUL", "CONCATENATION", "HARD_SWISH", "RELU", "RELU6",
             "LOGISTIC", "MEAN", "SPLIT", "LOCAL_RESPONSE_NORMALIZATION"}


# ----- helpers (imported by test_tflite_coverage.py) ---------------------------------------------
def ort_outputs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime on the graph: fp32 as is, a QDQ graph by its exact semantics (no int8 kernels)."""
    return session(model).run(None, dict(feed))


def litert_outputs(flatbuffer: bytes, feed: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
    """Run on LiteRT (XNNPACK, 2 threads), feeding and reading tensors by their ONNX names."""
    interpreter = Interpreter(model_content=flatbuffer, num_threads=2)
    interpreter.allocate_tensors()
    inputs = {d["name"]: d for d in interpreter.get_input_details()}
    for name, value in feed.items():
        interpreter.set_tensor(inputs[name]["index"], np.ascontiguousarray(value, dtype=inputs[name]["dtype"]))
    interpreter.invoke()
    outputs = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
    return [outputs[name] for name in output_names]


def quantized(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
    """The raspberry-pi QDQ graph from edgeopt's quantizer (simplified first, as the pipeline does)."""
    simple, _ = simplify(model)
    dataset = open_dataset(list(samples), model_input_specs(simple), role="calibration")
    return quantize(simple, TARGET.quant_scheme, dataset, QuantizeOptions(techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0)).model


def output_scales(qdq: onnx.ModelProto) -> list[float]:
    """Scale of the DequantizeLinear that produces each graph output (the output's int8 step)."""
    producers = {node.output[0]: node for node in qdq.graph.node}
    constants = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    scales = []
    for output in qdq.graph.output:
        node = producers[output.name]
        assert node.op_type == "DequantizeLinear", f"output {output.name} is not quantized"
        scales.append(float(constants[node.input[1]]))
    return scales


def assert_float_close(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], rel: float, atol: float = 0.0) -> float:
    worst = 0.0
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        error = float(np.abs(a.astype(np.float64) - e).max())
        bound = rel * float(np.abs(e).max()) + atol
        assert error <= bound, f"max|Δ| {error:.3g} > {bound:.3g}"
        worst = max(worst, error / max(float(np.abs(e).max()), 1e-12))
    return worst


def int8_steps(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], scales: Sequence[float]) -> float:
    """Largest difference in output quantization steps (rounded: steps are computed in float32)."""
    return round(max(float(np.abs(a - e).max()) / s for a, e, s in zip(actual, expected, scales)), 3)


def operators(flatbuffer: bytes) -> tuple[list[tuple[str, list[int], list[int]]], list[int], list[int]]:
    """(op name, inputs, outputs) of every operator, and the graph inputs and outputs."""
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    ops = [(names[model.operatorCodes[op.opcodeIndex].builtinCode], list(op.inputs), list(op.outputs)) for op in graph.operators]
    return ops, list(graph.inputs), list(graph.outputs)


def transposes_inside_conv_chains(flatbuffer: bytes) -> int:
    """TRANSPOSE ops fed by a conv-chain op and feeding one: exactly what the NHWC conversion must avoid."""
    ops, _, _ = operators(flatbuffer)
    producer = {out: name for name, _, outs in ops for out in outs}
    readers: dict[int, list[str]] = {}
    for name, ins, _ in ops:
        for index in ins:
            readers.setdefault(index, []).append(name)
    return sum(
        1
        for name, ins, outs in ops
        if name == "TRANSPOSE" and producer.get(ins[0]) in CONV_LIKE and any(r in CONV_LIKE for r in readers.get(outs[0], []))
    )


# ----- the zoo nets in every precision -----------------------------------------------------------
ZOO_NETS = ["mobilenet_v2_style", "unet_style", "transformer_encoder"]


@pytest.fixture(scope="module")
def nets() -> dict[str, tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]]:
    return {name: (getattr(zoo, name)(), zoo.random_inputs(getattr(zoo, name)(), 9, seed=3)) for name in ZOO_NETS}


@pytest.mark.parametrize("name", ZOO_NETS)
def test_fp32_matches_onnxruntime(nets, name: str) -> None:
    model, feeds = nets[name]
    flatbuffer, _, outputs, summary = lower_to_bytes(model, "fp32", LoweringOptions())
    names = [o.name for o in outputs]
    assert_float_close(litert_outputs(flatbuffer, feeds[0], names), ort_outputs(model, feeds[0]), 1e-4, 1e-5)
    assert transposes_inside_conv_chains(flatbuffer) == 0
    assert summary["transpose_ops"] == sum(1 for op, _, _ in operators(flatbuffer)[0] if op == "TRANSPOSE")


@pytest.mark.parametrize("name", ZOO_NETS)
def test_int8_matches_the_same_qdq_graph_on_onnxruntime(nets, name: str) -> None:
    model, feeds = nets[name]
    qdq = quantized(model, feeds[1:])
    flatbuffer, inputs, outputs, summary = lower_to_bytes(qdq, "int8", LoweringOptions())
    got = litert_outputs(flatbuffer, feeds[0], [o.name for o in outputs])
    assert int8_steps(got, ort_outputs(qdq, feeds[0]), output_scales(qdq)) <= 2.0
    assert all(spec.dtype in ("float32", "int64") and spec.quantization is None for spec in inputs)
    ops = summary["ops"]
    if name == "transformer_encoder":
        # The encoder runs in int8 on LiteRT: dense layers, attention matmuls and softmax (the quantizer
        # keeps the bias Add before the erf-GELU in float, so GELU itself runs between DEQUANTIZE/QUANTIZE).
        interpreter = Interpreter(model_content=flatbuffer)
        int8_ops = {d["op_name"] for d in interpreter._get_ops_details() if any(
            interpreter._get_tensor_details(i, 0)["dtype"] == np.int8 for i in d["inputs"] if i >= 0)}
        assert {"FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX"} <= int8_ops
    else:
        assert ops.get("CONV_2D", 0) > 0 and transposes_inside_conv_chains(flatbuffer) == 0
        assert summary["quantized_op_share"] > 0.5
    # XNNPACK takes int8 tensors only when per-tensor params say quantized_dimension 0 (else LiteRT
    # falls back to its reference kernels, several times slower than fp32).
    graph = schema.ModelT.InitFromPackedBuf(flatbuffer, 0).subgraphs[0]
    for tensor in graph.tensors:
        q = tensor.quantization
        if q is not None and q.scale is not None and len(q.scale) == 1:
            assert q.quantizedDimension == 0, tensor.name


@pytest.mark.parametrize(("precision", "rel", "size_ratio"), [("fp16", 1e-2, 0.6), ("int8-weights", 6e-2, 0.5)])
def test_compressed_weight_precisions(nets, precision: str, rel: float, size_ratio: float) -> None:
    model, feeds = nets["mobilenet_v2_style"]
    fp32, _, _, _ = lower_to_bytes(model, "fp32", LoweringOptions())
    flatbuffer, _, outputs, summary = lower_to_bytes(model, precision, LoweringOptions())
    assert_float_close(litert_outputs(flatbuffer, feeds[0], [o.name for o in outputs]), ort_outputs(model, feeds[0]), rel)
    assert len(flatbuffer) < size_ratio * len(fp32)
    if precision == "fp16":
        assert summary["ops"]["DEQUANTIZE"] > 0  # half weights expanded once at load, as LiteRT's float16 quantization
    else:
        assert "DEQUANTIZE" not in summary["ops"]  # hybrid kernels take the int8 weights directly


# ----- layouts and I/O ---------------------------------------------------------------------------
def test_nhwc_io_removes_the_boundary_transposes(nets) -> None:
    model, feeds = nets["unet_style"]
    nchw, _, _, nchw_summary = lower_to_bytes(model, "fp32", LoweringOptions(io_layout="nchw"))
    nhwc, inputs, outputs, summary = lower_to_bytes(model, "fp32", LoweringOptions(io_layout="nhwc"))
    assert nchw_summary["transpose_ops"] == 2 and summary["transpose_ops"] == 0
    assert (inputs[0].layout, inputs[0].shape) == ("NHWC", (1, 64, 64, 3))
    assert (outputs[0].layout, outputs[0].shape) == ("NHWC", (1, 64, 64, 2))
    x = feeds[0]["input"]
    got = litert_outputs(nhwc, {"input": x.transpose(0, 2, 3, 1)}, ["mask"])[0]
    assert_float_close([got.transpose(0, 3, 1, 2)], ort_outputs(model, feeds[0]), 1e-4, 1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_flatten_into_dense_layers_needs_no_transpose(precision: str) -> None:
    """Conv → Flatten → Gemm: the dense weights' columns are permuted to NHWC order instead of the activations."""
    model = _graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fb"], ["h"], transB=1),
         helper.make_node("Relu", ["h"], ["g"]), helper.make_node("Gemm", ["g", "fc2"], ["y"])],
        (1, 3, 6, 6), (1, 4), [_w(8, 3, 3, 3), _w(8), _w(5, 288) * 0.1, _w(5), _w(5, 4)], ["w", "b", "fc", "fb", "fc2"],
    )
    feeds = [{"x": _rng.random((1, 3, 6, 6), dtype=np.float32)} for _ in range(9)]
    source = model if precision == "fp32" else quantized(model, feeds[1:])
    flatbuffer, inputs, _, summary = lower_to_bytes(source, precision, LoweringOptions(io_layout="nhwc"))
    assert summary["transpose_ops"] == 0 and inputs[0].shape == (1, 6, 6, 3)
    got = litert_outputs(flatbuffer, {"x": feeds[0]["x"].transpose(0, 2, 3, 1)}, ["y"])
    if precision == "fp32":
        assert_float_close(got, ort_outputs(model, feeds[0]), 1e-4, 1e-5)
    else:
        assert int8_steps(got, ort_outputs(source, feeds[0]), output_scales(source)) <= 2.0


def test_int8_io_carries_the_qdq_scales(nets) -> None:
    model, feeds = nets["mobilenet_v2_style"]
    qdq = quantized(model, feeds[1:])
    flatbuffer, inputs, outputs, summary = lower_to_bytes(qdq, "int8", LoweringOptions(extra={"int_io": True}))
    ops, graph_inputs, graph_outputs = operators(flatbuffer)
    assert summary["int_io"]
    assert not any(op == "QUANTIZE" and ins[0] in graph_inputs for op, ins, _ in ops)
    assert not any(op == "DEQUANTIZE" and outs[0] in graph_outputs for op, _, outs in ops)
    (spec_in,), (spec_out,) = inputs, outputs
    assert spec_in.dtype == "int8" and spec_out.dtype == "int8"
    scale, zero = spec_in.quantization["scale"], spec_in.quantization["zero_point"]
    x = feeds[0]["input"]
    q = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    raw = litert_outputs(flatbuffer, {"input": q}, ["logits"])[0]
    y = (raw.astype(np.float32) - spec_out.quantization["zero_point"]) * spec_out.quantization["scale"]
    assert spec_out.quantization["scale"] == pytest.approx(output_scales(qdq)[0])
    assert int8_steps([y], ort_outputs(qdq, feeds[0]), output_scales(qdq)) <= 2.0


# ----- single ops ------------------------------------------------------------------------------
def _graph(nodes: list[onnx.NodeProto], x_shape: Sequence[int], y_shape: Sequence[int], inits: Sequence[np.ndarray] = (), names: Sequence[str] = ()) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(v, n) for v, n in zip(inits, names)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


_rng = np.random.default_rng(7)
_w = lambda *shape: _rng.standard_normal(shape).astype(np.float32)  # noqa: E731
_i = lambda *values: np.asarray(values, np.int64)  # noqa: E731

SINGLE_OPS = {
    "conv_transpose_same": (
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[4, 4])],
        (1, 4, 8, 8), (1, 6, 16, 16), [_w(4, 6, 4, 4), _w(6)], ["w", "b"]),
    "conv_transpose_valid": (
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], kernel_shape=[2, 2])],
        (1, 4, 8, 8), (1, 3, 16, 16), [_w(4, 3, 2, 2)], ["w"]),
    "grouped_dilated_conv": (
        [helper.make_node("Conv", ["x", "w"], ["y"], group=2, dilations=[2, 2], pads=[2, 2, 2, 2])],
        (1, 4, 9, 9), (1, 6, 9, 9), [_w(6, 2, 3, 3)], ["w"]),
    "avgpool_asymmetric_ceil": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)],
        (1, 3, 10, 10), (1, 3, 6, 6), [], []),
    "maxpool_pads": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        (1, 3, 9, 9), (1, 3, 5, 5), [], []),
    "activations": (
        [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1), helper.make_node("Elu", ["a"], ["b"]),
         helper.make_node("PRelu", ["b", "slope"], ["c"]), helper.make_node("Tanh", ["c"], ["d"]),
         helper.make_node("HardSigmoid", ["d"], ["e"]), helper.make_node("Mul", ["e", "x"], ["f"]),
         helper.make_node("Clip", ["f", "lo", "hi"], ["y"])],
        (1, 3, 4, 4), (1, 3, 4, 4), [_w(3, 1, 1), np.float32(-0.5), np.float32(0.7)], ["slope", "lo", "hi"]),
    "pad_reflect_split_concat": (
        [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
         helper.make_node("Split", ["p", "sizes"], ["s1", "s2"], axis=1),
         helper.make_node("Concat", ["s2", "s1"], ["y"], axis=1)],
        (1, 5, 4, 4), (1, 5, 6, 6), [_i(0, 0, 1, 1, 0, 0, 1, 1), _i(2, 3)], ["pads", "sizes"]),
    "slice_reduce_softmax": (
        [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"]),
         helper.make_node("ReduceMax", ["s"], ["r"], axes=[3], keepdims=1),
         helper.make_node("Softmax", ["r"], ["y"], axis=1)],
        (1, 6, 8, 8), (1, 3, 4, 1), [_i(0, 1), _i(6, 9), _i(1, 2), _i(2, 2)], ["starts", "ends", "axes", "steps"]),
    "where_equal_gather": (
        [helper.make_node("Gather", ["x", "idx"], ["g"], axis=2),
         helper.make_node("Equal", ["g", "zero"], ["mask"]),
         helper.make_node("Where", ["mask", "fill", "g"], ["y"])],
        (1, 2, 5, 3), (1, 2, 2, 3), [_i(4, 0), np.float32(0.0), np.float32(-1.0)], ["idx", "zero", "fill"]),
    "logical_and_or_xor_not": (
        [helper.make_node("Greater", ["x", "zero"], ["a"]), helper.make_node("Less", ["x", "half"], ["b"]),
         helper.make_node("And", ["a", "b"], ["c"]), helper.make_node("GreaterOrEqual", ["x", "one"], ["d"]),
         helper.make_node("Or", ["c", "d"], ["e"]), helper.make_node("LessOrEqual", ["x", "minus_one"], ["f"]),
         helper.make_node("Xor", ["e", "f"], ["g"]), helper.make_node("Not", ["g"], ["h"]),
         helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Where", ["h", "x", "n"], ["y"])],
        (1, 3, 4, 4), (1, 3, 4, 4), [np.float32(0.0), np.float32(0.5), np.float32(1.0), np.float32(-1.0)], ["zero", "half", "one", "minus_one"]),
    "reduce_l1_l2_sum_square_min": (
        [helper.make_node("ReduceL2", ["x"], ["a"], axes=[1], keepdims=1), helper.make_node("ReduceL1", ["x"], ["b"], axes=[2, 3], keepdims=1),
         helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("ReduceSumSquare", ["x"], ["d"], axes=[3], keepdims=1),
         helper.make_node("Add", ["c", "d"], ["e"]), helper.make_node("ReduceMin", ["x"], ["f"], axes=[2], keepdims=1),
         helper.make_node("Add", ["e", "f"], ["y"])],
        (1, 3, 4, 4), (1, 3, 4, 4), [], []),
    "reduce_l2_over_channels_last_conv": (  # the conv makes the value NHWC: the reduced axis is mapped, not transposed back
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("ReduceL2", ["c"], ["y"], axes=[1], keepdims=0)],
        (1, 3, 6, 6), (1, 6, 6), [_w(8, 3, 3, 3)], ["w"]),
    "reduce_l2_normalize": (  # torch.nn.functional.normalize as exported: ReduceL2, Clip, Expand, Div
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["v"]),
         helper.make_node("ReduceL2", ["v"], ["n"], axes=[1], keepdims=1), helper.make_node("Clip", ["n", "eps"], ["k"]),
         helper.make_node("Expand", ["k", "shape"], ["e"]), helper.make_node("Div", ["v", "e"], ["y"])],
        (1, 4, 4, 4), (1, 128), [_w(8, 4, 1, 1), np.float32(1e-12), _i(1, 128)], ["w", "eps", "shape"]),
    "range_of_computed_int64_bounds": (
        [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0), helper.make_node("Cast", ["m"], ["s"], to=TensorProto.INT64),
         helper.make_node("Add", ["s", "six"], ["limit"]), helper.make_node("Range", ["s", "limit", "two"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)],
        (8,), (3,), [_i(6).reshape(()), _i(2).reshape(())], ["six", "two"]),
    "range_of_computed_float_bounds": (
        [helper.make_node("ReduceMin", ["x"], ["s"], keepdims=0), helper.make_node("Add", ["s", "span"], ["limit"]),
         helper.make_node("Range", ["s", "limit", "step"], ["y"])],
        (8,), (4,), [np.float32(2.5), np.float32(0.7)], ["span", "step"]),
    "gather_elements_constant_and_computed_indices": (
        [helper.make_node("GatherElements", ["x", "idx"], ["a"], axis=2), helper.make_node("Greater", ["x", "zero"], ["p"]),
         helper.make_node("Cast", ["p"], ["i"], to=TensorProto.INT64), helper.make_node("Mul", ["i", "three"], ["i3"]),
         helper.make_node("Sub", ["i3", "two"], ["j"]), helper.make_node("GatherElements", ["x", "j"], ["b"], axis=3),
         helper.make_node("ReduceSum", ["b", "ax2"], ["s"], keepdims=1), helper.make_node("Add", ["a", "s"], ["y"])],
        (1, 3, 4, 4), (1, 3, 2, 4),
        [np.asarray([[[[0, 3, -1, 2], [-4, 1, 1, 0]]] * 3], np.int64), np.float32(0.0), _i(3).reshape(()), _i(2).reshape(()), _i(2)],
        ["idx", "zero", "three", "two", "ax2"]),
    "gather_elements_and_range_folded_over_a_wide_buffer": (  # BERT's token-type ids: onnx.reference folds this wrongly
        [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
         helper.make_node("Range", ["zero", "length", "one"], ["positions"]), helper.make_node("Unsqueeze", ["positions", "axis0"], ["index"]),
         helper.make_node("GatherElements", ["buffer", "index"], ["ids"], axis=1), helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "f"], ["y"])],
        (1, 32), (1, 32), [_i(0).reshape(()), _i(1).reshape(()), _i(0), np.arange(100, 300, 2, dtype=np.int64).reshape(1, 100)],
        ["zero", "one", "axis0", "buffer"]),
    "resize_bilinear_align_corners": (
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", coordinate_transformation_mode="align_corners")],
        (1, 2, 5, 5), (1, 2, 10, 10), [np.asarray([1, 1, 2, 2], np.float32)], ["scales"]),
}


@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_single_op_graphs_match_onnxruntime(case: str) -> None:
    nodes, x_shape, y_shape, inits, names = SINGLE_OPS[case]
    model = _graph(nodes, x_shape, y_shape, inits, names)
    x = _rng.standard_normal(x_shape).astype(np.float32)
    if case == "where_equal_gather":
        x[0, 0, 4, 0] = 0.0
    flatbuffer, _, _, summary = lower_to_bytes(model, "fp32", LoweringOptions())
    assert_float_close(litert_outputs(flatbuffer, {"x": x}, ["y"]), ort_outputs(model, {"x": x}), 1e-4, 1e-5)


@pytest.mark.parametrize("case", ["avgpool_asymmetric_ceil", "conv_transpose_same", "conv_transpose_valid", "grouped_dilated_conv", "slice_reduce_softmax"])
def test_single_op_graphs_in_int8_match_the_qdq_graph(case: str) -> None:
    nodes, x_shape, y_shape, inits, names = SINGLE_OPS[case]
    model = _graph(nodes, x_shape, y_shape, inits, names)
    feeds = [{"x": np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)} for seed in range(9)]
    qdq = quantized(model, feeds[1:])
    flatbuffer, _, _, _ = lower_to_bytes(qdq, "int8", LoweringOptions())
    assert int8_steps(litert_outputs(flatbuffer, feeds[0], ["y"]), ort_outputs(qdq, feeds[0]), output_scales(qdq)) <= 1.0


def test_int64_input_through_a_reshape_keeps_its_values() -> None:
    """BERT's mean pooling: Unsqueeze(attention_mask int64) -> Cast -> Mul. Inside the file int64 values are int32;
    a RESHAPE straight from the int64 input tensor would copy its bytes as int32 pairs (mask 1, 0 -> 1, 0, 0, 0 ...)."""
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["mask", "axes"], ["m3"]), helper.make_node("Cast", ["m3"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "mf"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 6, 4)), helper.make_tensor_value_info("mask", TensorProto.INT64, (1, 6))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 6, 4))],
        [numpy_helper.from_array(_i(2), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": _rng.standard_normal((1, 6, 4)).astype(np.float32), "mask": np.asarray([[1, 1, 1, 0, 1, 0]], np.int64)}
    flatbuffer, inputs, _, _ = lower_to_bytes(model, "fp32", LoweringOptions())
    assert [s.dtype for s in inputs] == ["float32", "int64"]  # the boundary keeps the model's dtype
    assert_float_close(litert_outputs(flatbuffer, feed, ["y"]), ort_outputs(model, feed), 1e-6)


def test_mask_logic_and_l2_normalize_between_int8_layers_match_the_qdq_graph() -> None:
    """A BERT-style tail in int8: the bool mask (Greater/Less/And) and the L2 normalisation (ReduceL2, Clip,
    Expand, Div) run in float between the int8 MatMuls, as ONNX Runtime runs them between DQ and Q."""
    nodes = [
        helper.make_node("Greater", ["x", "lo"], ["a"]), helper.make_node("Less", ["x", "hi"], ["b"]),
        helper.make_node("And", ["a", "b"], ["m"]), helper.make_node("Where", ["m", "x", "zero"], ["masked"]),
        helper.make_node("MatMul", ["masked", "w1"], ["h"]), helper.make_node("ReduceL2", ["h"], ["n"], axes=[1], keepdims=1),
        helper.make_node("Clip", ["n", "eps"], ["k"]), helper.make_node("Expand", ["k", "shape"], ["e"]),
        helper.make_node("Div", ["h", "e"], ["u"]), helper.make_node("MatMul", ["u", "w2"], ["y"]),
    ]
    inits = [np.float32(-0.5), np.float32(1.5), np.float32(0.0), _w(16, 16), np.float32(1e-12), _i(2, 16), _w(16, 8)]
    model = _graph(nodes, (2, 16), (2, 8), inits, ["lo", "hi", "zero", "w1", "eps", "shape", "w2"])
    feeds = [{"x": np.random.default_rng(seed).standard_normal((2, 16)).astype(np.float32)} for seed in range(9)]
    qdq = quantized(model, feeds[1:])
    flatbuffer, _, _, summary = lower_to_bytes(qdq, "int8", LoweringOptions())
    assert summary["quantized_onnx_ops"] == {"MatMul": 2}
    assert {"LOGICAL_AND", "SQRT", "SUM"} <= set(summary["ops"])
    assert int8_steps(litert_outputs(flatbuffer, feeds[0], ["y"]), ort_outputs(qdq, feeds[0]), output_scales(qdq)) <= 1.0


def transformer_block(seed: int = 11) -> onnx.ModelProto:
    """x [1, 8, 16] -> LayerNorm (gains 0.2-6) -> attention (q = h Wq + bq, softmax(q h^T) h) -> MatMul + bias
    -> erf GELU -> MatMul + bias -> + x: each op a BERT layer has, as torch exports them."""
    rng = np.random.default_rng(seed)
    sqrt2, one, half = np.float32(np.sqrt(2.0)), np.float32(1.0), np.float32(0.5)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-12),
        helper.make_node("MatMul", ["h", "wq"], ["q0"]), helper.make_node("Add", ["bq", "q0"], ["q"]),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]), helper.make_node("MatMul", ["q", "ht"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "h"], ["a"]),
        helper.make_node("MatMul", ["a", "w1"], ["f0"]), helper.make_node("Add", ["f0", "b1"], ["f"]),
        helper.make_node("Div", ["f", "sqrt2"], ["fs"]), helper.make_node("Erf", ["fs"], ["fe"]),
        helper.make_node("Add", ["fe", "one"], ["fp"]), helper.make_node("Mul", ["f", "fp"], ["fm"]),
        helper.make_node("Mul", ["fm", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["o0"]), helper.make_node("Add", ["o0", "b2"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["y"]),
    ]
    gamma = rng.uniform(0.2, 1.5, 16).astype(np.float32)
    gamma[3] = 6.0  # an outlier gain: a per-tensor int8 MUL would give the others 4-30 levels
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = [gamma, w(16) * 0.1, w(16, 16) * 0.3, w(16) * 0.1, w(16, 32) * 0.3, w(32) * 0.1, sqrt2, one, half, w(32, 16) * 0.2, w(16) * 0.1]
    names = ["gamma", "beta", "wq", "bq", "w1", "b1", "sqrt2", "one", "half", "w2", "b2"]
    return _graph(nodes, (1, 8, 16), (1, 8, 16), inits, names)


def test_a_transformer_block_runs_every_op_int8_on_litert_and_matches_the_qdq_graph() -> None:
    """raspberry-pi's int8_transformer scheme: the bias Adds fold into FULLY_CONNECTED as int32, GELU is one int8
    GELU, LayerNorm is int8 MEAN/SUB/MUL/RSQRT with its gains in a per-channel 1x1 DEPTHWISE_CONV_2D; only the
    graph input's QUANTIZE and the output's DEQUANTIZE touch float."""
    model = transformer_block()
    feeds = [{"x": np.random.default_rng(seed).standard_normal((1, 8, 16)).astype(np.float32) * 2} for seed in range(17)]
    qdq = quantized(model, feeds[1:])
    flatbuffer, _, _, summary = lower_to_bytes(qdq, "int8", LoweringOptions())
    interpreter = Interpreter(model_content=flatbuffer)
    float_ops = sorted(d["op_name"] for d in interpreter._get_ops_details() if any(
        interpreter._get_tensor_details(i, 0)["dtype"] == np.float32 for i in [*d["inputs"], *d["outputs"]] if i >= 0))
    assert float_ops == ["DEQUANTIZE", "QUANTIZE"], summary["ops"]
    assert {"GELU", "RSQRT", "MEAN", "SUB", "BATCH_MATMUL", "SOFTMAX"} <= set(summary["ops"])
    # the LayerNorm's gains: a 1x1 DEPTHWISE_CONV_2D (C MACs a row), not a diagonal FULLY_CONNECTED (C^2)
    assert summary["ops"]["FULLY_CONNECTED"] == 3 and summary["ops"]["DEPTHWISE_CONV_2D"] == 1
    assert summary["fused_patterns"]["MatMul+Add bias->FULLY_CONNECTED"] == 4
    assert "ADD" in summary["ops"] and "POW" not in summary["ops"]
    # The build's own parity rule (sdk/checks.py): the artifact's noise against the QDQ graph within 4x the
    # QDQ graph's own against fp32. A one-step flip of the int8 1/std moves a whole row, so a sample can
    # be several output steps off (seen: up to 10 on 1 of 6 samples, other seeds); most are within 1.
    reference = [{"y": ort_outputs(qdq, feed)[0]} for feed in feeds[:8]]
    got = [{"y": litert_outputs(flatbuffer, feed, ["y"])[0]} for feed in feeds[:8]]
    fp32 = [{"y": ort_outputs(model, feed)[0]} for feed in feeds[:8]]
    check_parity(Precision.INT8, reference, got, parity_tolerances(Precision.INT8, reference, qdq), "QDQ", "LiteRT", fp32)
    steps = [int8_steps([g["y"]], [r["y"]], output_scales(qdq)) for g, r in zip(got, reference)]
    assert np.median(steps) <= 1.0, steps
    reference, got = ort_outputs(model, feeds[0])[0].ravel(), litert_outputs(flatbuffer, feeds[0], ["y"])[0].ravel()
    assert float(reference @ got / np.linalg.norm(reference) / np.linalg.norm(got)) > 0.99


# ----- contract, errors ------------------------------------------------------------------------
def test_lower_through_the_dispatch_writes_a_verified_tflite(tmp_path: Path, nets) -> None:
    model, feeds = nets["mobilenet_v2_style"]
    result: LoweringResult = lower(model, TARGET, "fp32", tmp_path, LoweringOptions(model_name="mobilenet"))
    assert result.model_file == "model.tflite" and (tmp_path / "model.tflite").stat().st_size > 0
    assert (result.runtime_backend, result.verify_backend) == ("tflite", "tflite")
    assert [(s.name, s.shape, s.dtype, s.layout) for s in result.inputs] == [("input", (1, 3, 64, 64), "float32", "NCHW")]
    summary = result.summary
    assert summary["install"] == INSTALL_HINT and summary["io_layout"] == "nchw"
    assert summary["transpose_ops"] == 1  # the NCHW input boundary; none inside the network
    assert summary["ops"]["CONV_2D"] > 0 and summary["min_tflite_runtime"] and summary["litert_version"]
    got = litert_outputs((tmp_path / "model.tflite").read_bytes(), feeds[0], ["logits"])
    assert_float_close(got, ort_outputs(model, feeds[0]), 1e-4, 1e-5)


def test_unsupported_ops_are_all_named_before_anything_is_written(tmp_path: Path) -> None:
    model = _graph(
        [helper.make_node("Erf", ["x"], ["e"], name="lonely_erf"), helper.make_node("Relu", ["e"], ["r"]),
         helper.make_node("Hardmax", ["r"], ["y"], name="the_hardmax")],
        (1, 4), (1, 4),
    )
    with pytest.raises(UnsupportedOpsError) as caught:
        lower(model, TARGET, "fp32", tmp_path / "out", LoweringOptions())
    assert [(n, op) for n, op, _ in caught.value.nodes] == [("lonely_erf", "Erf"), ("the_hardmax", "Hardmax")]
    assert "lonely_erf" in str(caught.value) and "GELU pattern" in str(caught.value)
    reasons = {op: why for _, op, why in caught.value.nodes}
    assert reasons["Erf"].startswith("LiteRT has no builtin for Erf")  # LiteRT's limit ...
    assert reasons["Hardmax"] == "edgeopt's TFLite lowering does not write Hardmax yet"  # ... or edgeopt's, never blurred
    assert not (tmp_path / "out").exists()


def test_support_checks_read_an_unprepared_onnx_ir_node() -> None:
    """Validation asks the registry before anything is folded: attribute limits answer at once; what
    needs a constant or a static shape not known yet says nothing (None) until the lowering asks."""
    model = _graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(_w(4, 4, 3, 3))),
         helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["c", "wt"], ["t"], group=2),
         helper.make_node("Resize", ["t", "", "scales"], ["r"], mode="cubic"),
         helper.make_node("Shape", ["r"], ["s"]), helper.make_node("Reshape", ["r", "s"], ["y"])],
        (1, 4, 8, 8), (1, 4, 20, 20), [_w(4, 2, 3, 3), np.asarray([1, 1, 2, 2], np.float32)], ["wt", "scales"],
    )
    nodes = {n.op_type: n for n in ir.from_proto(onnx.shape_inference.infer_shapes(model)).graph}
    assert REGISTRY.why_unsupported("Conv", nodes["Conv"]) is None  # its weight is a Constant that will fold
    assert "no groups" in REGISTRY.why_unsupported("ConvTranspose", nodes["ConvTranspose"])
    assert "not mode 'cubic'" in REGISTRY.why_unsupported("Resize", nodes["Resize"])
    assert REGISTRY.why_unsupported("Shape", nodes["Shape"]) is None
    assert "not static" in REGISTRY.why_unsupported("Shape", nodes["Shape"], True)  # left over in the prepared graph


def test_range_whose_length_depends_on_values_is_reported() -> None:
    nodes, x_shape, y_shape, inits, names = SINGLE_OPS["range_of_computed_int64_bounds"]
    _, _, _, summary = lower_to_bytes(_graph(nodes, x_shape, y_shape, inits, names), "fp32", LoweringOptions())
    assert summary["ops"]["RANGE"] == 1
    assert any(a.startswith("Range ") and "declares 3" in a for a in summary["adaptations"])


def test_int8_without_a_qdq_graph_fails_clearly(nets, tmp_path: Path) -> None:
    with pytest.raises(LoweringError, match="needs a QDQ model"):
        lower(nets["mobilenet_v2_style"][0], TARGET, "int8", tmp_path, LoweringOptions())


def test_unknown_io_layout_is_rejected(nets) -> None:
    with pytest.raises(LoweringError, match="io_layout"):
        lower_to_bytes(nets["mobilenet_v2_style"][0], "fp32", LoweringOptions(io_layout="nwhc"))


def test_foreign_qdq_with_tflite_incompatible_params_is_adapted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """ORT's quantizer calibrates softmax outputs (scale 1/255); TFLite fixes them at 1/256, -128: requantize, say so."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = _graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)],
        (1, 16), (1, 8), [_w(16, 8)], ["w"],
    )
    samples = [{"x": _rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        onnx.save(model, f"{folder}/f.onnx")
        quantize_static(f"{folder}/f.onnx", f"{folder}/q.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        qdq = onnx.load(f"{folder}/q.onnx")
    with caplog.at_level(logging.WARNING):
        flatbuffer, _, outputs, summary = lower_to_bytes(qdq, "int8", LoweringOptions())
    assert any("0.00390625" in a and "requantizes" in a for a in summary["adaptations"])
    assert "requantizes" in caplog.text
    got = litert_outputs(flatbuffer, samples[0], ["y"])
    assert int8_steps(got, ort_outputs(qdq, samples[0]), output_scales(qdq)) <= 2.0


def test_the_lowering_registry_is_the_profile_op_list() -> None:
    """No hand-kept list: the profile defers to the registry, which knows every op the zoo models use."""
    assert TARGET.supported_ops is None
    used = {node.op_type for name in zoo.LIGHT_MODELS for node in zoo.light_model(name).graph.node}
    assert used <= REGISTRY.op_types, sorted(used - REGISTRY.op_types)
    assert {"Shape", "ConstantOfShape", "Erf", "Constant"} <= REGISTRY.op_types  # fold-only, known with their reasons
    assert "Hardmax" not in REGISTRY and REGISTRY.why_unsupported("Hardmax") is not None
