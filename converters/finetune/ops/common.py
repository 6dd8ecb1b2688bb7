"""What every op handler of the trainable interpreter reads: a node as plain data, and ONNX ↔ torch types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch

__all__ = ["NodeSpec", "TORCH_DTYPES", "integers", "pads_pair", "torch_pad"]

#: ONNX element types the interpreter computes in, by ONNX TensorProto number
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def _attribute_value(attribute: ir.Attr) -> Any:
    value = attribute.value
    if attribute.type == ir.AttributeType.TENSOR:
        return value.numpy()
    if attribute.type == ir.AttributeType.STRING:
        return value.decode() if isinstance(value, bytes) else value
    if attribute.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(value)
    return value


@dataclass(frozen=True)
class NodeSpec:
    """One ONNX node as plain data: the interpreter keeps no onnx_ir objects (the module deep-copies and pickles)."""

    name: str
    op_type: str
    domain: str
    opset: int
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    has_subgraph: bool = False

    @classmethod
    def of(cls, node: ir.Node, name: str, opset: int) -> NodeSpec:
        subgraph = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        return cls(
            name=name,
            op_type=node.op_type,
            domain=node.domain or "",
            opset=node.version or opset,
            inputs=tuple(value.name if value is not None else "" for value in node.inputs),
            outputs=tuple(value.name or "" for value in node.outputs),
            attrs={} if subgraph else {key: _attribute_value(a) for key, a in node.attributes.items() if not a.is_ref()},
            has_subgraph=subgraph,
        )

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def integers(value: torch.Tensor | None) -> list[int] | None:
    """A shape-like tensor input (Reshape's shape, Slice's starts...) as Python ints."""
    return None if value is None else [int(v) for v in value.reshape(-1).tolist()]


def pads_pair(pads: list[int], spatial: int) -> tuple[list[int], list[int]]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] as (begins, ends)."""
    pads = list(pads) if pads else [0] * (2 * spatial)
    return pads[:spatial], pads[spatial:]


def torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """(begins, ends) per spatial axis as torch.nn.functional.pad's last-axis-first list."""
    flat: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        flat += [begin, end]
    return flat
