"""Bring an ONNX model into the static, constant-folded form the TFLite lowering walks.

TFLite wants static shapes and constant weights, so before any op is lowered this module fixes the
input shapes, folds every node whose inputs are all known (shape arithmetic, ConstantOfShape weights,
Unsqueeze of constants ...), folds BatchNormalization into the Conv before it, recognises the erf
GELU pattern, and records the shape and dtype of every remaining value.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.errors import LoweringError, ModelLoadError

__all__ = ["Node", "PreparedGraph", "prepare_graph"]

log = logging.getLogger(__name__)

_MIN_OPSET = 13
# Q/DQ stay as nodes: they carry the int8 meaning of the tensors they touch.
_NEVER_FOLD = {"DequantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}


@dataclass
class Node:
    """One ONNX node in a form the lowering can rewrite freely (inputs "" mean omitted)."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""


@dataclass
class PreparedGraph:
    """The model as the lowering sees it: static shapes, folded constants, remaining nodes in order."""

    nodes: list[Node]
    constants: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    inputs: list[str]
    outputs: list[str]
    opset: int
    folded_nodes: int = 0
    # Values whose static shape comes from one ONNX Runtime run on zeros (shape inference left them
    # symbolic): right for shape arithmetic, an assumption where a size depends on computed values.
    probed: set[str] = field(default_factory=set)
    fused: dict[str, int] = field(default_factory=dict)

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        return users

    def producer(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _static_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None) -> list[onnx.ValueInfoProto]:
    """Copies of the graph inputs pinned to static shapes (user shapes first, symbolic dims become 1)."""
    initializers = {i.name for i in model.graph.initializer}
    values: list[onnx.ValueInfoProto] = []
    for original in model.graph.input:
        if original.name in initializers:
            continue
        value = onnx.ValueInfoProto()
        value.CopyFrom(original)
        values.append(value)
        dims = value.type.tensor_type.shape.dim
        wanted = (input_shapes or {}).get(value.name)
        if wanted is not None:
            if len(wanted) != len(dims):
                raise LoweringError(
                    f"input '{value.name}' has rank {len(dims)} but --input-shape gives {tuple(wanted)}",
                    hint="pass one size per dimension of the ONNX input",
                )
            for dim, size in zip(dims, wanted):
                dim.Clear()
                dim.dim_value = int(size)
            continue
        for dim in dims:
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                log.info("input '%s': dynamic dim '%s' fixed to 1 for TFLite", value.name, dim.dim_param)
                dim.Clear()
                dim.dim_value = 1
    return values


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer as numpy; raw little-endian float/int data is read without the generic converter's copies."""
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tensor.HasField("raw_data") and sys.byteorder == "little" and dtype.kind in "fiub" and tensor.data_type != onnx.TensorProto.BFLOAT16:
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _gather_elements(data: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    """ONNX GatherElements. onnx.reference's kernel (onnx 1.23) goes through np.choose, which takes at
    most 64 choices, and its 2-D fallback reads only column 0 of the indices: BERT's token-type Gather
    over a [1, 512] buffer folded to the wrong shape."""
    axis %= data.ndim
    indices = np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64)
    return np.take_along_axis(data, indices, axis=axis)


def _run_node(node: onnx.NodeProto, values: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "GatherElements" and node.domain in ("", "ai.onnx"):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return [_gather_elements(values[0], values[1], axis)]
    inputs = [
        helper.make_tensor_value_info(f"in{i}" if name else "", helper.np_dtype_to_tensor_dtype(v.dtype) if v is not None else 0, None)
        for i, (name, v) in enumerate(zip(node.input, values))
    ]
    single = helper.make_node(
        node.op_type, [f"in{i}" if name else "" for i, name in enumerate(node.input)],
        [f"out{i}" for i in range(len(node.output))], domain=node.domain,
    )
    single.attribute.extend(node.attribute)
    graph = helper.make_graph(
        [single], "fold", [i for i in inputs if i.name], [helper.make_tensor_value_info(f"out{i}", 0, None) for i in range(len(node.output))]
    )
    evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    feeds = {f"in{i}": v for i, (name, v) in enumerate(zip(node.input, values)) if name}
    return [np.asarray(r) for r in evaluator.run(None, feeds)]


def _fold_constants(
    nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], opset: int, shapes: dict[str, tuple[int, ...]]
) -> tuple[list[onnx.NodeProto], int]:
    remaining: list[onnx.NodeProto] = []
    folded = 0
    for node in nodes:
        if node.op_type == "Constant":
            constants[node.output[0]] = _run_node(node, [], opset)[0]
            folded += 1
            continue
        if node.op_type == "Shape" and node.input[0] in shapes and not node.attribute:
            constants[node.output[0]] = np.asarray(shapes[node.input[0]], dtype=np.int64)
            folded += 1
            continue
        known = all((not name) or name in constants for name in node.input)
        if known and node.op_type not in _NEVER_FOLD and node.domain in ("", "ai.onnx"):
            results = _run_node(node, [constants.get(name) if name else None for name in node.input], opset)
            for out, value in zip(node.output, results):
                constants[out] = value
            folded += 1
            continue
        remaining.append(node)
    return remaining, folded


def _without_negative_dims(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy whose negative dims are unknown: some exporters (Paddle) declare dynamic dims as dim_value -1,
    which shape inference would keep, and a TFLite tensor of size -1 is rejected by LiteRT."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    for dim in copy.type.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value < 0:
            dim.Clear()
    return copy


def _infer_shapes(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], inputs: list[onnx.ValueInfoProto]
) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype], set[str]]:
    """Static shape and dtype of every value, and the names whose shape only a probe run found."""
    used = {name for node in nodes for name in node.input}
    # Large weights enter as typed inputs: inference needs their shapes, not a serialized copy.
    small = {n: v for n, v in constants.items() if n in used and v.size <= 4096}
    large = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in constants.items() if n in used and n not in small
    ]
    graph = helper.make_graph(
        nodes,
        "prepared",
        [*inputs, *large],
        [_without_negative_dims(o) for o in model.graph.output],
        [numpy_helper.from_array(value, name) for name, value in small.items()],
    )
    folded = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(folded, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type:
            dtypes[value.name] = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        dims = tensor_type.shape.dim
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    missing = [out for node in nodes for out in node.output if out and out not in shapes]
    if missing:
        shapes.update(_shapes_by_running(folded, missing, dtypes))
    return shapes, dtypes, set(missing)


def _shapes_by_running(model: onnx.ModelProto, names: list[str], dtypes: dict[str, np.dtype]) -> dict[str, tuple[int, ...]]:
    """Shapes shape inference left symbolic, from one ONNX Runtime run on zeros."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        # the typed inputs include large int8/int32 constants of a QDQ graph, not only float activations
        dtype = helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(value.type[len("tensor(") : -1].upper()))
        feeds[value.name] = np.zeros(value.shape, dtype=dtype)
    results = session.run(names, feeds)
    for name, result in zip(names, results):
        dtypes.setdefault(name, result.dtype)
    return {name: tuple(result.shape) for name, result in zip(names, results)}


def _fold_batchnorm(graph: PreparedGraph) -> None:
    """Fold BatchNormalization into the float Conv that alone feeds it (the usual export pattern)."""
    producer = graph.producer()
    consumers = graph.consumers()
    kept: list[Node] = []
    removed: set[int] = set()
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or len(node.outputs) > 1 and any(node.outputs[1:]):
            continue
        conv = producer.get(node.inputs[0])
        if conv is None or conv.op_type != "Conv" or len(consumers.get(conv.outputs[0], [])) != 1:
            continue
        if conv.outputs[0] in graph.outputs or conv.inputs[1] not in graph.constants:
            continue
        if not all(name in graph.constants for name in node.inputs[1:5]):
            continue
        gamma, beta, mean, var = (graph.constants[name].astype(np.float64) for name in node.inputs[1:5])
        factor = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        weight = graph.constants[conv.inputs[1]].astype(np.float64)
        bias = graph.constants[conv.inputs[2]].astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] else 0.0
        weight_name, bias_name = f"{conv.name}.bn_folded_weight", f"{conv.name}.bn_folded_bias"
        graph.constants[weight_name] = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        graph.constants[bias_name] = ((bias - mean) * factor + beta).astype(np.float32)
        conv.inputs = [conv.inputs[0], weight_name, bias_name]
        conv.outputs = [node.outputs[0]]
        removed.add(id(node))
    kept = [n for n in graph.nodes if id(n) not in removed]
    if removed:
        graph.fused["BatchNormalization->Conv"] = len(removed)
    graph.nodes = kept


def _scalar(graph: PreparedGraph, name: str, producer: dict[str, Node] | None = None) -> float | None:
    """The value of a one-element float constant, also behind a DequantizeLinear of a constant."""
    value = graph.constants.get(name)
    dq = (producer or {}).get(name)
    if value is None and dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0] in graph.constants:
        scale = graph.constants[dq.inputs[1]].astype(np.float64)
        zero = graph.constants[dq.inputs[2]].astype(np.float64) if len(dq.inputs) > 2 and dq.inputs[2] else 0.0
        value = ((graph.constants[dq.inputs[0]].astype(np.float64) - zero) * scale).astype(np.float32)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return round(float(value.reshape(())), 6)


def _fuse_erf_gelu(graph: PreparedGraph) -> None:
    """x * 0.5 * (1 + erf(x / sqrt(2))) in any of its exported orders becomes one Gelu node."""
    producer = graph.producer()
    consumers = graph.consumers()

    def through_qdq(name: str) -> str:
        """The float tensor behind a Q->DQ pair (QDQ graphs put pairs between the pattern's nodes)."""
        dq = producer.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.inputs[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.inputs[0]
        return name

    def single_user(name: str) -> Node | None:
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            dq_users = consumers.get(users[0].outputs[0], [])
            if len(dq_users) == 1 and dq_users[0].op_type == "DequantizeLinear":
                return single_user(dq_users[0].outputs[0])
        return users[0] if len(users) == 1 and name not in graph.outputs else None

    def other(node: Node, name: str) -> str:
        return node.inputs[1] if through_qdq(node.inputs[0]) == name or node.inputs[0] == name else node.inputs[0]

    removed: set[int] = set()
    replacements: dict[int, Node] = {}
    for erf in [n for n in graph.nodes if n.op_type == "Erf"]:
        scaled = producer.get(through_qdq(erf.inputs[0]))
        if scaled is None or scaled.op_type not in ("Div", "Mul"):
            continue
        constant = _scalar(graph, scaled.inputs[1], producer)
        if constant is None:
            continue
        factor = 1.0 / constant if scaled.op_type == "Div" else constant
        if not math.isclose(factor, 1.0 / math.sqrt(2.0), rel_tol=1e-3):
            continue
        x = scaled.inputs[0]
        add = single_user(erf.outputs[0])
        if add is None or add.op_type != "Add" or _scalar(graph, other(add, erf.outputs[0]), producer) != 1.0:
            continue
        chain = [scaled, erf, add]
        first = single_user(add.outputs[0])
        if first is None or first.op_type != "Mul":
            continue
        partner = other(first, add.outputs[0])
        if through_qdq(partner) != through_qdq(x) and _scalar(graph, partner, producer) != 0.5:
            # 0.5 * x computed first: Mul(x, 0.5) feeds this Mul
            half = producer.get(through_qdq(partner))
            if half is None or half.op_type != "Mul" or through_qdq(half.inputs[0]) != through_qdq(x) or _scalar(graph, half.inputs[1], producer) != 0.5:
                continue
            chain += [half, first]
            last = first
        else:
            second = single_user(first.outputs[0])
            if second is None or second.op_type != "Mul":
                continue
            partner2 = other(second, first.outputs[0])
            expected = 0.5 if through_qdq(partner) == through_qdq(x) else None
            if expected == 0.5 and _scalar(graph, partner2, producer) != 0.5:
                continue
            if expected is None and through_qdq(partner2) != through_qdq(x):
                continue
            chain += [first, second]
            last = second
        gelu = Node(f"{erf.name or 'gelu'}_gelu", "Gelu", [x], [last.outputs[0]])
        for member in chain:
            removed.add(id(member))
        replacements[id(last)] = gelu
    if not removed:
        return
    needed = set()
    nodes: list[Node] = []
    for node in graph.nodes:
        if id(node) in replacements:
            nodes.append(replacements[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    # Q/DQ pairs that sat inside a fused pattern are now dead; drop nodes nobody reads.
    for node in reversed(nodes):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in needed or o in graph.outputs for o in node.outputs):
            continue
        needed.update(node.inputs)
    graph.nodes = [n for n in nodes if not (n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in needed or o in graph.outputs for o in n.outputs))]
    graph.fused["erf GELU -> Gelu"] = len(replacements)


def prepare_graph(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> PreparedGraph:
    """Static shapes, folded constants and fused patterns; raises ModelLoadError on an invalid model."""
    work = model
    opset = _opset(work)
    if opset < _MIN_OPSET:
        try:
            work = onnx.version_converter.convert_version(work, _MIN_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise ModelLoadError(
                f"cannot bring the model from opset {opset} to opset {_MIN_OPSET}: {exc}",
                hint="re-export the model with opset >= 13",
            ) from exc
        opset = _MIN_OPSET
    inputs = _static_inputs(work, input_shapes)
    input_names = [v.name for v in inputs]
    constants = {i.name: _array(i) for i in work.graph.initializer}
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in inputs}
    nodes, folded = _fold_constants(list(work.graph.node), constants, opset, shapes)
    shapes, dtypes, probed = _infer_shapes(work, nodes, constants, inputs)
    while any(n.op_type == "Shape" and n.input[0] in shapes for n in nodes):
        # Shapes known only after inference (Shape of an intermediate) unlock another folding round.
        nodes, more = _fold_constants(nodes, constants, opset, shapes)
        folded += more
        shapes, dtypes, probed = _infer_shapes(work, nodes, constants, inputs)
    for name, value in constants.items():
        shapes[name] = tuple(value.shape)
        dtypes[name] = value.dtype
    graph = PreparedGraph(
        nodes=[Node(n.name or f"{n.op_type}_{i}", n.op_type, list(n.input), list(n.output), _attrs(n), n.domain) for i, n in enumerate(nodes)],
        constants=constants,
        shapes=shapes,
        dtypes=dtypes,
        inputs=input_names,
        outputs=[o.name for o in work.graph.output],
        opset=opset,
        folded_nodes=folded,
        probed=probed,
    )
    _fold_batchnorm(graph)
    _fuse_erf_gelu(graph)
    return graph
