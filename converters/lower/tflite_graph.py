"""The state of one ONNX→TFLite conversion: where each ONNX value lives and in which layout.

Every ONNX value may exist as several TFLite tensors ("variants"), keyed by a permutation and a
quantization: the tensor holds `onnx_value.transpose(perm)`, as float or as int8 with given scale and
zero point. Ops ask for the variant they need; a missing one is made on demand with the cheapest op
(RESHAPE when the permutation only moves size-1 axes, else TRANSPOSE; QUANTIZE/DEQUANTIZE for the
dtype), so layout changes appear only where an op's semantics need them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from ai_edge_litert import schema_py_generated as schema

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.graph.opset import ir_opset
from edgeopt.converters.graph.rewrite import constant_array
from edgeopt.converters.lower.tflite_builder import QuantParams, TFLiteBuilder
from edgeopt.converters.lower.tflite_prepare import Prepared
from edgeopt.runtime.kinds import Precision

__all__ = ["Conversion", "QConst", "attributes", "identity", "input_names", "nhwc_perm", "output_names", "same_memory_order"]

log = logging.getLogger(__name__)

Perm = tuple[int, ...]
Op = schema.BuiltinOperator
Opt = schema.BuiltinOptions


def input_names(node: ir.Node) -> list[str]:
    """The node's input names, as the conversion's tables key values ("" for an omitted optional input)."""
    return [value.name if value is not None else "" for value in node.inputs]


def output_names(node: ir.Node) -> list[str]:
    return [value.name or "" for value in node.outputs]


def attributes(node: ir.Node) -> dict[str, object]:
    """The node's attributes as Python values (ints, floats, str, tuples)."""
    return {name: attribute.value for name, attribute in node.attributes.items()}


def identity(rank: int) -> Perm:
    return tuple(range(rank))


def nhwc_perm(rank: int) -> Perm:
    """Channels-last permutation of an ONNX channels-first tensor (NCHW→NHWC, NCW→NWC)."""
    return (0, *range(2, rank), 1) if rank >= 3 else identity(rank)


def channel_last_family(rank: int) -> list[Perm]:
    """(0, j..r-1, 1..j-1): the layouts a channels-last tensor has after its channel axis is split."""
    return [(0, *range(j, rank), *range(1, j)) for j in range(2, rank)] if rank >= 3 else []


_ORDER_CHECK_LIMIT = 1 << 24


def same_memory_order(in_shape: Sequence[int], in_perm: Perm, out_shape: Sequence[int], out_perm: Perm) -> bool:
    """Whether reshaping ONNX `in_shape` to `out_shape` is a plain RESHAPE between the two layouts."""
    size = int(np.prod(in_shape, dtype=np.int64))
    if size != int(np.prod(out_shape, dtype=np.int64)) or size > _ORDER_CHECK_LIMIT:
        return False
    index = np.arange(size, dtype=np.int32).reshape(tuple(in_shape))
    return bool(np.array_equal(index.transpose(in_perm).ravel(), index.reshape(tuple(out_shape)).transpose(out_perm).ravel()))


@dataclass(frozen=True)
class QConst:
    """A constant stored as integers with its quantization (the input of a DequantizeLinear)."""

    values: np.ndarray
    params: QuantParams

    def dequantized(self) -> np.ndarray:
        scale = self.params.scale_array()
        zero = self.params.zero_point_array()
        if not self.params.per_tensor:
            shape = [1] * self.values.ndim
            shape[self.params.axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return (self.values.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)


@dataclass
class Value:
    """A dynamic ONNX value and its TFLite variants."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    variants: dict[tuple[Perm, QuantParams | None], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Ref:
    """An ONNX name that reads another value, optionally through a Q→DQ pair (fake quantization)."""

    base: str
    quant: QuantParams | None = None


class Conversion:
    """Holds the builder and the value table while the op lowerings run in graph order."""

    def __init__(self, prepared: Prepared, builder: TFLiteBuilder, precision: Precision) -> None:
        graph = prepared.model.graph
        self.graph = graph
        self.probed = prepared.probed
        self.opset = ir_opset(graph) or 1
        self.graph_values = ir.convenience.create_value_mapping(graph)
        self.graph_outputs = {value.name for value in graph.outputs}
        # Folded constants by name; handlers add the few they derive (a reciprocal, a one).
        self.constants = {
            name: array for name, value in graph.initializers.items() if (array := constant_array(value)) is not None
        }
        self.builder = builder
        self.precision = precision
        self.values: dict[str, Value] = {}
        self.refs: dict[str, Ref] = {}
        self.qconsts: dict[str, QConst] = {}
        self.adaptations: list[str] = []
        self.consumers: dict[str, list[ir.Node]] = {}
        for node in graph:
            for name in input_names(node):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.skip: set[int] = set()
        self.pending_q: dict[str, tuple[str, QuantParams]] = {}
        self.pending_requant: list[tuple[int, int]] = []
        # Flattened values whose columns follow a channels-last order: column j holds ONNX column order[j].
        self.column_order: dict[str, np.ndarray] = {}
        self.fused_bias = 0
        self.fake_quantized: dict[tuple[str, Perm, QuantParams], int] = {}
        self.dq_constants = {
            n.outputs[0].name for n in graph if n.op_type == "DequantizeLinear" and input_names(n)[0] in self.constants
        }

    # ----- the prepared graph ------------------------------------------------------------------
    def graph_shape(self, name: str) -> tuple[int, ...]:
        """The static ONNX shape of a value of the prepared graph."""
        if name in self.constants:
            return tuple(self.constants[name].shape)
        return tuple(int(d) for d in self.graph_values[name].shape)

    def graph_dtype(self, name: str) -> np.dtype:
        value = self.graph_values.get(name)
        return value.dtype.numpy() if value is not None and value.dtype is not None else np.dtype(np.float32)

    # ----- constants -------------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return name in self.constants or name in self.qconsts

    def is_weight(self, name: str) -> bool:
        """Constant now or once its DequantizeLinear is reached (usable before graph order gets there)."""
        return self.is_const(name) or name in self.dq_constants

    def const(self, name: str) -> np.ndarray:
        """The float (or integer) value of a constant input, dequantized if it sits behind a DQ."""
        if name in self.qconsts:
            return self.qconsts[name].dequantized()
        if name not in self.constants:
            raise LoweringError(f"input '{name}' must be a constant for this op", hint="fold it before lowering")
        return self.constants[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.refs:
            return self.values[self.refs[name].base].shape
        if name in self.values:
            return self.values[name].shape
        if name in self.qconsts:
            return tuple(self.qconsts[name].values.shape)
        return self.graph_shape(name)

    def quant_of(self, name: str) -> QuantParams | None:
        """The int8 params an input carries (activation behind Q→DQ, or DQ constant)."""
        if name in self.refs:
            return self.refs[name].quant
        if name in self.qconsts:
            return self.qconsts[name].params
        return None

    def output_quant(self, name: str) -> QuantParams | None:
        """The params of the Q nodes that read `name`, when every reader is such a Q (the QDQ form)."""
        users = self.consumers.get(name, [])
        if not users or name in self.graph_outputs:
            return None
        params = {self.q_params(u) for u in users if u.op_type == "QuantizeLinear"}
        if len(params) != 1 or any(u.op_type != "QuantizeLinear" for u in users):
            return None
        return params.pop()

    def q_params(self, node: ir.Node) -> QuantParams:
        """The quantization a QuantizeLinear or DequantizeLinear node applies."""
        inputs = input_names(node)
        scale = np.asarray(self.const(inputs[1]), dtype=np.float64).reshape(-1)
        has_zero = len(inputs) > 2 and inputs[2]
        zero = np.asarray(self.const(inputs[2])).reshape(-1) if has_zero else np.zeros(scale.shape, np.int64)
        dtype = str(np.asarray(self.const(inputs[2])).dtype) if has_zero else "uint8"
        axis = node.attributes.get_int("axis", 1) if scale.size > 1 else 0
        return QuantParams(tuple(float(s) for s in scale), tuple(int(z) for z in zero), dtype, axis)

    def const_tensor(self, name: str, data: np.ndarray, dtype: str | None = None, quant: QuantParams | None = None) -> int:
        """A constant tensor; in fp16 precision large float weights are stored half and dequantized at load."""
        array = np.asarray(data)
        if dtype is None and array.dtype == np.float64:
            array = array.astype(np.float32)
        if dtype is None and array.dtype == np.int64 and quant is None:
            array = array.astype(np.int32) if np.abs(array).max(initial=0) < 2**31 else array
        if self.precision == Precision.FP16 and quant is None and (dtype or str(array.dtype)) == "float32" and array.size >= 16:
            half = self.builder.constant(f"{name}_fp16", array.astype(np.float16), "float16")
            out = self.builder.tensor(name, array.shape, "float32")
            self.builder.op(Op.DEQUANTIZE, [half], [out], version=3)
            return out
        return self.builder.constant(name, array, dtype, quant)

    # ----- dynamic values ---------------------------------------------------------------------
    def add_value(self, name: str, shape: Sequence[int], dtype: str) -> Value:
        value = Value(name, tuple(int(d) for d in shape), dtype)
        self.values[name] = value
        return value

    def resolve(self, name: str) -> tuple[Value, QuantParams | None]:
        if name in self.refs:
            ref = self.refs[name]
            return self.values[ref.base], ref.quant
        if name not in self.values:
            raise LoweringError(f"tensor '{name}' is used before it is produced", hint="check the graph order")
        return self.values[name], None

    def natural_perm(self, name: str) -> Perm:
        value, _ = self.resolve(name)
        return next(iter(value.variants))[0]

    def has_float_variant(self, name: str) -> bool:
        value, _ = self.resolve(name)
        return any(q is None for _, q in value.variants)

    def new_output(self, name: str, perm: Perm, quant: QuantParams | None, dtype: str | None = None) -> int:
        """The TFLite tensor for ONNX output `name` in layout `perm` (float unless `quant`)."""
        shape = self.graph_shape(name)
        onnx_dtype = dtype or str(self.graph_dtype(name))
        value = self.values.get(name) or self.add_value(name, shape, onnx_dtype)
        tensor_dtype = quant.dtype if quant is not None else onnx_dtype
        if tensor_dtype == "int64":
            tensor_dtype = "int32" if onnx_dtype == "int64" and name not in self.graph_outputs else tensor_dtype
        index = self.builder.tensor(name, [shape[p] for p in perm], tensor_dtype, quant)
        value.variants[(perm, quant)] = index
        return index

    def alias(self, name: str, source: str, perm_map: Perm | None = None) -> None:
        """`name` is `source` seen through an ONNX transpose (or unchanged): no TFLite op needed."""
        value, quant = self.resolve(source)
        if perm_map is None:
            self.refs[name] = Ref(value.name, quant)
            return
        target = self.add_value(name, self.graph_shape(name), value.dtype)
        for (perm, q), index in value.variants.items():
            target.variants[(tuple(perm_map.index(p) for p in perm), q)] = index
        if quant is not None:
            self.refs[name] = Ref(name, quant)

    def get(self, name: str, perm: Perm | None = None, quant: QuantParams | None | str = None) -> int:
        """The tensor of input `name` in layout `perm` (None: any) and dtype: float, "q" (its int8 params) or given params."""
        if self.is_const(name):
            raise LoweringError(f"internal: constant '{name}' requested as activation")
        value, ref_quant = self.resolve(name)
        self._narrow_int64(value)
        want_q = ref_quant if quant == "q" else quant
        if quant == "q" and want_q is None:
            raise LoweringError(f"tensor '{name}' has no int8 params in the QDQ graph")
        if perm is None:
            perms = [p for p, q in value.variants if q == want_q] or [p for p, _ in value.variants]
            perm = perms[0]
        produced_as = next(iter(value.variants))[1]
        if quant is None and ref_quant is not None and not ref_quant.same_as(produced_as):
            return self._fake_quantized(name, value, perm, ref_quant)
        key = (perm, want_q)
        if key in value.variants:
            return value.variants[key]
        # Same dtype, other layout: permute.
        for (p, q), index in list(value.variants.items()):
            if q == want_q:
                return self._permute(value, index, p, perm, q)
        # Other dtype: (de)quantize in a layout we have, then permute.
        source_perm, source_q = self._best_source(value, perm, want_q, ref_quant)
        source = value.variants[(source_perm, source_q)]
        out = self._convert(value, source, source_perm, source_q, want_q)
        if source_perm != perm:
            return self._permute(value, out, source_perm, perm, want_q)
        return out

    def _narrow_int64(self, value: Value) -> None:
        """int64 values are int32 tensors inside the file (see new_output); an int64 graph input is CAST once,
        on first use, so RESHAPE and the other dtype-keeping ops never pair an int64 input with an int32 output
        (RESHAPE copies bytes: the int64 attention mask of a BERT export was read as int32 pairs)."""
        if value.name in self.graph_outputs:
            return
        for key, index in list(value.variants.items()):
            if self.builder.dtypes[index] == "int64":
                narrow = self.builder.tensor(f"{value.name}_int32", self.builder.shapes[index], "int32")
                self.builder.op(Op.CAST, [index], [narrow], Opt.CastOptions, schema.CastOptionsT())
                value.variants[key] = narrow

    def _fake_quantized(self, name: str, value: Value, perm: Perm, params: QuantParams) -> int:
        """A float reader behind Q→DQ of a value made in float (or at other params): QUANTIZE then DEQUANTIZE,
        which is what the QDQ graph computes."""
        key = (value.name, perm, params)
        if key not in self.fake_quantized:
            quantized = self.get(name, perm, "q")
            out = self.builder.tensor(f"{value.name}_fq", [value.shape[p] for p in perm], "float32")
            self.builder.op(Op.DEQUANTIZE, [quantized], [out], version=2)
            self.fake_quantized[key] = out
        return self.fake_quantized[key]

    def _best_source(
        self, value: Value, perm: Perm, want: QuantParams | None, ref_quant: QuantParams | None
    ) -> tuple[Perm, QuantParams | None]:
        keys = list(value.variants)
        keys.sort(key=lambda k: (k[0] != perm, not (k[1] is not None and ref_quant is not None and k[1] == ref_quant)))
        return keys[0]

    def _convert(self, value: Value, source: int, perm: Perm, have: QuantParams | None, want: QuantParams | None) -> int:
        key = (perm, want)
        if key in value.variants:
            return value.variants[key]
        shape = [value.shape[p] for p in perm]
        dtype = want.dtype if want is not None else "float32"
        out = self.builder.tensor(f"{value.name}_{'q' if want else 'dq'}", shape, dtype, want)
        if want is None:
            self.builder.op(Op.DEQUANTIZE, [source], [out], version=2)
        else:
            self.builder.op(Op.QUANTIZE, [source], [out], version=2)
        value.variants[key] = out
        return out

    def _permute(self, value: Value, source: int, have: Perm, want: Perm, quant: QuantParams | None) -> int:
        shape = [value.shape[p] for p in want]
        dtype = self.builder.dtypes[source]
        out = self.builder.tensor(f"{value.name}_{'x'.join(map(str, want))}", shape, dtype, quant)
        if same_memory_order(value.shape, have, value.shape, want):
            self.reshape_op(source, out, shape)
        else:
            relative = [have.index(p) for p in want]
            self.builder.op(Op.TRANSPOSE, [source, self.builder.constant(f"{value.name}_perm", np.asarray(relative, np.int32))], [out], version=2)
        value.variants[(want, quant)] = out
        return out

    def reshape_op(self, source: int, out: int, shape: Sequence[int]) -> None:
        options = schema.ReshapeOptionsT()
        options.newShape = [int(d) for d in shape]
        shape_tensor = self.builder.constant(f"{self.builder.tensor_name(out)}_shape", np.asarray(shape, np.int32))
        self.builder.op(Op.RESHAPE, [source, shape_tensor], [out], Opt.ReshapeOptions, options)

    def adapt(self, message: str) -> None:
        """A change the lowering made to fit TFLite's rules; logged and reported in the summary."""
        log.warning("tflite lowering: %s", message)
        self.adaptations.append(message)
