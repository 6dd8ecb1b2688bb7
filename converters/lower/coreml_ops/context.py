"""What every Core ML op handler works with: the tensors built so far, MIL names and constants."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.graph.opset import MIN_OPSET, ir_opset

__all__ = ["Builder", "GraphInput", "Handler", "Value", "input_at", "mil_const", "mil_dtype", "mil_name", "node_opset"]

#: a tensor during the build: a MIL Var, or a numpy value known at build time
Value = Var | np.ndarray


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


def mil_dtype(dtype: np.dtype) -> type:
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


def mil_const(value: np.ndarray, like: Var | None = None) -> np.ndarray:
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


def node_opset(node: ir.Node) -> int:
    """The default-domain opset that defines `node` (attribute defaults and input layouts changed across versions)."""
    if node.version is not None:
        return node.version
    return (ir_opset(node.graph) if node.graph is not None else None) or MIN_OPSET


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    """The node's input at `index`, None when absent or left empty."""
    return node.inputs[index] if index < len(node.inputs) else None


class Builder:
    """State of one conversion: the value of every ONNX tensor, as a MIL Var or a numpy constant."""

    def __init__(self, opset: int, ios18: bool, target_name: str) -> None:
        self.opset = opset
        self.ios18 = ios18
        self.target_name = target_name
        self.values: dict[ir.Value, Value] = {}
        self._names: dict[str, int] = {}

    def value(self, tensor: ir.Value) -> Value:
        return self.values[tensor]

    def known(self, tensor: ir.Value) -> np.ndarray:
        value = self.values[tensor]
        if isinstance(value, Var):
            if value.val is not None:
                return np.asarray(value.val)
            raise LoweringError(f"tensor '{tensor.name}' must be known at build time but is computed from the inputs")
        return value

    def var(self, tensor: ir.Value, like: Var | None = None) -> Var:
        value = self.values[tensor]
        if isinstance(value, Var):
            return value
        return mb.const(val=mil_const(value, like), name=self.fresh(tensor.name))

    def fresh(self, name: str) -> str:
        base = mil_name(name)
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def shape(self, tensor: ir.Value) -> tuple[int, ...]:
        value = self.values[tensor]
        return tuple(int(d) for d in (value.shape if isinstance(value, Var) else np.shape(value)))

    def operand(self, tensor: ir.Value, other: ir.Value) -> Value:
        """An operand of an elementwise op, with a numpy side cast to the dtype of the Var side."""
        value, partner = self.values[tensor], self.values[other]
        if isinstance(value, Var):
            return value
        return mil_const(value, partner if isinstance(partner, Var) else None)

    def const_or_var(self, tensor: ir.Value, like: Var | None = None) -> Value:
        """A Var as it is, a numpy value in the dtype MIL wants (MIL makes it a constant)."""
        value = self.values[tensor]
        return value if isinstance(value, Var) else mil_const(value, like)


#: a handler gets the builder, the node and the MIL name for its (first) output, and returns the
#: node's outputs (MIL Vars or numpy constants) in ONNX order
Handler = Callable[[Builder, ir.Node, str], "list[Value]"]
