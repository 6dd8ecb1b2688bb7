"""Read an ONNX model and describe it: what it takes and returns, how big and how costly it is,
what a target cannot run, and where int8 quantization will hurt.

Everything here is read-only on the model except `load_model`, which may convert an old opset up
to `MIN_OPSET` because every later pass assumes the opset-13 forms of Split, Squeeze, per-channel
QuantizeLinear and friends.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper, shape_inference, version_converter

from edgeopt.converters.errors import ModelLoadError
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target

__all__ = [
    "MIN_OPSET",
    "OPSET_CONVERTED_FROM_KEY",
    "Advice",
    "ModelStats",
    "io_specs",
    "is_qdq",
    "load_model",
    "model_opset",
    "model_stats",
    "quantization_advice",
    "unsupported_nodes",
]

log = logging.getLogger(__name__)

MIN_OPSET = 13
"""Models below this default-domain opset are converted up to it on load."""

OPSET_CONVERTED_FROM_KEY = "edgeopt.opset_converted_from"
"""metadata_props key `load_model` sets when it converted the opset, so later stages can report it."""

_STANDARD_DOMAINS = ("", "ai.onnx")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Element types whose initializers are weights (int64/bool initializers are shapes, axes and masks).
_PARAMETER_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4,
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E5M2,
    }
)


# --------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read, validate (checker with full shape inference) and, if older than opset 13, upgrade a model.

    External data files next to the model are loaded into it. Every failure is a ModelLoadError
    that names the file and says what to do.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", hint="check the path (and the current directory)")
    if path.is_dir():
        candidates = sorted(p.name for p in path.glob("*.onnx"))
        hint = f"pass the .onnx file itself, e.g. {path / candidates[0]}" if candidates else "pass an .onnx file"
        raise ModelLoadError(f"{path} is a directory, not an ONNX model file", hint=hint)

    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty", hint="re-export the model, or re-copy the file")
    other_format = None if path.suffix in _TEXT_ONNX_SUFFIXES else _sniff_format(path)
    if other_format is not None:
        raise ModelLoadError(
            f"{path} is not an ONNX model: it looks like {other_format}",
            hint="export the model to ONNX first (e.g. torch.onnx.export) and pass the .onnx file",
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model (the protobuf is truncated or corrupt): {exc}",
            hint="re-export the model to ONNX, or re-copy the file if it was cut short",
        ) from exc
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelLoadError(
            f"{path} parsed as protobuf but is not an ONNX model (no graph, IR version or opset)",
            hint="pass a model exported to .onnx (torch.onnx.export, tf2onnx, ...)",
        )
    _load_external_data(model, path)
    _check(model, path)
    _check_finite_weights(model, path)

    opset = model_opset(model)
    if opset is not None and opset < MIN_OPSET:
        model = _upgrade_opset(model, opset, path)
    return model


# Suffixes onnx.load reads as the text forms of ONNX.
_TEXT_ONNX_SUFFIXES = frozenset({".textproto", ".prototxt", ".txtpb", ".onnxtxt", ".json"})
# Leading bytes of files users mistake for models: (offset, magic, what it is).
_OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PK\x03\x04", "a zip archive (a PyTorch .pt checkpoint, an .npz or a Keras file)"),
    (4, b"TFL3", "a TFLite flatbuffer"),
    (0, b"\x89HDF", "an HDF5 file (a Keras .h5 model)"),
    (0, b"\x80", "a Python pickle (a PyTorch checkpoint?)"),
    (0, b"\x93NUMPY", "a NumPy .npy array"),
)


def _sniff_format(path: Path) -> str | None:
    """What a non-ONNX file looks like, from its first bytes; None when it could be ONNX."""
    with path.open("rb") as file:
        head = file.read(512)
    for offset, magic, what in _OTHER_FORMATS:
        if head[offset : offset + len(magic)] == magic:
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # A serialized ModelProto starts with field 1 (ir_version, varint): byte 0x08.
    if not head.startswith(b"\x08") and all(c.isprintable() or c.isspace() for c in text):
        return "a text file"
    return None


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    external = list(_external_tensors(model))
    if not external:
        return
    base = path.parent.resolve()
    missing: Counter[str] = Counter()
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        file = (base / location).resolve()
        if not file.is_relative_to(base):
            raise ModelLoadError(
                f"{path}: initializer '{tensor.name}' points outside the model's folder ({location})",
                hint="external data must live next to the model file; re-save it with onnx.save(..., location=...)",
            )
        if not file.is_file():
            missing[location] += 1
    if missing:
        listed = ", ".join(f"{location} ({count} tensor(s))" for location, count in sorted(missing.items()))
        raise ModelLoadError(
            f"{path}: external weight file(s) not found in {base}: {listed}",
            hint="copy the external data file(s) next to the .onnx file, keeping their names",
        )
    try:
        onnx.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read external weights: {exc}", hint="re-save the model's external data") from exc


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for graph in _all_graphs(model.graph):
        tensors = [*graph.initializer, *(a.t for n in graph.node for a in n.attribute if a.HasField("t"))]
        yield from (t for t in tensors if onnx.external_data_helper.uses_external_data(t))


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


def _check_finite_weights(model: onnx.ModelProto, path: Path) -> None:
    """NaN or Inf in a weight poisons every figure after it (calibration ranges, quality, the manifest):
    refuse the model, naming each tensor and how many of its values are not finite."""
    bad = []
    for name, tensor in _weight_tensors(model.graph):
        if tensor.data_type in _FLOAT_TYPES:
            values = numpy_helper.to_array(tensor)
            values = values if values.dtype.kind == "f" else values.astype(np.float32)
            count = int(values.size - np.count_nonzero(np.isfinite(values)))
            if count:
                bad.append(f"{name} ({count} of {values.size})")
    if bad:
        raise ModelLoadError(
            f"{path} holds NaN or Inf weights in {len(bad)} initializer(s): {', '.join(bad)}",
            hint="the model was saved from a diverged or broken training run; re-export it from a finite checkpoint",
        )


def _weight_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(name, tensor) for every initializer and Constant value, subgraphs included."""
    for tensor in graph.initializer:
        yield tensor.name, tensor
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                yield node.output[0] if node.output else node.name, attr.t
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _weight_tensors(sub)


def _check(model: onnx.ModelProto, path: Path) -> None:
    """onnx.checker with full shape inference; given the file, the C++ checker reads it directly,
    which is ~10x faster than handing it the parsed model and works past protobuf's 2 GB limit."""
    try:
        if path.suffix in _TEXT_ONNX_SUFFIXES:
            onnx.checker.check_model(model, full_check=True)
        else:
            onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path} fails the ONNX checker: {first_line}",
            hint="fix the exporter output (onnx.checker.check_model(model, full_check=True) shows the details), "
            "or re-export with a newer exporter",
        ) from exc


def _upgrade_opset(model: onnx.ModelProto, opset: int, path: Path) -> onnx.ModelProto:
    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded, full_check=True)
    except Exception as exc:  # the converter raises bare RuntimeErrors and checker errors alike
        raise ModelLoadError(
            f"{path} uses opset {opset} and onnx.version_converter could not convert it to opset {MIN_OPSET}: {exc}",
            hint=f"re-export the model with opset >= {MIN_OPSET} (e.g. torch.onnx.export(..., opset_version=17))",
        ) from exc
    onnx.helper.set_model_props(
        upgraded, {**{p.key: p.value for p in upgraded.metadata_props}, OPSET_CONVERTED_FROM_KEY: str(opset)}
    )
    log.info("%s: converted opset %d to %d with onnx.version_converter", path, opset, MIN_OPSET)
    return upgraded


def model_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain (ai.onnx) opset version, or None for a model that imports none."""
    return next((int(o.version) for o in model.opset_import if o.domain in _STANDARD_DOMAINS), None)


# --------------------------------------------------------------------------------------------
# Inputs, outputs, statistics


def io_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs: names, shapes (ints or symbolic names), dtypes."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [_spec(v) for v in model.graph.output]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims: tuple[int | str | None, ...] = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
    )
    dtype = (
        onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        if value.type.HasField("tensor_type") and tensor_type.elem_type
        else value.type.WhichOneof("value") or "unknown"
    )
    return TensorSpec(name=value.name, shape=dims, dtype=dtype)


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
    graph_nodes = list(_all_nodes(model.graph))
    histogram = Counter(_op_key(node) for node in graph_nodes)
    shapes = _inferred_shapes(model)
    macs = 0
    uncounted: list[str] = []
    for index, node in enumerate(graph_nodes):
        if node.domain not in _STANDARD_DOMAINS or node.op_type not in _MAC_COUNTERS:
            continue
        count = _MAC_COUNTERS[node.op_type](node, shapes)
        if count is None:
            uncounted.append(_node_label(node, index))
        else:
            macs += count
    return ModelStats(
        parameters=_parameter_count(model),
        macs=macs,
        bytes=model.ByteSize(),
        nodes=len(graph_nodes),
        op_histogram=dict(histogram.most_common()),
        opset=model_opset(model),
        macs_uncounted=uncounted,
    )


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_nodes(subgraph)


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_graphs(subgraph)


def _parameter_count(model: onnx.ModelProto) -> int:
    """Elements of constant weight tensors; Q/DQ scales and zero points, shapes and masks are not parameters."""
    qparam_names = {
        name for node in _all_nodes(model.graph) if node.op_type in _QDQ_OPS for name in node.input[1:]
    }
    total = 0
    for graph in _all_graphs(model.graph):
        tensors = list(graph.initializer)
        tensors += [
            a.t
            for node in graph.node
            if node.op_type == "Constant" and node.output[0] not in qparam_names
            for a in node.attribute
            if a.name == "value"
        ]
        for tensor in tensors:
            if tensor.data_type in _PARAMETER_TYPES and tensor.name not in qparam_names:
                total += int(np.prod(tensor.dims, dtype=np.int64))
    return total


_Shape = tuple[int, ...]


# Initializers with more elements than this are hidden from shape inference (see _skeleton).
_SKELETON_MIN_ELEMENTS = 1024


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers turned into typed graph inputs.

    Shape inference serializes the whole model; without the weights it is ~10x faster on a
    100 MB model and infers the same shapes (weights carry no shape information beyond their dims,
    and the small int64 shape tensors that data propagation reads stay).
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    graph = skeleton.graph
    kept, hidden = [], []
    for tensor in graph.initializer:
        (hidden if np.prod(tensor.dims, dtype=np.int64) > _SKELETON_MIN_ELEMENTS else kept).append(tensor)
    if hidden:
        declared = {v.name for v in graph.input}
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in hidden if t.name not in declared
        )
        skeleton.ir_version = max(skeleton.ir_version, 4)  # IR >= 4: inputs need not be initializers and vice versa
    return skeleton


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, _Shape]:
    """Static shapes of every tensor shape inference can resolve; symbolic dims become 1."""
    try:
        inferred = shape_inference.infer_shapes(_skeleton(model), data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        log.warning("shape inference failed, MACs will be incomplete: %s", exc)
        inferred = model
    shapes: dict[str, _Shape] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param:
                dims.append(1)
            else:
                break
        else:
            shapes[value.name] = tuple(dims)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attribute.t.dims)
    return shapes


def _conv_macs(node: onnx.NodeProto, shapes: dict[str, _Shape]) -> int | None:
    weight, output = shapes.get(node.input[1]), shapes.get(node.output[0])
    if weight is None or output is None:
        return None
    # output N*M*spatial positions, each a dot product over (C/group) * kernel weights
    return int(np.prod(output, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))


def _conv_transpose_macs(node: onnx.NodeProto, shapes: dict[str, _Shape]) -> int | None:
    data, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
    if data is None or weight is None:
        return None
    # every input element is scattered into (M/group) * kernel outputs; weight is [C, M/group, *kernel]
    return int(np.prod(data, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))


def _gemm_macs(node: onnx.NodeProto, shapes: dict[str, _Shape]) -> int | None:
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    attributes = {attr.name: attr.i for attr in node.attribute}
    m, k = (a[1], a[0]) if attributes.get("transA", 0) else a
    n = b[0] if attributes.get("transB", 0) else b[1]
    return m * n * k


def _matmul_macs(node: onnx.NodeProto, shapes: dict[str, _Shape]) -> int | None:
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    if a is None or b is None or not a or not b:
        return None
    a = (1, *a) if len(a) == 1 else a
    b = (*b, 1) if len(b) == 1 else b
    batch = np.broadcast_shapes(a[:-2], b[:-2])
    return int(np.prod(batch, dtype=np.int64)) * a[-2] * a[-1] * b[-1]


def _attention_macs(node: onnx.NodeProto, shapes: dict[str, _Shape]) -> int | None:
    """ONNX Attention (opset 23): Q·Kᵀ plus softmax(·)·V, for 4-D [B, H, S, D] or 3-D [B, S, H*D] inputs."""
    q, k, v = (shapes.get(name) for name in node.input[:3])
    if q is None or k is None or v is None:
        return None
    if len(q) == 4 and len(k) == 4 and len(v) == 4:
        batch, heads, q_len, head_dim = q
        kv_len, v_head_dim = k[2], v[3]
    elif len(q) == 3 and len(k) == 3 and len(v) == 3:
        attributes = {attr.name: attr.i for attr in node.attribute}
        heads, kv_heads = attributes.get("q_num_heads", 0), attributes.get("kv_num_heads", 0)
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


def is_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model is already quantized in QDQ form."""
    return any(node.op_type in _QDQ_OPS for node in _all_nodes(model.graph))


# --------------------------------------------------------------------------------------------
# What a target cannot run


def unsupported_nodes(model: onnx.ModelProto, target: Target) -> list[tuple[str, str, str]]:
    """Every node `target` cannot run, as (node name, op, why), all at once and in graph order.

    Nodes computed from constants alone are left out: simplification folds them away.
    """
    contrib_ops = _onnxruntime_ops() if target.backend == "onnxruntime" else frozenset()
    output_types = _inferred_types(model) if target.backend in _NO_FLOAT64_BACKENDS else {}
    folded = {tuple(node.output) for node in _foldable_nodes(model.graph)}
    problems: list[tuple[str, str, str]] = []
    for index, node in enumerate(_all_nodes(model.graph)):
        if tuple(node.output) in folded:
            continue
        reasons = _why_unsupported(node, target, contrib_ops, output_types)
        if reasons:
            problems.append((_node_label(node, index), _op_key(node), "; ".join(reasons)))
    return problems


_NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})


def _foldable_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes computed from constants alone: constant folding removes them before lowering, so the
    target never has to run them (e.g. the ConstantOfShape weight generators of the `light` models)."""
    constant = {t.name for t in graph.initializer}
    foldable = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if (
            node.domain in _STANDARD_DOMAINS
            and node.op_type not in _NONDETERMINISTIC_OPS
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            and all(name in constant for name in node.input if name)
        ):
            foldable.append(node)
            constant.update(node.output)
    return foldable


# The GPU/CPU kernels of these backends have no float64 (TensorRT's DataType has no double;
# TFLite's builtin kernels and XNNPACK are float32/float16/int8).
_NO_FLOAT64_BACKENDS = frozenset({"tensorrt", "tflite"})


def _why_unsupported(
    node: onnx.NodeProto, target: Target, contrib_ops: frozenset[tuple[str, str]], output_types: dict[str, int]
) -> list[str]:
    if node.domain not in _STANDARD_DOMAINS:
        if (node.domain, node.op_type) in contrib_ops:
            return []
        plugin = " (TensorRT would need a plugin for it)" if target.backend == "tensorrt" else ""
        return [f"op of the non-standard domain '{node.domain}', which {target.name} does not run{plugin}"]
    if not onnx.defs.has(node.op_type):
        return [f"'{node.op_type}' is not an ONNX operator"]
    if not target.supports(node.op_type):
        # hand-kept lists describe what edgeopt's lowering writes, not what the device's runtime lacks
        return [f"edgeopt's {target.artifact_format.value} lowering for {target.name} does not write {node.op_type} yet (targets/{target.name}.toml)"]
    reasons = []
    if target.backend in _NO_FLOAT64_BACKENDS and any(
        output_types.get(name) == onnx.TensorProto.DOUBLE for name in node.output
    ):
        reasons.append(f"computes in float64, which {target.backend} has no kernels for; cast to float32 at export")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    for backend, op_type, attribute, cannot_run, explanation in _ATTRIBUTE_LIMITS:
        if target.backend != backend or node.op_type != op_type or attribute not in attributes:
            continue
        value = attributes[attribute]
        value = value.decode() if isinstance(value, bytes) else value
        if cannot_run(value):
            reasons.append(f"{attribute}={value!r}: {explanation}")
    return reasons


# (backend, op, attribute, which values it cannot run, why)
_ATTRIBUTE_LIMITS: tuple[tuple[str, str, str, Callable[[Any], bool], str], ...] = (
    ("tflite", "Resize", "mode", lambda mode: mode == "cubic",
     "TFLite resizes only nearest or bilinear (RESIZE_NEAREST_NEIGHBOR, RESIZE_BILINEAR)"),
    ("coreml", "Resize", "mode", lambda mode: mode == "cubic",
     "Core ML's MIL resize ops are nearest-neighbour or bilinear only"),
    ("tflite", "Pad", "mode", lambda mode: mode in ("edge", "wrap"),
     "TFLite pads only with a constant (PAD/PADV2) or by mirroring (MIRROR_PAD)"),
    ("tflite", "ConvTranspose", "group", lambda group: group > 1, "TFLite's TRANSPOSE_CONV has no groups"),
)


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        graph = shape_inference.infer_shapes(_skeleton(model)).graph
    except (onnx.shape_inference.InferenceError, ValueError):
        graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _onnxruntime_ops() -> frozenset[tuple[str, str]]:
    """(domain, op) of every kernel schema ONNX Runtime registers, contrib ops included."""
    from onnxruntime.capi import onnxruntime_pybind11_state

    return frozenset((s.domain, s.name) for s in onnxruntime_pybind11_state.get_all_operator_schema())


# --------------------------------------------------------------------------------------------
# Quantization advice


@dataclass(frozen=True)
class Advice:
    """One place where int8 quantization is likely to lose accuracy, and what to do about it."""

    rule: str
    node: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# A weight channel whose max |w| exceeds this many (robust) standard deviations leaves the bulk of
# its values (within ±1σ) fewer than 127/16 ≈ 8 int8 levels under a max-calibrated scale.
OUTLIER_RATIO = 16.0
# Fewest weights per channel for the outlier statistic to mean something.
MIN_OUTLIER_SAMPLE = 32
_MAD_SAMPLE = 128
# Per-tensor int8 on a depthwise conv: flag when some channel would use fewer levels than this.
MIN_CHANNEL_LEVELS = 16
_SILU_RANGES = {"SiLU/Swish": -0.2785, "HardSwish": -0.375}


def quantization_advice(model: onnx.ModelProto, target: Target | None = None) -> list[Advice]:
    """Where int8 will likely hurt: per-tensor depthwise weights, SiLU/Swish/HardSwish activations
    under a symmetric scheme, and weights with outliers. A QDQ model is already calibrated, so for
    it only the structure of its existing quantization is judged."""
    constants = _Constants(model.graph)
    producers = {out: node for node in model.graph.node for out in node.output}
    if is_qdq(model):
        return _per_tensor_depthwise_in_qdq(model.graph, constants, producers)
    advice: list[Advice] = []
    advice += _depthwise_spread(model.graph, constants, target)
    advice += _swish_activations(model.graph, producers, target)
    advice += _weight_outliers(model.graph, constants, target)
    return advice


class _Constants:
    """A graph's constant tensors by name, converted to numpy only when asked for."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._protos = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self._protos[node.output[0]] = attribute.t
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray | None:
        if name not in self._arrays:
            proto = self._protos.get(name)
            if proto is None:
                return None
            self._arrays[name] = numpy_helper.to_array(proto)
        return self._arrays[name]


def _is_depthwise(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return node.op_type == "Conv" and group > 1 and weight.ndim >= 3 and weight.shape[1] == 1


def _worst_channel_levels(weight: np.ndarray) -> tuple[int, float]:
    """(channel, int8 levels it gets) for the channel that fares worst under one per-tensor scale."""
    channel_max = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    overall = float(channel_max.max())
    channel = int(np.argmin(channel_max))
    levels = 127.0 * float(channel_max[channel]) / overall if overall > 0 else 127.0
    return channel, levels


def _depthwise_spread(
    graph: onnx.GraphProto, constants: _Constants, target: Target | None
) -> list[Advice]:
    if target is not None and target.quant_scheme.weight_per_channel:
        return []  # the target's scheme already quantizes weights per channel
    advice = []
    for index, node in enumerate(graph.node):
        weight = constants.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or not np.issubdtype(weight.dtype, np.floating) or not _is_depthwise(node, weight):
            continue
        channel, levels = _worst_channel_levels(weight.astype(np.float32))
        if levels < MIN_CHANNEL_LEVELS:
            advice.append(
                Advice(
                    "depthwise-per-channel",
                    _node_label(node, index),
                    f"depthwise conv weights differ widely between channels: with one per-tensor int8 scale, "
                    f"channel {channel} would use only {levels:.1f} of 127 levels; quantize these weights per channel",
                )
            )
    return advice


def _per_tensor_depthwise_in_qdq(
    graph: onnx.GraphProto, constants: _Constants, producers: dict[str, onnx.NodeProto]
) -> list[Advice]:
    advice = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        quantized, scale = constants.get(dq.input[0]), constants.get(dq.input[1])
        if quantized is None or scale is None or scale.size != 1 or not _is_depthwise(node, quantized):
            continue
        zero_point = constants.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
        dequantized = (quantized.astype(np.float32) - zero_point.astype(np.float32)) * scale.astype(np.float32)
        channel, levels = _worst_channel_levels(dequantized)
        advice.append(
            Advice(
                "depthwise-per-tensor",
                _node_label(node, index),
                f"depthwise conv weights share one per-tensor scale ({dq.name or dq.output[0]}); "
                f"channel {channel} uses {levels:.1f} of 127 levels. Re-quantize them per channel (axis 0)",
            )
        )
    return advice


def _swish_activations(
    graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto], target: Target | None
) -> list[Advice]:
    symmetric = target is None or target.quant_scheme.activation_symmetric
    if not symmetric:
        return []  # an asymmetric zero point covers the skewed range without wasting levels
    where = f"{target.name}'s symmetric int8 activations" if target else "a symmetric int8 scheme (e.g. TensorRT)"
    advice = []
    for index, node in enumerate(graph.node):
        kind = None
        if node.op_type in ("HardSwish", "Swish"):
            kind = "HardSwish" if node.op_type == "HardSwish" else "SiLU/Swish"
        elif node.op_type == "Mul" and len(node.input) == 2:
            for this, other in (node.input, node.input[::-1]):
                sigmoid = producers.get(this)
                if sigmoid is not None and sigmoid.op_type == "Sigmoid" and sigmoid.input[0] == other:
                    kind = "SiLU/Swish"
        if kind is None:
            continue
        advice.append(
            Advice(
                "swish-before-int8",
                _node_label(node, index),
                f"{kind} output lies in [{_SILU_RANGES[kind]}, +inf): under {where} (zero point 0) the negative "
                "half of the int8 range is spent on that small tail, leaving about 7 bits for the rest; "
                "keep the next layer's input in float, calibrate with percentile/MSE, or fine-tune with QAT",
            )
        )
    return advice


def _weight_outliers(graph: onnx.GraphProto, constants: _Constants, target: Target | None) -> list[Advice]:
    per_channel = target is None or target.quant_scheme.weight_per_channel
    advice = []
    for index, node in enumerate(graph.node):
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        weight = constants.get(node.input[1])
        if weight is None or not np.issubdtype(weight.dtype, np.floating):
            continue
        channels = _output_channels(node, weight.astype(np.float32)) if per_channel else weight.reshape(1, -1)
        if channels.shape[1] < MIN_OUTLIER_SAMPLE:
            continue  # a median over a handful of values (e.g. a 3x3 depthwise filter) says nothing
        # A robust sigma (1.4826 x median absolute deviation): the outliers themselves must not inflate it,
        # and a plain std can never exceed max/sqrt(n) in a small channel. The medians come from an
        # evenly strided sample of each channel (at most _MAD_SAMPLE values); the peak from all of it.
        sample = channels[:, :: max(1, channels.shape[1] // _MAD_SAMPLE)]
        center = np.median(sample, axis=1, keepdims=True)
        sigma = 1.4826 * np.median(np.abs(sample - center), axis=1)
        peak = np.abs(channels - center).max(axis=1)
        ratio = np.divide(peak, sigma, out=np.zeros_like(peak), where=sigma > 0)
        worst = int(np.argmax(ratio))
        if ratio[worst] > OUTLIER_RATIO:
            where = f"output channel {worst}" if per_channel else "the tensor"
            advice.append(
                Advice(
                    "weight-outliers",
                    _node_label(node, index),
                    f"in {where} of '{node.input[1]}' max |w| is {ratio[worst]:.0f}x the typical spread (robust sigma): "
                    f"a max-based int8 scale leaves the bulk of the weights about {127 / ratio[worst]:.0f} levels; "
                    "clip the weights (percentile/MSE calibration) or keep this layer in float",
                )
            )
    return advice


def _output_channels(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """The weight as [output channels, everything else], following each op's weight layout."""
    if node.op_type == "ConvTranspose":
        axis = 1
    elif node.op_type == "Gemm":
        axis = 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    elif node.op_type == "MatMul":
        axis = weight.ndim - 1
    else:
        axis = 0
    return np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
