"""Structured pruning on small graphs made with onnx.helper: one structure per test.

The zero-equivalence oracle (issue 16): take the original model and zero the input-channel slices
of every layer that reads a channel the pruner removed, so those channels contribute nothing
downstream whatever their bias, BatchNorm shift or activation value. The pruned model's outputs
must equal that model's within float tolerance (|Δ| <= 1e-4 · max|ref| + 1e-5). Which slices are
"read" comes from the analysis (its consumer slices); what the pruned graph computes comes from the
surgery (sliced weights, rewritten Reshape/Split/Slice/group) — a coupling missed by the analysis
shows up as a shape error or an output mismatch. Each test also states what must have been pruned
and what must have been kept, and why.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.graph.qdq import build_time_array
from edgeopt.converters.graph.rewrite import NameScope, add_initializer
from edgeopt.converters.graph.session import run_model
from edgeopt.converters.passes import simplify
from edgeopt.converters.prune import PruneChannelsPass, PruneOptions, PruneReport, prune
from edgeopt.converters.prune.groups import analyze
from edgeopt.runtime.errors import OptionError

RNG = np.random.default_rng(0)


# -- the oracle --------------------------------------------------------------------------------


def zeroed_original(model: onnx.ModelProto, kept_atoms: np.ndarray, protected: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The original model with every removed channel's consumer input slices set to zero."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ir_model = ir.from_proto(copy)
    analysis = analyze(ir_model, protected)
    names = NameScope(ir_model.graph)
    for param in analysis.params:
        if not param.consumer:
            continue
        removed = ~kept_atoms[param.atoms]
        if not removed.any():
            continue
        weight = build_time_array(param.node.inputs[1]).copy()  # type: ignore[union-attr]
        index = [slice(None)] * weight.ndim
        index[param.axis] = removed  # type: ignore[call-overload]
        weight[tuple(index)] = 0
        param.node.replace_input_with(1, add_initializer(ir_model.graph, names, "zeroed", weight))
    return ir.to_proto(ir_model)


def assert_zero_equivalent(model: onnx.ModelProto, options: PruneOptions, feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune `model` (simplified) and check the oracle on `feeds`; returns the pruned model and report."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    step = PruneChannelsPass(options)
    result = step(ir.from_proto(copy))
    assert step.report is not None and step.kept_atoms is not None
    pruned = ir.to_proto(result.model)
    onnx.checker.check_model(pruned, full_check=_full_check_passes(model))
    reference = list(run_model(zeroed_original(model, step.kept_atoms, options.protected), feeds))
    candidate = list(run_model(pruned, feeds))
    for ref, got in zip(reference, candidate):
        for name, value in ref.items():
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-4 * float(np.abs(value).max()) + 1e-5, err_msg=name)
    for group in step.report["groups"]:
        for layer, (before, after) in group["widths"].items():
            assert after == before or after % options.channel_multiple == 0, (layer, before, after)
    return pruned, step.report


def _full_check_passes(model: onnx.ModelProto) -> bool:
    """Whether the original passes the checker with strict shape inference (simplified zoo models declare
    a dynamic batch on outputs that inference now finds to be 1): the pruned one must then too."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError:
        return False
    except onnx.shape_inference.InferenceError:
        return False
    return True


# -- graph making --------------------------------------------------------------------------------


def _weight(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


class GraphMaker:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def conv(self, x: str, name: str, c_in: int, c_out: int, kernel: int = 3, group: int = 1, relu: bool = True) -> str:
        w = self.const(f"{name}.w", _weight(c_out, c_in // group, kernel, kernel))
        b = self.const(f"{name}.b", RNG.standard_normal(c_out).astype(np.float32))
        y = self.node("Conv", [x, w, b], name, pads=[kernel // 2] * 4, group=group)
        return self.node("Relu", [y], f"{name}.relu") if relu else y

    def model(self, inputs: dict[str, list[int]], outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "prune_test",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_empty_tensor_value_info(o) for o in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        simplified, _ = simplify(model)
        return simplified


def _feeds(shapes: dict[str, list[int]], count: int = 2) -> list[dict[str, np.ndarray]]:
    return [{n: RNG.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(count)]


IMAGE = {"x": [1, 3, 8, 8]}


def _group_of(report: PruneReport, layer: str) -> dict:
    return next(g for g in report["groups"] if layer in g["layers"])


# -- structures ----------------------------------------------------------------------------------


def test_residual_add_ties_both_branches_and_prunes_them_together() -> None:
    g = GraphMaker()
    stem = g.conv("x", "stem", 3, 8)
    a = g.conv(stem, "a", 8, 32)
    b = g.conv(a, "b", 32, 32, relu=False)
    s = g.node("Add", [a, b], "residual")
    c = g.conv(s, "c", 32, 8)
    model = g.model(IMAGE, [c])
    _, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5, channel_multiple=8), _feeds(IMAGE))
    group = _group_of(report, "a")
    assert set(group["layers"]) == {"a", "b"} and group["widths"] == {"a": [32, 16], "b": [32, 16]}
    assert "first layer Conv 'stem' (reads a graph input) is protected" in _group_of(report, "stem")["why"]
    assert not _group_of(report, "c")["pruned"]  # reaches the graph output


def test_depthwise_conv_passes_channels_through_and_shrinks_its_group() -> None:
    g = GraphMaker()
    stem = g.conv("x", "stem", 3, 8)
    expand = g.conv(stem, "expand", 8, 48, kernel=1)
    depthwise = g.conv(expand, "depthwise", 48, 48, group=48)
    project = g.conv(depthwise, "project", 48, 8, kernel=1, relu=False)
    model = g.model(IMAGE, [project])
    pruned, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5), _feeds(IMAGE))
    assert _group_of(report, "expand")["widths"] == {"expand": [48, 24]}
    depthwise_node = next(n for n in pruned.graph.node if n.name == "depthwise")
    assert helper.get_attribute_value(next(a for a in depthwise_node.attribute if a.name == "group")) == 24


def test_grouped_conv_prunes_the_same_positions_in_every_group() -> None:
    """group 4: the channels a grouped conv reads and makes go four at a time (one per group)."""
    g = GraphMaker()
    stem = g.conv("x", "stem", 3, 8)
    a = g.conv(stem, "a", 8, 64)
    grouped = g.conv(a, "grouped", 64, 32, group=4)
    b = g.conv(grouped, "b", 32, 32)
    out = g.conv(b, "out", 32, 4, relu=False)
    model = g.model(IMAGE, [out])
    pruned, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5), _feeds(IMAGE))
    assert _group_of(report, "a")["widths"] == {"a": [64, 32]} and _group_of(report, "a")["channels"] == 16
    assert _group_of(report, "grouped")["widths"] == {"grouped": [32, 16]}
    grouped_node = next(n for n in pruned.graph.node if n.name == "grouped")
    weight = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == grouped_node.input[1])
    assert weight.shape[:2] == (16, 8)  # 4 groups of 4 filters, each reading 8 of the 32 kept channels


def test_concat_lays_channels_end_to_end_and_the_reader_loses_both_parts() -> None:
    g = GraphMaker()
    stem = g.conv("x", "stem", 3, 8)
    a = g.conv(stem, "a", 8, 16)
    b = g.conv(stem, "b", 8, 32)
    joined = g.node("Concat", [a, b, stem], "joined", axis=1)
    out = g.conv(joined, "out", 56, 4, relu=False)
    model = g.model(IMAGE, [out])
    _, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5, channel_multiple=8), _feeds(IMAGE))
    assert _group_of(report, "a")["widths"] == {"a": [16, 8]}
    assert _group_of(report, "b")["widths"] == {"b": [32, 16]}


def test_split_and_slice_map_channels_back_and_their_sizes_are_rewritten() -> None:
    """YOLOv8's C2f: a conv split in two halves, the second half in a residual, all concatenated."""
    g = GraphMaker()
    stem = g.conv("x", "stem", 3, 8)
    cv1 = g.conv(stem, "cv1", 8, 64, kernel=1)
    sizes = g.const("split_sizes", np.array([32, 32], dtype=np.int64))
    g.nodes.append(helper.make_node("Split", [cv1, sizes], ["half0", "half1"], name="split", axis=1))
    m = g.conv(g.conv("half1", "m.cv1", 32, 32), "m.cv2", 32, 32)
    residual = g.node("Add", ["half1", m], "m.add")
    sliced = g.node(
        "Slice", [cv1, g.const("s0", np.array([16])), g.const("s1", np.array([48])), g.const("s2", np.array([1]))], "sliced"
    )
    joined = g.node("Concat", ["half0", "half1", residual, sliced], "joined", axis=1)
    out = g.conv(joined, "cv2", 128, 4, kernel=1, relu=False)
    model = g.model(IMAGE, [out])
    pruned, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5, channel_multiple=8), _feeds(IMAGE))
    group = _group_of(report, "cv1")
    assert set(group["layers"]) == {"cv1", "m.cv2"} and group["widths"]["cv1"] == [64, 32]
    split_sizes = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name.startswith("split_sizes"))
    assert split_sizes.tolist() == [16, 16]


def test_flatten_and_reshape_into_gemm_remove_whole_spatial_blocks() -> None:
    g = GraphMaker()
    stem = g.conv("x", "stem", 3, 8)
    a = g.conv(stem, "a", 8, 32)
    pooled = g.node("MaxPool", [a], "pool", kernel_shape=[2, 2], strides=[2, 2])
    flat = g.node("Flatten", [pooled], "flat", axis=1)
    hidden = g.node("Gemm", [flat, g.const("fc1.w", _weight(32 * 16, 64).T.copy().T), g.const("fc1.b", np.zeros(64, np.float32))], "fc1")
    b = g.conv(stem, "b", 8, 16)
    reshaped = g.node("Reshape", [b, g.const("to_rows", np.array([1, -1], dtype=np.int64))], "rows")
    hidden2 = g.node("MatMul", [reshaped, g.const("fc2.w", _weight(16 * 64, 64))], "fc2")
    relu = g.node("Relu", [g.node("Add", [hidden, hidden2], "sum")], "sum.relu")
    logits = g.node("Gemm", [relu, g.const("fc3.w", _weight(10, 64)), g.const("fc3.b", np.zeros(10, np.float32))], "logits", transB=1)
    model = g.model(IMAGE, [logits])
    pruned, report = assert_zero_equivalent(model, PruneOptions(ratio=0.25, channel_multiple=8), _feeds(IMAGE))
    assert _group_of(report, "a")["widths"] == {"a": [32, 24]}
    assert _group_of(report, "b")["widths"] == {"b": [16, 16]}  # 12 rounds up to 16
    assert set(_group_of(report, "fc1")["layers"]) == {"fc1", "fc2"} and _group_of(report, "fc1")["widths"]["fc1"] == [64, 48]
    fc1 = next(n for n in pruned.graph.node if n.name == "fc1")
    assert next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == fc1.input[1]).shape == (24 * 16, 48)


def test_attention_prunes_whole_heads_and_feed_forward_neurons() -> None:
    """Q/K/V reshaped into 4 heads of 8: a head goes whole, from Q, K and V together, and the merged
    context loses its channels in the output projection; the residual stream (tied to the first
    layer, the embedding projection) is kept."""
    tokens, width, heads, hidden = 6, 32, 4, 128
    g = GraphMaker()

    def project(src: str, name: str, n_in: int, n_out: int) -> str:
        y = g.node("MatMul", [src, g.const(f"{name}.w", _weight(n_in, n_out))], name)
        return g.node("Add", [y, g.const(f"{name}.b", RNG.standard_normal(n_out).astype(np.float32))], f"{name}.add")

    x = project("x", "embed", width, width)
    split_heads = g.const("heads", np.array([1, tokens, heads, width // heads], dtype=np.int64))
    q, k, v = (
        g.node("Transpose", [g.node("Reshape", [project(x, n, width, width), split_heads], f"{n}.heads")], f"{n}.t", perm=[0, 2, 1, 3])
        for n in ("q", "k", "v")
    )
    kt = g.node("Transpose", [k], "kt", perm=[0, 1, 3, 2])
    scores = g.node("Mul", [g.node("MatMul", [q, kt], "scores"), g.const("scale", np.array(8**-0.5, dtype=np.float32))], "scaled")
    attention = g.node("Softmax", [scores], "attention", axis=-1)
    context = g.node("Transpose", [g.node("MatMul", [attention, v], "context")], "context.t", perm=[0, 2, 1, 3])
    merged = g.node("Reshape", [context, g.const("merge", np.array([1, tokens, width], dtype=np.int64))], "merged")
    h = g.node("Add", [x, project(merged, "o", width, width)], "h")
    ffn = g.node("Relu", [project(h, "ffn.up", width, hidden)], "ffn.act")
    out = g.node("Add", [h, project(ffn, "ffn.down", hidden, width)], "out")
    shapes = {"x": [1, tokens, width]}
    model = g.model(shapes, [out])
    pruned, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5, channel_multiple=8), _feeds(shapes))
    heads_group = _group_of(report, "q")
    assert set(heads_group["layers"]) == {"q", "k", "v"} and heads_group["channels"] == heads
    assert heads_group["widths"] == {"q": [32, 16], "k": [32, 16], "v": [32, 16]}
    shapes_after = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer}
    reshape = next(n for n in pruned.graph.node if n.name == "q.heads")
    assert shapes_after[reshape.input[1]] == [1, tokens, 2, width // heads]  # two heads left
    assert _group_of(report, "ffn.up")["widths"] == {"ffn.up": [hidden, hidden // 2]}
    assert not _group_of(report, "o")["pruned"]  # the residual stream, tied to the protected embedding


# -- options and refusals ------------------------------------------------------------------------


def _small_cnn() -> onnx.ModelProto:
    g = GraphMaker()
    stem = g.conv("x", "stem", 3, 8)
    out = g.conv(g.conv(g.conv(stem, "a", 8, 32), "b", 32, 24), "out", 24, 4, relu=False)
    return g.model(IMAGE, [out])


def test_ratio_zero_returns_the_same_graph() -> None:
    model = _small_cnn()
    result = prune(model, PruneOptions(ratio=0.0))
    assert result.model is model and not result.changed
    assert result.report["groups_found"] == 4 and result.report["macs_after"] == result.report["macs_before"]


def test_kept_widths_round_up_to_the_multiple_and_narrow_groups_stay() -> None:
    model = _small_cnn()
    _, report = assert_zero_equivalent(model, PruneOptions(ratio=0.6, channel_multiple=16), _feeds(IMAGE))
    assert _group_of(report, "a")["widths"] == {"a": [32, 16]}  # 12.8 -> 16
    assert _group_of(report, "b")["widths"] == {"b": [24, 24]}  # narrower than two multiples of 16
    assert "narrower than two multiples of 16" in _group_of(report, "b")["why"][0]


def test_named_layers_are_protected_and_global_ranking_prunes_across_groups() -> None:
    model = _small_cnn()
    _, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5, protected=("a",)), _feeds(IMAGE))
    assert _group_of(report, "a")["widths"] == {"a": [32, 32]} and "protected by name" in _group_of(report, "a")["why"][0]
    _, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5, global_ranking=True), _feeds(IMAGE))
    removed = sum(before - after for g in report["groups"] for before, after in g["widths"].values())
    assert removed == 28  # half of the 56 channels of a and b, wherever they rank lowest


def test_a_quantized_model_is_refused_with_the_advice_to_prune_first() -> None:
    qat = onnx.load("tests/data/digits_qat.onnx")
    with pytest.raises(OptionError, match="QuantizeLinear/DequantizeLinear") as error:
        prune(qat, PruneOptions(ratio=0.3))
    assert "prune the float model before quantizing" in (error.value.hint or "")
