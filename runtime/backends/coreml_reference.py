"""`coreml-reference`: saved Core ML ML Programs run by a numpy evaluator, on any OS.

Core ML predicts on macOS only. This backend lets a bundle for apple-ane be verified and benched
anywhere else — the build's lowering parity uses it off macOS, and the runtime's `verify` and
`bench` run it where Core ML cannot, saying so in every result (`STAND_INS` in this package):
its figures are numpy's, not Core ML's, and its latency is not a device's.

It reads only what is on disk — the ML Program spec (`Data/com.apple.CoreML/model.mlmodel`,
parsed with coremltools' protobuf classes, imported when a model is loaded) and the weight blob
file (`weights/weight.bin`, the MILBlob storage format: a 64-byte header, then per blob a 64-byte
metadata record with the 0xDEADBEEF sentinel, dtype, size and data offset) — and shares no code
with the lowering that wrote them. The ops' kernels (`coreml_kernels/`, one module per op family)
follow the MIL op definitions in the coremltools documentation. Every op computes in float32 from its inputs and rounds its result to the dtype the
program declares for it, so a program that casts to fp16 is evaluated with fp16 tensors between
ops, as Core ML stores them on the GPU and Neural Engine. What this cannot reproduce: the
accumulation order and internal precision of Apple's kernels (the Neural Engine may accumulate
in fp16).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, TypedDict

import numpy as np

from edgeopt.runtime.backends.base import Backend, import_first
from edgeopt.runtime.backends.coreml import _feature_spec
from edgeopt.runtime.backends.coreml_kernels import KERNELS, Args, MilValue, unpack_bits, unsupported
from edgeopt.runtime.errors import BundleError, InputSpecError
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.library_output import library_output_to_log
from edgeopt.runtime.spec import TensorSpec

__all__ = ["CoreMLReferenceBackend", "MilReferenceEvaluator", "read_weight_blob"]

log = logging.getLogger(__name__)

NAME = BackendName.COREML_REFERENCE
INSTALL_HINT = "pip install coremltools (any OS: only its protobuf classes are used, to read the program)"
_REBUILD = "rebuild the bundle with `edgeopt build --target apple-ane`"

_BLOB_SENTINEL = 0xDEADBEEF
# MILBlob BlobDataType → (numpy dtype of the unpacked values, bits per value)
_BLOB_TYPES: dict[int, tuple[np.dtype, int]] = {
    1: (np.dtype(np.float16), 16), 2: (np.dtype(np.float32), 32), 3: (np.dtype(np.uint8), 8),
    4: (np.dtype(np.int8), 8), 6: (np.dtype(np.int16), 16), 7: (np.dtype(np.uint16), 16),
    8: (np.dtype(np.int8), 4), 9: (np.dtype(np.uint8), 1), 10: (np.dtype(np.uint8), 2),
    11: (np.dtype(np.uint8), 4), 12: (np.dtype(np.uint8), 3), 13: (np.dtype(np.uint8), 6),
    14: (np.dtype(np.int32), 32), 15: (np.dtype(np.uint32), 32),
}
# MIL DataType (MIL.proto) by name → (numpy dtype, bits per value in packed storage); the enum's
# numbers are read from coremltools' MIL_pb2 when a program is loaded.
_MIL_TYPE_NAMES: dict[str, tuple[np.dtype, int]] = {
    "FLOAT16": (np.dtype(np.float16), 16), "FLOAT32": (np.dtype(np.float32), 32),
    "FLOAT64": (np.dtype(np.float64), 64), "INT8": (np.dtype(np.int8), 8), "INT16": (np.dtype(np.int16), 16),
    "INT32": (np.dtype(np.int32), 32), "INT64": (np.dtype(np.int64), 64), "UINT8": (np.dtype(np.uint8), 8),
    "UINT16": (np.dtype(np.uint16), 16), "UINT32": (np.dtype(np.uint32), 32), "UINT64": (np.dtype(np.uint64), 64),
    "BOOL": (np.dtype(bool), 8), "INT4": (np.dtype(np.int8), 4), "UINT4": (np.dtype(np.uint8), 4),
    "UINT6": (np.dtype(np.uint8), 6), "UINT3": (np.dtype(np.uint8), 3), "UINT2": (np.dtype(np.uint8), 2),
    "UINT1": (np.dtype(np.uint8), 1),
}
def _proto_modules() -> tuple[ModuleType, ModuleType]:
    """coremltools' MIL_pb2 and Model_pb2, imported on first use (the runtime imports no library up front).

    Importing coremltools prints warnings about the parts it cannot load off macOS: to the log.
    """
    with library_output_to_log(log, "coremltools"):
        model_pb2 = import_first(("coremltools.proto.Model_pb2",), backend=NAME, hint=INSTALL_HINT)
        return importlib.import_module("coremltools.proto.MIL_pb2"), model_pb2


def read_weight_blob(path: Path, offset: int) -> np.ndarray:
    """The flat array stored at `offset` (the blob's metadata record) of a MILBlob weight file."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        meta = handle.read(64)
        if len(meta) < 32:
            raise BundleError(f"{path}: no blob metadata at offset {offset} (the file ends first)", hint=_REBUILD)
        sentinel, dtype_code, size, data_offset, padding_bits = np.frombuffer(meta[:32], dtype="<u4,<u4,<u8,<u8,<u8")[0]
        if sentinel != _BLOB_SENTINEL or int(dtype_code) not in _BLOB_TYPES:
            raise BundleError(f"{path}: no blob metadata at offset {offset} (sentinel {sentinel:#x})", hint=_REBUILD)
        handle.seek(int(data_offset))
        raw = handle.read(int(size))
    dtype, bits = _BLOB_TYPES[int(dtype_code)]
    if bits >= 8:
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    count = (len(raw) * 8 - int(padding_bits)) // bits
    return unpack_bits(raw, bits, count, signed=dtype == np.int8)


class MilReferenceEvaluator:
    """Runs the `main` function of a saved `.mlpackage` ML Program with numpy.

    Calls share nothing mutable (each builds its own value table), so one evaluator is safe to
    call from several threads.
    """

    def __init__(self, package: Path) -> None:
        mil_pb2, model_pb2 = _proto_modules()
        self.package = Path(package)
        self.types = {mil_pb2.DataType.Value(name): kind for name, kind in _MIL_TYPE_NAMES.items()}
        self.string_type = mil_pb2.DataType.Value("STRING")
        spec_path = self._spec_path()
        self.model = model_pb2.Model()
        try:
            self.model.ParseFromString(spec_path.read_bytes())
        except Exception as error:  # protobuf's DecodeError: the spec is truncated or not a Core ML model
            raise BundleError(f"{spec_path}: not a Core ML model spec ({error})", hint=_REBUILD) from None
        if not self.model.HasField("mlProgram"):
            raise unsupported(f"{spec_path} is not an ML Program (it is a neural network or pipeline model)")
        self.weights_dir = spec_path.parent
        function = self.model.mlProgram.functions["main"]
        self.block = function.block_specializations[function.opset]
        self.input_types = {i.name: i.type.tensorType for i in function.inputs}
        self.output_names = list(self.block.outputs)
        self.feature_names = (
            [f.name for f in self.model.description.input],
            [f.name for f in self.model.description.output],
        )
        self._constants: dict[str, MilValue] = {}
        self._load_constants()

    def _spec_path(self) -> Path:
        """The root model spec named by the package's Manifest.json, kept inside the package."""
        manifest_path = self.package / "Manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BundleError(f"{manifest_path}: cannot read the package's root model ({type(error).__name__}: {error})", hint=_REBUILD) from None
        return self._inside(self.package / "Data" / str(root))

    def _inside(self, path: Path) -> Path:
        """`path`, resolved, when it stays inside the package; a path that leaves it is a damaged bundle."""
        resolved, package = path.resolve(), self.package.resolve()
        if not resolved.is_relative_to(package):
            raise BundleError(f"{path}: points outside the package {self.package}", hint=_REBUILD)
        return resolved

    # -- values --------------------------------------------------------------------------------
    def decode(self, value: Any) -> MilValue:
        """A MIL_pb2.Value (immediate or in the weight file) as numpy, or a Python string."""
        tensor_type = value.type.tensorType
        dtype, bits = self.types.get(tensor_type.dataType, (None, 0))
        shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
        if value.HasField("blobFileValue"):
            file_name = value.blobFileValue.fileName.replace("@model_path/", "")
            flat = read_weight_blob(self._inside(self.weights_dir / file_name), value.blobFileValue.offset)
            return flat[: math.prod(shape)].astype(dtype).reshape(shape)
        tensor = value.immediateValue.tensor
        kind = tensor.WhichOneof("value")
        if tensor_type.dataType == self.string_type:
            items = list(tensor.strings.values)
            return items[0] if not shape else np.array(items).reshape(shape)
        if kind == "bytes":
            raw = tensor.bytes.values
            flat = np.frombuffer(raw, dtype=dtype) if bits >= 8 else unpack_bits(raw, bits, math.prod(shape), dtype == np.int8)
        else:
            flat = np.array(list(getattr(tensor, kind).values) if kind else [])
        return flat.astype(dtype).reshape(shape)

    def _load_constants(self) -> None:
        for op in self.block.operations:
            if op.type == "const":
                self._constants[op.outputs[0].name] = self.decode(op.attributes["val"])

    # -- running -------------------------------------------------------------------------------
    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of the program for `feeds`, keyed by the model's feature names."""
        env: dict[str, MilValue] = dict(self._constants)
        for name, tensor_type in self.input_types.items():
            if name not in feeds:
                raise InputSpecError(f"{NAME}: input '{name}' missing (got {sorted(feeds)})", hint="pass every input of the model")
            dtype = self.types[tensor_type.dataType][0]
            env[name] = np.asarray(feeds[name]).astype(dtype)
        for op in self.block.operations:
            if op.type == "const":
                continue
            if op.type not in KERNELS:
                raise unsupported(f"no kernel for MIL op '{op.type}' ({op.outputs[0].name})")
            args = Args(op, env, self.decode)
            reason = KERNELS.why_unsupported(op.type, args)
            if reason is not None:
                raise unsupported(f"{reason} ({op.outputs[0].name})")
            results = KERNELS.handler(op.type)(args)
            results = results if isinstance(results, (list, tuple)) else [results]
            for output, result in zip(op.outputs, results):
                declared = self.types.get(output.type.tensorType.dataType, (None, 0))[0]
                env[output.name] = np.asarray(result).astype(declared) if declared is not None else result
        return {name: np.asarray(env[name]) for name in self.output_names}


class CoreMLReferenceFacts(TypedDict):
    evaluator: str
    mil_ops: int  # operations run per call (constants excluded)


class CoreMLReferenceBackend(Backend):
    """An .mlpackage run by `MilReferenceEvaluator`: Core ML's numerics checked anywhere, not its speed."""

    name: ClassVar[BackendName] = NAME
    #: a bare .mlpackage goes to Core ML; this backend is named, or stands in for Core ML (STAND_INS)
    suffixes: ClassVar[tuple[str, ...]] = ()
    modules: ClassVar[tuple[str, ...]] = ("coremltools",)
    distributions: ClassVar[tuple[str, ...]] = ("coremltools",)
    default_install_hint: ClassVar[str] = INSTALL_HINT

    def activate(self) -> None:
        self.evaluator = MilReferenceEvaluator(self.model_path)
        description = self.evaluator.model.description
        self._inputs = [_feature_spec(f) for f in description.input]
        self._outputs = [_feature_spec(f) for f in description.output]
        self._output_dtypes = {spec.name: np.dtype(spec.dtype) for spec in self._outputs}

    def input_metadata(self) -> list[TensorSpec]:
        return list(self._inputs)

    def output_metadata(self) -> list[TensorSpec]:
        return list(self._outputs)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs in the dtypes the model describes (what Core ML's predict returns)."""
        results = self.evaluator(feeds)
        return {name: results[name].astype(dtype, copy=False) for name, dtype in self._output_dtypes.items()}

    def raw_call(self) -> tuple[Any, Any]:
        return self.evaluator, lambda feeds: (feeds,)

    def deactivate(self) -> None:
        del self.evaluator

    def facts(self) -> CoreMLReferenceFacts:
        operations = [op for op in self.evaluator.block.operations if op.type != "const"]
        return {"evaluator": "numpy, op by op (not Core ML)", "mil_ops": len(operations)}
