"""Simplify passes: each pass on small hand-made graphs, then ``simplify`` on real model structures.

Numerics: every rewritten model is run in ONNX Runtime (CPU, fp32) and compared with the original
model run the same way. Tolerance is relative to the largest reference value:
``max|optimized - reference| <= tol * max|reference|`` with tol = 1e-5 for single passes on small
graphs and 1e-4 for whole models (BatchNorm folding reorders float arithmetic across many layers).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.passes import (
    FoldAffineIntoBatchNormPass,
    FoldBatchNormPass,
    FoldConstantsPass,
    RemoveIdentityPass,
    SimplifyReport,
    SumToAddPass,
    simplify,
)
from edgeopt.converters.passes.base import GraphPass
from tests import zoo

PASS_TOLERANCE = 1e-5
MODEL_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[int]]],
    outputs: list[str],
    initializers: dict[str, np.ndarray],
    *,
    initializers_as_inputs: bool = False,
) -> onnx.ModelProto:
    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs]
    if initializers_as_inputs:
        graph_inputs += [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
            for name, array in initializers.items()
        ]
    graph = helper.make_graph(
        nodes,
        "test",
        graph_inputs,
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        [numpy_helper.from_array(array, name) for name, array in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def apply(step: ir.passes.PassBase, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    result = step(ir.from_proto(model))
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result.modified


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(reference: onnx.ModelProto, optimized: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float) -> None:
    expected, actual = run(reference, feeds), run(optimized, feeds)
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want.shape == got.shape
        scale = max(float(np.max(np.abs(want))), 1e-12)
        assert float(np.max(np.abs(want - got))) <= tol * scale


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def rng_array(shape: tuple[int, ...], seed: int = 0, low: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, low + 1.0, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def batchnorm_params(prefix: str, channels: int, seed: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_scale": rng_array((channels,), seed, low=0.5),
        f"{prefix}_bias": rng_array((channels,), seed + 1),
        f"{prefix}_mean": rng_array((channels,), seed + 2),
        f"{prefix}_var": rng_array((channels,), seed + 3, low=0.5),
    }


def batchnorm(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"],
        [y],
        epsilon=1e-3,
        name=f"{prefix}_node",
    )


# ------------------------------------------------------------------------------------------------
# FoldConstantsPass
# ------------------------------------------------------------------------------------------------


def test_fold_constants_evaluates_chains_of_constant_nodes() -> None:
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
            helper.make_node("Mul", ["w_t", "two"], ["w_scaled"]),
            helper.make_node("MatMul", ["x", "w_scaled"], ["y"]),
        ],
        [("x", [2, 4])],
        ["y"],
        {"w": rng_array((3, 4)), "two": np.array(2.0, np.float32)},
    )
    folded, modified = apply(FoldConstantsPass(), model)
    assert modified
    assert op_types(folded) == ["MatMul"]
    assert_same_outputs(model, folded, {"x": rng_array((2, 4), 1)}, PASS_TOLERANCE)


def test_fold_constants_turns_shape_arithmetic_of_static_tensors_into_constants() -> None:
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
            helper.make_node("Unsqueeze", ["batch", "axes"], ["batch_1d"]),
            helper.make_node("Concat", ["batch_1d", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [("x", [1, 3, 4, 4])],
        ["y"],
        {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus_one": np.array([-1], np.int64)},
    )
    folded, _ = apply(FoldConstantsPass(), model)
    assert op_types(folded) == ["Reshape"]
    target = {init.name: numpy_helper.to_array(init) for init in folded.graph.initializer}["target"]
    np.testing.assert_array_equal(target, [1, -1])
    assert_same_outputs(model, folded, {"x": rng_array((1, 3, 4, 4))}, PASS_TOLERANCE)


def test_fold_constants_leaves_results_above_the_size_limit_unmaterialised() -> None:
    model = make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
            helper.make_node("Add", ["x", "ones"], ["y"]),
        ],
        [("x", [64, 64])],
        ["y"],
        {"shape": np.array([64, 64], np.int64)},
    )
    kept, modified = apply(FoldConstantsPass(max_output_elements=1000), model)
    assert not modified
    assert op_types(kept) == ["ConstantOfShape", "Add"]
    folded, modified = apply(FoldConstantsPass(max_output_elements=64 * 64), model)
    assert modified
    assert op_types(folded) == ["Add"]
    assert_same_outputs(model, folded, {"x": rng_array((64, 64))}, PASS_TOLERANCE)


def test_fold_constants_keeps_random_ops_and_overridable_initializers() -> None:
    model = make_model(
        [
            helper.make_node("RandomUniformLike", ["w"], ["noise"], seed=1.0),
            helper.make_node("Mul", ["w", "w"], ["w2"]),
            helper.make_node("Add", ["noise", "w2"], ["y"]),
        ],
        [],
        ["y"],
        {"w": rng_array((2, 2))},
        initializers_as_inputs=True,  # IR < 4 style: a caller may feed "w", so it is not a constant
    )
    kept, modified = apply(FoldConstantsPass(), model)
    assert not modified
    assert op_types(kept) == ["RandomUniformLike", "Mul", "Add"]


def test_fold_constants_keeps_quantize_dequantize_pairs_of_qat_weights() -> None:
    model = make_model(
        [
            helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w"], axis=0),
            helper.make_node("Conv", ["x", "w"], ["y"]),
        ],
        [("x", [1, 3, 4, 4])],
        ["y"],
        {
            "w_int8": np.arange(-12, 12, dtype=np.int8).reshape(2, 3, 2, 2),
            "w_scale": np.array([0.1, 0.2], np.float32),
            "w_zero": np.zeros(2, np.int8),
        },
    )
    kept, modified = apply(FoldConstantsPass(), model)
    assert not modified
    assert op_types(kept) == ["DequantizeLinear", "Conv"]


def test_fold_constants_keeps_the_name_of_a_folded_graph_output() -> None:
    model = make_model(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Relu", ["x"], ["y"])],
        [("x", [3])],
        ["sum", "y"],
        {"a": rng_array((3,)), "b": rng_array((3,), 1)},
    )
    folded, _ = apply(FoldConstantsPass(), model)
    assert op_types(folded) == ["Relu"]
    assert [output.name for output in folded.graph.output] == ["sum", "y"]
    assert_same_outputs(model, folded, {"x": rng_array((3,), 2)}, PASS_TOLERANCE)


def test_fold_constants_materialises_constant_nodes_and_can_be_limited_to_some_ops() -> None:
    model = make_model(
        [
            helper.make_node("Constant", [], ["scale"], value_floats=[2.0, 3.0, 4.0]),
            helper.make_node("Identity", ["w"], ["w_shared"]),
            helper.make_node("Mul", ["w_shared", "scale"], ["w_scaled"]),
            helper.make_node("Add", ["x", "w_scaled"], ["y"]),
        ],
        [("x", [3])],
        ["y"],
        {"w": rng_array((3,))},
    )
    materialised, modified = apply(FoldConstantsPass(only_ops=frozenset({"Constant", "Identity"})), model)
    assert modified
    assert op_types(materialised) == ["Mul", "Add"]
    assert {"scale", "w_shared"} <= {init.name for init in materialised.graph.initializer}
    folded, _ = apply(FoldConstantsPass(), model)
    assert op_types(folded) == ["Add"]
    for result in (materialised, folded):
        assert_same_outputs(model, result, {"x": rng_array((3,), 1)}, PASS_TOLERANCE)


def test_fold_constants_leaves_string_constants_as_nodes() -> None:
    words = helper.make_tensor("words", TensorProto.STRING, [2], [b"int8", b"fp16"])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["labels"], value=words), helper.make_node("Identity", ["labels"], ["out"])],
        "strings",
        [],
        [helper.make_tensor_value_info("out", TensorProto.STRING, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    kept, modified = apply(FoldConstantsPass(), model)
    assert not modified
    assert op_types(kept) == ["Constant", "Identity"]


# ------------------------------------------------------------------------------------------------
# FoldBatchNormPass
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "with_bias"),
    [(1, True), (1, False), (8, False)],
    ids=["conv-with-bias", "conv-without-bias", "depthwise"],
)
def test_fold_batchnorm_into_conv(group: int, with_bias: bool) -> None:
    initializers = {"w": rng_array((8, 8 // group, 3, 3))} | batchnorm_params("bn", 8, 10)
    conv_inputs = ["x", "w"]
    if with_bias:
        initializers["b"] = rng_array((8,), 5)
        conv_inputs.append("b")
    model = make_model(
        [
            helper.make_node("Conv", conv_inputs, ["conv"], pads=[1, 1, 1, 1], group=group),
            batchnorm("bn", "conv", "bn_out"),
            helper.make_node("Relu", ["bn_out"], ["y"]),
        ],
        [("x", [1, 8, 6, 6])],
        ["y"],
        initializers,
    )
    folded, modified = apply(FoldBatchNormPass(), model)
    assert modified
    assert op_types(folded) == ["Conv", "Relu"]
    assert_same_outputs(model, folded, {"x": rng_array((1, 8, 6, 6), 3)}, PASS_TOLERANCE)


@pytest.mark.parametrize("group", [1, 2])
def test_fold_batchnorm_into_conv_transpose(group: int) -> None:
    model = make_model(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["up"], strides=[2, 2], group=group),
            batchnorm("bn", "up", "y"),
        ],
        [("x", [1, 4, 5, 5])],
        ["y"],
        {"w": rng_array((4, 6 // group, 2, 2))} | batchnorm_params("bn", 6, 20),
    )
    folded, _ = apply(FoldBatchNormPass(), model)
    assert op_types(folded) == ["ConvTranspose"]
    assert [output.name for output in folded.graph.output] == ["y"]
    assert_same_outputs(model, folded, {"x": rng_array((1, 4, 5, 5), 4)}, PASS_TOLERANCE)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_batchnorm_into_gemm_with_alpha_and_beta(trans_b: int) -> None:
    weight = rng_array((6, 5) if trans_b else (5, 6))
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w", "c"], ["fc"], alpha=2.0, beta=0.5, transB=trans_b),
            batchnorm("bn", "fc", "y"),
        ],
        [("x", [3, 5])],
        ["y"],
        {"w": weight, "c": rng_array((6,), 7)} | batchnorm_params("bn", 6, 30),
    )
    folded, _ = apply(FoldBatchNormPass(), model)
    assert op_types(folded) == ["Gemm"]
    assert_same_outputs(model, folded, {"x": rng_array((3, 5), 5)}, PASS_TOLERANCE)


def test_fold_batchnorm_into_matmul_plus_add() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"]),
            helper.make_node("Add", ["b", "mm"], ["fc"]),
            batchnorm("bn", "fc", "y"),
        ],
        [("x", [4, 5])],
        ["y"],
        {"w": rng_array((5, 6)), "b": rng_array((6,), 8)} | batchnorm_params("bn", 6, 40),
    )
    folded, _ = apply(FoldBatchNormPass(), model)
    assert op_types(folded) == ["MatMul", "Add"]
    assert_same_outputs(model, folded, {"x": rng_array((4, 5), 6)}, PASS_TOLERANCE)


def test_fold_batchnorm_gives_each_conv_its_own_weights_when_weights_are_shared() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c1"]),
            batchnorm("bn1", "c1", "y1"),
            helper.make_node("Conv", ["x", "w"], ["c2"]),
            batchnorm("bn2", "c2", "y2"),
        ],
        [("x", [1, 3, 5, 5])],
        ["y1", "y2"],
        {"w": rng_array((4, 3, 1, 1))} | batchnorm_params("bn1", 4, 50) | batchnorm_params("bn2", 4, 60),
    )
    folded, _ = apply(FoldBatchNormPass(), model)
    assert op_types(folded) == ["Conv", "Conv"]
    assert folded.graph.node[0].input[1] != folded.graph.node[1].input[1]
    assert_same_outputs(model, folded, {"x": rng_array((1, 3, 5, 5), 7)}, PASS_TOLERANCE)


def test_fold_batchnorm_leaves_batchnorm_whose_input_is_needed_elsewhere_or_not_foldable() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["conv"]),
            batchnorm("bn1", "conv", "normalised"),
            helper.make_node("Relu", ["conv"], ["raw"]),  # second consumer of the Conv output
            helper.make_node("Add", ["normalised", "raw"], ["sum"]),
            batchnorm("bn2", "sum", "y"),  # after an Add: nothing to fold into
        ],
        [("x", [1, 3, 5, 5])],
        ["y"],
        {"w": rng_array((4, 3, 1, 1))} | batchnorm_params("bn1", 4, 70) | batchnorm_params("bn2", 4, 80),
    )
    kept, modified = apply(FoldBatchNormPass(), model)
    assert not modified
    assert op_types(kept).count("BatchNormalization") == 2


# ------------------------------------------------------------------------------------------------
# FoldAffineIntoBatchNormPass
# ------------------------------------------------------------------------------------------------


def test_fold_affine_merges_per_channel_scale_layer_into_batchnorm() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            batchnorm("bn", "r", "normalised"),
            helper.make_node("Mul", ["normalised", "scale"], ["scaled"]),
            helper.make_node("Add", ["shift", "scaled"], ["y"]),
        ],
        [("x", [1, 4, 3, 3])],
        ["y"],
        {"scale": rng_array((4, 1, 1), 90), "shift": rng_array((1, 4, 1, 1), 91)} | batchnorm_params("bn", 4, 92),
    )
    folded, modified = apply(FoldAffineIntoBatchNormPass(), model)
    assert modified
    assert op_types(folded) == ["Relu", "BatchNormalization"]
    assert [output.name for output in folded.graph.output] == ["y"]
    assert_same_outputs(model, folded, {"x": rng_array((1, 4, 3, 3), 9)}, PASS_TOLERANCE)


def test_fold_affine_leaves_constants_that_vary_along_other_axes() -> None:
    model = make_model(
        [
            batchnorm("bn", "x", "normalised"),
            helper.make_node("Mul", ["normalised", "per_pixel"], ["y"]),
        ],
        [("x", [1, 4, 3, 3])],
        ["y"],
        {"per_pixel": rng_array((1, 1, 3, 3), 93)} | batchnorm_params("bn", 4, 94),
    )
    kept, modified = apply(FoldAffineIntoBatchNormPass(), model)
    assert not modified
    assert op_types(kept) == ["BatchNormalization", "Mul"]


def test_simplify_folds_conv_batchnorm_and_scale_layer_into_one_conv() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["conv"]),
            batchnorm("bn", "conv", "normalised"),
            helper.make_node("Mul", ["normalised", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "shift"], ["y"]),
        ],
        [("x", [1, 3, 5, 5])],
        ["y"],
        {"w": rng_array((4, 3, 3, 3)), "scale": rng_array((4, 1, 1), 95), "shift": rng_array((4, 1, 1), 96)}
        | batchnorm_params("bn", 4, 97),
    )
    simplified, report = simplify(model)
    assert op_types(simplified) == ["Conv"]
    assert (report.nodes_before, report.nodes_after) == (4, 1)
    assert_same_outputs(model, simplified, {"x": rng_array((1, 3, 5, 5), 10)}, PASS_TOLERANCE)


# ------------------------------------------------------------------------------------------------
# RemoveIdentityPass
# ------------------------------------------------------------------------------------------------


def test_remove_identity_bypasses_every_pass_through_node() -> None:
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Dropout", ["a", "ratio"], ["b", "unused_mask"]),
            helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["c", "same_shape"], ["d"]),
            helper.make_node("Relu", ["d"], ["e"]),
            helper.make_node("Reshape", ["e", "flat_shape"], ["y"]),  # changes the shape: kept
        ],
        [("x", [2, 3, 4])],
        ["y"],
        {
            "ratio": np.array(0.5, np.float32),
            "same_shape": np.array([2, 3, 4], np.int64),
            "flat_shape": np.array([2, 12], np.int64),
        },
    )
    simplified, modified = apply(RemoveIdentityPass(), model)
    assert modified
    assert op_types(simplified) == ["Relu", "Reshape"]
    assert_same_outputs(model, simplified, {"x": rng_array((2, 3, 4))}, PASS_TOLERANCE)


def test_remove_identity_keeps_nodes_that_change_values() -> None:
    model = make_model(
        [
            helper.make_node("Dropout", ["x", "ratio"], ["dropped", "mask"]),  # mask is used
            helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Dropout", ["x", "ratio", "training"], ["train_dropped"]),  # training mode
            helper.make_node("Cast", ["x"], ["as_int"], to=TensorProto.INT32),
            helper.make_node("Cast", ["as_int"], ["back"], to=TensorProto.FLOAT),
            helper.make_node("Sum", ["dropped", "mask_f", "train_dropped", "back"], ["y"]),
        ],
        [("x", [2, 3])],
        ["y"],
        {"ratio": np.array(0.5, np.float32), "training": np.array(True)},
    )
    kept, modified = apply(RemoveIdentityPass(), model)
    assert not modified
    assert op_types(kept) == op_types(model)


def test_remove_identity_keeps_graph_interface_names() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Identity", ["r"], ["y"]),  # output renamed onto the Relu
            helper.make_node("Identity", ["x"], ["x_copy"]),  # input straight to output: must stay
        ],
        [("x", [4])],
        ["y", "x_copy"],
        {},
    )
    simplified, _ = apply(RemoveIdentityPass(), model)
    assert op_types(simplified) == ["Relu", "Identity"]
    assert [value.name for value in simplified.graph.input] == ["x"]
    assert [value.name for value in simplified.graph.output] == ["y", "x_copy"]
    assert_same_outputs(model, simplified, {"x": rng_array((4,))}, PASS_TOLERANCE)


# ------------------------------------------------------------------------------------------------
# simplify on whole models
# ------------------------------------------------------------------------------------------------


def foldable_batchnorms(model: onnx.ModelProto) -> int:
    """BatchNorms directly after a Conv/ConvTranspose/Gemm whose output feeds nothing else."""
    producers = {output: node for node in model.graph.node for output in node.output}
    uses = Counter(name for node in model.graph.node for name in node.input)
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        and node.input[0] in producers
        and producers[node.input[0]].op_type in ("Conv", "ConvTranspose", "Gemm")
        and uses[node.input[0]] == 1
    )


MODELS = {
    "resnet50": lambda: zoo.light_model("resnet50"),
    "squeezenet": lambda: zoo.light_model("squeezenet"),
    "shufflenet": lambda: zoo.light_model("shufflenet"),
    "densenet121": lambda: zoo.light_model("densenet121"),
    "mobilenet_v2_style": zoo.mobilenet_v2_style,
    "unet_style": zoo.unet_style,
    "transformer_encoder": zoo.transformer_encoder,
    "digits": zoo.digits_cnn,
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.slow) if name == "densenet121" else name for name in MODELS],
)
def test_simplify_shrinks_real_models_without_changing_outputs(name: str) -> None:
    model = MODELS[name]()
    original_bytes = model.SerializeToString()
    simplified, report = simplify(model)

    onnx.checker.check_model(simplified, full_check=True)
    assert model.SerializeToString() == original_bytes, "simplify must not modify its argument"
    assert [v.name for v in simplified.graph.input] == [v.name for v in model.graph.input]
    assert [v.name for v in simplified.graph.output] == [v.name for v in model.graph.output]

    assert report.nodes_before == len(model.graph.node)
    assert report.nodes_after == len(simplified.graph.node)
    assert report.nodes_after < report.nodes_before
    assert sum(step.nodes_removed for step in report.per_pass) == report.nodes_before - report.nodes_after

    batchnorms_before = op_types(model).count("BatchNormalization")
    assert op_types(simplified).count("BatchNormalization") == batchnorms_before - foldable_batchnorms(model)
    assert "Dropout" not in op_types(simplified) and "Identity" not in op_types(simplified)

    assert_same_outputs(model, simplified, zoo.random_inputs(model)[0], MODEL_TOLERANCE)


def test_simplify_report_is_plain_data() -> None:
    _, report = simplify(zoo.digits_cnn())
    assert isinstance(report, SimplifyReport)
    data = report.to_dict()
    assert data["nodes_before"] == 10 and data["nodes_after"] == 7
    steps = {step["name"]: step for step in data["per_pass"]}
    assert steps["fold_batchnorm"] == {"name": "fold_batchnorm", "modified": True, "nodes_removed": 2}
    assert steps["remove_identity"] == {"name": "remove_identity", "modified": True, "nodes_removed": 1}


# ------------------------------------------------------------------------------------------------
# SumToAddPass
# ------------------------------------------------------------------------------------------------


def test_sum_becomes_a_chain_of_adds_with_broadcasting_and_the_output_name_kept() -> None:
    model = make_model(
        [helper.make_node("Sum", ["a", "b", "bias"], ["y"], name="residual_sum")],
        [("a", [1, 4, 3, 3]), ("b", [1, 4, 3, 3])],
        ["y"],
        {"bias": rng_array((4, 1, 1), seed=5)},
    )
    rewritten, modified = apply(SumToAddPass(), model)
    assert modified and op_types(rewritten) == ["Add", "Add"]
    assert rewritten.graph.output[0].name == "y"
    feeds = {"a": rng_array((1, 4, 3, 3), 1), "b": rng_array((1, 4, 3, 3), 2)}
    assert_same_outputs(model, rewritten, feeds, PASS_TOLERANCE)


def test_single_input_sum_is_left_to_identity_removal() -> None:
    model = make_model([helper.make_node("Sum", ["a"], ["y"])], [("a", [2, 2])], ["y"], {})
    _, modified = apply(SumToAddPass(), model)
    assert not modified


def _dynamic_range_model() -> onnx.ModelProto:
    """x [1, 3, H, W] -> Shape -> Gather(W) -> Range(0, W, 1) -> Cast -> Add to x (a YOLO head's grid)."""
    from onnx import TensorProto

    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "three"], ["width"], axis=0),
            helper.make_node("Range", ["zero", "width", "one"], ["grid"]),
            helper.make_node("Cast", ["grid"], ["grid_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "grid_f"], ["y"]),
        ],
        "dynamic_range",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [numpy_helper.from_array(np.array(3, np.int64), "three"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
         numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fixed_input_shapes_fold_shape_arithmetic_into_constants() -> None:
    model = _dynamic_range_model()
    assert "Range" in {n.op_type for n in simplify(model)[0].graph.node}, "dynamic: the grid depends on the input"
    fixed, report = simplify(model, {"x": (1, 3, 4, 5)})
    assert [n.op_type for n in fixed.graph.node] == ["Add"]
    dims = [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 4, 5] and report.per_pass[0].name == "fix_input_shapes"
    x = np.random.default_rng(0).normal(size=(1, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(run(fixed, {"x": x})[0], x + np.arange(5, dtype=np.float32))


def test_fixed_input_shapes_pass_the_checker_where_an_output_was_declared_with_minus_one() -> None:
    """Paddle writes a dynamic size as -1, on outputs too: left there it clashed with the size inferred from the
    fixed input, and a model simplified with --input-shape and saved failed edgeopt's own loader."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "paddle_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fixed, _ = simplify(model, {"x": (3, 2)})
    onnx.checker.check_model(fixed, full_check=True)
    assert [d.dim_value for d in fixed.graph.output[0].type.tensor_type.shape.dim] == [3, 2]


@pytest.mark.parametrize(
    "shapes,message",
    [
        ({"image": (1, 3, 4, 5)}, "names image, which the model does not have"),
        ({"x": (1, 3, 4)}, "has rank 4 but --input-shape gives 3"),
        ({"x": (1, 1, 4, 5)}, "static dimension 1 = 3"),
    ],
)
def test_bad_input_shapes_are_clear_errors(shapes: dict, message: str) -> None:
    from edgeopt.converters.errors import InputShapeError

    with pytest.raises(InputShapeError, match=message) as info:
        simplify(_dynamic_range_model(), shapes)
    assert info.value.exit_code == 2


# ------------------------------------------------------------------------------------------------
# Subgraphs and the passes' own checks
# ------------------------------------------------------------------------------------------------


def _if_model() -> onnx.ModelProto:
    """Conv -> BatchNorm -> Identity and folded constants in the main graph, read from inside both
    branches of an If; the then-branch also scales a second BatchNorm per channel (a Mul that
    FoldAffineIntoBatchNormPass would merge in the main graph), holds a Constant, and owns a value
    named like the weight FoldBatchNormPass creates."""
    params = {
        "w": rng_array((3, 3, 1, 1)),
        "w2": rng_array((3, 3, 1, 1), 9),
        "k1": rng_array((1, 3, 1, 1), 5),
        "k2": rng_array((1, 3, 1, 1), 6),
        "s": rng_array((1, 3, 1, 1), 7),
        **batchnorm_params("bn", 3, 1),
        **batchnorm_params("bn2", 3, 11),
    }
    shape = [1, 3, 4, 4]
    then_branch = helper.make_graph(
        [
            helper.make_node("Mul", ["b2", "s"], ["w__bn"], name="then_scale"),
            helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
            helper.make_node("Mul", ["identity_out", "kk"], ["t0"], name="then_mul"),
            helper.make_node("Mul", ["t0", "half"], ["t1"], name="then_half"),
            helper.make_node("Add", ["t1", "w__bn"], ["t"], name="then_add"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Add", ["identity_out", "k"], ["e"], name="else_add")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        batchnorm("bn", "c", "b"),
        helper.make_node("Identity", ["b"], ["identity_out"], name="identity"),
        helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
        batchnorm("bn2", "c2", "b2"),
        helper.make_node("Add", ["k1", "k2"], ["k"], name="fold_add"),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32))),
        helper.make_node("Mul", ["two", "k"], ["kk"], name="fold_mul"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(array, name) for name, array in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_simplify_rewires_values_that_if_branches_read_from_the_outer_scope() -> None:
    model = _if_model()
    simplified, report = simplify(model)
    onnx.checker.check_model(simplified, full_check=True)
    assert op_types(simplified) == ["Conv", "Conv", "If"], "BatchNorms folded, Identity and constant arithmetic gone"
    assert report.nodes_after < report.nodes_before
    branches = {attr.name: attr.g for attr in simplified.graph.node[-1].attribute}
    outer = {init.name for init in simplified.graph.initializer} | {o for n in simplified.graph.node for o in n.output}
    for branch in branches.values():
        local = {o for n in branch.node for o in n.output} | {init.name for init in branch.initializer}
        read = {i for n in branch.node for i in n.input if i}
        assert read <= outer | local, "every outer-scope name a branch reads still exists"
        assert not (local & outer), "no branch value shadows an outer one"
    assert "then_scale" in {n.name for n in branches["then_branch"].node}, "a Mul inside a branch stays there"
    x = rng_array((1, 3, 4, 4), 3)
    for cond in (True, False):
        assert_same_outputs(model, simplified, {"x": x, "cond": np.array(cond)}, PASS_TOLERANCE)


def test_a_pass_that_changes_the_graph_interface_fails_its_postcondition() -> None:
    class RenamesOutput(GraphPass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            model.graph.outputs[0].name = "renamed"
            return ir.passes.PassResult(model, modified=True)

    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [3])], ["y"], {})
    with pytest.raises(ir.passes.PostconditionError, match="RenamesOutput changed the graph's inputs or outputs"):
        RenamesOutput()(ir.from_proto(model))


def test_fold_constants_reports_whether_it_changed_the_model() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [3])], ["y"], {})
    result = FoldConstantsPass()(ir.from_proto(model))
    assert not result.modified


@pytest.mark.parametrize("opset", [17, 18])
def test_decompose_layer_norm_computes_the_same_values_and_leaves_other_axes_alone(opset: int) -> None:
    from edgeopt.converters.passes.decompose_layer_norm import DecomposeLayerNormPass

    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5),
        helper.make_node("LayerNormalization", ["h", "gamma2"], ["y"], axis=1),  # over axes 1..: stays
    ]
    gamma = rng_array((16,), seed=1, low=0.1)
    gamma[2] = 30.0
    model = make_model(
        nodes, [("x", [2, 4, 16])], ["y"],
        {"gamma": gamma, "beta": rng_array((16,), seed=2), "gamma2": rng_array((4, 16), seed=3, low=0.5)},
    )
    model.opset_import[0].version = opset
    step = DecomposeLayerNormPass()
    decomposed, modified = apply(step, model)
    assert modified and step.decomposed == 1
    assert Counter(op_types(decomposed)) == Counter(
        {"LayerNormalization": 1, "ReduceMean": 2, "Sub": 1, "Mul": 2, "Add": 2, "Pow": 1, "MatMul": 1}
    )
    assert {init.name for init in decomposed.graph.initializer}.isdisjoint({"gamma", "beta"})
    assert_same_outputs(model, decomposed, {"x": rng_array((2, 4, 16), seed=4) * 5 + 3}, PASS_TOLERANCE)
