"""ONNX nodes → Core ML MIL ops, built with coremltools' MIL builder.

The graph is walked once in topological order. Tensors whose value is known at build time
(initializers, Constant nodes, `Shape` of a static tensor, and anything computed only from those)
are folded with ONNX's own reference implementation, so the shape arithmetic that exporters emit
never reaches the device. Everything else becomes a MIL op on static shapes.

QDQ graphs keep their scales: `DequantizeLinear` of an int8 initializer becomes a compressed
constant (`constexpr_affine_dequantize`, iOS 18: `constexpr_blockwise_shift_scale`), and activation
`QuantizeLinear`/`DequantizeLinear` pairs become the iOS 17 `quantize`/`dequantize` ops.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from edgeopt.converters.errors import LoweringError, UnsupportedOpsError

__all__ = ["FOLD_ONLY_OPS", "SUPPORTED_OPS", "GraphInput", "build_program", "check_supported", "mil_name"]

Value = Var | np.ndarray

# Ops that only ever run at build time: their inputs must be known once input shapes are fixed.
FOLD_ONLY_OPS = frozenset(
    {"Constant", "ConstantOfShape", "Shape", "Size", "Range", "Tile", "Floor", "Ceil"}
)
# Ops that never need a MIL op of their own.
_PASSTHROUGH = frozenset({"Identity", "Dropout"})
# Never folded: a DequantizeLinear of an int8 weight must stay a compressed constant.
_NEVER_FOLD = frozenset({"DequantizeLinear"})


@dataclass(frozen=True)
class GraphInput:
    """A model input with the static shape and MIL dtype it gets in the program."""

    name: str
    shape: tuple[int, ...]
    onnx_dtype: np.dtype


def mil_name(name: str) -> str:
    """A MIL-legal identifier for an ONNX tensor name (Core ML feature names are renamed back later)."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"t_{cleaned}"


def _mil_dtype(dtype: np.dtype) -> type:
    match np.dtype(dtype).kind, np.dtype(dtype).itemsize:
        case "f", 2:
            return types.fp16
        case "f", _:
            return types.fp32
        case "b", _:
            return types.bool
        case ("i" | "u"), _:
            return types.int32
    raise LoweringError(f"input dtype {dtype} has no Core ML equivalent", hint="feed float, int or bool inputs")


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _decode(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def _const(value: np.ndarray, like: Var | None = None) -> np.ndarray:
    """A numpy value in the dtype MIL wants: int64→int32, float64→float32, or the dtype of `like`."""
    if like is not None and like.dtype is not None:
        if types.is_float(like.dtype):
            return np.asarray(value, dtype=np.float16 if like.dtype == types.fp16 else np.float32)
        if like.dtype == types.int32:
            return np.asarray(value).astype(np.int32)
        if like.dtype == types.bool:
            return np.asarray(value).astype(bool)
    value = np.asarray(value)
    if (value.dtype.kind in "iu" and value.dtype.itemsize > 4) or value.dtype == np.uint32:
        return value.astype(np.int32)
    if value.dtype == np.float64:
        return value.astype(np.float32)
    return value


class _Builder:
    """State of one conversion: the value of every ONNX tensor, as a MIL Var or a numpy constant."""

    def __init__(self, model: onnx.ModelProto, opset_target: object, target_name: str) -> None:
        self.graph = model.graph
        self.target_name = target_name
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.opset_target = opset_target
        self.ios18 = opset_target >= _ios18()
        self.values: dict[str, Value] = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self._names: dict[str, int] = {}

    # -- values -----------------------------------------------------------------------------
    def has(self, node: onnx.NodeProto, index: int) -> bool:
        return len(node.input) > index and node.input[index] != ""

    def value(self, name: str) -> Value:
        return self.values[name]

    def known(self, name: str) -> np.ndarray:
        value = self.values[name]
        if isinstance(value, Var):
            if value.val is not None:
                return np.asarray(value.val)
            raise LoweringError(f"tensor '{name}' must be known at build time but is computed from the inputs")
        return value

    def var(self, name: str, like: Var | None = None) -> Var:
        value = self.values[name]
        if isinstance(value, Var):
            return value
        return mb.const(val=_const(value, like), name=self.fresh(name))

    def fresh(self, name: str) -> str:
        base = mil_name(name)
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def shape(self, name: str) -> tuple[int, ...]:
        value = self.values[name]
        return tuple(int(d) for d in (value.shape if isinstance(value, Var) else np.shape(value)))

    def operand(self, name: str, other: str) -> Value:
        """An operand of an elementwise op, with a numpy side cast to the dtype of the Var side."""
        value, partner = self.values[name], self.values[other]
        if isinstance(value, Var):
            return value
        return _const(value, partner if isinstance(partner, Var) else None)


def _ios18() -> object:
    import coremltools as ct

    return ct.target.iOS18


# --------------------------------------------------------------------------------------------
# Handlers: each returns the node's outputs (MIL Vars or numpy constants) in ONNX order.
# --------------------------------------------------------------------------------------------
Handler = Callable[[_Builder, onnx.NodeProto, str], list[Value]]
_HANDLERS: dict[str, Handler] = {}


def _handles(*ops: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register


_BINARY = {"Add": mb.add, "Sub": mb.sub, "Mul": mb.mul, "Pow": mb.pow, "Max": mb.maximum, "Min": mb.minimum}
_COMPARE = {
    "Equal": mb.equal, "Greater": mb.greater, "Less": mb.less, "GreaterOrEqual": mb.greater_equal, "LessOrEqual": mb.less_equal,
}


@_handles("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", *_COMPARE)
def _binary(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, y = b.operand(node.input[0], node.input[1]), b.operand(node.input[1], node.input[0])
    if node.op_type == "Div":
        is_int = all(not types.is_float(v.dtype) if isinstance(v, Var) else v.dtype.kind in "iu" for v in (x, y))
        return [(mb.floor_div if is_int else mb.real_div)(x=x, y=y, name=name)]
    if node.op_type in _COMPARE:
        return [_COMPARE[node.op_type](x=x, y=y, name=name)]
    if node.op_type == "Pow" and not isinstance(y, Var) and np.all(y == 2):
        return [mb.mul(x=x, y=x, name=name)]
    return [_BINARY[node.op_type](x=x, y=y, name=name)]


@_handles("Sum")
def _sum(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    total = b.value(node.input[0])
    for index, other in enumerate(node.input[1:], start=1):
        last = index == len(node.input) - 1
        total = mb.add(x=total, y=b.operand(other, node.input[0]), name=name if last else b.fresh(name))
    return [total]


_LOGICAL = {"And": mb.logical_and, "Or": mb.logical_or, "Xor": mb.logical_xor}


@_handles(*_LOGICAL)
def _logical(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, y = (b.var(t) if isinstance(b.value(t), Var) else b.value(t).astype(bool) for t in node.input)
    return [_LOGICAL[node.op_type](x=x, y=y, name=name)]


@_handles("Not")
def _not(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    return [mb.logical_not(x=b.var(node.input[0]), name=name)]


_UNARY = {
    "Relu": mb.relu, "Sigmoid": mb.sigmoid, "Tanh": mb.tanh, "Erf": mb.erf, "Sqrt": mb.sqrt,
    "Exp": mb.exp, "Log": mb.log, "Abs": mb.abs, "Reciprocal": mb.inverse,
}


@_handles(*_UNARY)
def _unary(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    return [_UNARY[node.op_type](x=b.var(node.input[0]), name=name)]


@_handles("Neg")
def _neg(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x = b.var(node.input[0])
    return [mb.mul(x=x, y=_const(np.array(-1), x), name=name)]


@_handles("Elu", "LeakyRelu", "HardSigmoid", "HardSwish", "Gelu", "PRelu", "Clip")
def _activation(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    match node.op_type:
        case "Elu":
            return [mb.elu(x=x, alpha=float(attrs.get("alpha", 1.0)), name=name)]
        case "LeakyRelu":
            return [mb.leaky_relu(x=x, alpha=float(attrs.get("alpha", 0.01)), name=name)]
        case "HardSigmoid":
            return [mb.sigmoid_hard(x=x, alpha=float(attrs.get("alpha", 0.2)), beta=float(attrs.get("beta", 0.5)), name=name)]
        case "HardSwish":
            gate = mb.sigmoid_hard(x=x, alpha=1.0 / 6.0, beta=0.5, name=b.fresh(name + "_gate"))
            return [mb.mul(x=x, y=gate, name=name)]
        case "Gelu":
            mode = "TANH_APPROXIMATION" if _decode(attrs.get("approximate", "none")) == "tanh" else "EXACT"
            return [mb.gelu(x=x, mode=mode, name=name)]
        case "PRelu":
            slope = b.known(node.input[1]).astype(np.float32)
            rank = len(x.shape)
            if rank >= 3 and slope.size == x.shape[1] and slope.squeeze().ndim <= 1 and (
                slope.ndim <= 1 or slope.shape[0] == x.shape[1]
            ):
                return [mb.prelu(x=x, alpha=slope.reshape(-1), name=name)]
            positive = mb.relu(x=x, name=b.fresh(name + "_pos"))
            negative = mb.minimum(x=x, y=_const(np.array(0.0), x), name=b.fresh(name + "_neg"))
            scaled = mb.mul(x=negative, y=_const(slope, x), name=b.fresh(name + "_scaled"))
            return [mb.add(x=positive, y=scaled, name=name)]
        case "Clip":
            low, high = _clip_bounds(b, node, attrs)
            if low == 0.0 and high == 6.0:
                return [mb.relu6(x=x, name=name)]
            if low is not None and high is not None:
                return [mb.clip(x=x, alpha=_const(np.array(low), x), beta=_const(np.array(high), x), name=name)]
            if low is not None:
                return [mb.maximum(x=x, y=_const(np.array(low), x), name=name)]
            if high is not None:
                return [mb.minimum(x=x, y=_const(np.array(high), x), name=name)]
            return [mb.identity(x=x, name=name)]
    raise AssertionError(node.op_type)


def _clip_bounds(b: _Builder, node: onnx.NodeProto, attrs: dict[str, object]) -> tuple[float | None, float | None]:
    if b.opset < 11:
        return float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
    low = float(b.known(node.input[1])) if b.has(node, 1) else None
    high = float(b.known(node.input[2])) if b.has(node, 2) else None
    return low, high


@_handles("Softmax")
def _softmax(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    rank = len(x.shape)
    if b.opset >= 13:
        return [mb.softmax(x=x, axis=int(attrs.get("axis", -1)), name=name)]
    axis = int(attrs.get("axis", 1)) % rank
    if axis == rank - 1:
        return [mb.softmax(x=x, axis=-1, name=name)]
    # Before opset 13, Softmax normalizes over everything from `axis` on, flattened.
    shape = tuple(x.shape)
    flat = mb.reshape(x=x, shape=[math.prod(shape[:axis]), math.prod(shape[axis:])], name=b.fresh(name + "_2d"))
    soft = mb.softmax(x=flat, axis=-1, name=b.fresh(name + "_soft"))
    return [mb.reshape(x=soft, shape=list(shape), name=name)]


def _spatial_pads(attrs: dict[str, object], spatial: int) -> tuple[str, list[int]]:
    """ONNX pads [b1, b2, …, e1, e2, …] → MIL pad_type and [b1, e1, b2, e2, …]."""
    auto_pad = _decode(attrs.get("auto_pad", "NOTSET"))
    if auto_pad == "SAME_UPPER":
        return "same", [0] * 2 * spatial
    if auto_pad == "SAME_LOWER":
        return "same_lower", [0] * 2 * spatial
    if auto_pad == "VALID":
        return "valid", [0] * 2 * spatial
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    return "custom", [int(p) for pair in zip(pads[:spatial], pads[spatial:]) for p in pair]


@_handles("Conv")
def _conv(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    weight = b.value(node.input[1])
    spatial = len(x.shape) - 2
    pad_type, pad = _spatial_pads(attrs, spatial)
    kwargs: dict[str, object] = dict(
        x=x,
        weight=_const(weight, x) if isinstance(weight, np.ndarray) else weight,
        strides=[int(s) for s in attrs.get("strides", [1] * spatial)],
        dilations=[int(d) for d in attrs.get("dilations", [1] * spatial)],
        groups=int(attrs.get("group", 1)),
        pad_type=pad_type,
        pad=pad,
        name=name,
    )
    if b.has(node, 2):
        kwargs["bias"] = _bias(b, node.input[2], x)
    return [mb.conv(**kwargs)]


def _bias(b: _Builder, tensor: str, like: Var) -> Value:
    bias = b.value(tensor)
    return _const(bias, like) if isinstance(bias, np.ndarray) else bias


@_handles("ConvTranspose")
def _conv_transpose(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    weight = b.value(node.input[1])
    spatial = len(x.shape) - 2
    kernel = b.shape(node.input[1])[2:]
    strides = [int(s) for s in attrs.get("strides", [1] * spatial)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * spatial)]
    groups = int(attrs.get("group", 1))
    output_padding = [int(p) for p in attrs.get("output_padding", [0] * spatial)]
    _, pad = _spatial_pads(attrs, spatial)
    out_spatial = [
        strides[i] * (x.shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - pad[2 * i] - pad[2 * i + 1]
        for i in range(spatial)
    ]
    if "output_shape" in attrs:
        out_spatial = [int(d) for d in list(attrs["output_shape"])[-spatial:]]
        total = [strides[i] * (x.shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - out_spatial[i] for i in range(spatial)]
        upper = _decode(attrs.get("auto_pad", "NOTSET")) != "SAME_LOWER"
        pad = [p for t in total for p in ((t // 2, t - t // 2) if upper else (t - t // 2, t // 2))]
    out_channels = b.shape(node.input[1])[1] * groups
    kwargs: dict[str, object] = dict(
        x=x,
        weight=_const(weight, x) if isinstance(weight, np.ndarray) else weight,
        strides=strides,
        dilations=dilations,
        groups=groups,
        pad_type="custom",
        pad=pad,
        output_shape=[int(x.shape[0]), out_channels, *out_spatial],
        name=name,
    )
    if b.has(node, 2):
        kwargs["bias"] = _bias(b, node.input[2], x)
    return [mb.conv_transpose(**kwargs)]


@_handles("MatMul")
def _matmul(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    a, w = b.value(node.input[0]), b.value(node.input[1])
    if isinstance(a, Var) and isinstance(w, np.ndarray) and w.ndim == 2:
        return [mb.linear(x=a, weight=_const(w.T, a), name=name)]
    x = a if isinstance(a, Var) else b.var(node.input[0], w)
    return [mb.matmul(x=x, y=b.var(node.input[1], x), name=name)]


@_handles("Gemm")
def _gemm(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    attrs = _attrs(node)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
    a = b.var(node.input[0])
    if trans_a:
        a = mb.transpose(x=a, perm=[1, 0], name=b.fresh(name + "_at"))
    w = b.value(node.input[1])
    bias = b.value(node.input[2]) if b.has(node, 2) else None
    out_features = b.shape(node.input[1])[0 if trans_b else 1]
    if isinstance(w, np.ndarray) and (bias is None or isinstance(bias, np.ndarray) and bias.size in (1, out_features)):
        weight = (w if trans_b else w.T) * alpha
        linear_bias = None if bias is None else np.broadcast_to(beta * bias.reshape(-1), (out_features,))
        return [mb.linear(x=a, weight=_const(weight, a), bias=None if linear_bias is None else _const(linear_bias, a), name=name)]
    product = mb.matmul(x=a, y=b.var(node.input[1], a), transpose_y=trans_b, name=b.fresh(name + "_mm") if bias is not None or alpha != 1 else name)
    if alpha != 1.0:
        product = mb.mul(x=product, y=_const(np.array(alpha), a), name=b.fresh(name + "_alpha") if bias is not None else name)
    if bias is None:
        return [product]
    if isinstance(bias, np.ndarray):
        bias = _const(bias * beta, a)
    elif beta != 1.0:
        bias = mb.mul(x=bias, y=_const(np.array(beta), a), name=b.fresh(name + "_beta"))
    return [mb.add(x=product, y=bias, name=name)]


@_handles("MaxPool", "AveragePool")
def _pool(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    spatial = len(x.shape) - 2
    pad_type, pad = _spatial_pads(attrs, spatial)
    kwargs: dict[str, object] = dict(
        x=x,
        kernel_sizes=[int(k) for k in attrs["kernel_shape"]],
        strides=[int(s) for s in attrs.get("strides", [1] * spatial)],
        pad_type=pad_type,
        pad=pad,
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
        name=name,
    )
    if node.op_type == "MaxPool":
        return [mb.max_pool(**kwargs)]
    return [mb.avg_pool(exclude_padding_from_average=not attrs.get("count_include_pad", 0), **kwargs)]


@_handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x = b.var(node.input[0])
    axes = list(range(2, len(x.shape)))
    reduce = mb.reduce_mean if node.op_type == "GlobalAveragePool" else mb.reduce_max
    return [reduce(x=x, axes=axes, keep_dims=True, name=name)]


@_handles("BatchNormalization")
def _batch_norm(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x = b.var(node.input[0])
    gamma, beta, mean, var = (_const(b.known(t), x) for t in node.input[1:5])
    epsilon = float(_attrs(node).get("epsilon", 1e-5))
    return [mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=epsilon, name=name)]


@_handles("LayerNormalization")
def _layer_norm(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    rank = len(x.shape)
    axis = int(attrs.get("axis", -1)) % rank
    normalized = tuple(x.shape[axis:])
    gamma = np.broadcast_to(b.known(node.input[1]), normalized)
    beta = np.broadcast_to(b.known(node.input[2]), normalized) if b.has(node, 2) else np.zeros(normalized)
    return [
        mb.layer_norm(
            x=x, axes=list(range(axis, rank)), gamma=_const(gamma, x), beta=_const(beta, x),
            epsilon=float(attrs.get("epsilon", 1e-5)), name=name,
        )
    ]


@_handles("LRN")
def _lrn(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    attrs = _attrs(node)
    return [
        mb.local_response_norm(
            x=b.var(node.input[0]), size=int(attrs["size"]), alpha=float(attrs.get("alpha", 1e-4)),
            beta=float(attrs.get("beta", 0.75)), k=float(attrs.get("bias", 1.0)), name=name,
        )
    ]


@_handles("Pad")
def _pad(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    rank = len(x.shape)
    if b.opset < 11:
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
    else:
        pads = [int(p) for p in b.known(node.input[1])]
        value = float(b.known(node.input[2])) if b.has(node, 2) else 0.0
        if b.has(node, 3):
            axes = [int(a) % rank for a in b.known(node.input[3])]
            full = [0] * 2 * rank
            for i, axis in enumerate(axes):
                full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
            pads = full
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[_decode(attrs.get("mode", "constant"))]
    interleaved = [int(p) for pair in zip(pads[:rank], pads[rank:]) for p in pair]
    return [mb.pad(x=x, pad=interleaved, mode=mode, constant_val=value, name=name)]


@_handles("Concat")
def _concat(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    like = next(b.value(t) for t in node.input if isinstance(b.value(t), Var))
    values = [b.var(t, like) for t in node.input if math.prod(b.shape(t)) > 0]
    return [mb.concat(values=values, axis=int(_attrs(node)["axis"]), name=name)]


@_handles("Split")
def _split(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    axis = int(attrs.get("axis", 0)) % len(x.shape)
    if b.opset >= 13 and b.has(node, 1):
        sizes = [int(s) for s in b.known(node.input[1])]
    elif "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]
    else:
        parts = int(attrs.get("num_outputs", len(node.output)))
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    outputs = mb.split(x=x, split_sizes=sizes, axis=axis, name=name)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


@_handles("Slice")
def _slice(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x = b.var(node.input[0])
    shape = tuple(x.shape)
    rank = len(shape)
    if b.opset < 10:
        attrs = _attrs(node)
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = list(b.known(node.input[1])), list(b.known(node.input[2]))
        axes = list(b.known(node.input[3])) if b.has(node, 3) else list(range(len(starts)))
        steps = list(b.known(node.input[4])) if b.has(node, 4) else [1] * len(starts)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    end_mask = [False] * rank
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        first, last, step = slice(int(max(min(start, 2**62), -(2**62))), int(max(min(stop, 2**62), -(2**62))), int(step)).indices(shape[axis])
        begin[axis], end[axis], stride[axis] = first, last, step
        end_mask[axis] = step < 0 and last < 0
    return [mb.slice_by_index(x=x, begin=begin, end=end, stride=stride, end_mask=end_mask, name=name)]


def _static_reshape(b: _Builder, node: onnx.NodeProto) -> list[int]:
    shape = b.shape(node.input[0])
    target = [int(d) for d in b.known(node.input[1])]
    allow_zero = bool(_attrs(node).get("allowzero", 0))
    target = [shape[i] if d == 0 and not allow_zero else d for i, d in enumerate(target)]
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(shape) // known
    return target


@_handles("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    shape = tuple(int(d) for d in x.shape)
    rank = len(shape)
    match node.op_type:
        case "Reshape":
            target = _static_reshape(b, node)
        case "Flatten":
            axis = int(attrs.get("axis", 1)) % (rank + 1) if rank else 0
            target = [math.prod(shape[:axis]), math.prod(shape[axis:])]
        case "Squeeze":
            axes = attrs.get("axes") if b.opset < 13 else (b.known(node.input[1]) if b.has(node, 1) else None)
            drop = {int(a) % rank for a in axes} if axes is not None else {i for i, d in enumerate(shape) if d == 1}
            target = [d for i, d in enumerate(shape) if i not in drop]
        case "Unsqueeze":
            axes = attrs.get("axes") if b.opset < 13 else b.known(node.input[1])
            out_rank = rank + len(axes)
            insert = sorted(int(a) % out_rank for a in axes)
            target = list(shape)
            for axis in insert:
                target.insert(axis, 1)
    if not target:
        return [mb.squeeze(x=x, name=name)]
    return [mb.reshape(x=x, shape=target, name=name)]


@_handles("Expand")
def _expand(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    """ONNX Expand broadcasts both ways; with static shapes that is a reshape to the output rank and a tile."""
    x = b.var(node.input[0])
    shape = tuple(int(d) for d in x.shape)
    out_shape = np.broadcast_shapes(shape, tuple(int(d) for d in b.known(node.input[1])))
    padded = (1,) * (len(out_shape) - len(shape)) + shape
    if padded != shape:
        x = mb.reshape(x=x, shape=list(padded), name=b.fresh(name + "_rank"))
    reps = [o // i for o, i in zip(out_shape, padded)]
    return [mb.tile(x=x, reps=reps, name=name) if any(r != 1 for r in reps) else mb.identity(x=x, name=name)]


@_handles("Transpose")
def _transpose(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x = b.var(node.input[0])
    perm = _attrs(node).get("perm", list(reversed(range(len(x.shape)))))
    return [mb.transpose(x=x, perm=[int(p) for p in perm], name=name)]


_REDUCE = {
    "ReduceMean": mb.reduce_mean, "ReduceMax": mb.reduce_max, "ReduceSum": mb.reduce_sum, "ReduceMin": mb.reduce_min,
    "ReduceL1": mb.reduce_l1_norm, "ReduceL2": mb.reduce_l2_norm, "ReduceSumSquare": mb.reduce_sum_square,
}


@_handles(*_REDUCE)
def _reduce(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x, attrs = b.var(node.input[0]), _attrs(node)
    axes_as_input = b.opset >= 18 or (node.op_type == "ReduceSum" and b.opset >= 13)
    axes = (list(b.known(node.input[1])) if b.has(node, 1) else None) if axes_as_input else attrs.get("axes")
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [mb.identity(x=x, name=name)]
        axes = list(range(len(x.shape)))
    keep = bool(attrs.get("keepdims", 1))
    return [_REDUCE[node.op_type](x=x, axes=[int(a) for a in axes], keep_dims=keep, name=name)]


def _resize_geometry(b: _Builder, node: onnx.NodeProto) -> tuple[int, int, int, int]:
    """(in_h, in_w, out_h, out_w) of a 4-D Resize from its scales or sizes input."""
    shape = b.shape(node.input[0])
    if len(shape) != 4:
        raise LoweringError(f"Resize '{node.name}' has a rank-{len(shape)} input; Core ML resizes 4-D NCHW tensors")
    scales_index = 1 if b.opset < 11 else 2
    if b.opset >= 11 and b.has(node, 3):
        sizes = [int(s) for s in b.known(node.input[3])]
    else:
        scales = b.known(node.input[scales_index]).astype(np.float64)
        sizes = [int(math.floor(d * s)) for d, s in zip(shape, scales)]
    if sizes[:2] != list(shape[:2]):
        raise LoweringError(f"Resize '{node.name}' scales the batch or channel axis, which Core ML cannot do")
    return shape[2], shape[3], sizes[2], sizes[3]


def _nearest_index(size_in: int, size_out: int, coordinate_mode: str, nearest_mode: str) -> np.ndarray:
    """The source index ONNX Resize (nearest) picks for each output index."""
    scale = size_out / size_in
    dst = np.arange(size_out, dtype=np.float64)
    src = {
        "asymmetric": dst / scale,
        "half_pixel": (dst + 0.5) / scale - 0.5,
        "pytorch_half_pixel": (dst + 0.5) / scale - 0.5 if size_out > 1 else np.zeros_like(dst),
        "align_corners": dst * (size_in - 1) / max(size_out - 1, 1),
        "tf_half_pixel_for_nn": (dst + 0.5) / scale,
    }[coordinate_mode]
    picked = {
        "floor": np.floor(src),
        "ceil": np.ceil(src),
        "round_prefer_floor": np.ceil(src - 0.5),
        "round_prefer_ceil": np.floor(src + 0.5),
    }[nearest_mode]
    return np.clip(picked, 0, size_in - 1).astype(np.int64)


def _resize_support(b: _Builder, node: onnx.NodeProto) -> str | None:
    """Why this Resize cannot be expressed exactly in MIL, or None when it can."""
    attrs = _attrs(node)
    mode = _decode(attrs.get("mode", "nearest"))
    coordinate_mode = _decode(attrs.get("coordinate_transformation_mode", "half_pixel" if b.opset >= 11 else "asymmetric"))
    in_h, in_w, out_h, out_w = _resize_geometry(b, node)
    if mode == "nearest":
        nearest_mode = _decode(attrs.get("nearest_mode", "round_prefer_floor" if b.opset >= 11 else "floor"))
        for size_in, size_out in ((in_h, out_h), (in_w, out_w)):
            if size_out % size_in:
                return f"nearest resize by a non-integer factor ({size_in}→{size_out})"
            floor_map = np.arange(size_out) // (size_out // size_in)
            if not np.array_equal(_nearest_index(size_in, size_out, coordinate_mode, nearest_mode), floor_map):
                return f"nearest resize with {coordinate_mode}/{nearest_mode} does not pick the pixels Core ML picks"
        return None
    if mode == "linear":
        if coordinate_mode in ("half_pixel", "align_corners"):
            return None
        if coordinate_mode == "pytorch_half_pixel" and min(out_h, out_w) > 1:
            return None
        return f"linear resize with coordinate_transformation_mode={coordinate_mode}"
    return f"Resize mode '{mode}' (Core ML offers nearest and bilinear)"


@_handles("Resize", "Upsample")
def _resize(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    reason = _resize_support(b, node)
    if reason:
        raise UnsupportedOpsError(b.target_name, [(node.name, node.op_type, reason)])
    x = b.var(node.input[0])
    in_h, in_w, out_h, out_w = _resize_geometry(b, node)
    attrs = _attrs(node)
    if _decode(attrs.get("mode", "nearest")) == "nearest":
        return [
            mb.upsample_nearest_neighbor(x=x, scale_factor_height=out_h // in_h, scale_factor_width=out_w // in_w, name=name)
        ]
    coordinate_mode = _decode(attrs.get("coordinate_transformation_mode", "half_pixel"))
    sampling = "ALIGN_CORNERS" if coordinate_mode == "align_corners" else "UNALIGN_CORNERS"
    return [mb.resize_bilinear(x=x, target_size_height=out_h, target_size_width=out_w, sampling_mode=sampling, name=name)]


@_handles("Gather")
def _gather(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    data, indices = b.value(node.input[0]), b.value(node.input[1])
    axis = int(_attrs(node).get("axis", 0))
    rank = len(b.shape(node.input[0]))
    axis %= rank
    if isinstance(indices, np.ndarray):
        indices = np.where(indices < 0, indices + b.shape(node.input[0])[axis], indices).astype(np.int32)
        if indices.ndim == 0:
            # A constant scalar index (e.g. q, k, v = qkv[0], qkv[1], qkv[2]) is a slice, not a gather.
            shape = b.shape(node.input[0])
            begin, end = [0] * rank, list(shape)
            begin[axis], end[axis] = int(indices), int(indices) + 1
            squeeze = [i == axis for i in range(rank)]
            return [mb.slice_by_index(x=b.var(node.input[0]), begin=begin, end=end, squeeze_mask=squeeze, name=name)]
    x = _const(data) if isinstance(data, np.ndarray) else data
    return [_gather_op(b, mb.gather, x, indices, axis, name)]


def _gather_op(b: _Builder, gather: Callable[..., Var], x: Value, indices: Value, axis: int, name: str) -> Var:
    """gather/gather_along_axis; MIL's take no bool tensors, so a mask is gathered as int32 and cast back."""
    is_bool = x.dtype == types.bool if isinstance(x, Var) else np.asarray(x).dtype == bool
    if not is_bool:
        return gather(x=x, indices=indices, axis=axis, name=name)
    as_int = mb.cast(x=x, dtype="int32", name=b.fresh(name + "_int")) if isinstance(x, Var) else np.asarray(x, np.int32)
    picked = gather(x=as_int, indices=indices, axis=axis, name=b.fresh(name + "_picked"))
    return mb.cast(x=picked, dtype="bool", name=name)


@_handles("GatherElements")
def _gather_elements(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    """MIL gather_along_axis; ONNX's negative indices count from the end of the axis."""
    rank = len(b.shape(node.input[0]))
    axis = int(_attrs(node).get("axis", 0)) % rank
    size = b.shape(node.input[0])[axis]
    indices = b.value(node.input[1])
    if isinstance(indices, np.ndarray):
        indices = np.where(indices < 0, indices + size, indices).astype(np.int32)
    else:
        negative = mb.less(x=indices, y=np.int32(0), name=b.fresh(name + "_negative"))
        wrapped = mb.add(x=indices, y=np.int32(size), name=b.fresh(name + "_wrapped"))
        indices = mb.select(cond=negative, a=wrapped, b=indices, name=b.fresh(name + "_indices"))
    data = b.value(node.input[0])
    return [_gather_op(b, mb.gather_along_axis, _const(data) if isinstance(data, np.ndarray) else data, indices, axis, name)]


@_handles("Where")
def _where(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    a, c = b.value(node.input[1]), b.value(node.input[2])
    like = a if isinstance(a, Var) else c if isinstance(c, Var) else None
    cond = b.value(node.input[0])
    return [
        mb.select(
            cond=cond if isinstance(cond, Var) else cond.astype(bool),
            a=a if isinstance(a, Var) else _const(a, like),
            b=c if isinstance(c, Var) else _const(c, like),
            name=name,
        )
    ]


_CAST_DTYPES = {
    onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.DOUBLE: "fp32", onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BOOL: "bool", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int32",
    onnx.TensorProto.INT8: "int32", onnx.TensorProto.UINT8: "int32", onnx.TensorProto.INT16: "int32",
}


@_handles("Cast")
def _cast(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    to = int(_attrs(node)["to"])
    if to not in _CAST_DTYPES:
        raise UnsupportedOpsError(b.target_name, [(node.name, "Cast", f"cast to {onnx.TensorProto.DataType.Name(to)}")])
    return [mb.cast(x=b.var(node.input[0]), dtype=_CAST_DTYPES[to], name=name)]


def _qparams(b: _Builder, node: onnx.NodeProto, rank: int) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    scale = b.known(node.input[1]).astype(np.float32)
    zero_point = b.known(node.input[2]) if b.has(node, 2) else None
    axis = int(_attrs(node).get("axis", 1)) % rank if scale.size > 1 else None
    if scale.size == 1:
        scale = scale.reshape(())
        zero_point = None if zero_point is None else zero_point.reshape(())
    return scale, zero_point, axis


@_handles("QuantizeLinear")
def _quantize(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    x = b.var(node.input[0])
    scale, zero_point, axis = _qparams(b, node, len(x.shape))
    dtype = "int8" if zero_point is not None and zero_point.dtype == np.int8 else "uint8"
    kwargs: dict[str, object] = dict(input=x, scale=scale, output_dtype=dtype, name=name)
    if zero_point is not None and np.any(zero_point != 0):
        kwargs["zero_point"] = zero_point
    if axis is not None:
        kwargs["axis"] = axis
    return [mb.quantize(**kwargs)]


@_handles("DequantizeLinear")
def _dequantize(b: _Builder, node: onnx.NodeProto, name: str) -> list[Value]:
    data = b.value(node.input[0])
    rank = len(b.shape(node.input[0]))
    scale, zero_point, axis = _qparams(b, node, max(rank, 1))
    if isinstance(data, np.ndarray):
        if data.dtype not in (np.int8, np.uint8) or data.ndim < 2:
            # int32 biases and tiny tensors: dequantize now, as float constants.
            offset = 0 if zero_point is None else zero_point.astype(np.float64)
            if axis is not None:
                shape = [1] * data.ndim
                shape[axis] = -1
                offset = offset if np.isscalar(offset) else np.reshape(offset, shape)
                return [((data.astype(np.float64) - offset) * scale.reshape(shape)).astype(np.float32)]
            return [((data.astype(np.float64) - offset) * scale).astype(np.float32)]
        return [_compressed_weight(b, data, scale, zero_point, axis, name)]
    kwargs: dict[str, object] = dict(input=data, scale=scale, name=name)
    if zero_point is not None and np.any(zero_point != 0):
        kwargs["zero_point"] = zero_point
    if axis is not None:
        kwargs["axis"] = axis
    return [mb.dequantize(**kwargs)]


def _compressed_weight(
    b: _Builder, data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None, name: str
) -> Var:
    """An int8 weight that stays int8 in the file and is dequantized by Core ML at load time."""
    zero = np.zeros_like(scale, dtype=data.dtype) if zero_point is None else zero_point.astype(data.dtype)
    if b.ios18:
        block = [1] * data.ndim
        if axis is not None:
            block[axis] = data.shape[axis]
        kwargs: dict[str, object] = dict(data=data, scale=scale.reshape(block), name=name)
        if np.any(zero != 0):
            kwargs["offset"] = zero.reshape(block)
        return mb.constexpr_blockwise_shift_scale(**kwargs)
    if not np.any(zero != 0):
        zero = np.zeros((), dtype=data.dtype)  # one scalar instead of a per-channel blob of zeros
    return mb.constexpr_affine_dequantize(
        quantized_data=data, zero_point=zero, scale=scale, axis=0 if axis is None else axis, name=name
    )


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------
SUPPORTED_OPS: frozenset[str] = frozenset(_HANDLERS) | FOLD_ONLY_OPS | _PASSTHROUGH


def _static_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose value is known once input shapes are fixed (so their producers fold)."""
    known = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type in _NEVER_FOLD:
            continue
        if node.op_type in ("Shape", "Size") or all(not i or i in known for i in node.input):
            known.update(node.output)
    return known


def check_supported(model: onnx.ModelProto, target_name: str) -> None:
    """Raise UnsupportedOpsError naming every node the lowering cannot handle, before any work."""
    problems: list[tuple[str, str, str]] = []
    known = _static_tensors(model.graph)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append((node.name, f"{node.domain}.{node.op_type}", "custom-domain op"))
        elif node.op_type not in SUPPORTED_OPS:
            problems.append((node.name, node.op_type, f"edgeopt's Core ML lowering does not write {node.op_type} yet"))
        elif node.op_type in FOLD_ONLY_OPS and not all(not i or i in known for i in node.input) and node.op_type not in ("Shape", "Size"):
            problems.append((node.name, node.op_type, "only supported when its inputs are known at build time"))
        elif node.op_type == "Expand" and node.input[1] not in known:
            problems.append((node.name, node.op_type, "only supported when its target shape is known at build time"))
        elif node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append((node.name, node.op_type, "the indices output has no Core ML equivalent"))
        elif node.op_type in ("MaxPool", "AveragePool") and any(d != 1 for d in _attrs(node).get("dilations", [])):
            problems.append((node.name, node.op_type, "dilated pooling"))
        elif node.op_type == "Pad" and _decode(_attrs(node).get("mode", "constant")) not in ("constant", "reflect", "edge"):
            problems.append((node.name, node.op_type, f"pad mode {_decode(_attrs(node)['mode'])}"))
        elif node.op_type == "Cast" and int(_attrs(node)["to"]) not in _CAST_DTYPES:
            problems.append((node.name, node.op_type, f"cast to {onnx.TensorProto.DataType.Name(int(_attrs(node)['to']))}"))
        elif node.op_type in ("Resize", "Upsample") and _decode(_attrs(node).get("mode", "nearest")) not in ("nearest", "linear"):
            problems.append((node.name, node.op_type, f"Resize mode '{_decode(_attrs(node)['mode'])}' (Core ML offers nearest and bilinear)"))
    if problems:
        raise UnsupportedOpsError(
            target_name, problems,
            hint="replace these ops before export, fix the input shapes with --input-shape, or choose another --target",
        )


def _fold(node: onnx.NodeProto, inputs: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Evaluate one node on constant inputs with ONNX's reference implementation."""
    if node.op_type == "GatherElements" and node.domain in ("", "ai.onnx"):
        # onnx.reference's GatherElements (onnx 1.23) goes through np.choose (at most 64 choices) and its
        # 2-D fallback reads only column 0 of the indices: BERT's token-type gather folded wrongly.
        data, indices = inputs[0], inputs[1]
        axis = int(_attrs(node).get("axis", 0)) % data.ndim
        indices = np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64)
        return [np.take_along_axis(data, indices, axis=axis)]
    names = [f"in{i}" if value is not None else "" for i, value in enumerate(inputs)]
    single = onnx.helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))], domain=node.domain)
    single.attribute.extend(node.attribute)
    evaluator = ReferenceEvaluator(single, opsets={"": opset})
    results = evaluator.run(None, {n: v for n, v in zip(names, inputs) if n})
    return [np.asarray(r) for r in results]


def build_program(
    model: onnx.ModelProto, inputs: Sequence[GraphInput], opset_target: object, target_name: str
) -> tuple[Program, dict[str, str]]:
    """The MIL program of `model`, and the MIL name each ONNX output got (Core ML features are renamed back)."""
    b = _Builder(model, opset_target, target_name)
    placeholders = {mil_name(i.name): mb.placeholder(shape=i.shape, dtype=_mil_dtype(i.onnx_dtype)) for i in inputs}
    output_names: dict[str, str] = {}
    with Function(placeholders, opset_version=opset_target) as function:
        for graph_input in inputs:
            b.values[graph_input.name] = function.inputs[mil_name(graph_input.name)]
            b.fresh(graph_input.name)
        graph_outputs = [o.name for o in model.graph.output]
        for node in model.graph.node:
            _lower_node(b, node)
        results = []
        for onnx_name in graph_outputs:
            value = b.values[onnx_name]
            if isinstance(value, np.ndarray) or value.op is None or value.name in output_names.values():
                value = mb.identity(x=b.var(onnx_name), name=b.fresh(onnx_name + "_out"))
            if value.dtype == types.int32 or value.dtype == types.bool:
                value = mb.cast(x=value, dtype="int32" if value.dtype == types.int32 else "bool", name=b.fresh(onnx_name))
            output_names[onnx_name] = value.name
            results.append(value)
        function.set_outputs(results)
    program = Program()
    program.add_function("main", function)
    return program, output_names


def _lower_node(b: _Builder, node: onnx.NodeProto) -> None:
    values = [b.values.get(i) if i else None for i in node.input]
    if node.op_type in _PASSTHROUGH:
        b.values[node.output[0]] = values[0]
        return
    if node.op_type in ("Shape", "Size") and values[0] is not None:
        shape = np.array(b.shape(node.input[0]), dtype=np.int64)
        if node.op_type == "Size":
            b.values[node.output[0]] = np.array(math.prod(shape), dtype=np.int64)
            return
        attrs = _attrs(node)
        b.values[node.output[0]] = shape[attrs.get("start", 0) : attrs.get("end", len(shape))]
        return
    constant_inputs = [
        v if isinstance(v, np.ndarray) else (np.asarray(v.val) if isinstance(v, Var) and v.val is not None and v.op is not None and v.op.op_type == "const" else None)
        for v in values
    ]
    if node.op_type == "Constant" or (
        node.op_type not in _NEVER_FOLD and all((c is not None) == bool(i) for c, i in zip(constant_inputs, node.input))
    ):
        for name, result in zip(node.output, _fold(node, constant_inputs, b.opset)):
            b.values[name] = result
        return
    handler = _HANDLERS[node.op_type]
    name = b.fresh(node.output[0] if node.output else node.name)
    for output, result in zip(node.output, handler(b, node, name)):
        if output:
            b.values[output] = result
