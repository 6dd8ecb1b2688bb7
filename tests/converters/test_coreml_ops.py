"""Each ONNX op the Core ML lowering handles, in the variants exporters emit, against ONNX Runtime.

One-node (or few-node) graphs lowered at fp32 compute precision, so the lowering's semantics and the
reference evaluator's are checked to 1e-4·max|ref| + 1e-5 without fp16 noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.errors import UnsupportedOpsError
from edgeopt.converters.lower.base import LoweringOptions
from edgeopt.converters.lower.coreml import lower
from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.runtime.kinds import Precision
from edgeopt.targets import get_target

TARGET = get_target("apple-ane")
RNG = np.random.default_rng(7)


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: dict[str, Sequence[int]],
    outputs: Sequence[str],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "op",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in (initializers or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


node = helper.make_node
X4 = {"x": (1, 4, 8, 8)}

CASES: dict[str, onnx.ModelProto] = {
    "conv_strided_asymmetric_pads": _model([node("Conv", ["x", "w", "b"], ["y"], strides=[2, 1], pads=[0, 1, 1, 2])], X4, ["y"], {"w": _w(6, 4, 3, 3), "b": _w(6)}),
    "conv_same_upper": _model([node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])], X4, ["y"], {"w": _w(5, 4, 4, 4)}),
    "conv_dilated": _model([node("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[2, 1, 2, 1])], X4, ["y"], {"w": _w(5, 4, 3, 3)}),
    "conv_grouped": _model([node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1])], X4, ["y"], {"w": _w(6, 2, 3, 3)}),
    "conv_depthwise": _model([node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1], strides=[2, 2])], X4, ["y"], {"w": _w(4, 1, 3, 3)}),
    "conv1d": _model([node("Conv", ["x", "w"], ["y"], pads=[1, 1])], {"x": (1, 4, 10)}, ["y"], {"w": _w(3, 4, 3)}),
    "conv_transpose_stride2": _model([node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])], X4, ["y"], {"w": _w(4, 3, 3, 3), "b": _w(3)}),
    "conv_transpose_grouped": _model([node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], group=2)], X4, ["y"], {"w": _w(4, 2, 2, 2)}),
    "gemm_trans_alpha_beta": _model([node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)], {"x": (2, 6)}, ["y"], {"w": _w(3, 6), "c": _w(3)}),
    "gemm_trans_a": _model([node("Gemm", ["x", "w"], ["y"], transA=1)], {"x": (6, 2)}, ["y"], {"w": _w(6, 3)}),
    "gemm_two_inputs": _model([node("Gemm", ["x", "z", "c"], ["y"], transB=1, beta=0.5)], {"x": (2, 6), "z": (3, 6)}, ["y"], {"c": _w(2, 3)}),
    "matmul_batched": _model([node("MatMul", ["x", "z"], ["y"])], {"x": (2, 3, 4, 5), "z": (2, 3, 5, 6)}, ["y"]),
    "matmul_weight": _model([node("MatMul", ["x", "w"], ["y"])], {"x": (1, 7, 5)}, ["y"], {"w": _w(5, 6)}),
    "elementwise_broadcast": _model(
        [node("Sub", ["x", "c"], ["a"]), node("Div", ["a", "z"], ["b"]), node("Pow", ["b", "two"], ["d"]), node("Max", ["d", "x"], ["e"]),
         node("Min", ["e", "c"], ["f"]), node("Neg", ["f"], ["g"]), node("Sum", ["g", "x", "c"], ["y"])],
        {"x": (1, 4, 8, 8), "z": (1, 1, 8, 8)}, ["y"], {"c": _w(4, 1, 1), "two": np.array(2.0, np.float32)},
    ),
    "activations": _model(
        [node("Elu", ["x"], ["a"], alpha=0.7), node("LeakyRelu", ["a"], ["b"], alpha=0.1), node("HardSigmoid", ["b"], ["c"], alpha=0.3, beta=0.4),
         node("Mul", ["c", "x"], ["d"]), node("HardSwish", ["d"], ["e"]), node("Tanh", ["e"], ["f"]), node("Sigmoid", ["x"], ["g"]),
         node("Add", ["f", "g"], ["h"]), node("Gelu", ["h"], ["i"], approximate="tanh"), node("Erf", ["i"], ["y"])],
        X4, ["y"], opset=20,
    ),
    "unary_math": _model(
        [node("Abs", ["x"], ["a"]), node("Sqrt", ["a"], ["b"]), node("Exp", ["b"], ["c"]), node("Log", ["c"], ["d"]), node("Reciprocal", ["c"], ["e"]),
         node("Add", ["d", "e"], ["y"])],
        X4, ["y"],
    ),
    "prelu_per_channel": _model([node("PRelu", ["x", "s"], ["y"])], X4, ["y"], {"s": _w(4, 1, 1)}),
    "prelu_scalar_on_2d": _model([node("PRelu", ["x", "s"], ["y"])], {"x": (3, 5)}, ["y"], {"s": np.array([0.2], np.float32)}),
    "clip_relu6_and_bounds": _model(
        [node("Clip", ["x", "zero", "six"], ["a"]), node("Clip", ["x", "", "six"], ["b"]), node("Clip", ["x", "lo", "hi"], ["c"]),
         node("Add", ["a", "b"], ["d"]), node("Add", ["d", "c"], ["y"])],
        X4, ["y"], {"zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32), "lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)},
    ),
    "softmax_opset11_axis1": _model([node("Softmax", ["x"], ["y"], axis=1)], {"x": (2, 3, 4)}, ["y"], opset=11),
    "softmax_axis1": _model([node("Softmax", ["x"], ["y"], axis=1)], {"x": (2, 3, 4)}, ["y"]),
    "pools_ceil_and_padding": _model(
        [node("MaxPool", ["x"], ["a"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
         node("AveragePool", ["x"], ["b"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
         node("AveragePool", ["x"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         node("Add", ["b", "c"], ["d"])],
        {"x": (1, 4, 9, 9)}, ["a", "d"],
    ),
    "global_pools_and_reductions": _model(
        [node("GlobalMaxPool", ["x"], ["a"]), node("GlobalAveragePool", ["x"], ["b"]), node("ReduceSum", ["x", "axes"], ["c"], keepdims=1),
         node("ReduceMin", ["x"], ["d"], axes=[2, 3], keepdims=1), node("ReduceMax", ["x"], ["e"], axes=[1], keepdims=1),
         node("Add", ["a", "b"], ["f"]), node("Add", ["f", "c"], ["g"]), node("Add", ["g", "d"], ["h"]), node("Add", ["h", "e"], ["y"])],
        X4, ["y"], {"axes": _i64(2, 3)},
    ),
    "batchnorm_lrn_layernorm": _model(
        [node("BatchNormalization", ["x", "g", "b", "m", "v"], ["a"], epsilon=1e-3), node("LRN", ["a"], ["c"], size=3, alpha=1e-2, beta=0.75, bias=2.0),
         node("LayerNormalization", ["c", "lg", "lb"], ["y"], axis=-1)],
        X4, ["y"],
        {"g": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5, "lg": _w(8), "lb": _w(8)},
    ),
    "pads": _model(
        [node("Pad", ["x", "p"], ["a"], mode="reflect"), node("Pad", ["x", "p", "value"], ["b"]), node("Pad", ["x", "p"], ["c"], mode="edge"),
         node("Add", ["a", "b"], ["d"]), node("Add", ["d", "c"], ["y"])],
        X4, ["y"], {"p": _i64(0, 0, 1, 2, 0, 0, 2, 1), "value": np.array(0.5, np.float32)},
    ),
    "slice_split_concat": _model(
        [node("Slice", ["x", "st", "en", "ax", "sp"], ["a"]), node("Split", ["x", "sizes"], ["s1", "s2"], axis=1),
         node("Slice", ["x", "st2", "en2", "ax2"], ["b"]), node("Concat", ["s2", "s1"], ["c"], axis=1),
         node("Flatten", ["a"], ["fa"]), node("Flatten", ["b"], ["fb"]), node("Flatten", ["c"], ["fc"]), node("Concat", ["fa", "fb", "fc"], ["y"], axis=1)],
        X4, ["y"],
        {"st": _i64(-1, 6), "en": _i64(-1000, 0), "ax": _i64(3, 2), "sp": _i64(-2, -3), "sizes": _i64(1, 3),
         "st2": _i64(1), "en2": _i64(3), "ax2": _i64(1)},
    ),
    "reshape_transpose_squeeze": _model(
        [node("Reshape", ["x", "shape"], ["a"]), node("Transpose", ["a"], ["b"], perm=[0, 2, 1, 3]), node("Unsqueeze", ["b", "ax0"], ["c"]),
         node("Squeeze", ["c", "ax0"], ["d"]), node("Reshape", ["d", "flat"], ["y"])],
        X4, ["y"], {"shape": _i64(0, 2, -1, 16), "ax0": _i64(0), "flat": _i64(1, -1)},
    ),
    "resize_nearest_and_bilinear": _model(
        [node("Resize", ["x", "", "scales"], ["a"], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
         node("Resize", ["x", "", "scales"], ["b"], mode="linear", coordinate_transformation_mode="half_pixel"),
         node("Resize", ["x", "", "", "sizes"], ["c"], mode="linear", coordinate_transformation_mode="align_corners"),
         node("Resize", ["x", "", "", "sizes"], ["d"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
         node("Add", ["a", "b"], ["e"]), node("Add", ["c", "d"], ["f"]), node("Concat", ["e", "f"], ["y"], axis=1)],
        X4, ["y"], {"scales": np.array([1, 1, 2, 2], np.float32), "sizes": _i64(1, 4, 16, 16)},
    ),
    "gather_where_cast": _model(
        [node("Gather", ["table", "idx"], ["a"], axis=0), node("Greater", ["x", "zero"], ["m"]), node("Where", ["m", "x", "a"], ["b"]),
         node("Equal", ["x", "x"], ["e"]), node("Cast", ["e"], ["ef"], to=TensorProto.FLOAT), node("Add", ["b", "ef"], ["y"])],
        {"x": (2, 3)}, ["y"], {"table": _w(5, 3), "idx": _i64(4, 1), "zero": np.array(0.0, np.float32)},
    ),
    "gather_of_a_bool_mask": _model(  # BERT's attention mask: Cast to bool, Flatten, Gather (MIL gathers no bool)
        [node("Greater", ["x", "zero"], ["m"]), node("Flatten", ["m"], ["f"], axis=2), node("Gather", ["f", "idx"], ["g"], axis=0),
         node("Reshape", ["g", "shape"], ["r"]), node("GatherElements", ["r", "pick"], ["e"], axis=1), node("Where", ["e", "one", "zero"], ["y"])],
        {"x": (1, 6)}, ["y"],
        {"zero": np.array(0.0, np.float32), "one": np.array(1.0, np.float32), "idx": np.arange(6, dtype=np.int64).reshape(1, 6),
         "shape": _i64(1, 6), "pick": _i64(5, 0, -1).reshape(1, 3)},
    ),
    "gather_scalar_index_is_a_slice": _model(
        [node("Gather", ["x", "last"], ["y"], axis=1)], {"x": (2, 3, 4)}, ["y"], {"last": np.array(-1, np.int64)},
    ),
    "logical_and_or_xor_not": _model(
        [node("Greater", ["x", "zero"], ["a"]), node("Less", ["x", "half"], ["b"]), node("And", ["a", "b"], ["c"]),
         node("GreaterOrEqual", ["x", "one"], ["d"]), node("Or", ["c", "d"], ["e"]), node("LessOrEqual", ["x", "minus_one"], ["f"]),
         node("Xor", ["e", "f"], ["g"]), node("Not", ["g"], ["h"]), node("Neg", ["x"], ["n"]), node("Where", ["h", "x", "n"], ["y"])],
        X4, ["y"],
        {"zero": np.array(0.0, np.float32), "half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32), "minus_one": np.array(-1.0, np.float32)},
    ),
    "reduce_l1_l2_sum_square": _model(
        [node("ReduceL2", ["x"], ["a"], axes=[1], keepdims=1), node("ReduceL1", ["x"], ["b"], axes=[2, 3], keepdims=1), node("Add", ["a", "b"], ["c"]),
         node("ReduceSumSquare", ["x"], ["d"], axes=[3], keepdims=1), node("Add", ["c", "d"], ["e"]),
         node("ReduceL2", ["x"], ["f"], axes=[1, 2], keepdims=0), node("Add", ["e", "f"], ["y"])],
        X4, ["y"],
    ),
    "reduce_l2_normalize_opset18": _model(  # torch.nn.functional.normalize as exported: ReduceL2, Clip, Expand, Div
        [node("ReduceL2", ["x", "axes"], ["n"], keepdims=1), node("Clip", ["n", "eps"], ["c"]), node("Expand", ["c", "shape"], ["e"]),
         node("Div", ["x", "e"], ["y"])],
        {"x": (2, 16)}, ["y"], {"axes": _i64(1), "eps": np.array(1e-12, np.float32), "shape": _i64(2, 16)}, opset=18,
    ),
    "expand_runtime_value": _model(
        [node("Relu", ["x"], ["r"]), node("Expand", ["r", "shape"], ["e"]), node("Expand", ["x", "same"], ["f"]), node("Add", ["e", "f"], ["y"])],
        {"x": (3, 1)}, ["y"], {"shape": _i64(2, 1, 4), "same": _i64(3, 1)},
    ),
    "gather_elements_constant_and_computed_indices": _model(
        [node("GatherElements", ["x", "idx"], ["a"], axis=2), node("Greater", ["x", "zero"], ["p"]), node("Cast", ["p"], ["i"], to=TensorProto.INT64),
         node("Mul", ["i", "three"], ["i3"]), node("Sub", ["i3", "two"], ["j"]), node("GatherElements", ["x", "j"], ["b"], axis=3),
         node("ReduceSum", ["b", "ax2"], ["s"], keepdims=1), node("Add", ["a", "s"], ["y"])],
        X4, ["y"],
        {"idx": np.array([[[[0, 7, -1, 2, 5, -8, 3, 3], [-4, 1, 1, 0, 6, 6, -2, 4]]] * 4], np.int64), "zero": np.array(0.0, np.float32),
         "three": np.array(3, np.int64), "two": np.array(2, np.int64), "ax2": _i64(2)},
    ),
    "gather_elements_and_range_folded_over_a_wide_buffer": _model(  # BERT's token-type ids: onnx.reference folds this wrongly
        [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "one"], ["length"], axis=0), node("Range", ["zero", "length", "one"], ["positions"]),
         node("Unsqueeze", ["positions", "axis0"], ["index"]), node("GatherElements", ["buffer", "index"], ["ids"], axis=1),
         node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), node("Add", ["x", "f"], ["y"])],
        {"x": (1, 32)}, ["y"],
        {"zero": np.array(0, np.int64), "one": np.array(1, np.int64), "axis0": _i64(0), "buffer": np.arange(100, 300, 2, dtype=np.int64).reshape(1, 100)},
    ),
    "shape_arithmetic_is_folded": _model(
        [node("Shape", ["x"], ["s"]), node("Gather", ["s", "one"], ["c"], axis=0), node("Unsqueeze", ["c", "ax0"], ["cu"]),
         node("Concat", ["batch", "cu", "minus"], ["shape"], axis=0), node("Reshape", ["x", "shape"], ["y"])],
        X4, ["y"], {"one": np.array(1, np.int64), "ax0": _i64(0), "batch": _i64(1), "minus": _i64(-1)},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    model = CASES[case]
    feeds = {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for precision, (rtol, atol) in ((Precision.FP32, (1e-4, 1e-5)), (Precision.FP16, (1e-2, 1e-3))):
        result = lower(model, TARGET, precision, tmp_path / precision, LoweringOptions())
        actual = result.runner(feeds)
        for output, reference in zip(model.graph.output, expected):
            error = np.abs(actual[output.name] - reference).max()
            assert error <= rtol * np.abs(reference).max() + atol, f"{case} {precision}: max|Δ| {error}"


def test_resize_that_core_ml_cannot_express_is_refused_up_front(tmp_path: Path) -> None:
    model = _model(
        [node("Resize", ["x", "", "scales"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="round_prefer_floor")],
        X4, ["y"], {"scales": np.array([1, 1, 3, 3], np.float32)},
    )
    with pytest.raises(UnsupportedOpsError, match="does not pick the pixels Core ML picks"):
        lower(model, TARGET, Precision.FP16, tmp_path, LoweringOptions())


def test_unsupported_op_reason_says_it_is_edgeopts_lowering(tmp_path: Path) -> None:
    model = _model([node("Hardmax", ["x"], ["y"], name="the_hardmax")], {"x": (2, 3)}, ["y"])
    with pytest.raises(UnsupportedOpsError) as caught:
        lower(model, TARGET, Precision.FP16, tmp_path, LoweringOptions())
    assert caught.value.nodes == [("the_hardmax", "Hardmax", "edgeopt's Core ML lowering does not write Hardmax yet")]


def test_shape_ops_on_runtime_values_are_refused(tmp_path: Path) -> None:
    model = _model([node("Relu", ["x"], ["r"]), node("ConstantOfShape", ["r"], ["y"])], {"x": (2,)}, ["y"])
    with pytest.raises(UnsupportedOpsError, match="only supported when its inputs are known at build time"):
        lower(model, TARGET, Precision.FP16, tmp_path, LoweringOptions())


def test_support_checks_decide_from_the_node_of_a_model_not_yet_folded() -> None:
    """The validate stage asks the registry with nodes of a shape-inferred model, before any folding:
    a check refuses only what it can tell from the node, and says None when it cannot decide."""
    model = _model(
        [node("Shape", ["x"], ["s"], name="shape"), node("ConstantOfShape", ["s"], ["c"], name="from_static_shape"),
         node("Relu", ["x"], ["r"], name="relu"), node("Cast", ["r"], ["ri"], to=TensorProto.INT64, name="cast"),
         node("ConstantOfShape", ["ri"], ["d"], name="from_runtime_values"),
         node("Expand", ["x", "s"], ["e"], name="expand_to_static_shape"), node("Expand", ["x", "ri"], ["f"], name="expand_to_runtime_shape"),
         node("Resize", ["x", "", "scales"], ["g"], mode="cubic", name="cubic"),
         node("Resize", ["x", "", "scales"], ["h"], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="round_prefer_floor", name="nearest_by_3"),
         node("Resize", ["x", "", "", "s"], ["i"], mode="linear", name="linear_to_computed_size"),
         node("Cast", ["x"], ["j"], to=TensorProto.STRING, name="to_string"), node("Pad", ["x", "p"], ["k"], mode="wrap", name="wrap"),
         node("MaxPool", ["x"], ["l"], kernel_shape=[2, 2], dilations=[2, 2], name="dilated")],
        {"x": (1, 4, 8, 8)}, ["c", "d", "e", "f", "g", "h", "i", "j", "k", "l"],
        {"scales": np.array([1, 1, 3, 3], np.float32), "p": _i64(0, 0, 1, 1, 0, 0, 1, 1)},
    )
    graph = ir.from_proto(onnx.shape_inference.infer_shapes(model)).graph
    reasons = {n.name: REGISTRY.why_unsupported(n.op_type, n) for n in graph}
    assert reasons == {
        "shape": None, "from_static_shape": None, "relu": None, "cast": None,
        "from_runtime_values": "only supported when its inputs are known at build time",
        "expand_to_static_shape": None, "expand_to_runtime_shape": "only supported when its target shape is known at build time",
        "cubic": "Resize mode 'cubic' (Core ML's MIL resize ops are nearest-neighbour or bilinear only)",
        "nearest_by_3": "nearest resize with asymmetric/round_prefer_floor does not pick the pixels Core ML picks",
        "linear_to_computed_size": None,
        "to_string": "cast to STRING", "wrap": "pad mode wrap", "dilated": "dilated pooling",
    }
