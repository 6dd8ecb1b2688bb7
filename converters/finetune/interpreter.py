"""The ONNX graph, fp32 or QDQ, executed as a `torch.nn.Module` whose parameters are its initializers.

Fine-tuning trains the very graph that ships (no export to PyTorch and back): `TrainableGraph` reads
the graph through onnx_ir once into plain node records, and `forward` runs the nodes in order with
the torch handlers of `converters/finetune/ops`. Float initializers that are a layer's weights (the
weight and bias inputs of Conv/Gemm/MatMul, normalization scales and biases, Gather tables) are
`nn.Parameter`s (trainable); other constants (folded anchor grids, BatchNorm statistics, Clip bounds,
Mul/Add constants) and integer tensors are buffers. In a QDQ graph every QuantizeLinear (with the DequantizeLinears that
read it) and every DequantizeLinear of a stored weight is a `FakeQuantizer`; `quant_params()` says which
ONNX nodes and initializers each one came from, so trained values go back into the same graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from edgeopt.converters.errors import UnsupportedOpsError
from edgeopt.converters.finetune.fake_quant import FakeQuantizer, QuantizerMode, QuantSpec, integer_range
from edgeopt.converters.finetune.ops import REGISTRY
from edgeopt.converters.finetune.ops.common import TORCH_DTYPES, NodeSpec
from edgeopt.converters.quantize.placement import sums_products_pairwise
from edgeopt.converters.graph.qdq import int_attribute, producer_op, qparams, quantization_source
from edgeopt.runtime.errors import InputSpecError, OptionError

if TYPE_CHECKING:
    from edgeopt.targets import QuantScheme

__all__ = ["QuantRecord", "TrainableGraph"]

INTERPRETER = "edgeopt's trainable interpreter"
_QDQ = ("QuantizeLinear", "DequantizeLinear")

#: (op, input index) of a layer's weights: the float initializers there train. Constants elsewhere do
#: not: after simplify they include folded anchor grids and position tables (yolov8n's head) that
#: gradient descent must not move, and BatchNorm's statistics.
_WEIGHT_INPUTS = frozenset(
    {("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2), ("Gemm", 0), ("Gemm", 1), ("Gemm", 2), ("MatMul", 0), ("MatMul", 1)}
    | {(op, i) for op in ("LayerNormalization", "BatchNormalization", "InstanceNormalization") for i in (1, 2)}
    | {("Gather", 0), ("PRelu", 1), ("QuantizeLinear", 0)}  # a float weight quantized at run time (QAT exports)
)
#: outputs whose quantization TFLite fixes: (scale, zero point at the bottom or middle of the range)
_FIXED_OUTPUTS = {"Softmax": (1.0 / 256.0, "bottom"), "Sigmoid": (1.0 / 256.0, "bottom"), "Tanh": (1.0 / 128.0, "middle")}


@dataclass(frozen=True)
class QuantRecord:
    """Where one fake-quant of a `TrainableGraph` lives in the ONNX graph, for the write-back.

    kind:
      "activation": a QuantizeLinear (`quantize_node`) and the DequantizeLinears reading it
        (`dequantize_nodes`); write `quantizer.scale_value()` / `zero_point_value()` into every name
        in `scale_initializers` / `zero_point_initializers` (Q's and DQs', same values). When the Q
        reads a float initializer (a weight quantized at run time, as QAT exports write it), that
        weight trains as one of `TrainableGraph.float_parameters()`.
      "weight": the DequantizeLinear(s) of stored integers that read them alike (several when a deduplicated
        graph shares the initializer); `latent_initializer` is the integer initializer,
        `latent` the trained float weight: write round(latent / s) + z, clipped to [qmin, qmax], in the
        initializer's dtype (s, z as shipped, per channel on `spec.axis`), and s, z as above.
      "bias": a DequantizeLinear of an int32 bias; `latent` is the float bias; its scale is re-derived
        as `TrainableGraph.bias_scale(record)` = s_in·s_w (float32) from the quantizers named in
        `bias_sources`, the integers are round(latent / scale); zero point stays 0. `quantizer` is None.
      "frozen": a DequantizeLinear of integers computed at run time or held in a Constant node; never trained.
    `name` is the quantizer's node name (the Q for activations, the DQ otherwise), the key of `TrainableGraph.quantizer_of`;
    nodes without a name in the ONNX graph are named "<op>_<index>" here.
    """

    name: str
    kind: str
    quantize_node: str | None
    dequantize_nodes: tuple[str, ...]
    scale_initializers: tuple[str, ...]
    zero_point_initializers: tuple[str, ...]
    latent_initializer: str | None
    spec: QuantSpec
    quantizer: FakeQuantizer | None
    latent: nn.Parameter | None
    bias_sources: tuple[str, str] | None = None


def _key(name: str) -> str:
    """An ONNX name as a torch module/parameter key, reversibly: torch forbids '.', and a name that is
    already an attribute of the container (a buffer called "half") gets a leading '%'."""
    key = name.replace("%", "%25").replace(".", "%2E") or "%00"
    return f"%{key}" if hasattr(nn.ParameterDict, key) or hasattr(nn.ModuleDict, key) else key


def _dtype_name(data_type: ir.DataType) -> str:
    return data_type.name.lower()


def _initializer_names(node: ir.Node, indices: Iterable[int]) -> tuple[str, ...]:
    return tuple(node.inputs[i].name for i in indices if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].is_initializer())


class TrainableGraph(nn.Module):
    """The ONNX graph as a torch module: `forward(feeds, capture=...)` → {output name: tensor}.

    quantizers: LEARNED (LSQ/LSQ+ fake-quant, trainable scales), FROZEN (exact QDQ semantics, scales
    fixed; weights still train). A graph without Q/DQ is the fp32 interpreter either way (the teacher).
    scheme: the target's `QuantScheme`, which says which quantizers are symmetric (their zero points
    stay fixed); without it, a zero point at 0 (signed) or the midpoint (unsigned) counts as symmetric.
    power_of_two_scales: keep every trained scale a power of two (targets that shift instead of multiply).
    Raises `UnsupportedOpsError` at construction naming every node the interpreter cannot run.
    """

    def __init__(
        self, model: onnx.ModelProto, *, quantizers: QuantizerMode = QuantizerMode.LEARNED, scheme: QuantScheme | None = None, power_of_two_scales: bool = False
    ) -> None:
        super().__init__()
        self.mode = quantizers
        ir_model = ir.from_proto(model)
        graph = ir_model.graph
        graph.sort()
        opset = ir_model.opset_imports.get("", ir_model.opset_imports.get("ai.onnx", 13))
        initializers = dict(graph.initializers)
        self.input_names = [v.name for v in graph.inputs if v.name not in initializers]
        self.output_names = [v.name for v in graph.outputs]
        # a QuantizeLinear's codes are floats (gradients flow); as a graph output they take its integer type
        self._integer_outputs = {
            v.name: TORCH_DTYPES[v.dtype.value] for v in graph.outputs if producer_op(v) == "QuantizeLinear" and v.dtype is not None and v.dtype.value in TORCH_DTYPES
        }
        # inputs declared with batch 1: a larger batch runs per sample (see `forward`)
        self._batch_one = [v.name for v in graph.inputs if v.name not in initializers and v.shape is not None and v.shape.rank() > 0 and v.shape[0] == 1]
        names = self._node_names(graph)
        self.nodes = [NodeSpec.of(node, names[node], opset) for node in graph]
        problems = [(spec.name, spec.op_type, why) for spec in self.nodes if (why := self._why_unsupported(spec))]
        self.quantizers = nn.ModuleDict()
        self._quantizer_keys: dict[str, str] = {}  # Q/DQ node name -> quantizer key
        self._dq_roles: dict[str, str] = {}
        self._records: list[QuantRecord] = []
        self.latent = nn.ParameterDict()
        self._latent_keys: dict[str, str] = {}  # DequantizeLinear node name -> key of the latent it reads
        self._latent_inputs: dict[str, str] = {}  # DequantizeLinear of an untied latent -> the value name it reads it under
        latent_sources = self._read_quantizers(graph, names, scheme, power_of_two_scales, problems)
        if problems:
            raise UnsupportedOpsError(
                INTERPRETER, problems, hint="fine-tuning runs the graph itself in torch; replace these ops, or build without --finetune"
            )
        # Q/DQ read their scale and zero point from their quantizer, not from the inputs
        self.nodes = [
            replace(spec, inputs=(self._latent_inputs.get(spec.name, spec.inputs[0]),)) if spec.op_type in _QDQ else spec for spec in self.nodes
        ]
        self.weights = nn.ParameterDict()
        self.constants = nn.Module()
        self._sources: list[tuple[str, str, str]] = []  # (ONNX name, container, key)
        self._register_initializers(graph, initializers, latent_sources)
        self._records = [self._bind(record) for record in self._records]
        self._value_names = {name for spec in self.nodes for name in spec.outputs if name} | set(self.input_names) | set(initializers)
        last_use: dict[str, int] = {}
        for index, spec in enumerate(self.nodes):
            for name in spec.inputs:
                if name:
                    last_use[name] = index
        self._dead_after: list[list[str]] = [[] for _ in self.nodes]
        for name, index in last_use.items():
            if name not in initializers:
                self._dead_after[index].append(name)

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def _node_names(graph: ir.Graph) -> dict[ir.Node, str]:
        """Each node's ONNX name, or "<op>_<index>" when it has none or shares it."""
        names: dict[ir.Node, str] = {}
        taken: set[str] = set()
        for index, node in enumerate(graph):
            name = node.name if node.name and node.name not in taken else f"{node.op_type}_{index}"
            taken.add(name)
            names[node] = name
        return names

    @staticmethod
    def _why_unsupported(spec: NodeSpec) -> str | None:
        if spec.domain not in ("", "ai.onnx"):
            return f"custom domain {spec.domain!r}"
        if spec.has_subgraph:
            return "control flow (subgraphs)"
        return REGISTRY.why_unsupported(spec.op_type, spec)

    def _spec(self, node: ir.Node, scale: np.ndarray, zero_point: np.ndarray | None, *, weight: bool, scheme: QuantScheme | None, power_of_two: bool) -> QuantSpec:
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            dtype = _dtype_name(node.inputs[2].dtype)
        elif node.op_type == "DequantizeLinear":
            dtype = _dtype_name(node.inputs[0].dtype)
        else:
            output_dtype = node.attributes.get("output_dtype")
            dtype = _dtype_name(ir.DataType(output_dtype.value)) if output_dtype is not None and output_dtype.value else "uint8"
        qmin, qmax = integer_range(dtype)
        zero = np.zeros(1) if zero_point is None else np.asarray(zero_point).reshape(-1)
        middle = (qmin + qmax + 1) // 2 if qmin == 0 else 0
        if scheme is not None:
            symmetric = scheme.weight_symmetric if weight else scheme.activation_symmetric
        else:
            symmetric = bool(np.all(zero == middle))
        fixed = False
        if not weight and node.op_type == "QuantizeLinear" and scale.size == 1:
            fixed_scale, where = _FIXED_OUTPUTS.get(producer_op(node.inputs[0]) or "", (None, None))
            fixed = fixed_scale is not None and float(scale.reshape(-1)[0]) == np.float32(fixed_scale) and int(zero[0]) == (qmin if where == "bottom" else middle)
        axis = None
        if scale.size > 1:
            axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 1
            rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
            axis = axis % rank if rank else axis
        return QuantSpec(dtype, qmin, qmax, symmetric or fixed, axis, fixed=fixed, power_of_two=power_of_two)

    def _add_quantizer(self, name: str, quantizer: FakeQuantizer) -> None:
        key = _key(name)
        self.quantizers[key] = quantizer
        self._quantizer_keys[name] = key

    def _read_quantizers(self, graph: ir.Graph, names: Mapping[ir.Node, str], scheme, power_of_two: bool, problems: list) -> dict[str, tuple[str, np.ndarray, np.ndarray | None, int | None]]:
        """Make the fake-quants; return {value name of a latent: (integer initializer, scale, zero point, axis)}.

        A stored integer tensor read by several DequantizeLinears (ONNX allows it; deduplicating equal
        constants makes it: yolov8n's zero int32 bias and its zero point become one initializer) trains
        one latent per group of readers that dequantize it alike (same scale, zero point, grid; for an
        int32 bias also the same input and weight quantizers of the op that adds it). Readers that
        dequantize it differently need different float tensors from the same integers, so each group
        trains its own latent; the write-back gives a group whose integers end different its own copy."""
        learned = self.mode is QuantizerMode.LEARNED
        latent_sources: dict[str, tuple[str, np.ndarray, np.ndarray | None, int | None]] = {}
        dq_of_q: dict[str, list[ir.Node]] = {}
        for node in graph:
            if node.op_type != "QuantizeLinear":
                continue
            params = qparams(node)
            if params.scale is None:
                problems.append((names[node], node.op_type, "scale or zero point computed at run time"))
                continue
            weight = node.inputs[0].is_initializer()
            spec = self._spec(node, params.scale, params.zero_point, weight=weight, scheme=scheme, power_of_two=power_of_two)
            elements = node.inputs[0].const_value.numpy().size if weight else None
            self._add_quantizer(names[node], FakeQuantizer(spec, params.scale, params.zero_point, trainable=learned, elements=elements))
            readers = [user for user, _ in node.outputs[0].uses() if user.op_type == "DequantizeLinear"]
            dq_of_q[names[node]] = readers
            for dq in readers:
                dq_params = qparams(dq)
                same = dq_params.scale is not None and np.array_equal(dq_params.scale, params.scale) and np.array_equal(
                    np.zeros(1) if dq_params.zero_point is None else dq_params.zero_point, np.zeros(1) if params.zero_point is None else params.zero_point
                )
                if not same:
                    problems.append((names[dq], dq.op_type, f"its scale or zero point differs from those of {names[node]}, the QuantizeLinear it reads"))
                self._quantizer_keys[names[dq]] = self._quantizer_keys[names[node]]
                self._dq_roles[names[dq]] = "activation"
            self._records.append(
                QuantRecord(
                    name=names[node], kind="activation", quantize_node=names[node], dequantize_nodes=tuple(names[d] for d in readers),
                    scale_initializers=_initializer_names(node, [1]) + tuple(n for d in readers for n in _initializer_names(d, [1])),
                    zero_point_initializers=_initializer_names(node, [2]) + tuple(n for d in readers for n in _initializer_names(d, [2])),
                    latent_initializer=None, spec=spec, quantizer=None, latent=None,
                )
            )
        readers: dict[str, list[ir.Node]] = {}  # stored integer initializer -> the DequantizeLinears reading it as data
        for node in graph:
            if node.op_type != "DequantizeLinear" or names[node] in self._dq_roles:
                continue
            params = qparams(node)
            if params.scale is None:
                problems.append((names[node], node.op_type, "scale or zero point computed at run time"))
                continue
            stored = node.inputs[0]
            if stored.is_initializer():
                readers.setdefault(stored.name, []).append(node)
                continue
            spec = self._weight_spec(node, params, scheme, power_of_two)
            self._add_quantizer(names[node], FakeQuantizer(spec, params.scale, params.zero_point, trainable=False))
            self._dq_roles[names[node]] = "frozen"
            self._records.append(QuantRecord(kind="frozen", latent_initializer=None, **self._common(node, names, spec)))
        biases: list[tuple[str, ir.Node]] = []
        for stored_name, dequantizers in readers.items():
            stored = dequantizers[0].inputs[0]
            others = [names[user] for user, index in stored.uses() if not (user.op_type in _QDQ and (index > 0 or user.op_type == "DequantizeLinear"))]
            if others:
                problems.append((names[dequantizers[0]], "DequantizeLinear", f"integer initializer {stored_name!r} is also read by {', '.join(others)}, which would see it trained"))
                continue
            if stored.dtype is not None and _dtype_name(stored.dtype) == "int32":
                biases.extend((stored_name, dq) for dq in dequantizers)
                continue
            for group in _tied(dequantizers, lambda dq: _quantization(dq, self._weight_spec(dq, qparams(dq), scheme, power_of_two))):
                params, spec = qparams(group[0]), self._weight_spec(group[0], qparams(group[0]), scheme, power_of_two)
                self._add_latent(stored_name, group, names, spec, latent_sources)
                elements = stored.const_value.numpy().size
                self._add_quantizer(names[group[0]], FakeQuantizer(spec, params.scale, params.zero_point, trainable=learned, elements=elements))
                for dq in group:
                    self._quantizer_keys[names[dq]] = self._quantizer_keys[names[group[0]]]
                    self._dq_roles[names[dq]] = "weight"
                self._records.append(QuantRecord(kind="weight", latent_initializer=stored_name, **self._common(group, names, spec)))
        def accumulator(dq: ir.Node) -> tuple[str, ...] | None:
            """The quantizers of the input and weight of the op adding this bias: its integers count in s_in · s_w."""
            sources = self._bias_sources(dq, names)
            return None if sources is None else tuple(self._quantizer_keys.get(name, name) for name in sources)

        by_initializer: dict[str, list[ir.Node]] = {}
        for stored_name, dq in biases:
            by_initializer.setdefault(stored_name, []).append(dq)
        for stored_name, dequantizers in by_initializer.items():
            for group in _tied(dequantizers, lambda dq: (_quantization(dq, self._weight_spec(dq, qparams(dq), scheme, power_of_two)), accumulator(dq))):
                spec = self._weight_spec(group[0], qparams(group[0]), scheme, power_of_two)
                self._add_latent(stored_name, group, names, spec, latent_sources)
                for dq in group:
                    self._dq_roles[names[dq]] = "bias"
                self._records.append(
                    QuantRecord(kind="bias", latent_initializer=stored_name, bias_sources=self._bias_sources(group[0], names), **self._common(group, names, spec))
                )
        return latent_sources

    def _weight_spec(self, dequantize: ir.Node, params, scheme, power_of_two: bool) -> QuantSpec:
        return _weight_grid(self._spec(dequantize, params.scale, params.zero_point, weight=True, scheme=scheme, power_of_two=power_of_two), dequantize, scheme)

    @staticmethod
    def _common(dequantizers: ir.Node | Sequence[ir.Node], names: Mapping[ir.Node, str], spec: QuantSpec) -> dict:
        """The record fields of a stored tensor's DequantizeLinear(s)."""
        group = [dequantizers] if isinstance(dequantizers, ir.Node) else list(dequantizers)
        return dict(
            name=names[group[0]], quantize_node=None, dequantize_nodes=tuple(names[dq] for dq in group),
            scale_initializers=tuple(dict.fromkeys(n for dq in group for n in _initializer_names(dq, [1]))),
            zero_point_initializers=tuple(dict.fromkeys(n for dq in group for n in _initializer_names(dq, [2]))), spec=spec, quantizer=None, latent=None,
        )

    def _add_latent(self, stored_name: str, group: Sequence[ir.Node], names: Mapping[ir.Node, str], spec: QuantSpec, latent_sources: dict) -> None:
        """One trainable latent for `group`, DequantizeLinears that read `stored_name` alike; a stored tensor read
        with different quantizations (untied) has one latent per group, which the group's nodes read under its own name."""
        untied = any(source == stored_name for source, *_ in latent_sources.values())
        value = f"{stored_name}@{names[group[0]]}" if untied else stored_name
        params = qparams(group[0])
        latent_sources[value] = (stored_name, params.scale, params.zero_point, spec.axis)
        for dq in group:
            self._latent_keys[names[dq]] = _key(value)
            if untied:
                self._latent_inputs[names[dq]] = value

    @staticmethod
    def _bias_sources(bias_dq: ir.Node, names: Mapping[ir.Node, str]) -> tuple[str, str] | None:
        """The quantizers of the input and the weight of the op that adds this bias, if both are quantized."""
        consumer = next((user for user, _ in bias_dq.outputs[0].uses()), None)
        if consumer is None or len(consumer.inputs) < 2:
            return None
        sources = [quantization_source(consumer.inputs[i]) for i in (0, 1)]
        return None if None in sources else (names[sources[0]], names[sources[1]])

    def _register_initializers(self, graph: ir.Graph, initializers: Mapping[str, ir.Value], latent_sources: Mapping) -> None:
        qdq_parameters = {
            value.name for node in graph if node.op_type in _QDQ for value in node.inputs[1:] if value is not None
        }
        for name, value in initializers.items():
            array = value.const_value.numpy()
            latents = [(latent, source) for latent, source in latent_sources.items() if source[0] == name]
            for latent, (_, scale, zero_point, axis) in latents:
                self.latent[_key(latent)] = nn.Parameter(_dequantized(array, scale, zero_point, axis))
                self._sources.append((latent, "latent", _key(latent)))
            if latents:
                continue
            uses = value.uses()
            if name in qdq_parameters and all(user.op_type in _QDQ and index > 0 for user, index in uses):
                continue
            tensor = torch.from_numpy(np.array(array))
            trainable = tensor.is_floating_point() and any((user.op_type, index) in _WEIGHT_INPUTS for user, index in uses)
            if trainable:
                self.weights[_key(name)] = nn.Parameter(tensor)
                self._sources.append((name, "weights", _key(name)))
            else:
                self.constants.register_buffer(_key(name), tensor)
                self._sources.append((name, "constants", _key(name)))

    def _bind(self, record: QuantRecord) -> QuantRecord:
        """The record with its live quantizer and latent parameter."""
        quantizer = self.quantizers[self._quantizer_keys[record.name]] if record.name in self._quantizer_keys else None
        latent = self.latent[self._latent_keys[record.name]] if record.latent_initializer is not None else None
        return QuantRecord(**{**record.__dict__, "quantizer": quantizer, "latent": latent})

    # -- queries --------------------------------------------------------------------------------

    def share_quantizer(self, name: str, source: str) -> None:
        """Run QuantizeLinear `name` (and the DequantizeLinears reading it) with `source`'s quantizer from now
        on: sites the target needs on one scale (the quantizer gave them one) train one. Its record follows."""
        old, new = self._quantizer_keys[name], self._quantizer_keys[source]
        if old == new:
            return
        for node, key in list(self._quantizer_keys.items()):
            if key == old:
                self._quantizer_keys[node] = new
        del self.quantizers[old]
        self._records = [self._bind(record) for record in self._records]

    def quantizer_of(self, node_name: str) -> FakeQuantizer:
        """The fake-quant of a QuantizeLinear or DequantizeLinear node (a Q and its DQs share one)."""
        return self.quantizers[self._quantizer_keys[node_name]]

    def dequantize_role(self, node_name: str) -> str:
        """"activation", "weight", "bias" or "frozen" (see `QuantRecord.kind`)."""
        return self._dq_roles[node_name]

    @property
    def device(self) -> torch.device:
        """Where the graph's tensors live (ops that make tensors from nothing put them there)."""
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def quant_params(self) -> list[QuantRecord]:
        """Every fake-quant with the ONNX nodes and initializers it came from (see `QuantRecord`), in graph order."""
        return list(self._records)

    def float_parameters(self) -> dict[str, nn.Parameter]:
        """{ONNX initializer name: parameter} for the float initializers that train as they are, outside any
        quantizer (LayerNorm scales, biases and weights of layers left float...): a write-back must put these
        into the initializers of the same name too, or the graph ships values training did not end with."""
        return {name: self.weights[key] for name, container, key in self._sources if container == "weights"}

    def bias_scale(self, record: QuantRecord) -> np.ndarray:
        """The int32 bias scale that ships with the current scales: float32(s_in) · float32(s_w); the stored one when its sources are unknown."""
        if record.bias_sources is None:
            raise OptionError(f"bias {record.name}: its input or weight is not quantized, so its scale cannot be re-derived")
        activation, weight = (self.quantizer_of(name).scale_value() for name in record.bias_sources)
        return (activation.astype(np.float32) * weight.astype(np.float32)).astype(np.float32)

    def initializer(self, name: str) -> torch.Tensor:
        """The tensor that stands for ONNX initializer `name` (for a stored integer weight: its float latent)."""
        for onnx_name, container, key in self._sources:
            if onnx_name == name:
                return self._tensor(container, key)
        raise KeyError(name)

    def _tensor(self, container: str, key: str) -> torch.Tensor:
        return getattr(self.constants, key) if container == "constants" else getattr(self, container)[key]

    # -- execution ------------------------------------------------------------------------------

    def forward(self, feeds: Mapping[str, object], capture: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """{output name (and each `capture` name): tensor} for `feeds` {input name: tensor or array}.

        A graph whose inputs are fixed to batch 1 (simplify folds the batch into Reshape shapes) runs a
        larger batch per sample, vectorized with torch.func.vmap: each result is the per-sample
        results concatenated on axis 0, as if the samples had been run one by one.
        """
        unknown = [name for name in capture if name not in self._value_names]
        if unknown:
            raise OptionError(f"cannot capture {', '.join(map(repr, unknown))}: no such tensor in the graph")
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise InputSpecError(f"missing input(s) {', '.join(map(repr, missing))}; the graph's inputs are {self.input_names}")
        inputs = {name: torch.as_tensor(feeds[name]) for name in self.input_names}
        batched = [name for name in self._batch_one if inputs[name].dim() > 0 and inputs[name].shape[0] != 1]
        if not batched:
            return self._run(inputs, capture)

        def one_sample(*values: torch.Tensor) -> dict[str, torch.Tensor]:
            return self._run({**inputs, **{name: value.unsqueeze(0) for name, value in zip(batched, values)}}, capture)

        results = torch.func.vmap(one_sample, randomness="same")(*(inputs[name] for name in batched))
        return {name: value.flatten(0, 1) if value.dim() > 1 else value for name, value in results.items()}

    def _run(self, inputs: Mapping[str, torch.Tensor], capture: Sequence[str]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {name: self._tensor(container, key) for name, container, key in self._sources}
        env.update(inputs)
        keep = set(self.output_names) | set(capture)
        for spec, dead in zip(self.nodes, self._dead_after):
            outputs = REGISTRY.handler(spec.op_type)(spec, [env[name] if name else None for name in spec.inputs], self)
            for name, value in zip(spec.outputs, outputs):
                if name:
                    env[name] = value
            for name in dead:
                if name not in keep:
                    env.pop(name, None)
        results = {name: env[name] for name in capture}
        results.update({name: env[name].to(self._integer_outputs[name]) if name in self._integer_outputs else env[name] for name in self.output_names})
        return results


def _tied(dequantizers: Sequence[ir.Node], key) -> list[list[ir.Node]]:
    """`dequantizers` grouped by equal `key(node)`, in order of first appearance."""
    groups: dict[object, list[ir.Node]] = {}
    for node in dequantizers:
        groups.setdefault(key(node), []).append(node)
    return list(groups.values())


def _quantization(dequantize: ir.Node, spec: QuantSpec) -> tuple:
    """What a DequantizeLinear makes of its integers: grid and axis, scale and zero point bit for bit."""
    params = qparams(dequantize)
    zero = b"" if params.zero_point is None else np.asarray(params.zero_point).tobytes()
    return spec, np.asarray(params.scale, np.float32).tobytes(), zero


def _weight_grid(spec: QuantSpec, dequantize: ir.Node, scheme) -> QuantSpec:
    """The spec on the narrower grid the quantizer stored this weight on, which training must keep:
    `QuantScheme.pairwise_weight_bits` (7 on AVX2: [-64, 64]) for ops whose int8 kernels sum products
    pairwise, the same grid `quantize.qdq.quantize_weight` uses."""
    bits = 8 if scheme is None else scheme.pairwise_weight_bits
    consumer = next((user for user, index in dequantize.outputs[0].uses() if index == 1), None)
    if bits >= 8 or spec.dtype not in ("int8", "uint8") or consumer is None or dequantize.inputs[0].shape is None:
        return spec
    if not sums_products_pairwise(consumer.op_type, tuple(dequantize.inputs[0].shape.numpy()), int_attribute(consumer, "group", 1)):
        return spec
    if spec.qmin < 0:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - (0 if spec.symmetric else 1)
    else:
        qmin, qmax = 0, 2**bits - 1
    return replace(spec, qmin=qmin, qmax=qmax)


def _dequantized(stored: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None) -> torch.Tensor:
    """DequantizeLinear in float32, as ONNX Runtime computes it: float(q − z) · s."""
    codes = torch.from_numpy(np.array(stored, dtype=np.int64))
    shape = [1] * codes.dim()
    if axis is not None:
        shape[axis] = -1

    def shaped(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(shape) if tensor.numel() > 1 else tensor.reshape([])

    zero = 0 if zero_point is None else shaped(torch.from_numpy(np.array(zero_point, dtype=np.int64)))
    return (codes - zero).to(torch.float32) * shaped(torch.from_numpy(np.array(scale, dtype=np.float32)))
