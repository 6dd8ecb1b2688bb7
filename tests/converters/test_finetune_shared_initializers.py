"""Fine-tuning a QDQ graph whose equal constants were deduplicated: one initializer, several readers.

ONNX lets any number of nodes read one initializer, and deduplicating equal constants (onnx_ir's
DeduplicateInitializersPass here; yolov8n's onnxruntime-cpu graph met it as its DFL conv's zero int32
bias, which is also that bias's zero point) makes such graphs from quantized ones. The graph made here
has three convs on one quantized input: a and b with equal weights and biases, c with twice a's weights
(the same int8 codes at twice the per-channel scale) and a zero bias. After deduplication a's and b's
weight DequantizeLinears read one int8 initializer, one scale and one zero point, c's reads the same
int8 initializer with its own scale; a's and b's biases are one int32 initializer; c's zero bias is one
initializer with every bias's zero point. The trainer refused it ("read by more than one node").
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import DeduplicateInitializersPass

torch = pytest.importorskip("torch")

from edgeopt.converters.data import model_input_specs, open_dataset  # noqa: E402
from edgeopt.converters.finetune import QuantizerMode, TrainableGraph  # noqa: E402
from edgeopt.converters.finetune.data import load_training_data  # noqa: E402
from edgeopt.converters.finetune.train import FinetuneOptions, finetune  # noqa: E402
from edgeopt.converters.finetune.writeback import write_back  # noqa: E402
from edgeopt.converters.graph.session import run_model  # noqa: E402
from edgeopt.converters.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeopt.runtime.kinds import Effort, FinetuneMode  # noqa: E402
from edgeopt.targets import get_target  # noqa: E402

SCHEME = get_target("onnxruntime-cpu").scheme_for(None)
OUTPUTS = ("ya", "yb", "yc")


def _three_convs() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, 4).astype(np.float32)
    initializers = [
        numpy_helper.from_array(weight, "wa"), numpy_helper.from_array(weight.copy(), "wb"), numpy_helper.from_array(2 * weight, "wc"),
        numpy_helper.from_array(bias, "ba"), numpy_helper.from_array(bias.copy(), "bb"), numpy_helper.from_array(np.zeros(4, np.float32), "bc"),
    ]
    nodes = [helper.make_node("Conv", ["x", f"w{c}", f"b{c}"], [f"y{c}"], name=f"conv_{c}", pads=[1, 1, 1, 1]) for c in "abc"]
    graph = helper.make_graph(
        nodes, "three_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 8, 8]) for name in OUTPUTS], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def graphs() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(fp32, the deduplicated QDQ graph)."""
    fp32 = _three_convs()
    qdq = quantize(fp32, SCHEME, open_dataset(_samples(16, 0), model_input_specs(fp32)), QuantizeOptions(effort=Effort.FAST)).model
    model = ir.from_proto(qdq)
    DeduplicateInitializersPass()(model)
    return fp32, ir.to_proto(model)


def _readers(model: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.name, index))
    return readers


def _weight_dq(model: onnx.ModelProto, conv: str, index: int = 1) -> onnx.NodeProto:
    consumer = next(n for n in model.graph.node if n.name == conv)
    return next(n for n in model.graph.node if n.output[0] == consumer.input[index])


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_the_deduplicated_graph_shares_weight_and_bias_initializers(graphs) -> None:
    _, qdq = graphs
    weights = {c: _weight_dq(qdq, f"conv_{c}") for c in "abc"}
    biases = {c: _weight_dq(qdq, f"conv_{c}", 2) for c in "abc"}
    assert len({dq.input[0] for dq in weights.values()}) == 1, "one int8 initializer for the three weights"
    assert weights["a"].input[1] == weights["b"].input[1] != weights["c"].input[1], "a and b share a scale, c has twice it"
    assert biases["a"].input[0] == biases["b"].input[0] != biases["c"].input[0]
    assert all(dq.input[2] == biases["c"].input[0] for dq in biases.values()), "c's zero bias is every bias's zero point"


def test_readers_that_dequantize_alike_train_one_latent_others_their_own(graphs) -> None:
    _, qdq = graphs
    student = TrainableGraph(qdq, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
    records = {(r.kind, r.dequantize_nodes): r for r in student.quant_params() if r.kind in ("weight", "bias")}
    names = {c: (_weight_dq(qdq, f"conv_{c}").name, _weight_dq(qdq, f"conv_{c}", 2).name) for c in "abc"}
    assert set(records) == {
        ("weight", (names["a"][0], names["b"][0])), ("weight", (names["c"][0],)),
        ("bias", (names["a"][1], names["b"][1])), ("bias", (names["c"][1],)),
    }
    assert len(student.latent) == 4
    tied = records[("weight", (names["a"][0], names["b"][0]))]
    assert student.quantizer_of(names["a"][0]) is student.quantizer_of(names["b"][0]) is tied.quantizer
    # the graph runs in the interpreter as on ONNX Runtime
    _computes_as_onnx_runtime(TrainableGraph(qdq, quantizers=QuantizerMode.FROZEN, scheme=SCHEME), qdq, seed=1)


def _computes_as_onnx_runtime(graph: TrainableGraph, model: onnx.ModelProto, seed: int) -> None:
    """`graph` in torch gives what ONNX Runtime gives for `model`, on 8 samples."""
    samples = _samples(8, seed)
    for sample, reference in zip(samples, run_model(model, samples)):
        with torch.no_grad():
            ours = graph({"x": torch.from_numpy(sample["x"])})
        for name in OUTPUTS:
            np.testing.assert_allclose(ours[name].numpy(), reference[name], atol=1e-6)


def test_write_back_writes_a_shared_initializer_once_and_unties_readers_whose_values_differ(graphs) -> None:
    _, qdq = graphs
    student = TrainableGraph(qdq, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
    untouched, report = write_back(qdq, student)
    assert report["initializers_untied"] == 0
    assert {k: v.tobytes() for k, v in _initializers(untouched).items()} == {k: v.tobytes() for k, v in _initializers(qdq).items()}

    records = {r.dequantize_nodes[0]: r for r in student.quant_params() if r.kind in ("weight", "bias")}
    a, c = _weight_dq(qdq, "conv_a"), _weight_dq(qdq, "conv_c")
    bias_c = _weight_dq(qdq, "conv_c", 2)
    with torch.no_grad():  # as training would move them: c's weight and zero bias, not a's and b's
        records[c.name].latent[0].add_(3 * records[c.name].quantizer.scale[0])
        records[bias_c.name].latent.add_(torch.from_numpy(3 * student.bias_scale(records[bias_c.name])))  # on its int32 grid
    written, report = write_back(qdq, student)
    stored, readers = _initializers(written), _readers(written)
    assert report["initializers_untied"] == 2  # c's codes and c's bias, each into a copy
    new = {c2: _weight_dq(written, f"conv_{c2}") for c2 in "abc"}
    assert new["a"].input[0] == new["b"].input[0] == a.input[0], "a and b keep the stored codes and the name"
    assert new["c"].input[0] != a.input[0] and readers[new["c"].input[0]] == [(c.name, 0)]
    with torch.no_grad():
        assert np.array_equal(stored[new["c"].input[0]], records[c.name].quantizer.quantize(records[c.name].latent).numpy())
        assert np.array_equal(stored[a.input[0]], records[a.name].quantizer.quantize(records[a.name].latent).numpy())
    zero_bias = bias_c.input[0]
    assert not stored[zero_bias].any(), "the zero points that shared c's zero bias stay 0"
    assert all(_weight_dq(written, f"conv_{c2}", 2).input[2] == zero_bias for c2 in "abc")
    assert stored[_weight_dq(written, "conv_c", 2).input[0]].any()
    onnx.checker.check_model(written)

    # the written graph computes on ONNX Runtime what the student computed in training
    _computes_as_onnx_runtime(student, written, seed=2)


def test_qad_trains_the_deduplicated_graph_and_ships_what_it_trained(graphs) -> None:
    fp32, qdq = graphs
    options = FinetuneOptions(mode=FinetuneMode.QAD, epochs=1, batch_size=8, threads=1, lr=1e-3)
    result = finetune(qdq, fp32, load_training_data(_samples(64, 3), model_input_specs(fp32)), options, scheme=SCHEME)
    written = result.model
    assert result.report["best_epoch"] == 1 and result.report["writeback"]["activation_scales_changed"] > 0, "the epoch trained and shipped"
    new = {c: _weight_dq(written, f"conv_{c}") for c in "ab"}
    assert new["a"].input[0] == new["b"].input[0] and new["a"].input[1] == new["b"].input[1], "a and b trained one latent, one scale"
    frozen = TrainableGraph(written, quantizers=QuantizerMode.FROZEN, scheme=SCHEME)
    samples = _samples(4, 4)
    for sample, reference in zip(samples, run_model(written, samples)):
        with torch.no_grad():
            ours = frozen({"x": torch.from_numpy(sample["x"])})
        for name in OUTPUTS:
            np.testing.assert_allclose(ours[name].numpy(), reference[name], atol=1e-6)
