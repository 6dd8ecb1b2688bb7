"""What a model takes and returns, how big it is and what one inference costs, on onnx_ir."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import shape_inference

from edgeopt.converters.graph.opset import onnx_opset
from edgeopt.converters.graph.qdq import QDQ_OPS, int_attribute
from edgeopt.runtime.spec import TensorSpec

__all__ = ["ModelStats", "io_specs", "is_qdq", "model_stats", "node_label", "node_macs", "op_key", "shape_inferred"]

log = logging.getLogger(__name__)

STANDARD_DOMAINS = ("", "ai.onnx")
# Element types whose initializers are weights (int64/bool initializers are shapes, axes and masks).
_PARAMETER_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.INT4,
        ir.DataType.UINT4,
        ir.DataType.FLOAT8E4M3FN,
        ir.DataType.FLOAT8E5M2,
    }
)


def op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def node_label(node: ir.Node, index: int) -> str:
    """The node's name, or op#index (its position among all nodes, subgraphs included) when unnamed."""
    return node.name or f"{node.op_type}#{index}"


def is_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model is already quantized in QDQ form."""
    return any(node.op_type in QDQ_OPS for node in ir.from_proto(model).graph.all_nodes())


# --------------------------------------------------------------------------------------------
# Inputs and outputs


def io_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs: names, shapes (ints or symbolic names), dtypes."""
    graph = ir.from_proto(model).graph
    inputs = [_spec(v) for v in graph.inputs if not v.is_initializer()]
    return inputs, [_spec(v) for v in graph.outputs]


def _spec(value: ir.Value) -> TensorSpec:
    dims: tuple[int | str | None, ...] = (
        tuple(d if isinstance(d, int) else d.value for d in value.shape) if value.shape is not None else ()
    )
    return TensorSpec(name=value.name or "", shape=dims, dtype=_dtype_name(value.type))


def _dtype_name(type_: ir.TypeProtocol | None) -> str:
    """numpy's name for a tensor's element type; for other values, the ONNX type field ("sequence_type")."""
    match type_:
        case None:
            return "unknown"
        case ir.TensorType() if type_.dtype != ir.DataType.UNDEFINED:
            return type_.dtype.numpy().name
        case ir.TensorType():
            return "tensor_type"
        case ir.SparseTensorType():
            return "sparse_tensor_type"
        case ir.SequenceType():
            return "sequence_type"
        case ir.OptionalType():
            return "optional_type"
    return "unknown"


# --------------------------------------------------------------------------------------------
# Size and cost


@dataclass
class ModelStats:
    """Size and cost of one inference. MACs count Conv, ConvTranspose, Gemm, MatMul and Attention
    from inferred shapes, with every symbolic dimension (e.g. batch) taken as 1; nodes whose shapes
    could not be inferred are listed in `macs_uncounted`."""

    parameters: int
    macs: int
    bytes: int
    nodes: int
    op_histogram: dict[str, int]
    opset: int | None
    macs_uncounted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_stats(model: onnx.ModelProto) -> ModelStats:
    graph = shape_inferred(model).graph
    nodes = list(graph.all_nodes())
    macs = 0
    uncounted: list[str] = []
    for index, node in enumerate(nodes):
        if node.domain not in STANDARD_DOMAINS or node.op_type not in _MAC_COUNTERS:
            continue
        count = _MAC_COUNTERS[node.op_type](node)
        if count is None:
            uncounted.append(node_label(node, index))
        else:
            macs += count
    return ModelStats(
        parameters=_parameter_count(graph),
        macs=macs,
        bytes=model.ByteSize(),
        nodes=len(nodes),
        op_histogram=dict(Counter(op_key(node) for node in nodes).most_common()),
        opset=onnx_opset(model),
        macs_uncounted=uncounted,
    )


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs of each named main-graph node that model_stats counts (a mixed-precision report's MAC share)."""
    counts = {}
    for node in shape_inferred(model).graph:
        if node.name and node.domain in STANDARD_DOMAINS and node.op_type in _MAC_COUNTERS:
            count = _MAC_COUNTERS[node.op_type](node)
            if count is not None:
                counts[node.name] = count
    return counts


def _parameter_count(graph: ir.Graph) -> int:
    """Elements of constant weight tensors; Q/DQ scales and zero points, shapes and masks are not parameters."""
    qparams = {id(value) for node in graph.all_nodes() if node.op_type in QDQ_OPS for value in node.inputs[1:] if value is not None}
    tensors = [
        value.const_value
        for subgraph in (graph, *graph.subgraphs())
        for value in subgraph.initializers.values()
        if value.const_value is not None and id(value) not in qparams
    ]
    tensors += [
        node.attributes["value"].value
        for node in graph.all_nodes()
        if node.op_type == "Constant" and "value" in node.attributes and id(node.outputs[0]) not in qparams
    ]
    return sum(int(np.prod(tensor.shape.numpy(), dtype=np.int64)) for tensor in tensors if tensor.dtype in _PARAMETER_TYPES)


# Initializers with more elements than this are hidden from shape inference (see _skeleton).
_SKELETON_MIN_ELEMENTS = 1024


def shape_inferred(model: onnx.ModelProto) -> ir.Model:
    """The model on onnx_ir with every node output typed and shaped by ONNX shape inference
    (with data propagation). When inference fails the model's own annotations stay, with a warning
    (MAC counts, float64 checks and dtype-based lint rules then see less)."""
    skeleton, hidden = _skeleton(model)
    try:
        inferred = ir.from_proto(shape_inference.infer_shapes(skeleton, data_prop=True))
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        log.warning("shape inference failed, so shapes and types are only those the model declares: %s", exc)
        return ir.from_proto(model)
    graph = inferred.graph
    declared = {v.name for v in model.graph.input}
    inputs = {v.name: v for v in graph.inputs}
    for tensor in hidden:  # the weights come back, read from the model's own tensors when asked for
        value = inputs[tensor.name]
        value.const_value = ir.TensorProtoTensor(tensor)
        if tensor.name not in declared:
            graph.inputs.remove(value)
        graph.register_initializer(value)
    return inferred


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """The model with its large initializers turned into typed graph inputs, and those initializers.

    Shape inference serializes the whole model; without the weights it is ~10x faster on a
    100 MB model and infers the same shapes (weights carry no shape information beyond their dims,
    and the small int64 shape tensors that data propagation reads stay).
    """
    hidden = [t for t in model.graph.initializer if np.prod(t.dims, dtype=np.int64) > _SKELETON_MIN_ELEMENTS]
    if not hidden:
        return model, []
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    graph = skeleton.graph
    declared = {v.name for v in graph.input}
    kept = [t for t in graph.initializer if np.prod(t.dims, dtype=np.int64) <= _SKELETON_MIN_ELEMENTS]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in hidden if t.name not in declared
    )
    skeleton.ir_version = max(skeleton.ir_version, 4)  # IR >= 4: inputs need not be initializers and vice versa
    return skeleton, hidden


_Shape = tuple[int, ...]


def _static_shape(value: ir.Value | None) -> _Shape | None:
    """The value's shape with symbolic dimensions as 1 (and -1, which exporters write for a dynamic
    one: counted as is, it made MACs negative); None when a dimension or the rank is unknown."""
    if value is None:
        return None
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None:
        return None
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d if d >= 0 else 1)
        elif d.value is not None:
            dims.append(1)
        else:
            return None
    return tuple(dims)


def _input_shapes(node: ir.Node, count: int) -> list[_Shape | None]:
    return [_static_shape(node.inputs[i] if i < len(node.inputs) else None) for i in range(count)]


def _conv_macs(node: ir.Node) -> int | None:
    weight, output = _static_shape(node.inputs[1]), _static_shape(node.outputs[0])
    if weight is None or output is None:
        return None
    # output N*M*spatial positions, each a dot product over (C/group) * kernel weights
    return int(np.prod(output, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))


def _conv_transpose_macs(node: ir.Node) -> int | None:
    data, weight = _input_shapes(node, 2)
    if data is None or weight is None:
        return None
    # every input element is scattered into (M/group) * kernel outputs; weight is [C, M/group, *kernel]
    return int(np.prod(data, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))


def _gemm_macs(node: ir.Node) -> int | None:
    a, b = _input_shapes(node, 2)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if int_attribute(node, "transA", 0) else a
    n = b[0] if int_attribute(node, "transB", 0) else b[1]
    return m * n * k


def _matmul_macs(node: ir.Node) -> int | None:
    a, b = _input_shapes(node, 2)
    if a is None or b is None or not a or not b:
        return None
    a = (1, *a) if len(a) == 1 else a
    b = (*b, 1) if len(b) == 1 else b
    batch = np.broadcast_shapes(a[:-2], b[:-2])
    return int(np.prod(batch, dtype=np.int64)) * a[-2] * a[-1] * b[-1]


def _attention_macs(node: ir.Node) -> int | None:
    """ONNX Attention (opset 23): Q·Kᵀ plus softmax(·)·V, for 4-D [B, H, S, D] or 3-D [B, S, H*D] inputs."""
    q, k, v = _input_shapes(node, 3)
    if q is None or k is None or v is None:
        return None
    if len(q) == 4 and len(k) == 4 and len(v) == 4:
        batch, heads, q_len, head_dim = q
        kv_len, v_head_dim = k[2], v[3]
    elif len(q) == 3 and len(k) == 3 and len(v) == 3:
        heads, kv_heads = int_attribute(node, "q_num_heads", 0), int_attribute(node, "kv_num_heads", 0)
        if not heads or not kv_heads:
            return None
        batch, q_len, head_dim = q[0], q[1], q[2] // heads
        kv_len, v_head_dim = k[1], v[2] // kv_heads
    else:
        return None
    return batch * heads * q_len * kv_len * (head_dim + v_head_dim)


_MAC_COUNTERS = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    "Attention": _attention_macs,
}
