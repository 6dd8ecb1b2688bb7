"""Write-back: what a `TrainableGraph` holds goes into the same QDQ graph, exactly as training computed it.

The digits model quantized for onnxruntime-cpu (AVX2: 7-bit pairwise weights in [-64, 64], int32
biases, uint8 asymmetric activations) stands in for a trained one: its latent weights, scales and
zero points are moved by hand, as training would move them, so every kind of value changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from edgeopt.converters.data import model_input_specs, open_dataset  # noqa: E402
from edgeopt.converters.finetune import QuantizerMode, TrainableGraph  # noqa: E402
from edgeopt.converters.finetune.writeback import write_back  # noqa: E402
from edgeopt.converters.graph.session import run_model  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.converters.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeopt.runtime.kinds import Effort  # noqa: E402
from edgeopt.targets import get_target  # noqa: E402

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SCHEME = get_target("onnxruntime-cpu").scheme_for(None)


@pytest.fixture(scope="module")
def quantized() -> onnx.ModelProto:
    fp32, _ = simplify(onnx.load(DIGITS / "model.onnx"))
    calibration = open_dataset(DIGITS / "calib.npz", model_input_specs(fp32))
    return quantize(fp32, SCHEME, calibration, QuantizeOptions(effort=Effort.FAST)).model


def _moved(model: onnx.ModelProto) -> TrainableGraph:
    """The graph with every trainable value moved as training would: latents by up to a step and a
    half (some past the grid's end), scales by a few percent, asymmetric zero points by one."""
    graph = TrainableGraph(model, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for record in graph.quant_params():
            quantizer = record.quantizer
            if record.kind == "weight":
                step = quantizer.scale.reshape([-1] + [1] * (record.latent.dim() - 1))
                record.latent.add_(step * (3 * torch.rand(record.latent.shape, generator=generator) - 1.5))
                record.latent[0].mul_(4.0)  # the first output channel far past [-64, 64]: must be clamped
            elif record.kind == "bias":
                record.latent.add_(0.01 * torch.randn(record.latent.shape, generator=generator))
            if quantizer is not None and quantizer.trains_scale:
                quantizer.scale.mul_(1.0 + 0.05 * torch.rand(quantizer.scale.shape, generator=generator))
                if quantizer.zero_point.requires_grad:
                    quantizer.zero_point.add_(1.0)
    return graph


@pytest.fixture(scope="module")
def written(quantized: onnx.ModelProto) -> tuple[TrainableGraph, onnx.ModelProto, dict]:
    graph = _moved(quantized)
    model, report = write_back(quantized, graph)
    return graph, model, report


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_weights_hold_the_trained_codes_and_every_scale_and_zero_point_its_trained_value_bit_for_bit(written) -> None:
    graph, model, report = written
    stored = _initializers(model)
    records = graph.quant_params()
    with torch.no_grad():
        for record in records:
            if record.kind == "weight":
                codes = record.quantizer.quantize(record.latent).numpy()
                assert stored[record.latent_initializer].dtype == np.int8
                assert np.array_equal(stored[record.latent_initializer], codes), record.name
            if record.kind in ("weight", "activation"):
                for name in record.scale_initializers:
                    assert stored[name].tobytes() == record.quantizer.scale_value().reshape(stored[name].shape).tobytes(), name
                for name in record.zero_point_initializers:
                    assert np.array_equal(stored[name].astype(np.int64).reshape(-1), record.quantizer.zero_point_value().reshape(-1)), name
    kinds = {r.kind for r in records}
    assert {"weight", "activation", "bias"} <= kinds
    assert report["weights"] == 3 and report["activations"] == 6 and report["biases"] == 3
    assert report["weight_values_changed"] > 0.5 * report["weight_values"]
    assert report["activation_scales_changed"] > 0 and report["zero_points_changed"] > 0 and report["weight_scales_changed"] > 0


def test_weights_stay_on_the_quantizers_grid_and_round_half_to_even(written, quantized) -> None:
    """AVX2's 7-bit grid [-64, 64] holds for every weight, also the channel pushed 4x past it; ties go to even."""
    graph, model, report = written
    stored = _initializers(model)
    weights = [r for r in graph.quant_params() if r.kind == "weight"]
    for record in weights:
        assert (record.spec.qmin, record.spec.qmax) == (-64, 64)
        codes = stored[record.latent_initializer]
        assert codes.min() >= -64 and codes.max() <= 64
        assert np.abs(codes[0]).max() == 64  # the channel past the grid is clamped at its end
    assert report["weight_values_at_range_end"] >= sum(int(np.count_nonzero(np.abs(stored[r.latent_initializer]) == 64)) for r in weights)
    # ties: a latent exactly halfway between two codes rounds to the even one, as ONNX Runtime's QuantizeLinear
    tie_graph = TrainableGraph(quantized, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
    record = next(r for r in tie_graph.quant_params() if r.kind == "weight")
    with torch.no_grad():
        record.quantizer.scale.fill_(2.0**-6)  # a power of two: latent / scale is exactly the half below
        halves = torch.arange(record.latent.numel(), dtype=torch.float32).reshape(record.latent.shape) % 9 - 4.5  # -4.5 ... 3.5
        record.latent.copy_(halves * 2.0**-6)
    codes = _initializers(write_back(quantized, tie_graph)[0])[record.latent_initializer]
    expected = np.round(halves.numpy()).astype(np.int8)  # half to even: -4.5 -> -4, -3.5 -> -4, 0.5 -> 0, 1.5 -> 2
    assert np.array_equal(codes, expected), f"{int(np.count_nonzero(codes != expected))} codes round otherwise"


def test_int32_biases_are_rederived_from_the_trained_input_and_weight_scales(written) -> None:
    graph, model, _ = written
    stored = _initializers(model)
    for record in (r for r in graph.quant_params() if r.kind == "bias"):
        activation, weight = (graph.quantizer_of(name).scale_value() for name in record.bias_sources)
        scale = (activation.astype(np.float32) * weight.astype(np.float32)).astype(np.float32)
        assert stored[record.scale_initializers[0]].tobytes() == scale.tobytes()
        expected = np.round(record.latent.detach().numpy().astype(np.float64) / scale.astype(np.float64))
        assert stored[record.latent_initializer].dtype == np.int32
        assert np.array_equal(stored[record.latent_initializer], expected.astype(np.int32))


def test_only_initializer_values_change_nodes_names_types_and_shapes_stay(written, quantized) -> None:
    _, model, _ = written
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in quantized.graph.node
    ]
    before, after = _initializers(quantized), _initializers(model)
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == {k: (v.dtype, v.shape) for k, v in before.items()}
    onnx.checker.check_model(model)


def test_the_frozen_interpreter_on_the_written_back_graph_matches_onnx_runtime(written) -> None:
    """The written-back graph means on ONNX Runtime what the trained graph meant in training."""
    _, model, _ = written
    images = np.load(DIGITS / "eval.npz")["image"][:32]
    samples = [{"image": images[i : i + 1]} for i in range(len(images))]
    reference = [out["logits"] for out in run_model(model, samples)]
    frozen = TrainableGraph(model, quantizers=QuantizerMode.FROZEN, scheme=SCHEME)
    with torch.no_grad():
        ours = [frozen({"image": torch.from_numpy(s["image"])})["logits"].numpy() for s in samples]
    scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "logits_scale")))
    steps = max(float(np.abs(a - b).max()) for a, b in zip(ours, reference)) / scale
    assert steps == 0.0, f"{steps} output steps apart"


def test_float_initializers_that_trained_outside_any_quantizer_are_written_too() -> None:
    """OpenVINO's scheme keeps digits' biases float: they train as plain parameters, and the graph that
    ships must hold their trained values (it held the quantized-time ones)."""
    scheme = get_target("intel-openvino").scheme_for(None)
    fp32, _ = simplify(onnx.load(DIGITS / "model.onnx"))
    calibration = open_dataset(DIGITS / "calib.npz", model_input_specs(fp32))
    model = quantize(fp32, scheme, calibration, QuantizeOptions(effort=Effort.FAST)).model
    graph = TrainableGraph(model, quantizers=QuantizerMode.LEARNED, scheme=scheme)
    floats = graph.float_parameters()
    assert floats, "the OpenVINO scheme's float biases should train outside any quantizer"
    with torch.no_grad():
        for parameter in floats.values():
            parameter.add_(0.01)
    written, report = write_back(model, graph)
    stored = _initializers(written)
    for name, parameter in floats.items():
        assert stored[name].tobytes() == parameter.detach().numpy().astype(stored[name].dtype).tobytes(), name
    assert report["float_tensors"] == len(floats) and report["float_values_changed"] == sum(p.numel() for p in floats.values())


@pytest.mark.parametrize("freeze", [False, True], ids=["learned", "frozen_by_its_grid"])
def test_an_untrained_subnormal_weight_scale_its_codes_and_its_saturated_bias_are_written_back_bit_for_bit(freeze) -> None:
    """PP-OCR rec ships dead conv channels with scales ~2.6e-42 (subnormal) and int32 biases near ±2³¹ on them.
    The scales left floored at float32's smallest normal, their codes re-derived from the floor (q·s / tiny
    rounds to 0), and a bias above 2²⁴ came back as a neighbouring integer (its float32 latent stands for
    several): on ppocr_rec 36 scales, 7624 weight codes and 16 bias codes changed with nothing trained."""
    from onnx import TensorProto, helper

    from edgeopt.converters.finetune.train import freeze_weight_grids

    weight_scale = np.array([0.01, 2.6e-42, 1e-40], np.float32)  # one live channel, two dead ones with subnormal scales
    input_scale = np.float32(0.02)
    initializers = [
        numpy_helper.from_array(np.array([[[[60]], [[-20]]], [[[90]], [[45]]], [[[-127]], [[3]]]], np.int8), "codes"),
        numpy_helper.from_array(weight_scale, "scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "zero"),
        numpy_helper.from_array(np.array(input_scale), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(np.array([1234, -2145336091, 2145336181], np.int32), "bias_codes"),  # past 2**24: not every integer is a float32
        numpy_helper.from_array(input_scale * weight_scale, "bias_scale"),
        numpy_helper.from_array(np.zeros(3, np.int32), "bias_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["codes", "scale", "zero"], ["weight"], name="dq", axis=0),
        helper.make_node("DequantizeLinear", ["bias_codes", "bias_scale", "bias_zero"], ["bias"], name="dq_bias", axis=0),
        helper.make_node("Conv", ["xd", "weight", "bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "dead_channels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    student = TrainableGraph(model, quantizers=QuantizerMode.LEARNED)
    assert {r.kind for r in student.quant_params()} == {"activation", "weight", "bias"}
    if freeze:
        freeze_weight_grids(student)
    written, report = write_back(model, student)
    before, after = _initializers(model), _initializers(written)
    assert {k: v.tobytes() for k, v in after.items()} == {k: v.tobytes() for k, v in before.items()}
    assert report["weight_scales_changed"] == 0 and report["weight_values_changed"] == 0 and report["max_relative_scale_change"] == 0.0
    # a trained bias is re-derived; a trained scale is still floored at the smallest normal float, not at a subnormal
    weight = next(r for r in student.quant_params() if r.kind == "weight")
    bias = next(r for r in student.quant_params() if r.kind == "bias")
    with torch.no_grad():
        bias.latent[0] += 2 * float(input_scale * weight_scale[0])
        assert _initializers(write_back(model, student)[0])["bias_codes"].tolist() == [1236, -2145336091, 2145336181]
        weight.quantizer.scale[0] = -1.0
    assert weight.quantizer.scale_value()[0] == np.finfo(np.float32).tiny
