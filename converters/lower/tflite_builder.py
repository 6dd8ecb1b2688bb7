"""A small writer for TFLite flatbuffers on top of the schema's generated object API.

LiteRT's Python package ships `schema_py_generated` (ModelT, SubGraphT, TensorT, OperatorT, BufferT
...); this module holds one subgraph's tensors, constant buffers and operators and packs them with
`flatbuffers`, so the lowering needs no TensorFlow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from edgeopt.runtime.spec import TensorQuantization

__all__ = ["QuantParams", "TFLiteBuilder", "TENSOR_TYPES", "builtin_name"]

TENSOR_TYPES: dict[str, int] = {
    "float32": schema.TensorType.FLOAT32,
    "float16": schema.TensorType.FLOAT16,
    "int32": schema.TensorType.INT32,
    "int64": schema.TensorType.INT64,
    "int8": schema.TensorType.INT8,
    "uint8": schema.TensorType.UINT8,
    "int16": schema.TensorType.INT16,
    "bool": schema.TensorType.BOOL,
}

_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
# Builtin codes above 127 live in `builtin_code`; the deprecated int8 field holds this placeholder.
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127


def builtin_name(code: int) -> str:
    return _BUILTIN_NAMES[code]


@dataclass(frozen=True)
class QuantParams:
    """Affine int quantization of one tensor: real = (q - zero_point) * scale, per tensor or per axis."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    dtype: str = "int8"
    axis: int = 0

    @property
    def per_tensor(self) -> bool:
        return len(self.scale) == 1

    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float64)

    def zero_point_array(self) -> np.ndarray:
        return np.asarray(self.zero_point, dtype=np.int64)

    def same_as(self, other: QuantParams | None) -> bool:
        if other is None or self.dtype != other.dtype or len(self.scale) != len(other.scale):
            return False
        return bool(
            np.allclose(self.scale, other.scale, rtol=1e-6, atol=0.0)
            and tuple(self.zero_point) == tuple(other.zero_point)
        )

    def to_dict(self) -> TensorQuantization:
        if self.per_tensor:
            return {"scale": float(self.scale[0]), "zero_point": int(self.zero_point[0])}
        return {"scale": [float(s) for s in self.scale], "zero_point": [int(z) for z in self.zero_point], "axis": self.axis}


class TFLiteBuilder:
    """One subgraph under construction; tensors are addressed by their index."""

    def __init__(self, description: str) -> None:
        self._model = schema.ModelT()
        self._model.version = 3
        self._model.description = description
        self._model.buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel
        self._model.operatorCodes = []
        self._opcode_index: dict[tuple[int, int], int] = {}
        self._graph = schema.SubGraphT()
        self._graph.name = "main"
        self._graph.tensors = []
        self._graph.operators = []
        self._graph.inputs = []
        self._graph.outputs = []
        self._names: set[str] = set()
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[str] = []
        self.quant: list[QuantParams | None] = []
        self.constants: dict[int, np.ndarray] = {}
        self.op_histogram: Counter[str] = Counter()

    def _unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}_{n}"
        self._names.add(candidate)
        return candidate

    def tensor(
        self, name: str, shape: Sequence[int], dtype: str, quant: QuantParams | None = None, data: np.ndarray | None = None
    ) -> int:
        """Add a tensor (a constant when `data` is given) and return its index."""
        t = schema.TensorT()
        t.name = self._unique(name)
        t.shape = [int(d) for d in shape]
        t.type = TENSOR_TYPES[dtype]
        t.buffer = 0
        t.hasRank = True
        if data is not None:
            array = np.ascontiguousarray(np.asarray(data, dtype=dtype).reshape(tuple(shape)))
            buffer = schema.BufferT()
            buffer.data = array.reshape(-1).view(np.uint8)
            self._model.buffers.append(buffer)
            t.buffer = len(self._model.buffers) - 1
            self.constants[len(self._graph.tensors)] = array
        if quant is not None:
            q = schema.QuantizationParametersT()
            q.scale = [float(s) for s in quant.scale]
            q.zeroPoint = [int(z) for z in quant.zero_point]
            q.quantizedDimension = 0 if quant.per_tensor else int(quant.axis)
            t.quantization = q
        self._graph.tensors.append(t)
        self.shapes.append(tuple(int(d) for d in shape))
        self.dtypes.append(dtype)
        self.quant.append(quant)
        return len(self._graph.tensors) - 1

    def constant(self, name: str, data: np.ndarray, dtype: str | None = None, quant: QuantParams | None = None) -> int:
        array = np.asarray(data)
        return self.tensor(name, array.shape, dtype or str(array.dtype), quant, array)

    def tensor_name(self, index: int) -> str:
        return self._graph.tensors[index].name

    def op(
        self,
        code: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int = 0,
        options: Any = None,
        version: int = 1,
    ) -> None:
        """Append an operator; -1 in `inputs` marks an omitted optional input."""
        key = (code, version)
        if key not in self._opcode_index:
            opcode = schema.OperatorCodeT()
            opcode.builtinCode = code
            opcode.deprecatedBuiltinCode = min(code, _PLACEHOLDER_FOR_GREATER_OP_CODES)
            opcode.version = version
            self._model.operatorCodes.append(opcode)
            self._opcode_index[key] = len(self._model.operatorCodes) - 1
        operator = schema.OperatorT()
        operator.opcodeIndex = self._opcode_index[key]
        operator.inputs = [int(i) for i in inputs]
        operator.outputs = [int(o) for o in outputs]
        operator.builtinOptionsType = options_type
        operator.builtinOptions = options
        self._graph.operators.append(operator)
        self.op_histogram[builtin_name(code)] += 1

    def set_io(self, inputs: Sequence[int], outputs: Sequence[int]) -> None:
        self._graph.inputs = list(inputs)
        self._graph.outputs = list(outputs)

    def rename(self, index: int, name: str) -> None:
        """Give a graph input or output the user-visible name (the ONNX tensor name)."""
        current = self._graph.tensors[index].name
        if current == name:
            return
        for tensor in self._graph.tensors:
            if tensor.name == name:
                tensor.name = self._unique(f"{name}_internal")
        self._names.discard(current)
        self._names.add(name)
        self._graph.tensors[index].name = name

    def serialize(self) -> bytes:
        self._model.subgraphs = [self._graph]
        signature = schema.SignatureDefT()
        signature.signatureKey = "serving_default"
        signature.subgraphIndex = 0
        signature.inputs = [self._tensor_map(i) for i in self._graph.inputs]
        signature.outputs = [self._tensor_map(i) for i in self._graph.outputs]
        self._model.signatureDefs = [signature]
        payload = sum(len(b.data) for b in self._model.buffers if b.data is not None)
        builder = flatbuffers.Builder(payload + 16 * 1024 * 1024)
        builder.Finish(self._model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def _tensor_map(self, index: int) -> schema.TensorMapT:
        tensor_map = schema.TensorMapT()
        tensor_map.name = self._graph.tensors[index].name
        tensor_map.tensorIndex = index
        return tensor_map
