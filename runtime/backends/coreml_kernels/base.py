"""What every kernel of the Core ML reference evaluator shares: the registry, an op's inputs, the errors.

A kernel is `kernel(args) -> array` (or a list of arrays for ops with several outputs), registered in
`KERNELS` by MIL op type. Where a kernel handles only part of an op's definition, its `supports(args)`
check sits beside it and says why not; the evaluator asks it before running the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgeopt.runtime.errors import BackendUnavailableError
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.op_registry import OpRegistry

__all__ = ["CAST_NAMES", "KERNELS", "Args", "Kernel", "MilValue", "cast_support", "unpack_bits", "unsupported"]

#: a value in a running program: a tensor, or a string (dtype names, modes and other string constants)
MilValue = np.ndarray | str

#: MIL dtype names (cast, constexpr_cast) -> what the evaluator computes in; 64-bit as Core ML runs it
CAST_NAMES: dict[str, type] = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float32, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": bool, "int64": np.int32,
}


def cast_support(a: Args, key: str = "dtype") -> str | None:
    """cast and constexpr_cast name their result's dtype: supported when it is one of CAST_NAMES."""
    dtype = a(key)
    return None if dtype in CAST_NAMES else f"{a.op.type} to dtype {dtype!r} is not implemented"


def unsupported(what: str) -> BackendUnavailableError:
    """A program this evaluator cannot run: Core ML (on a Mac) still can."""
    return BackendUnavailableError(
        f"{BackendName.COREML_REFERENCE}: {what}",
        hint="run the bundle with Core ML on a Mac (--backend coreml), or rebuild it without that op",
    )


def unpack_bits(raw: bytes, bits: int, count: int, signed: bool) -> np.ndarray:
    """Sub-byte values packed little-endian: value i occupies bits [i*bits, (i+1)*bits) of the stream."""
    stream = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits, dtype=np.int32))
    values = stream.reshape(count, bits).astype(np.int32) @ weights
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values.astype(np.int8 if signed else np.uint8)


class Args:
    """The inputs of one op, decoded to numpy (variadic inputs as lists), with defaults.

    `decode` turns a MIL_pb2.Value (immediate or in the weight file) into numpy or a Python string.
    """

    def __init__(self, op: Any, env: dict[str, MilValue], decode: Callable[[Any], MilValue]) -> None:
        self.op, self.env, self.decode = op, env, decode

    def _one(self, binding: Any) -> Any:
        if binding.WhichOneof("binding") == "name":
            return self.env[binding.name]
        return self.decode(binding.value)

    def __call__(self, key: str, default: Any = None) -> Any:
        if key in self.op.inputs:
            return self._one(self.op.inputs[key].arguments[0])
        if key in self.op.attributes and key != "name":
            return self.decode(self.op.attributes[key])
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


Kernel = Callable[[Args], Any]

#: MIL op type -> kernel and its support check, filled by the family modules of this package
KERNELS: OpRegistry[Kernel] = OpRegistry("edgeopt's Core ML reference evaluator")
