"""Where Q/DQ go for a target's scheme: which activation tensors, weights and biases are quantized.

Two placements:
- "inputs" (TensorRT, OpenVINO): Q/DQ on the activation inputs of quantized ops only; the
  backend fuses them into the following op. Outputs stay float unless the next op asks for them.
- "inputs_and_outputs" (TFLite full-integer, ONNX Runtime QDQ): every tensor between quantized ops
  carries a Q/DQ pair; data-movement ops (reshape, transpose, max-pool, concat, ...) are quantized
  when their input already is, and a ReLU/ReLU6 right after a quantized op is absorbed into that
  op's output quantization (exact when the zero point sits at the lowest integer).

Where the backend runs a layer faster in float, or fuses more than the scheme's op list says, the
scheme says so: `float_convs` (depthwise convs, float islands), `silu_gates` (int8 SiLU) and
`activation_muls` (a SiLU/HardSwish written as a Mul is one activation: no Q/DQ inside it) and
`split_input_quantized` (a Split read only by quantized ops is quantized once, at its input).
Under "inputs_and_outputs" a Split in the scheme's op list is quantized only when quantized ops alone
read it, every output on its input's scale (ONNX Runtime then splits the uint8 tensor: no dequantize,
float split and requantize per C2f block of YOLOv8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgeopt.targets import QuantScheme

__all__ = ["ActivationSite", "has_attention", "QuantPlan", "WeightSite", "activation_muls", "plan_quantization", "silu_gates", "sums_products_pairwise", "weight_axis"]

#: Ops whose output values are a subset of their input values: quantized only where the input already is.
DATA_MOVEMENT_OPS = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Concat", "Resize", "Pad", "Slice", "Split", "GlobalMaxPool"}
)
#: Ops with a weight operand at input 1 quantized per channel.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Activations that follow a conv and that some backends run only in float (a dequantize/quantize island).
ISLAND_ACTIVATIONS = frozenset({"HardSwish", "HardSigmoid", "Sigmoid", "Gelu", "Elu", "Selu", "Softplus", "Mish", "Tanh"})
#: Elementwise ops quantized only when every operand is an activation.
BINARY_OPS = frozenset({"Add", "Sub", "Mul"})
#: Ops that make a gate g(x) in [0, 1] (or [0, 6]) out of x: SiLU is x * Sigmoid(x), HardSwish x * HardSigmoid(x)
#: or x * Clip(x + 3, 0, 6) / 6.
GATE_OPS = frozenset({"Sigmoid", "HardSigmoid", "Clip"})
#: Ops with one constant operand that a gate's chain may hold (the +3 and /6 of HardSwish).
AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


@dataclass
class ActivationSite:
    """One activation tensor that gets a Q/DQ pair.

    `tensor` is the value whose consumers read the dequantized copy; `source` is what the Q node
    reads (the producer's output when an activation was absorbed). `consumers` is None for "every
    consumer" (output placement), else the names of the quantized nodes that read the DQ output.
    """

    tensor: str
    source: str
    consumers: set[str] | None = field(default_factory=set)
    clip: tuple[float, float] | None = None
    fixed: tuple[float, int] | None = None
    axis: int | None = None  # per-channel scale and zero point on this axis (`QuantScheme.depthwise_input_per_channel`)
    signed: bool = False  # int8 symmetric whatever the scheme's activation type (`QuantScheme.attention_matmul_symmetric`)


@dataclass(frozen=True)
class WeightSite:
    node: str
    input_index: int
    initializer: str
    axis: int | None  # None: per-tensor
    bits: int = 8


@dataclass
class QuantPlan:
    sites: dict[str, ActivationSite] = field(default_factory=dict)
    weights: list[WeightSite] = field(default_factory=list)
    biases: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # node -> (input index, activation tensor, weight initializer)
    absorbed: dict[str, str] = field(default_factory=dict)  # activation node -> producer node
    quantized_nodes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    shared: list[tuple[str, str]] = field(default_factory=list)  # pairs of tensors that must share scale and zero point
    constants: list[tuple[str, int, str]] = field(default_factory=list)  # (node, input index, initializer) quantized per tensor

    def site(self, tensor: str, source: str | None = None) -> ActivationSite:
        if tensor not in self.sites:
            self.sites[tensor] = ActivationSite(tensor, source or tensor)
        return self.sites[tensor]

    def groups(self) -> dict[str, list[str]]:
        """Tensors that must share one scale and zero point, keyed by the group's root tensor."""
        parent = {name: name for name in self.sites}

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for a, b in self.shared:
            if a in parent and b in parent:
                parent[root(a)] = root(b)
        groups: dict[str, list[str]] = {}
        for name in self.sites:
            groups.setdefault(root(name), []).append(name)
        return groups


def weight_axis(node: ir.Node, rank: int) -> int | None:
    """The output-channel axis of a weight: Conv 0, ConvTranspose 1, Gemm 0 (transB=1) or 1, MatMul last."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return rank - 1 if rank == 2 else None
    return None


def sums_products_pairwise(op_type: str, weight_shape: tuple[int, ...], group: int = 1) -> bool:
    """Whether x86 int8 kernels without VNNI sum this op's products pairwise in int16 (VPMADDUBSW).

    Conv, ConvTranspose, Gemm and MatMul do; a depthwise Conv (one input channel per group) does
    not: ONNX Runtime's and oneDNN's depthwise kernels widen to int32 first (measured: 8-bit
    depthwise weights against saturated uint8 inputs match the QDQ graph exactly on AVX2).
    """
    if op_type not in WEIGHTED_OPS:
        return False
    depthwise = op_type == "Conv" and group > 1 and len(weight_shape) > 1 and weight_shape[1] == 1
    return not depthwise


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _is_float(value: ir.Value) -> bool:
    return value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, None)


def _initializer_name(value: ir.Value | None) -> str | None:
    if value is not None and value.const_value is not None and value.name:
        return value.name
    return None


def _activation_inputs(node: ir.Node, constant_operands: bool = False) -> list[int] | None:
    """Indices of the inputs to quantize as activations; None when the node is not quantizable.

    With `constant_operands`, an elementwise op with float initializer operands qualifies too (the
    initializers are then quantized per tensor, see `QuantPlan.constants`).
    """
    inputs = list(node.inputs)
    if not inputs or inputs[0] is None:
        return None
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return [0] if _initializer_name(inputs[1]) else None
    if op == "Gemm":
        if _initializer_name(inputs[1]) is None:
            return [0, 1]
        return [0]
    if op == "MatMul":
        indices = [i for i in (0, 1) if not _is_constant(inputs[i])]
        if 1 not in indices and _initializer_name(inputs[1]) is None:
            return None
        return indices or None
    if op in BINARY_OPS:
        variable = [i for i, v in enumerate(inputs) if not _is_constant(v)]
        if len(variable) == len(inputs):
            return variable
        constants_ok = all(_initializer_name(v) is not None and _is_float(v) for i, v in enumerate(inputs) if i not in variable)
        return variable if constant_operands and variable and constants_ok else None
    if op == "Concat":
        return [i for i, v in enumerate(inputs) if not _is_constant(v)] or None
    return [0] if _is_float(inputs[0]) else None


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(low, high) of a Clip whose bounds are constants; None otherwise."""
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            attr = node.attributes.get("min" if index == 1 else "max")
            bounds.append(float(attr.value) if attr is not None else default)
            continue
        tensor = value.const_value
        if tensor is None:
            producer = value.producer()
            attr = producer.attributes.get("value") if producer is not None and producer.op_type == "Constant" else None
            tensor = attr.value if attr is not None else None
        if tensor is None:
            return None
        bounds.append(float(np.asarray(tensor.numpy()).reshape(-1)[0]))
    return bounds[0], bounds[1]


def _absorbable(producer: ir.Node, output: ir.Value, scheme: QuantScheme) -> tuple[ir.Node, tuple[float, float] | None] | None:
    """The single ReLU/Clip(0, x) consumer that output quantization can replace exactly, if any."""
    if scheme.activation_symmetric or output.is_graph_output():
        return None
    consumers = list(output.consumers())
    if len(consumers) != 1:
        return None
    follower = consumers[0]
    if follower.op_type not in scheme.fused_activations:
        return None
    if follower.op_type == "Relu":
        return follower, None
    if follower.op_type == "Clip":
        bounds = _clip_bounds(follower)
        if bounds is not None and bounds[0] == 0.0:
            return follower, bounds
    return None


def float_convs(model: ir.Model, scheme: QuantScheme) -> list[tuple[str, str]]:
    """(name, why) of the convs the scheme keeps float because the backend runs them slower in int8.

    - `QuantScheme.float_depthwise`: a depthwise conv (the backend's int8 depthwise kernel is slower
      than its float one; edgeopt's ONNX Runtime sessions keep it float, see
      `runtime.backends.onnxruntime.DISABLED_OPTIMIZERS`).
    - `QuantScheme.float_island_min_spatial`: a conv whose only consumer is an activation the scheme
      neither quantizes nor fuses pays a dequantize/quantize island for its int8; it stays float when
      it is depthwise or its output is at least that large per channel.
    """
    float_ops = set(scheme.quantized_ops) | set(scheme.fused_activations)
    chosen = []
    for node in model.graph:
        if node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].shape is None:
            continue
        depthwise = _is_depthwise(node)
        if depthwise and scheme.float_depthwise:
            chosen.append((node.name, "depthwise conv: the backend's int8 depthwise kernel is slower than its float one"))
            continue
        if not scheme.float_island_min_spatial:
            continue
        consumers = list(node.outputs[0].consumers())
        if len(consumers) != 1 or consumers[0].op_type in float_ops or consumers[0].op_type not in ISLAND_ACTIVATIONS:
            continue
        spatial = 1
        for dim in list(node.outputs[0].shape or [])[2:]:
            spatial *= dim if isinstance(dim, int) else 0
        if depthwise or spatial >= scheme.float_island_min_spatial:
            chosen.append((node.name, "int8 would cost a float island larger than its gain"))
    return chosen


def has_attention(model: ir.Model) -> bool:
    """Whether a Softmax is read by a MatMul."""
    return any(node.op_type == "Softmax" and any(user.op_type == "MatMul" for user, _ in node.outputs[0].uses()) for node in model.graph)


def _transformer_elementwise(model: ir.Model) -> list[tuple[str, str]]:
    """(name, op) of the Add/Sub/Mul nodes of a model with attention; none otherwise."""
    attention = has_attention(model)
    return [(node.name or "", node.op_type) for node in model.graph if attention and node.op_type in BINARY_OPS]


def silu_gates(model: ir.Model) -> set[str]:
    """Names of the Sigmoid and Mul nodes of each SiLU, x * Sigmoid(x) (the Sigmoid's only consumer is a
    Mul that also reads the Sigmoid's input), in a model without attention: a transformer's Sigmoid/Mul
    stay float (their QLinear kernels measured slower than float on the encoder)."""
    gates: set[str] = set()
    if has_attention(model):
        return gates
    for node in model.graph:
        if node.op_type != "Sigmoid" or node.inputs[0] is None:
            continue
        users = list(node.outputs[0].consumers())
        if len(users) == 1 and users[0].op_type == "Mul" and node.inputs[0] in list(users[0].inputs) and node.name and users[0].name:
            gates |= {node.name, users[0].name}
    return gates


def _gates(value: ir.Value, x: ir.Value) -> bool:
    """Whether `value` is a gate of `x`: Sigmoid, HardSigmoid or Clip of x, with constant
    Add/Sub/Mul/Div steps on either side (HardSwish's x + 3 and / 6), each step read only by the next."""
    gated = False
    for _ in range(4):
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx") or len(list(value.uses())) != 1:
            return False
        variable = [v for v in producer.inputs if v is not None and not _is_constant(v)]
        if len(variable) != 1 or producer.op_type not in GATE_OPS | AFFINE_OPS:
            return False
        if producer.op_type == "Clip" and _clip_bounds(producer) is None:
            return False
        gated = gated or producer.op_type in GATE_OPS
        value = variable[0]
        if value is x:
            return gated
    return False


def activation_muls(model: ir.Model) -> set[str]:
    """Names of the Muls that complete an activation of one of their operands: x * g(x) with g a
    Sigmoid (SiLU), HardSigmoid or Clip(x + 3, 0, 6) / 6 (HardSwish) of the same x. A backend that
    fuses conv + activation (OpenVINO's CPU plugin) fuses these only without Q/DQ inside them."""
    muls: set[str] = set()
    for node in model.graph:
        if node.op_type != "Mul" or len(node.inputs) != 2 or any(v is None for v in node.inputs) or not node.name:
            continue
        first, second = node.inputs
        if _gates(second, first) or _gates(first, second):
            muls.add(node.name)
    return muls


def plan_quantization(model: ir.Model, scheme: QuantScheme, exclude: Iterable[str] = ()) -> QuantPlan:
    """Decide every Q/DQ site for the scheme; nodes in `exclude` stay float, and so do the convs
    `float_convs` picks."""
    slow_convs = float_convs(model, scheme)
    elementwise = _transformer_elementwise(model) if scheme.transformer_elementwise_float else []
    fused_muls = sorted(activation_muls(model) - {name for name, _ in elementwise}) if scheme.activation_muls_float and scheme.activation_placement == "inputs" else []
    excluded = set(exclude) | {name for name, _ in slow_convs} | {name for name, _ in elementwise} | set(fused_muls)
    plan = QuantPlan()
    plan.skipped.extend({"node": name, "op": "Conv", "why": why} for name, why in slow_convs)
    plan.skipped.extend({"node": name, "op": op, "why": "elementwise op of a transformer: stays float"} for name, op in elementwise)
    plan.skipped.extend({"node": name, "op": "Mul", "why": "completes an activation x * g(x) (SiLU, HardSwish): the backend fuses it into the conv without Q/DQ inside"} for name in fused_muls)
    outputs_too = scheme.activation_placement == "inputs_and_outputs"
    quantized_ops = set(scheme.quantized_ops)
    gates = silu_gates(model) if scheme.int8_silu else set()
    units = int8_transformer_units(model, plan) if scheme.int8_transformer and outputs_too else Int8Units()
    for node in model.graph:
        name = node.name or ""
        unit = units.nodes.get(name)
        if (node.op_type not in quantized_ops and name not in gates and unit is None) or node.domain not in ("", "ai.onnx"):
            continue
        if name in excluded or name in plan.absorbed or name in units.inside:
            continue
        indices = list(unit.inputs) if unit is not None else _activation_inputs(node, scheme.constant_operands and outputs_too)
        if indices is None:
            plan.skipped.append({"node": name, "op": node.op_type, "why": "constant or non-float operand"})
            continue
        inputs = [node.inputs[i] for i in indices]
        if outputs_too and node.op_type in DATA_MOVEMENT_OPS and not any(v is not None and v.name in plan.sites for v in inputs):
            continue  # keep float data movement between float ops
        if outputs_too and node.op_type == "Split" and _quantized_split(node.outputs[0], quantized_ops, excluded) is None:
            continue  # a float reader: quantized outputs would only move its dequantize (and let ORT fuse a float chain behind it)
        if scheme.attention_matmul_symmetric and node.op_type == "MatMul" and len(indices) == 2 and _reads_softmax(node):
            plan.skipped.append({"node": name, "op": node.op_type, "why": "attention's probabilities times V: stays float (the backend's int8 attention quantizes Q and K only)"})
            continue
        fixed_input = _fixed_scale_input(node, inputs, scheme, excluded)
        if fixed_input is not None:
            plan.skipped.append({"node": name, "op": node.op_type, "why": f"one scale in and out, and input {fixed_input} has a fixed scale that would clip the others: stays float"})
            continue
        for value in inputs:
            if value is None or not _is_float(value):
                continue
            split = _quantized_split(value, quantized_ops, excluded) if scheme.split_input_quantized and not outputs_too else None
            site = plan.site(split.inputs[0].name) if split is not None else plan.site(value.name)
            if site.consumers is not None:
                site.consumers.add(split.name if split is not None else name)
        plan.quantized_nodes.append(name)
        if scheme.attention_matmul_symmetric and node.op_type == "MatMul" and len(indices) == 2:
            for value in inputs:
                plan.site(value.name).signed = True
        if (node.op_type in BINARY_OPS and unit is None) or (unit is not None and unit.constants):
            plan.constants.extend((name, i, v.name) for i, v in enumerate(node.inputs) if i not in indices and _initializer_name(v) and _is_float(v))
        _plan_weight(node, plan, scheme)
        if not outputs_too or node.op_type in scheme.float_output_ops or name in units.float_outputs:
            continue
        output = node.outputs[0]
        if not _is_float(output):
            continue
        absorbed = _absorbable(node, output, scheme) if node.op_type not in DATA_MOVEMENT_OPS else None
        if absorbed is not None:
            follower, bounds = absorbed
            plan.absorbed[follower.name] = name
            site = plan.site(follower.outputs[0].name, source=output.name)
            site.clip = (0.0, bounds[1]) if bounds else (0.0, float("inf"))
        else:
            site = plan.site(output.name)
        site.consumers = None
        rule = scheme.rule_for(node.op_type)
        if rule is not None and rule.output_scale is not None:
            site.fixed = (float(rule.output_scale), int(rule.output_zero_point or 0))
        elif (rule is not None and rule.same_scale_as_input) or (node.op_type in DATA_MOVEMENT_OPS and node.op_type != "Concat"):
            plan.shared.append((site.tensor, inputs[0].name))
        if node.op_type == "Split":  # every output on the input's grid: the backend splits the int8 tensor itself
            for value in node.outputs[1:]:
                plan.site(value.name).consumers = None
                plan.shared.append((value.name, inputs[0].name))
        if node.op_type == "Concat" and rule is not None and rule.same_scale_as_input:
            plan.shared.extend((value.name, site.tensor) for value in inputs if value is not None and value.name in plan.sites)
    for tensor, params in units.fixed.items():
        if tensor in plan.sites:
            plan.sites[tensor].fixed = params
    if scheme.depthwise_input_per_channel and not outputs_too:
        _per_channel_depthwise_inputs(model, plan)
    return plan


def _reads_softmax(node: ir.Node) -> bool:
    """Whether an input is a Softmax output, through data movement (an opset-11 Softmax converted to
    13 is Flatten -> Softmax -> Reshape)."""
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        while producer is not None and producer.op_type in DATA_MOVEMENT_OPS and producer.inputs and producer.inputs[0] is not None:
            producer = producer.inputs[0].producer()
        if producer is not None and producer.op_type == "Softmax":
            return True
    return False


def _quantized_split(value: ir.Value, quantized_ops: set[str], excluded: set[str]) -> ir.Node | None:
    """The Split that produces `value` when every reader of every Split output is a quantized op: its
    input is then quantized once, before the Split (a YOLOv8 C2f block splits a conv output into a
    Concat and the next conv), or, under "inputs_and_outputs", the Split itself runs on int8."""
    split = value.producer()
    if split is None or split.op_type != "Split" or not split.name or split.inputs[0] is None:
        return None
    readers = [user for output in split.outputs for user in output.consumers()]
    return split if readers and all(user.op_type in quantized_ops and (user.name or "") not in excluded for user in readers) else None


def _fixed_scale_input(node: ir.Node, inputs: list[ir.Value | None], scheme: QuantScheme, excluded: set[str]) -> str | None:
    """The input of a same-scale Concat that a quantized fixed-scale op (Sigmoid, Softmax, Tanh under
    TFLite's rules) produces, if other inputs have no fixed scale. One scale for all would be the fixed one: YOLOv8's
    output Concat of box coordinates (0-640) and class scores (Sigmoid, [0, 1]) clipped every box to 1."""
    rule = scheme.rule_for(node.op_type)
    if node.op_type != "Concat" or rule is None or not rule.same_scale_as_input or len(inputs) < 2:
        return None
    quantized_ops = set(scheme.quantized_ops)

    def fixed(value: ir.Value | None) -> bool:
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type not in quantized_ops or (producer.name or "") in excluded:
            return False
        producer_rule = scheme.rule_for(producer.op_type)
        return producer_rule is not None and producer_rule.output_scale is not None

    fixed_inputs = [value.name for value in inputs if value is not None and fixed(value)]
    return fixed_inputs[0] if fixed_inputs and len(fixed_inputs) < len(inputs) else None


def _is_depthwise(node: ir.Node) -> bool:
    weight = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
    if weight is None or weight.shape is None or len(weight.shape) < 2:
        return False
    return not sums_products_pairwise("Conv", tuple(weight.shape), node.attributes.get_int("group", 1))


def _per_channel_depthwise_inputs(model: ir.Model, plan: QuantPlan) -> None:
    """Sites read only by depthwise convs (at input 0) get per-channel scales on axis 1."""
    nodes = {node.name: node for node in model.graph}
    shared = {name for pair in plan.shared for name in pair}
    for site in plan.sites.values():
        if not site.consumers or site.clip is not None or site.fixed is not None or site.tensor in shared:
            continue
        readers = [nodes[name] for name in site.consumers]
        if all(_is_depthwise(node) and node.inputs[0] is not None and node.inputs[0].name == site.tensor for node in readers):
            site.axis = 1


def _plan_weight(node: ir.Node, plan: QuantPlan, scheme: QuantScheme) -> None:
    if node.op_type not in WEIGHTED_OPS:
        return
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    initializer = _initializer_name(weight)
    if initializer is None:
        return
    shape = tuple(weight.const_value.shape)
    axis = weight_axis(node, len(shape)) if scheme.weight_per_channel else None
    pairwise = sums_products_pairwise(node.op_type, shape, node.attributes.get_int("group", 1))
    plan.weights.append(WeightSite(node.name, 1, initializer, axis, scheme.pairwise_weight_bits if pairwise else 8))
    if scheme.bias_int32 and node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
        bias = node.inputs[2]
        bias_name = _initializer_name(bias)
        if bias_name is not None and len(bias.const_value.shape) == 1 and axis in (0, 1):
            plan.biases[node.name] = (2, node.inputs[0].name, initializer)


#: An additive attention mask at or below this is "minus infinity" (HF: the float minimum; older exports -10000).
MASK_VALUE = 1e4
#: Its int8 params: 0 exact at zero point 127, masked positions saturate at -128: 127.5 below their
#: score, past the softmax input's span (32) wherever the scores spread less than 95.
MASK_PARAMS = (0.5, 127)


@dataclass(frozen=True)
class Int8Unit:
    """A node quantized beyond the scheme's op list: its output always, the activation inputs at
    `inputs`, and its constant operands when `constants` (else they stay float)."""

    inputs: tuple[int, ...] = ()
    constants: bool = False


@dataclass(frozen=True)
class Int8Units:
    """`int8_transformer_units`' answer: the units, the MatMuls whose output goes float into their bias
    Add, the nodes inside a unit (an erf GELU's) that stay float, and sites with fixed params."""

    nodes: dict[str, Int8Unit] = field(default_factory=dict)
    float_outputs: frozenset[str] = frozenset()
    inside: frozenset[str] = frozenset()
    fixed: dict[str, tuple[float, int]] = field(default_factory=dict)  # tensor -> (scale, zero point)


def _bias_of(node: ir.Node) -> int | None:
    """Index of the input of an Add that a MatMul alone feeds, when the other is a constant per-output bias."""
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for index, value in enumerate(node.inputs):
        bias = node.inputs[1 - index]
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type != "MatMul" or len(list(value.uses())) != 1 or value.is_graph_output():
            continue
        weight = producer.inputs[1]
        if _initializer_name(weight) is None or len(weight.shape or ()) != 2 or _initializer_name(bias) is None:
            continue
        if tuple(bias.shape or ())[-1:] == (weight.shape[1],) and bias.const_value.size == weight.shape[1]:
            return index
    return None


def _scalar(value: ir.Value | None) -> float | None:
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def _additive_mask(value: ir.Value | None) -> bool:
    """Whether `value` is an attention mask added to the scores: a Where choosing between 0 and a
    constant so negative (HF exports the float minimum) that softmax gives its positions nothing,
    or a Mul by such a constant."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Mul":  # (1 - mask) * fill
        return any((fill := _scalar(v)) is not None and fill <= -MASK_VALUE for v in producer.inputs)
    if producer is None or producer.op_type != "Where":
        return False
    branches = [_scalar(v) for v in producer.inputs[1:]]
    return None not in branches and 0.0 in branches and min(branches) <= -MASK_VALUE


def int8_transformer_units(model: ir.Model, plan: QuantPlan) -> Int8Units:
    """What a full-integer backend (TFLite) runs int8 in a model with attention beyond the op list
    (`QuantScheme.int8_transformer`); none in a model without one.

    - A MatMul's bias Add is quantized at its output and the MatMul's output stays float: the QDQ
      graph adds the bias in float, as the int32 accumulator of FULLY_CONNECTED does with an int32 bias.
    - An erf GELU is quantized at its output only (its input is the quantized output before it):
      the lowering fuses the chain into one int8 GELU; the nodes inside stay float (reported).
    - A decomposed LayerNorm: the Add of a scalar eps to a ReduceMean (the variance) and the
      Pow(-0.5) after it (TFLite's int8 RSQRT).
    - A Gather from a constant table (the word embeddings), a Mul by a scalar constant (the attention
      scale 1/sqrt(d)) and the Adds of constant tables (position and token-type embeddings): their
      constants become int8 too (per tensor).
    - The additive attention mask gets fixed params (`MASK_PARAMS`), not its observed range: 0 stays
      exact and the float minimum saturates past the softmax input's span; on its range (1e38 wide)
      one int8 grid could not hold the scores beside it.
    """
    from edgeopt.converters.passes.fuse_erf_gelu import erf_gelu_chain

    if not has_attention(model):
        return Int8Units()
    nodes: dict[str, Int8Unit] = {}
    float_outputs: set[str] = set()
    inside: set[str] = set()
    fixed: dict[str, tuple[float, int]] = {}
    for node in model.graph:
        if node.op_type == "Erf" and (match := erf_gelu_chain(node)) is not None:
            *chain, last = match[1]
            nodes[last.name or ""] = Int8Unit()
            inside.update(n.name or "" for n in chain)
            plan.skipped.extend({"node": n.name or "", "op": n.op_type, "why": "inside an erf GELU, which runs as one int8 GELU"} for n in chain)
    for node in model.graph:
        name = node.name or ""
        if name in nodes or name in inside:
            continue
        bias = _bias_of(node)
        scalars = [i for i, v in enumerate(node.inputs) if _scalar(v) is not None]
        variable = [i for i, v in enumerate(node.inputs) if not _is_constant(v)]
        if bias is not None:
            nodes[name] = Int8Unit()
            float_outputs.add(node.inputs[bias].producer().name or "")
        elif node.op_type == "Gather" and _initializer_name(node.inputs[0]) is not None and _is_float(node.inputs[0]):
            nodes[name] = Int8Unit(constants=True)  # an embedding table: int8 per tensor, GATHER reads it int8
        elif node.op_type == "Pow" and scalars == [1] and _scalar(node.inputs[1]) == -0.5:
            nodes[name] = Int8Unit(inputs=(0,))
        elif node.op_type not in ("Add", "Mul") or len(node.inputs) != 2 or len(variable) != 1:
            pass
        elif node.op_type == "Add" and scalars and node.inputs[variable[0]].producer() is not None and node.inputs[variable[0]].producer().op_type == "ReduceMean":
            nodes[name] = Int8Unit()  # variance + eps: the lowering drops an eps below half a step
        elif (node.op_type == "Mul" and scalars and abs(_scalar(node.inputs[scalars[0]])) < MASK_VALUE) or (node.op_type == "Add" and not scalars and _initializer_name(node.inputs[1 - variable[0]]) is not None):
            nodes[name] = Int8Unit(inputs=tuple(variable), constants=True)
    for node in model.graph:
        if node.op_type == "Add" and any(user.op_type == "Softmax" for user in node.outputs[0].consumers()):
            fixed.update((value.name, MASK_PARAMS) for value in node.inputs if _additive_mask(value))
    return Int8Units(nodes, frozenset(float_outputs), frozenset(inside), fixed)
