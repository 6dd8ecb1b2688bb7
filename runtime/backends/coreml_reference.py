"""`coreml-reference`: saved Core ML ML Programs run by a numpy evaluator, on any OS.

Core ML predicts on macOS only. This backend lets a bundle for apple-ane be verified and benched
anywhere else — the build's lowering parity uses it off macOS, and the runtime's `verify` and
`bench` run it where Core ML cannot, saying so in every result (`STAND_INS` in this package):
its figures are numpy's, not Core ML's, and its latency is not a device's.

It reads only what is on disk — the ML Program spec (`Data/com.apple.CoreML/model.mlmodel`,
parsed with coremltools' protobuf classes, imported when a model is loaded) and the weight blob
file (`weights/weight.bin`, the MILBlob storage format: a 64-byte header, then per blob a 64-byte
metadata record with the 0xDEADBEEF sentinel, dtype, size and data offset) — and shares no code
with the lowering that wrote them. Ops follow the MIL op definitions in the coremltools
documentation. Every op computes in float32 from its inputs and rounds its result to the dtype the
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
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgeopt.runtime.backends.base import Backend, import_first
from edgeopt.runtime.backends.coreml import _feature_spec
from edgeopt.runtime.errors import BackendUnavailableError, BundleError, InputSpecError
from edgeopt.runtime.library_output import library_output_to_log
from edgeopt.runtime.spec import TensorSpec

__all__ = ["CoreMLReferenceBackend", "MilReferenceEvaluator", "read_weight_blob"]

log = logging.getLogger(__name__)

NAME = "coreml-reference"
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
_CAST_NAMES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float32, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": bool, "int64": np.int32,
}


def _unsupported(what: str) -> BackendUnavailableError:
    """A program this evaluator cannot run: Core ML (on a Mac) still can."""
    return BackendUnavailableError(
        f"{NAME}: {what}", hint="run the bundle with Core ML on a Mac (--backend coreml), or rebuild it without that op"
    )


def _proto_modules() -> tuple[ModuleType, ModuleType]:
    """coremltools' MIL_pb2 and Model_pb2, imported on first use (the runtime imports no library up front).

    Importing coremltools prints warnings about the parts it cannot load off macOS: to the log.
    """
    with library_output_to_log(log, "coremltools"):
        model_pb2 = import_first(("coremltools.proto.Model_pb2",), backend=NAME, hint=INSTALL_HINT)
        return importlib.import_module("coremltools.proto.MIL_pb2"), model_pb2


def _unpack_bits(raw: bytes, bits: int, count: int, signed: bool) -> np.ndarray:
    """Sub-byte values packed little-endian: value i occupies bits [i*bits, (i+1)*bits) of the stream."""
    stream = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits, dtype=np.int32))
    values = stream.reshape(count, bits).astype(np.int32) @ weights
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values.astype(np.int8 if signed else np.uint8)


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
    return _unpack_bits(raw, bits, count, signed=dtype == np.int8)


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
            raise _unsupported(f"{spec_path} is not an ML Program (it is a neural network or pipeline model)")
        self.weights_dir = spec_path.parent
        function = self.model.mlProgram.functions["main"]
        self.block = function.block_specializations[function.opset]
        self.input_types = {i.name: i.type.tensorType for i in function.inputs}
        self.output_names = list(self.block.outputs)
        self.feature_names = (
            [f.name for f in self.model.description.input],
            [f.name for f in self.model.description.output],
        )
        self._constants: dict[str, np.ndarray] = {}
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
    def _decode(self, value: Any) -> Any:
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
            flat = np.frombuffer(raw, dtype=dtype) if bits >= 8 else _unpack_bits(raw, bits, math.prod(shape), dtype == np.int8)
        else:
            flat = np.array(list(getattr(tensor, kind).values) if kind else [])
        return flat.astype(dtype).reshape(shape)

    def _load_constants(self) -> None:
        for op in self.block.operations:
            if op.type == "const":
                self._constants[op.outputs[0].name] = self._decode(op.attributes["val"])

    # -- running -------------------------------------------------------------------------------
    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of the program for `feeds`, keyed by the model's feature names."""
        env: dict[str, Any] = dict(self._constants)
        for name, tensor_type in self.input_types.items():
            if name not in feeds:
                raise InputSpecError(f"{NAME}: input '{name}' missing (got {sorted(feeds)})", hint="pass every input of the model")
            dtype = self.types[tensor_type.dataType][0]
            env[name] = np.asarray(feeds[name]).astype(dtype)
        for op in self.block.operations:
            if op.type == "const":
                continue
            kernel = _KERNELS.get(op.type)
            if kernel is None:
                raise _unsupported(f"no kernel for MIL op '{op.type}' ({op.outputs[0].name})")
            args = _Args(op, env, self)
            results = kernel(args)
            results = results if isinstance(results, (list, tuple)) else [results]
            for output, result in zip(op.outputs, results):
                declared = self.types.get(output.type.tensorType.dataType, (None, 0))[0]
                env[output.name] = np.asarray(result).astype(declared) if declared is not None else result
        return {name: np.asarray(env[name]) for name in self.output_names}


class CoreMLReferenceBackend(Backend):
    """An .mlpackage run by `MilReferenceEvaluator`: Core ML's numerics checked anywhere, not its speed."""

    name: ClassVar[str] = NAME
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

    def facts(self) -> dict[str, Any]:
        operations = [op for op in self.evaluator.block.operations if op.type != "const"]
        return {"evaluator": "numpy, op by op (not Core ML)", "mil_ops": len(operations)}


class _Args:
    """The inputs of one op, decoded to numpy (variadic inputs as lists), with defaults."""

    def __init__(self, op: Any, env: dict[str, Any], evaluator: MilReferenceEvaluator) -> None:
        self.op, self.env, self.evaluator = op, env, evaluator

    def _one(self, binding: Any) -> Any:
        if binding.WhichOneof("binding") == "name":
            return self.env[binding.name]
        return self.evaluator._decode(binding.value)

    def __call__(self, key: str, default: Any = None) -> Any:
        if key in self.op.inputs:
            return self._one(self.op.inputs[key].arguments[0])
        if key in self.op.attributes and key != "name":
            return self.evaluator._decode(self.op.attributes[key])
        return default

    def many(self, key: str) -> list[Any]:
        return [self._one(b) for b in self.op.inputs[key].arguments]

    def f(self, key: str, default: Any = None) -> Any:
        """A float input upcast to float32 for computing."""
        value = self(key, default)
        if isinstance(value, np.ndarray) and value.dtype == np.float16:
            return value.astype(np.float32)
        return value

    def ints(self, key: str, default: Any = None) -> list[int] | None:
        value = self(key, default)
        return None if value is None else [int(v) for v in np.atleast_1d(value)]


Kernel = Callable[[_Args], Any]
_KERNELS: dict[str, Kernel] = {}


def _kernel(*names: str) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        for name in names:
            _KERNELS[name] = fn
        return fn

    return register


def _erf(x: np.ndarray) -> np.ndarray:
    """Exact erf, elementwise (numpy has none; math.erf is correctly rounded in float64)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


_ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "equal": np.equal, "not_equal": np.not_equal,
    "greater": np.greater, "greater_equal": np.greater_equal, "less": np.less, "less_equal": np.less_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _ELEMENTWISE.items():
    _KERNELS[_name] = (lambda fn: lambda a: fn(a.f("x"), a.f("y")))(_fn)


@_kernel("floor_div")
def _floor_div(a: _Args) -> np.ndarray:
    return np.floor_divide(a.f("x"), a.f("y"))


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "tanh": np.tanh, "exp": np.exp, "sqrt": np.sqrt,
    "abs": np.abs, "erf": _erf, "square": np.square, "floor": np.floor, "ceil": np.ceil,
    "round": np.round, "sign": np.sign, "silu": lambda x: x / (1 + np.exp(-x)), "identity": lambda x: x,
    "softplus": lambda x: np.logaddexp(0, x), "logical_not": np.logical_not, "sin": np.sin, "cos": np.cos,
}
for _name, _fn in _UNARY.items():
    _KERNELS[_name] = (lambda fn: lambda a: fn(a.f("x")))(_fn)


@_kernel("rsqrt", "inverse", "log")
def _with_epsilon(a: _Args) -> np.ndarray:
    x = a.f("x")
    eps = float(a("epsilon", 1e-12 if a.op.type != "log" else 1e-45))
    match a.op.type:
        case "rsqrt":
            return 1 / np.sqrt(x + eps)
        case "inverse":
            return 1 / (x + eps)
    return np.log(x + eps)


@_kernel("sigmoid_hard")
def _sigmoid_hard(a: _Args) -> np.ndarray:
    return np.clip(float(a("alpha", 0.2)) * a.f("x") + float(a("beta", 0.5)), 0, 1)


@_kernel("elu")
def _elu(a: _Args) -> np.ndarray:
    x = a.f("x")
    return np.where(x > 0, x, float(a("alpha", 1.0)) * (np.exp(np.minimum(x, 0)) - 1))


@_kernel("leaky_relu")
def _leaky_relu(a: _Args) -> np.ndarray:
    x = a.f("x")
    return np.where(x >= 0, x, float(a("alpha", 0.01)) * x)


@_kernel("prelu")
def _prelu(a: _Args) -> np.ndarray:
    x, alpha = a.f("x"), a.f("alpha")
    alpha = alpha.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, alpha * x)


@_kernel("clip")
def _clip(a: _Args) -> np.ndarray:
    return np.clip(a.f("x"), a.f("alpha"), a.f("beta"))


@_kernel("gelu")
def _gelu(a: _Args) -> np.ndarray:
    x, mode = a.f("x"), a("mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


@_kernel("select")
def _select(a: _Args) -> np.ndarray:
    return np.where(a("cond"), a.f("a"), a.f("b"))


@_kernel("cast")
def _cast(a: _Args) -> np.ndarray:
    return np.asarray(a.f("x")).astype(_CAST_NAMES[a("dtype")])


@_kernel("softmax")
def _softmax(a: _Args) -> np.ndarray:
    x, axis = a.f("x"), int(a("axis", -1))
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


_REDUCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_sum": np.sum, "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, **kw: np.sum(np.abs(x), **kw),
    "reduce_l2_norm": lambda x, **kw: np.sqrt(np.sum(np.square(x), **kw)),
    "reduce_sum_square": lambda x, **kw: np.sum(np.square(x), **kw),
}


@_kernel(*_REDUCTIONS)
def _reduce(a: _Args) -> np.ndarray:
    x = a.f("x")
    axes = a.ints("axes")
    axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
    return _REDUCTIONS[a.op.type](x, axis=axes, keepdims=bool(a("keep_dims", False)))


@_kernel("batch_norm")
def _batch_norm(a: _Args) -> np.ndarray:
    x = a.f("x")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = a.f("mean").reshape(shape), a.f("variance").reshape(shape)
    gamma = a.f("gamma", np.ones(1, np.float32)).reshape(shape)
    beta = a.f("beta", np.zeros(1, np.float32)).reshape(shape)
    return (x - mean) / np.sqrt(var + float(a("epsilon", 1e-5))) * gamma + beta


@_kernel("instance_norm")
def _instance_norm(a: _Args) -> np.ndarray:
    x = a.f("x")
    axes = tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    normed = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + float(a("epsilon", 1e-5)))
    gamma, beta = a.f("gamma"), a.f("beta")
    return normed * (1 if gamma is None else gamma.reshape(shape)) + (0 if beta is None else beta.reshape(shape))


@_kernel("layer_norm")
def _layer_norm(a: _Args) -> np.ndarray:
    x = a.f("x")
    axes = tuple(a.ints("axes") or range(x.ndim))
    normed = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + float(a("epsilon", 1e-5)))
    gamma, beta = a.f("gamma"), a.f("beta")
    return normed * (1 if gamma is None else gamma) + (0 if beta is None else beta)


@_kernel("local_response_norm")
def _lrn(a: _Args) -> np.ndarray:
    x, size = a.f("x"), int(a("size"))
    squares = np.square(x)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = np.pad(squares, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    window = sum(padded[:, i : i + x.shape[1]] for i in range(size))
    return x / (float(a("k", 1.0)) + float(a("alpha", 1e-4)) / size * window) ** float(a("beta", 0.75))


# -- shapes --------------------------------------------------------------------------------------
@_kernel("reshape")
def _reshape(a: _Args) -> np.ndarray:
    x, shape = a("x"), a.ints("shape")
    return np.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


@_kernel("expand_dims")
def _expand_dims(a: _Args) -> np.ndarray:
    x, axes = a("x"), a.ints("axes")
    out_rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(ax % out_rank for ax in axes)))


@_kernel("squeeze")
def _squeeze(a: _Args) -> np.ndarray:
    x, axes = a("x"), a.ints("axes")
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))


@_kernel("transpose")
def _transpose(a: _Args) -> np.ndarray:
    return np.transpose(a("x"), a.ints("perm"))


@_kernel("concat")
def _concat(a: _Args) -> np.ndarray:
    if a("interleave", False):
        raise _unsupported("interleaved concat is not implemented")
    return np.concatenate(a.many("values"), axis=int(a("axis")))


@_kernel("split")
def _split(a: _Args) -> list[np.ndarray]:
    x, axis = a("x"), int(a("axis"))
    sizes = a.ints("split_sizes")
    if sizes is None:
        parts = int(a("num_splits"))
        sizes = [x.shape[axis] // parts] * parts
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


@_kernel("slice_by_index")
def _slice_by_index(a: _Args) -> np.ndarray:
    x = a("x")
    rank = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * rank)
    begin_mask = a("begin_mask", np.zeros(rank, bool))
    end_mask = a("end_mask", np.zeros(rank, bool))
    squeeze_mask = a("squeeze_mask", np.zeros(rank, bool))
    index = []
    for i in range(rank):
        start = None if begin_mask[i] else begin[i]
        stop = None if end_mask[i] else end[i]
        index.append(begin[i] if squeeze_mask[i] else slice(start, stop, stride[i]))
    return x[tuple(index)]


@_kernel("slice_by_size")
def _slice_by_size(a: _Args) -> np.ndarray:
    x, begin, size = a("x"), a.ints("begin"), a.ints("size")
    return x[tuple(slice(b, x.shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))]


@_kernel("pad")
def _pad(a: _Args) -> np.ndarray:
    x, pad, mode = a.f("x"), a.ints("pad"), a("mode", "constant")
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
    if mode == "constant":
        return np.pad(x, pairs, constant_values=float(a("constant_val", 0.0)))
    return np.pad(x, pairs, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@_kernel("tile")
def _tile(a: _Args) -> np.ndarray:
    return np.tile(a("x"), a.ints("reps"))


@_kernel("gather")
def _gather(a: _Args) -> np.ndarray:
    x, indices, axis = a("x"), a("indices").astype(np.int64), int(a("axis", 0))
    if int(a("batch_dims", 0)):
        raise _unsupported("gather with batch_dims is not implemented")
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take(x, indices, axis=axis)


@_kernel("gather_along_axis")
def _gather_along_axis(a: _Args) -> np.ndarray:
    return np.take_along_axis(a("x"), a("indices").astype(np.int64), axis=int(a("axis", 0)))


# -- linear algebra ------------------------------------------------------------------------------
@_kernel("linear")
def _linear(a: _Args) -> np.ndarray:
    y = a.f("x") @ a.f("weight").T
    bias = a.f("bias")
    return y if bias is None else y + bias


@_kernel("matmul")
def _matmul(a: _Args) -> np.ndarray:
    x, y = a.f("x"), a.f("y")
    if a("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_kernel("scaled_dot_product_attention")
def _sdpa(a: _Args) -> np.ndarray:
    query, key, value = a.f("query"), a.f("key"), a.f("value")
    scores = query @ np.swapaxes(key, -1, -2) / math.sqrt(query.shape[-1])
    mask = a("attn_mask")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask.astype(np.float32)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ value


def _same_pads(size: int, kernel: int, stride: int, dilation: int, lower: bool) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (large, small) if lower else (small, large)


def _pads(a: _Args, spatial_in: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = a("pad_type", "valid")
    if pad_type == "custom":
        pad = a.ints("pad")
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(kernel))]
    if pad_type in ("same", "same_lower"):
        return [_same_pads(n, k, s, d, pad_type == "same_lower") for n, k, s, d in zip(spatial_in, kernel, strides, dilations)]
    return [(0, 0)] * len(kernel)


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int]) -> np.ndarray:
    """(N, C, *out, *kernel) view of all (dilated, strided) windows of a padded NC* tensor."""
    spatial = len(kernel)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, extent, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)
    return view[index]


def _convolve(x: np.ndarray, weight: np.ndarray, strides: list[int], dilations: list[int], groups: int) -> np.ndarray:
    """Cross-correlation of padded x (N, C, *S) with weight (O, C/groups, *K)."""
    spatial = weight.ndim - 2
    windows = _windows(x, list(weight.shape[2:]), strides, dilations)
    n, c = x.shape[:2]
    out_channels = weight.shape[0]
    out_spatial = windows.shape[2 : 2 + spatial]
    k_axes = tuple(range(2 + spatial, 2 + 2 * spatial))
    if groups == 1:
        result = np.tensordot(windows, weight, axes=((1, *k_axes), (1, *range(2, 2 + spatial))))
        return np.moveaxis(result, -1, 1)
    per_group = c // groups
    outs = []
    group_weights = weight.reshape(groups, out_channels // groups, per_group, *weight.shape[2:])
    grouped = windows.reshape(n, groups, per_group, *windows.shape[2:])
    letters = "hwd"[:spatial]
    kernel_letters = "ijk"[:spatial]
    equation = f"ngc{letters}{kernel_letters},goc{kernel_letters}->ngo{letters}"
    outs = np.einsum(equation, grouped, group_weights, optimize=True)
    return outs.reshape(n, out_channels, *out_spatial)


@_kernel("conv")
def _conv(a: _Args) -> np.ndarray:
    x, weight = a.f("x"), a.f("weight")
    spatial = weight.ndim - 2
    strides = a.ints("strides", [1] * spatial)
    dilations = a.ints("dilations", [1] * spatial)
    pads = _pads(a, x.shape[2:], list(weight.shape[2:]), strides, dilations)
    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    out = _convolve(padded, weight, strides, dilations, int(a("groups", 1)))
    bias = a.f("bias")
    return out if bias is None else out + bias.reshape((1, -1) + (1,) * spatial)


@_kernel("conv_transpose")
def _conv_transpose(a: _Args) -> np.ndarray:
    x, weight = a.f("x"), a.f("weight")  # weight: (C_in, C_out / groups, *K)
    spatial = weight.ndim - 2
    strides = a.ints("strides", [1] * spatial)
    dilations = a.ints("dilations", [1] * spatial)
    groups = int(a("groups", 1))
    kernel = list(weight.shape[2:])
    if a("pad_type", "valid") != "custom":
        raise _unsupported("conv_transpose supports pad_type='custom' only")
    pad = a.ints("pad")
    n, c_in = x.shape[:2]
    dilated = np.zeros((n, c_in, *[(s - 1) * st + 1 for s, st in zip(x.shape[2:], strides)]), dtype=x.dtype)
    dilated[(slice(None), slice(None), *(slice(None, None, st) for st in strides))] = x
    natural = [(s - 1) * st + (k - 1) * d + 1 - pad[2 * i] - pad[2 * i + 1] for i, (s, st, k, d) in enumerate(zip(x.shape[2:], strides, kernel, dilations))]
    output_shape = a.ints("output_shape")
    extra = [0] * spatial if output_shape is None else [o - nat for o, nat in zip(output_shape[2:], natural)]
    pads = [((k - 1) * d - pad[2 * i], (k - 1) * d - pad[2 * i + 1] + extra[i]) for i, (k, d) in enumerate(zip(kernel, dilations))]
    padded = np.pad(dilated, [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in pads])
    crop = tuple(slice(max(-b, 0), padded.shape[2 + i] - max(-e, 0)) for i, (b, e) in enumerate(pads))
    padded = padded[(slice(None), slice(None), *crop)]
    per_group_in, per_group_out = c_in // groups, weight.shape[1]
    flipped = np.flip(weight, axis=tuple(range(2, 2 + spatial)))
    forward = flipped.reshape(groups, per_group_in, per_group_out, *kernel).swapaxes(1, 2).reshape(groups * per_group_out, per_group_in, *kernel)
    out = _convolve(padded, forward, [1] * spatial, dilations, groups)
    bias = a.f("bias")
    return out if bias is None else out + bias.reshape((1, -1) + (1,) * spatial)


@_kernel("max_pool", "avg_pool")
def _pool(a: _Args) -> np.ndarray:
    x = a.f("x")
    kernel = a.ints("kernel_sizes")
    spatial = len(kernel)
    strides = a.ints("strides", [1] * spatial)
    pads = _pads(a, x.shape[2:], kernel, strides, [1] * spatial)
    if a("ceil_mode", False):
        grown = []
        for size, k, s, (b, e) in zip(x.shape[2:], kernel, strides, pads):
            out = -(-(size + b + e - k) // s) + 1
            if (out - 1) * s >= size + b:
                out -= 1
            grown.append((b, e, max((out - 1) * s + k - (size + b + e), 0)))
    else:
        grown = [(b, e, 0) for b, e in pads]
    is_max = a.op.type == "max_pool"
    fill = -np.inf if is_max else 0.0
    padded = np.pad(x, [(0, 0), (0, 0)] + [(b, e + extra) for b, e, extra in grown], constant_values=fill)
    axes = tuple(range(-spatial, 0))
    windows = _windows(padded, kernel, strides, [1] * spatial)
    if is_max:
        return windows.max(axis=axes)
    ones = np.ones((1, 1, *x.shape[2:]), np.float32)
    if a("exclude_padding_from_average", False):
        counted = np.pad(ones, [(0, 0), (0, 0)] + [(b, e + extra) for b, e, extra in grown])
    else:
        counted = np.pad(ones, [(0, 0), (0, 0)] + [(b, e) for b, e, _ in grown], constant_values=1.0)
        counted = np.pad(counted, [(0, 0), (0, 0)] + [(0, extra) for _, _, extra in grown])
    return windows.sum(axis=axes) / _windows(counted, kernel, strides, [1] * spatial).sum(axis=axes)


# -- resizing ------------------------------------------------------------------------------------
def _interpolate(x: np.ndarray, axis: int, grid: np.ndarray) -> np.ndarray:
    low = np.clip(np.floor(grid).astype(np.int64), 0, x.shape[axis] - 1)
    high = np.clip(low + 1, 0, x.shape[axis] - 1)
    frac = (grid - low).reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)])
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def _grid(size_in: int, size_out: int, mode: str) -> np.ndarray:
    """Sampling positions of resize_bilinear's `sampling_mode` (MIL docs, 1-D case)."""
    i = np.arange(size_out, dtype=np.float64)
    match mode:
        case "STRICT_ALIGN_CORNERS" | "ALIGN_CORNERS":
            if size_out == 1:
                return np.array([(size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0])
            grid = i * (size_in - 1) / (size_out - 1)
        case "DEFAULT":
            grid = i * (size_in - size_in / size_out) / max(size_out - 1, 1)
        case "OFFSET_CORNERS":
            delta = max(1, size_in - 1) / size_out
            grid = 0.5 * delta + i * delta
        case "UNALIGN_CORNERS":
            spacing = size_in / size_out
            grid = i * spacing + 0.5 * spacing - 0.5
        case _:
            raise _unsupported(f"unknown sampling_mode {mode}")
    return np.clip(grid, 0, size_in - 1)


@_kernel("resize_bilinear")
def _resize_bilinear(a: _Args) -> np.ndarray:
    x, mode = a.f("x"), a("sampling_mode", "DEFAULT")
    height, width = int(a("target_size_height", 1)), int(a("target_size_width", 1))
    out = _interpolate(x, -2, _grid(x.shape[-2], height, mode))
    return _interpolate(out, -1, _grid(x.shape[-1], width, mode))


@_kernel("upsample_bilinear")
def _upsample_bilinear(a: _Args) -> np.ndarray:
    x = a.f("x")
    scale_h, scale_w = float(a("scale_factor_height", 1)), float(a("scale_factor_width", 1))
    height, width = int(math.floor(x.shape[-2] * scale_h)), int(math.floor(x.shape[-1] * scale_w))
    align = bool(a("align_corners", True))
    half_pixel = bool(a("half_pixel_centers", not align))
    mode = "ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half_pixel else "DEFAULT")
    if mode == "DEFAULT":
        grid_h, grid_w = (np.clip(np.arange(n) / s, 0, m - 1) for n, s, m in ((height, scale_h, x.shape[-2]), (width, scale_w, x.shape[-1])))
    else:
        grid_h, grid_w = _grid(x.shape[-2], height, mode), _grid(x.shape[-1], width, mode)
    return _interpolate(_interpolate(x, -2, grid_h), -1, grid_w)


@_kernel("upsample_nearest_neighbor")
def _upsample_nearest(a: _Args) -> np.ndarray:
    x = a("x")
    scale_h, scale_w = float(a("scale_factor_height", 1)), float(a("scale_factor_width", 1))
    rows = np.floor(np.arange(int(x.shape[-2] * scale_h)) / scale_h).astype(np.int64)
    cols = np.floor(np.arange(int(x.shape[-1] * scale_w)) / scale_w).astype(np.int64)
    return np.take(np.take(x, rows, axis=-2), cols, axis=-1)


@_kernel("resize_nearest_neighbor")
def _resize_nearest(a: _Args) -> np.ndarray:
    x = a("x")
    height, width = int(a("target_size_height")), int(a("target_size_width"))
    rows = np.minimum(np.floor(np.arange(height) * x.shape[-2] / height), x.shape[-2] - 1).astype(np.int64)
    cols = np.minimum(np.floor(np.arange(width) * x.shape[-1] / width), x.shape[-1] - 1).astype(np.int64)
    return np.take(np.take(x, rows, axis=-2), cols, axis=-1)


# -- quantization --------------------------------------------------------------------------------
def _along(param: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[axis % rank] = -1
    return param.reshape(shape)


@_kernel("quantize")
def _quantize(a: _Args) -> np.ndarray:
    x = a.f("input")
    axis = a("axis")
    rank = x.ndim
    scale = _along(a.f("scale"), None if axis is None else int(axis), rank)
    zero_point = a("zero_point")
    dtype = np.int8 if a("output_dtype") == "int8" else np.uint8
    offset = 0 if zero_point is None else _along(zero_point.astype(np.float32), None if axis is None else int(axis), rank)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + offset, info.min, info.max).astype(dtype)


@_kernel("dequantize")
def _dequantize(a: _Args) -> np.ndarray:
    x = a("input").astype(np.float32)
    axis = a("axis")
    rank = x.ndim
    scale = _along(a.f("scale"), None if axis is None else int(axis), rank)
    zero_point = a("zero_point")
    offset = 0 if zero_point is None else _along(zero_point.astype(np.float32), None if axis is None else int(axis), rank)
    return (x - offset) * scale


@_kernel("constexpr_affine_dequantize")
def _affine_dequantize(a: _Args) -> np.ndarray:
    data = a("quantized_data").astype(np.float32)
    axis = int(a("axis"))
    scale = _along(a.f("scale"), axis, data.ndim)
    zero_point = _along(a("zero_point").astype(np.float32), axis, data.ndim)
    return (data - zero_point) * scale


def _blockwise(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter (same rank as the data) up to the data's shape."""
    for axis, (size, blocks) in enumerate(zip(shape, param.shape)):
        param = np.repeat(param, size // blocks, axis=axis)
    return param


@_kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a: _Args) -> np.ndarray:
    data = a("data").astype(np.float32)
    scale = _blockwise(a.f("scale"), data.shape)
    offset = a("offset")
    return (data - (0 if offset is None else _blockwise(offset.astype(np.float32), data.shape))) * scale


@_kernel("constexpr_lut_to_dense")
def _lut_to_dense(a: _Args) -> np.ndarray:
    lut, indices = a.f("lut"), a("indices")
    shape = a.ints("shape")
    if shape is not None:
        # iOS 16/17: a flat lut of 2**n entries and indices packed n bits each into a uint8 stream.
        bits = int(math.log2(lut.shape[-1] if lut.ndim == 1 else lut.size))
        count = math.prod(shape)
        raw = np.asarray(indices, dtype=np.uint8).tobytes()
        return lut.reshape(-1)[_unpack_bits(raw, bits, count, signed=False).astype(np.int64)].reshape(shape)
    # iOS 18: indices have the output's shape; lut is [*blocks, 2**n, vector] with one table per block.
    indices = indices.astype(np.int64)
    rank = indices.ndim
    vector = lut.shape[-1]
    if vector != 1:
        raise _unsupported("vector palettization is not implemented")
    tables = lut[..., 0]
    out = np.empty(indices.shape, np.float32)
    block = [indices.shape[i] // tables.shape[i] for i in range(rank)]
    for position in np.ndindex(*tables.shape[:rank]):
        region = tuple(slice(p * b, (p + 1) * b) for p, b in zip(position, block))
        out[region] = tables[position][indices[region]]
    return out


@_kernel("constexpr_cast")
def _constexpr_cast(a: _Args) -> np.ndarray:
    return a("source_val").astype(_CAST_NAMES[a("output_dtype")])
