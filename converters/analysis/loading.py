"""Loading a model file: the one place that reads, validates and upgrades ONNX files.

Every failure is a ModelLoadError that names the file and says what to do. A model older than
`MIN_OPSET` is converted up to it, because every later pass assumes the opset-13 forms of Split,
Squeeze, per-channel QuantizeLinear and friends.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import version_converter

from edgeopt.converters.errors import ModelLoadError
from edgeopt.converters.graph.opset import MIN_OPSET, onnx_opset

__all__ = ["OPSET_CONVERTED_FROM_KEY", "load_model"]

log = logging.getLogger(__name__)

OPSET_CONVERTED_FROM_KEY = "edgeopt.opset_converted_from"
"""metadata_props key `load_model` sets when it converted the opset, so later stages can report it."""


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

    opset = onnx_opset(model)
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
    external = [
        (name, tensor) for name, tensor in _stored_tensors(ir.from_proto(model).graph, constants_only=False)
        if isinstance(tensor, ir.ExternalTensor)
    ]
    if not external:
        return
    base = path.parent.resolve()
    missing: Counter[str] = Counter()
    for name, tensor in external:
        file = (base / tensor.location).resolve()
        if not file.is_relative_to(base):
            raise ModelLoadError(
                f"{path}: initializer '{name}' points outside the model's folder ({tensor.location})",
                hint="external data must live next to the model file; re-save it with onnx.save(..., location=...)",
            )
        if not file.is_file():
            missing[tensor.location] += 1
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


def _stored_tensors(graph: ir.Graph, *, constants_only: bool) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """(name, tensor) of every initializer and tensor attribute, subgraphs included; with
    `constants_only`, of Constant nodes only (the weights: other ops' tensor attributes are fill values)."""
    for subgraph in (graph, *graph.subgraphs()):
        for value in subgraph.initializers.values():
            if value.const_value is not None:
                yield value.name or "", value.const_value
    for node in graph.all_nodes():
        if constants_only and node.op_type != "Constant":
            continue
        for attribute in node.attributes.values():
            if isinstance(attribute, ir.Attr) and attribute.type == ir.AttributeType.TENSOR:
                yield (node.outputs[0].name if node.op_type == "Constant" else node.name) or "", attribute.value


_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


def _check_finite_weights(model: onnx.ModelProto, path: Path) -> None:
    """NaN or Inf in a weight poisons every figure after it (calibration ranges, quality, the manifest):
    refuse the model, naming each tensor and how many of its values are not finite."""
    bad = []
    for name, tensor in _stored_tensors(ir.from_proto(model).graph, constants_only=True):
        if tensor.dtype in _FLOAT_TYPES:
            values = tensor.numpy()
            values = values if values.dtype.kind == "f" else values.astype(np.float32)
            count = int(values.size - np.count_nonzero(np.isfinite(values)))
            if count:
                bad.append(f"{name} ({count} of {values.size})")
    if bad:
        raise ModelLoadError(
            f"{path} holds NaN or Inf weights in {len(bad)} initializer(s): {', '.join(bad)}",
            hint="the model was saved from a diverged or broken training run; re-export it from a finite checkpoint",
        )


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
