"""Model analysis: loading with clear errors, I/O specs, exact parameter and MAC counts, what a
target cannot run, and where int8 will hurt."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.analysis import (
    OPSET_CONVERTED_FROM_KEY,
    io_specs,
    is_qdq,
    load_model,
    model_stats,
    quantization_advice,
    unsupported_nodes,
)
from edgeopt.converters.errors import ModelLoadError
from edgeopt.converters.graph.opset import MIN_OPSET
from edgeopt.targets import get_target
from tests import zoo

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
RNG = np.random.default_rng(0)


def _weight(name: str, *shape: int, scale: float = 0.1) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inputs, outputs, initializers=(), opset: int = 17, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


def conv_gemm_model() -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv 3x3 (4 out) -> Relu -> depthwise Conv 3x3 (group 4) -> Flatten -> Gemm (10 out)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    initializers = [_weight("w1", 4, 3, 3, 3), _weight("b1", 4), _weight("w2", 4, 1, 3, 3), _weight("w3", 10, 256), _weight("b3", 10)]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializers,
    )


# ---------------------------------------------------------------------------------------- stats


def test_parameters_and_macs_of_a_conv_gemm_graph_are_exact():
    stats = model_stats(conv_gemm_model())
    # conv1: 4 outputs x 8x8 positions x (3 in x 3x3 kernel) = 6912; depthwise: 4 x 64 x (1 x 9) = 2304;
    # Gemm: 1 x 10 outputs x 256 inputs = 2560.
    assert stats.macs == 6912 + 2304 + 2560
    # 4*3*3*3 + 4 + 4*1*3*3 + 10*256 + 10
    assert stats.parameters == 108 + 4 + 36 + 2560 + 10
    assert stats.nodes == 5
    assert stats.opset == 17
    assert stats.macs_uncounted == []
    assert stats.bytes == conv_gemm_model().ByteSize()


def test_op_histogram_counts_every_op_most_common_first():
    stats = model_stats(conv_gemm_model())
    assert stats.op_histogram == {"Conv": 2, "Relu": 1, "Flatten": 1, "Gemm": 1}
    assert next(iter(stats.op_histogram)) == "Conv"
    assert stats.to_dict()["op_histogram"]["Gemm"] == 1


def test_macs_of_conv_transpose_batched_matmul_and_attention_with_a_symbolic_batch():
    nodes = [
        # [N,4,8,8] -> ConvTranspose 2x2 stride 2, 2 outputs: each input element feeds 2 x 2x2 outputs.
        helper.make_node("ConvTranspose", ["x", "wt"], ["up"], name="up", strides=[2, 2]),
        # [N,5,8] @ [8,3]: 5x3 outputs per sample, 8 MACs each.
        helper.make_node("MatMul", ["a", "wm"], ["m"], name="mm"),
        # Q,K,V [N,2 heads,6 tokens,4]: QK^T 2*6*6*4 + AV 2*6*6*4.
        helper.make_node("Attention", ["q", "k", "v"], ["att"], name="attn"),
    ]
    model = _model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 5, 8]),
            *(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2, 6, 4]) for n in "qkv"),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("up", "m", "att")],
        [_weight("wt", 4, 2, 2, 2), _weight("wm", 8, 3)],
        opset=23,
    )
    stats = model_stats(model)
    assert stats.macs == 4 * 64 * (2 * 2 * 2) + 5 * 3 * 8 + 2 * (2 * 6 * 6 * 4)
    assert stats.parameters == 32 + 24


def test_light_resnet50_counts_about_four_billion_macs():
    stats = model_stats(zoo.light_model("resnet50"))
    # ResNet-50 at 224x224 is 4.09 GMACs (He et al. report 3.8 G FLOPs counting multiply-adds without the fc).
    assert 4.0e9 < stats.macs < 4.2e9
    assert 25.0e6 < stats.parameters < 26.0e6
    assert stats.op_histogram["Conv"] == 53


def test_qdq_scales_and_zero_points_are_not_parameters():
    weight = numpy_helper.from_array(RNG.integers(-127, 128, (4, 3, 1, 1)).astype(np.int8), "wq")
    scale = numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws")
    zero = numpy_helper.from_array(np.zeros(4, np.int8), "wz")
    model = _model(
        [
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq_w", axis=0),
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [weight, scale, zero],
    )
    assert is_qdq(model)
    assert model_stats(model).parameters == 12
    assert not is_qdq(conv_gemm_model())


def test_io_specs_report_names_shapes_symbolic_dims_and_dtypes():
    model = _model(
        [helper.make_node("Cast", ["ids"], ["out"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 16])],
    )
    inputs, outputs = io_specs(model)
    assert [(s.name, s.shape, s.dtype) for s in inputs] == [("ids", ("batch", 16), "int64")]
    assert [(s.name, s.shape, s.dtype) for s in outputs] == [("out", ("batch", 16), "float32")]
    assert inputs[0].to_dict()["shape"] == ["batch", 16]


# ---------------------------------------------------------------------------------------- loading


def test_load_model_reads_a_valid_model(tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_gemm_model(), path)
    model = load_model(path)
    assert model.graph.node[0].name == "conv1"
    assert not any(p.key == OPSET_CONVERTED_FROM_KEY for p in model.metadata_props)


def test_load_model_converts_old_opsets_up_and_says_so(caplog: pytest.LogCaptureFixture):
    with caplog.at_level("INFO", logger="edgeopt.converters.analysis"):
        model = load_model(LIGHT_DIR / "light_bvlc_alexnet.onnx")  # shipped at opset 9
    assert model.opset_import[0].version == MIN_OPSET
    assert {p.key: p.value for p in model.metadata_props}[OPSET_CONVERTED_FROM_KEY] == "9"
    assert "converted opset 9 to 13" in caplog.text


def test_load_model_reads_external_data_next_to_the_file(tmp_path: Path):
    model = conv_gemm_model()
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    loaded = load_model(path)
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), original[tensor.name])


def test_missing_external_data_names_the_file(tmp_path: Path):
    path = tmp_path / "ext.onnx"
    onnx.save(conv_gemm_model(), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"weights\.bin") as info:
        load_model(path)
    assert "next to the .onnx file" in info.value.hint


def test_missing_file_is_a_model_load_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_model(tmp_path / "nope.onnx")
    assert info.value.exit_code == 2
    assert str(tmp_path / "nope.onnx") in info.value.message


def test_directory_is_a_model_load_error_that_points_at_the_onnx_inside(tmp_path: Path):
    onnx.save(conv_gemm_model(), tmp_path / "inner.onnx")
    with pytest.raises(ModelLoadError, match="is a directory") as info:
        load_model(tmp_path)
    assert "inner.onnx" in info.value.hint


def test_text_file_is_not_onnx(tmp_path: Path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a README, not a model\n" * 20)
    with pytest.raises(ModelLoadError, match="looks like a text file") as info:
        load_model(path)
    assert str(path) in info.value.message


def test_other_formats_are_named(tmp_path: Path):
    path = tmp_path / "weights.onnx"
    np.savez(tmp_path / "weights.npz", w=np.ones(3))
    (tmp_path / "weights.npz").rename(path)
    with pytest.raises(ModelLoadError, match="zip archive"):
        load_model(path)
    empty = tmp_path / "empty.onnx"
    empty.touch()
    with pytest.raises(ModelLoadError, match="is empty"):
        load_model(empty)


def test_onnx_text_format_is_read(tmp_path: Path):
    path = tmp_path / "model.textproto"
    onnx.save(conv_gemm_model(), path, format="textproto")
    assert model_stats(load_model(path)).macs == 6912 + 2304 + 2560


def test_truncated_protobuf_is_a_model_load_error(tmp_path: Path):
    data = zoo.light_model("squeezenet").SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        load_model(path)
    assert "re-copy" in info.value.hint


def test_model_failing_the_checker_is_a_model_load_error(tmp_path: Path):
    model = _model(
        [helper.make_node("Relu", ["missing_tensor"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="fails the ONNX checker") as info:
        load_model(path)
    assert "missing_tensor" in info.value.message


def test_model_failing_shape_inference_is_a_model_load_error(tmp_path: Path):
    # Adding [1,4] and [1,5] cannot broadcast: only full_check's shape inference sees it.
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "shapes.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="fails the ONNX checker"):
        load_model(path)


# ---------------------------------------------------------------------------------------- targets


def _mixed_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MyFancyOp", ["r"], ["c"], name="custom", domain="my.company"),
        helper.make_node("TopK", ["c", "k"], ["vals", "idx"], name="topk", axis=-1),
        helper.make_node("Resize", ["vals", "", "scales"], ["big"], name="resize_cubic", mode="cubic"),
        helper.make_node("ReduceLogSumExp", ["big"], ["y"], name="l2", keepdims=1),
        # Folded away by simplification, so never reported even where the op is missing.
        helper.make_node("ConstantOfShape", ["shape"], ["filled"], name="filler"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("filled", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([2], np.int64), "k"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
            numpy_helper.from_array(np.array([2, 2], np.int64), "shape"),
        ],
    )
    model.opset_import.append(helper.make_opsetid("my.company", 1))
    return model


def test_unsupported_nodes_are_listed_all_at_once_with_reasons():
    problems = unsupported_nodes(_mixed_model(), get_target("raspberry-pi"))
    by_name = {name: (op, why) for name, op, why in problems}
    assert list(by_name) == ["custom", "topk", "resize_cubic", "l2"]
    assert by_name["custom"][0] == "my.company::MyFancyOp"
    assert "non-standard domain 'my.company'" in by_name["custom"][1]
    assert "edgeopt's tflite lowering for raspberry-pi does not write TopK yet" in by_name["topk"][1]
    assert "mode 'cubic'" in by_name["resize_cubic"][1] and "bilinear" in by_name["resize_cubic"][1]  # the lowering's own check says why


def test_tensorrt_runs_topk_and_cubic_resize_but_not_custom_ops():
    problems = unsupported_nodes(_mixed_model(), get_target("jetson-orin"))
    assert [(name, why.endswith("plugin for it)")) for name, _, why in problems] == [("custom", True)]


def test_onnxruntime_accepts_its_contrib_ops_but_not_unknown_domains():
    model = _model(
        [
            helper.make_node("FusedMatMul", ["a", "b"], ["m"], name="fused", domain="com.microsoft"),
            helper.make_node("MyFancyOp", ["m"], ["y"], name="custom", domain="my.company"),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    assert [name for name, _, _ in unsupported_nodes(model, get_target("onnxruntime-cpu"))] == ["custom"]


def test_float64_compute_is_unsupported_on_tensorrt():
    model = _model(
        [helper.make_node("Add", ["a", "a"], ["y"], name="add64")],
        [helper.make_tensor_value_info("a", TensorProto.DOUBLE, [2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])],
    )
    [(name, op, why)] = unsupported_nodes(model, get_target("jetson-orin"))
    assert (name, op) == ("add64", "Add") and "float64" in why
    assert unsupported_nodes(model, get_target("onnxruntime-cpu")) == []


def test_a_supported_model_has_no_unsupported_nodes():
    for target in ("jetson-orin", "raspberry-pi", "onnxruntime-cpu", "intel-openvino", "apple-ane"):
        assert unsupported_nodes(conv_gemm_model(), get_target(target)) == []


# ---------------------------------------------------------------------------------------- advice


def _depthwise_model(channel_scales: list[float]) -> onnx.ModelProto:
    weight = RNG.standard_normal((len(channel_scales), 1, 3, 3)).astype(np.float32)
    weight *= np.array(channel_scales, np.float32)[:, None, None, None]
    c = len(channel_scales)
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=c, pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )


def test_depthwise_weights_with_spread_out_channels_need_per_channel():
    model = _depthwise_model([1.0, 1.0, 0.01, 1.0])
    [advice] = quantization_advice(model, None)
    assert (advice.rule, advice.node) == ("depthwise-per-channel", "dw")
    assert "channel 2" in advice.message
    # Every target profile quantizes weights per channel, so there is nothing to advise there.
    assert quantization_advice(model, get_target("jetson-orin")) == []
    assert quantization_advice(_depthwise_model([1.0, 0.9, 1.1, 1.0]), None) == []


def _silu_model() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
            helper.make_node("Mul", ["x", "s"], ["y1"], name="silu"),
            helper.make_node("HardSwish", ["y1"], ["y"], name="hswish"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )


def test_silu_and_hardswish_are_flagged_for_symmetric_int8_activations():
    advice = quantization_advice(_silu_model(), get_target("jetson-orin"))
    assert [(a.rule, a.node) for a in advice] == [("swish-before-int8", "silu"), ("swish-before-int8", "hswish")]
    assert "SiLU/Swish" in advice[0].message and "jetson-orin" in advice[0].message
    assert "HardSwish output lies in [-0.375" in advice[1].message
    # TFLite's asymmetric int8 activations cover the skewed range with the zero point.
    assert quantization_advice(_silu_model(), get_target("raspberry-pi")) == []


def test_weight_outliers_are_flagged_with_the_channel():
    weight = RNG.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.05
    weight[5, 3, 1, 1] = 3.0  # ~60 standard deviations
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 3, 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    [advice] = quantization_advice(model, get_target("raspberry-pi"))
    assert (advice.rule, advice.node) == ("weight-outliers", "conv")
    assert "output channel 5" in advice.message
    assert advice.to_dict()["rule"] == "weight-outliers"
    assert quantization_advice(conv_gemm_model(), get_target("raspberry-pi")) == []


def test_qdq_model_gets_structural_advice_only():
    quantized = np.concatenate([np.full((1, 1, 3, 3), 127), np.full((3, 1, 3, 3), 1)]).astype(np.int8)
    model = _model(
        [
            helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
            helper.make_node("Mul", ["x", "s"], ["a"], name="silu"),
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq_w"),
            helper.make_node("Conv", ["a", "w"], ["y"], name="dw", group=4),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])],
        [
            numpy_helper.from_array(quantized, "wq"),
            numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
            numpy_helper.from_array(np.array(0, np.int8), "wz"),
        ],
    )
    [advice] = quantization_advice(model, get_target("jetson-orin"))
    assert (advice.rule, advice.node) == ("depthwise-per-tensor", "dw")
    assert "channel 1 uses 1.0 of 127 levels" in advice.message


def test_mobilenet_style_model_gets_hardswish_advice_for_tensorrt():
    advice = quantization_advice(zoo.mobilenet_v2_style(), get_target("jetson-orin"))
    assert any(a.rule == "swish-before-int8" for a in advice)


def _model_with_external_weight(folder: Path, location: str) -> Path:
    """A one-Gemm model whose weight W says its bytes live at `location` (external data)."""
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "location, link",
    [("../../etc/passwd", None), ("/etc/passwd", None), ("weights.bin", "/etc/passwd")],
    ids=["dotdot", "absolute", "link-inside-the-folder"],
)
def test_external_data_outside_the_model_folder_is_refused(location: str, link: str | None, tmp_path: Path):
    folder = tmp_path / "models" / "deep"
    path = _model_with_external_weight(folder, location)
    if link is not None:
        (folder / location).symlink_to(link)
    with pytest.raises(ModelLoadError, match=rf"initializer 'W' points outside the model's folder \({re.escape(location)}\)") as info:
        load_model(path)
    assert info.value.exit_code == 2


def test_a_dimension_stored_as_minus_one_counts_as_one_not_as_negative_macs() -> None:
    """Exporters (PP-OCR's) write -1 for a dynamic batch; a negative MAC count made the manifest invalid."""
    weight = onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert model_stats(model).macs == 4 * 3 * 3 * 3 * 6 * 6
