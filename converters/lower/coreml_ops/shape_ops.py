"""Data movement on static shapes: Reshape and friends, Expand, Transpose, Concat, Split, Slice, Pad."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.converters.lower.coreml_ops.build_time import known_at_build_time
from edgeopt.converters.lower.coreml_ops.context import Builder, Value, input_at


@REGISTRY.register("Identity", "Dropout")
def _pass_through(b: Builder, node: ir.Node, name: str) -> list[Value]:
    return [b.value(node.inputs[0])]


def _static_reshape(b: Builder, node: ir.Node) -> list[int]:
    shape = b.shape(node.inputs[0])
    target = [int(d) for d in b.known(node.inputs[1])]
    allow_zero = bool(node.attributes.get_int("allowzero", 0))
    target = [shape[i] if d == 0 and not allow_zero else d for i, d in enumerate(target)]
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(shape) // known
    return target


def _axes(b: Builder, node: ir.Node) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, an (optional) input since."""
    if b.opset < 13:
        axes = node.attributes.get_ints("axes")
        return None if axes is None else [int(a) for a in axes]
    axes_input = input_at(node, 1)
    return None if axes_input is None else [int(a) for a in b.known(axes_input)]


@REGISTRY.register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    shape = tuple(int(d) for d in x.shape)
    rank = len(shape)
    match node.op_type:
        case "Reshape":
            target = _static_reshape(b, node)
        case "Flatten":
            axis = node.attributes.get_int("axis", 1) % (rank + 1) if rank else 0
            target = [math.prod(shape[:axis]), math.prod(shape[axis:])]
        case "Squeeze":
            axes = _axes(b, node)
            drop = {a % rank for a in axes} if axes is not None else {i for i, d in enumerate(shape) if d == 1}
            target = [d for i, d in enumerate(shape) if i not in drop]
        case "Unsqueeze":
            axes = _axes(b, node) or []
            out_rank = rank + len(axes)
            target = list(shape)
            for axis in sorted(a % out_rank for a in axes):
                target.insert(axis, 1)
    if not target:
        return [mb.squeeze(x=x, name=name)]
    return [mb.reshape(x=x, shape=target, name=name)]


def _expand_support(node: ir.Node) -> str | None:
    if known_at_build_time(node.inputs[1]) is False:
        return "only supported when its target shape is known at build time"
    return None


@REGISTRY.register("Expand", supports=_expand_support)
def _expand(b: Builder, node: ir.Node, name: str) -> list[Value]:
    """ONNX Expand broadcasts both ways; with static shapes that is a reshape to the output rank and a tile."""
    x = b.var(node.inputs[0])
    shape = tuple(int(d) for d in x.shape)
    out_shape = np.broadcast_shapes(shape, tuple(int(d) for d in b.known(node.inputs[1])))
    padded = (1,) * (len(out_shape) - len(shape)) + shape
    if padded != shape:
        x = mb.reshape(x=x, shape=list(padded), name=b.fresh(name + "_rank"))
    reps = [o // i for o, i in zip(out_shape, padded)]
    return [mb.tile(x=x, reps=reps, name=name) if any(r != 1 for r in reps) else mb.identity(x=x, name=name)]


@REGISTRY.register("Transpose")
def _transpose(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    perm = node.attributes.get_ints("perm", list(reversed(range(len(x.shape)))))
    return [mb.transpose(x=x, perm=[int(p) for p in perm], name=name)]


@REGISTRY.register("Concat")
def _concat(b: Builder, node: ir.Node, name: str) -> list[Value]:
    like = next(b.value(t) for t in node.inputs if isinstance(b.value(t), Var))
    values = [b.var(t, like) for t in node.inputs if math.prod(b.shape(t)) > 0]
    return [mb.concat(values=values, axis=node.attributes.get_int("axis"), name=name)]


@REGISTRY.register("Split")
def _split(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    axis = node.attributes.get_int("axis", 0) % len(x.shape)
    sizes_input = input_at(node, 1)
    if b.opset >= 13 and sizes_input is not None:
        sizes = [int(s) for s in b.known(sizes_input)]
    elif "split" in node.attributes:
        sizes = [int(s) for s in node.attributes.get_ints("split")]
    else:
        parts = node.attributes.get_int("num_outputs", len(node.outputs))
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    outputs = mb.split(x=x, split_sizes=sizes, axis=axis, name=name)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _slice_arguments(b: Builder, node: ir.Node) -> tuple[list[int], list[int], list[int], list[int]]:
    """(starts, ends, axes, steps): attributes before opset 10, inputs since."""
    if b.opset < 10:
        starts, ends = list(node.attributes.get_ints("starts")), list(node.attributes.get_ints("ends"))
        return starts, ends, list(node.attributes.get_ints("axes", range(len(starts)))), [1] * len(starts)
    starts, ends = list(b.known(node.inputs[1])), list(b.known(node.inputs[2]))
    axes, steps = input_at(node, 3), input_at(node, 4)
    return (
        starts,
        ends,
        list(b.known(axes)) if axes is not None else list(range(len(starts))),
        list(b.known(steps)) if steps is not None else [1] * len(starts),
    )


def _clamp(index: int) -> int:
    """ONNX writes "to the end" as ±2**63-ish; slice() wants Python ints it can compare."""
    return int(max(min(index, 2**62), -(2**62)))


@REGISTRY.register("Slice")
def _slice(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    shape = tuple(x.shape)
    rank = len(shape)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    end_mask = [False] * rank
    for start, stop, axis, step in zip(*_slice_arguments(b, node)):
        axis = int(axis) % rank
        first, last, step = slice(_clamp(start), _clamp(stop), int(step)).indices(shape[axis])
        begin[axis], end[axis], stride[axis] = first, last, step
        end_mask[axis] = step < 0 and last < 0
    return [mb.slice_by_index(x=x, begin=begin, end=end, stride=stride, end_mask=end_mask, name=name)]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad_support(node: ir.Node) -> str | None:
    mode = node.attributes.get_string("mode", "constant")
    return None if mode in _PAD_MODES else f"pad mode {mode}"


@REGISTRY.register("Pad", supports=_pad_support)
def _pad(b: Builder, node: ir.Node, name: str) -> list[Value]:
    x = b.var(node.inputs[0])
    rank = len(x.shape)
    if b.opset < 11:
        pads, value = list(node.attributes.get_ints("pads")), node.attributes.get_float("value", 0.0)
    else:
        pads = [int(p) for p in b.known(node.inputs[1])]
        value_input, axes_input = input_at(node, 2), input_at(node, 3)
        value = float(b.known(value_input)) if value_input is not None else 0.0
        if axes_input is not None:
            axes = [int(a) % rank for a in b.known(axes_input)]
            full = [0] * 2 * rank
            for i, axis in enumerate(axes):
                full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
            pads = full
    mode = _PAD_MODES[node.attributes.get_string("mode", "constant")]
    interleaved = [int(p) for pair in zip(pads[:rank], pads[rank:]) for p in pair]
    return [mb.pad(x=x, pad=interleaved, mode=mode, constant_val=value, name=name)]
