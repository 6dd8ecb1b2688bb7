"""Dependency groups: which channels of which layers must be removed together, found on the graph.

Every output channel of a prunable layer (Conv, ConvTranspose with group 1, Gemm and MatMul with a
constant 2-D weight) is an *atom*. The analysis walks the graph once, in order, and follows
each layer's channel axis forward as a per-position list of atoms (a `Trace`):

- element-wise and per-channel ops (activations, BatchNorm, pooling, Resize, Pad off the channel
  axis) keep it; a constant operand or parameter that spans the channels is sliced with it;
- Add/Mul/... of two traced tensors tie their atoms position by position (a residual couples both
  branches); Concat on the channel axis lays the inputs' lists end to end; Split/Slice cut them;
- Transpose/Squeeze/Unsqueeze/Reshape/Flatten move the axis, or spread one channel over a block of
  positions (Flatten→Gemm: one channel is H×W input features) when the new layout keeps one axis
  per channel; anything else stops the trace;
- a depthwise Conv (group = channels, one filter each) passes the channels through; a layer's input
  ends them (its weight's input-channel slices). In a grouped Conv the same position of every group
  is tied, in and out, so every group keeps the same count and `group` stays as it is.

An atom reaching anything the analysis does not prove safe — an unknown op, a graph output, a
reduction or Softmax across channels, a reshape that splits the channels
into heads, a protected layer — is *pinned* (tied to the atom `PINNED`, never removed), with the
reason recorded. Pinning keeps every position of that tensor, so the tensor itself is unchanged:
the safety argument needs nothing about the op that reads it. Connected atoms form *units* (one
removable channel, with all its copies); layers whose units are tied form a *group*.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgeopt.converters.graph.qdq import build_time_array, int_attribute

__all__ = ["PINNED", "Analysis", "Group", "ParamSlice", "ShapeEdit", "Source", "Trace", "analyze"]

#: The atom every kept-for-sure channel is tied to.
PINNED = 0

#: Ops that keep every channel where it is and compute each one from itself alone.
_PER_CHANNEL = frozenset(
    {
        "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Clip", "Exp",
        "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Identity",
        "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Shrink",
    }
)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where"})
#: Ops on NCHW tensors that work within each channel (channel axis 1).
_SPATIAL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize", "Upsample"})
#: Per-channel parameter inputs (axis 0, length C) of normalizations.
_NORM_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
_REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"})
#: Above this many elements a Reshape's layout is not enumerated (the channel is pinned instead).
_MAX_LAYOUT = 1 << 26


@dataclass(frozen=True)
class Trace:
    """Where channels are in a tensor: `atoms[p]` is the atom at position p of `axis`."""

    axis: int
    atoms: np.ndarray


@dataclass
class Source:
    """A layer whose output channels are atoms `start` .. `start + width - 1`."""

    node: ir.Node
    start: int
    width: int
    weight_axis: int  # the output-channel axis of its weight (input 1); its bias (input 2) is 1-D
    index: int = 0  # position in `Analysis.sources`

    @property
    def atoms(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.width)


@dataclass(frozen=True)
class ParamSlice:
    """A constant input of `node` that spans traced channels on `axis`: its positions are kept with their atoms.

    `consumer` marks a layer's weight input-channel slices (where channels end): the zero-equivalence
    check zeroes exactly these for the removed atoms.
    """

    node: ir.Node
    input_index: int
    axis: int
    atoms: np.ndarray
    consumer: bool = False


@dataclass(frozen=True)
class ShapeEdit:
    """An attribute or shape-like constant that states a channel count, rewritten after pruning.

    kind: "reshape" (input 1, entry `axis` becomes the kept count of `atoms`), "resize_sizes",
    "split" (the kept count of each output's atoms), "slice" (start/end of the kept positions),
    "group" (a depthwise Conv's group attribute).
    """

    node: ir.Node
    kind: str
    axis: int
    atoms: tuple[np.ndarray, ...]


@dataclass
class Group:
    """Layers whose channels are tied; `units` lists each removable channel's atoms (pinned ones excluded)."""

    sources: list[Source]
    units: list[np.ndarray] = field(default_factory=list)
    pinned_reasons: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    """The result of `analyze`: atoms, how they are tied, and everything surgery must slice or rewrite."""

    sources: list[Source]
    parent: np.ndarray  # union-find over atom ids (0 is PINNED)
    params: list[ParamSlice]
    edits: list[ShapeEdit]
    pins: list[tuple[np.ndarray, str]]  # atoms pinned, and why
    segment_starts: np.ndarray  # sorted atom ids where a Split/Slice cut (or a layer) begins a segment

    def find(self, atoms: np.ndarray) -> np.ndarray:
        return _find_all(self.parent, atoms)

    def groups(self) -> list[Group]:
        """Groups of tied layers, each with its units (sets of atoms removed together)."""
        atom_count = len(self.parent)
        roots = self.find(np.arange(atom_count))
        pinned_root = roots[PINNED]
        source_of = np.full(atom_count, -1)
        for source in self.sources:
            source_of[source.start : source.start + source.width] = source.index
        # sources tied through any atom share a group (pinned ties do not count)
        group_of = list(range(len(self.sources)))

        def top(i: int) -> int:
            while group_of[i] != i:
                group_of[i] = group_of[group_of[i]]
                i = group_of[i]
            return i

        members: dict[int, list[int]] = {}
        for atom in range(1, atom_count):
            if roots[atom] != pinned_root:
                members.setdefault(int(roots[atom]), []).append(atom)
        for atoms in members.values():
            first = top(int(source_of[atoms[0]]))
            for atom in atoms[1:]:
                other = top(int(source_of[atom]))
                if other != first:
                    group_of[other] = first
        groups: dict[int, Group] = {}
        for source in self.sources:
            groups.setdefault(top(source.index), Group(sources=[])).sources.append(source)
        for atoms in members.values():
            groups[top(int(source_of[atoms[0]]))].units.append(np.asarray(atoms))
        for atoms, reason in self.pins:
            for index in sorted({int(source_of[a]) for a in atoms if a != PINNED and source_of[a] >= 0}):
                group = groups[top(index)]
                if reason not in group.pinned_reasons:
                    group.pinned_reasons.append(reason)
        for group in groups.values():
            pinned = sum(int((roots[s.start : s.start + s.width] == pinned_root).sum()) for s in group.sources)
            if pinned and not group.pinned_reasons:
                group.pinned_reasons.append(f"{pinned} channel(s) tied (by Add, Mul or Concat) to channels kept for another layer's reason")
        return list(groups.values())

    def segment_of(self, atoms: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.segment_starts, atoms, side="right")

    def channels_per_layer(self, unit: np.ndarray) -> int:
        """How many channels of each layer a unit holds (1; a grouped conv's groups or a head's width: more)."""
        starts = np.asarray([s.start for s in self.sources])
        _, counts = np.unique(np.searchsorted(starts, unit, side="right"), return_counts=True)
        return math.gcd(*counts.tolist())


def analyze(model: ir.Model, protected: Iterable[str] = ()) -> Analysis:
    """Trace channels through the main graph (shapes inferred, constants folded; see the module docstring).

    `protected`: node names whose output channels are kept (first layers, which read a graph input,
    are always protected).
    """
    return _Tracer(model.graph, set(protected)).run()


def _find_all(parent: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    roots = np.asarray(atoms)
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


class _Tracer:
    def __init__(self, graph: ir.Graph, protected: set[str]) -> None:
        self.graph = graph
        self.protected = protected
        self.parent: list[int] = [PINNED]
        self.sources: list[Source] = []
        self.params: list[ParamSlice] = []
        self.edits: list[ShapeEdit] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.cuts: set[int] = set()
        self.traces: dict[ir.Value, Trace] = {}

    # -- union-find over atoms ---------------------------------------------------------------

    def _root(self, atom: int) -> int:
        parent = self.parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def tie(self, first: np.ndarray, second: np.ndarray) -> None:
        for a, b in zip(first.tolist(), second.tolist()):
            ra, rb = self._root(a), self._root(b)
            if ra != rb:
                # PINNED stays a root, so "is it pinned" is one lookup
                if rb == PINNED:
                    ra, rb = rb, ra
                self.parent[rb] = ra

    def pin(self, trace: Trace | None, reason: str) -> None:
        if trace is None:
            return
        atoms = np.unique(trace.atoms)
        self.tie(np.full(len(atoms), PINNED), atoms)
        self.pins.append((atoms, reason))

    # -- the walk ------------------------------------------------------------------------------

    def run(self) -> Analysis:
        # values computed from graph inputs (and constants) alone, through no prunable layer: a layer
        # that reads one is a first layer (a Resize or normalization may come before it)
        from_input = set(self.graph.inputs)
        for node in self.graph:
            self.visit(node, from_input)
            variable = [v for v in node.inputs if v is not None and build_time_array(v) is None]
            if self.source_weight_axis(node) is None and variable and all(v in from_input for v in variable):
                from_input.update(node.outputs)
        for value in self.graph.outputs:
            self.pin(self.traces.get(value), f"reaches graph output '{value.name}'")
        for source in self.sources:
            self.cuts.add(source.start)
        return Analysis(
            sources=self.sources,
            parent=np.asarray(self.parent),
            params=self.params,
            edits=self.edits,
            pins=self.pins,
            segment_starts=np.asarray(sorted(self.cuts), dtype=np.int64),
        )

    def visit(self, node: ir.Node, from_input: set[ir.Value]) -> None:
        traced = [(i, self.traces[v]) for i, v in enumerate(node.inputs) if v is not None and v in self.traces]
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            for _, trace in traced:
                self.pin(trace, f"read inside a subgraph of {_describe(node)}")
            self.pin_subgraph_reads(node)
            return
        if node.domain not in ("", "ai.onnx"):
            for _, trace in traced:
                self.pin(trace, f"read by {_describe(node)}, an op the analysis does not know")
            return
        source_axis = self.source_weight_axis(node)
        if source_axis is not None:
            for index, trace in traced:
                self.end_channels(node, index, trace)
            self.add_source(node, source_axis, first=node.inputs[0] in from_input)
            return
        if not traced:
            return
        handler = getattr(self, f"op_{node.op_type}", None)
        reason = handler(node, traced) if handler is not None else self.generic(node, traced)
        if reason:
            for _, trace in traced:
                self.pin(trace, f"{reason} ({_describe(node)})")

    def pin_subgraph_reads(self, node: ir.Node) -> None:
        for attr in node.attributes.values():
            graphs = [attr.value] if attr.type is ir.AttributeType.GRAPH else list(attr.value)
            for subgraph in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                    for value in inner.inputs:
                        if value is not None and value in self.traces:
                            self.pin(self.traces[value], f"read inside a subgraph of {_describe(node)}")

    def generic(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        if node.op_type in _PER_CHANNEL and len(traced) == 1 and traced[0][0] == 0:
            self.set_output(node, traced[0][1])
            return None
        if node.op_type in _ELEMENTWISE:
            return self.elementwise(node, traced)
        if node.op_type in _SPATIAL:
            return self.spatial(node, traced)
        if node.op_type in _NORM_PARAMS:
            return self.normalization(node, traced)
        if node.op_type in _REDUCE:
            return self.reduce(node, traced)
        return f"read by {node.op_type}, which the analysis does not trace"

    # -- sources and ends ----------------------------------------------------------------------

    def source_weight_axis(self, node: ir.Node) -> int | None:
        """The output-channel axis of the weight when `node` is a prunable layer, else None."""
        op = node.op_type
        weight = build_time_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and build_time_array(bias) is None:
            return None
        if op == "Conv" and weight.ndim >= 3:
            group = int_attribute(node, "group", 1)
            depthwise = group > 1 and weight.shape[0] == group and weight.shape[1] == 1  # passes channels through (op_Conv)
            return None if depthwise else 0
        if op == "ConvTranspose" and int_attribute(node, "group", 1) == 1 and weight.ndim >= 3:
            return 1
        if op == "Gemm" and weight.ndim == 2 and not int_attribute(node, "transA", 0):
            if bias is not None and build_time_array(bias).ndim != 1:  # type: ignore[union-attr]
                return None
            return 0 if int_attribute(node, "transB", 0) else 1
        if op == "MatMul" and weight.ndim == 2 and _rank(node.inputs[0]) not in (None, 1):
            return 1
        return None

    def add_source(self, node: ir.Node, weight_axis: int, *, first: bool) -> None:
        weight = build_time_array(node.inputs[1])
        assert weight is not None
        width = int(weight.shape[weight_axis])
        start = len(self.parent)
        self.parent.extend(range(start, start + width))
        source = Source(node=node, start=start, width=width, weight_axis=weight_axis, index=len(self.sources))
        self.sources.append(source)
        output = node.outputs[0]
        rank = _rank(output)
        axis = 1 if node.op_type in ("Conv", "ConvTranspose") else (rank - 1 if rank is not None else -1)
        if axis < 0:
            self.pin(Trace(0, source.atoms), f"{_describe(node)} has an output of unknown rank")
            return
        self.traces[output] = Trace(axis, source.atoms)
        self.tie_groups(node, source.atoms)
        if first:
            self.pin(Trace(axis, source.atoms), f"first layer {_describe(node)} (reads a graph input) is protected")
        if node.name in self.protected:
            self.pin(Trace(axis, source.atoms), f"{_describe(node)} is protected by name")

    def end_channels(self, node: ir.Node, index: int, trace: Trace) -> None:
        """A prunable layer reads traced channels on its input `index`: they end in its weight's input slices."""
        rank = _rank(node.inputs[index])
        op = node.op_type
        if index != 0 or rank is None:
            self.pin(trace, f"{_describe(node)} reads them as a weight or bias")
            return
        if op in ("Conv", "ConvTranspose") and trace.axis == 1:
            self.params.append(ParamSlice(node, 1, 1 if op == "Conv" else 0, self.tie_groups(node, trace.atoms), consumer=True))
        elif op == "Gemm" and trace.axis == 1 and rank == 2:
            self.params.append(ParamSlice(node, 1, 1 if int_attribute(node, "transB", 0) else 0, trace.atoms, consumer=True))
        elif op == "MatMul" and trace.axis == rank - 1:
            self.params.append(ParamSlice(node, 1, 0, trace.atoms, consumer=True))
        else:
            self.pin(trace, f"{_describe(node)} reads them on axis {trace.axis}, not its input-channel axis")

    def tie_groups(self, node: ir.Node, atoms: np.ndarray) -> np.ndarray:
        """A grouped Conv's channels (in or out): the same position in every group is one unit, so every
        group keeps the same count and `group` stays valid. Returns the first group's atoms."""
        group = int_attribute(node, "group", 1) if node.op_type == "Conv" else 1
        if group == 1:
            return atoms
        per_group = atoms.reshape(group, -1)
        for row in per_group[1:]:
            self.tie(per_group[0], row)
        return per_group[0]

    # -- ops that keep the channel axis --------------------------------------------------------

    def set_output(self, node: ir.Node, trace: Trace, index: int = 0) -> None:
        self.traces[node.outputs[index]] = trace

    def elementwise(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        out_rank = _rank(node.outputs[0])
        if out_rank is None:
            return "output rank unknown"
        axes = {out_rank - (_rank(node.inputs[i]) or 0) + t.axis for i, t in traced}
        if len(axes) != 1:
            return "channels on different axes"
        axis = axes.pop()
        first = traced[0][1]
        for _, trace in traced[1:]:
            if len(trace.atoms) != len(first.atoms):
                return "channels broadcast against each other"
            self.tie(first.atoms, trace.atoms)
        traced_inputs = {i for i, _ in traced}
        for i, value in enumerate(node.inputs):
            if value is None or i in traced_inputs:
                continue
            dim = _aligned_dim(value, axis, out_rank)
            if dim in (None, 1):
                if dim is None and _rank(value) is None:
                    return f"operand '{value.name}' of unknown shape"
                continue
            if build_time_array(value) is None:
                return f"operand '{value.name}' spans the channels but is not constant"
            self.params.append(ParamSlice(node, i, axis - (out_rank - (_rank(value) or 0)), first.atoms))
        self.set_output(node, Trace(axis, first.atoms))
        return None

    def spatial(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *rest = traced
        if rest or index != 0 or trace.axis != 1:
            return "channels not on axis 1"
        if node.op_type == "Resize":
            scales = build_time_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            sizes = build_time_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            if scales is not None and scales.size and scales[1] != 1:
                return "Resize scales the channel axis"
            if sizes is not None and sizes.size:
                self.edits.append(ShapeEdit(node, "resize_sizes", 1, (trace.atoms,)))
            elif scales is None or not scales.size:
                return "Resize without constant scales or sizes"
        self.set_output(node, trace)
        return None

    def normalization(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *rest = traced
        if rest or index != 0 or trace.axis != 1:
            return "channels not on axis 1, or as a parameter"
        for i in _NORM_PARAMS[node.op_type]:
            if i < len(node.inputs) and node.inputs[i] is not None:
                if build_time_array(node.inputs[i]) is None:
                    return "non-constant parameters"
                self.params.append(ParamSlice(node, i, 0, trace.atoms))
        self.set_output(node, trace)
        return None

    def reduce(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *_ = traced
        rank = _rank(node.inputs[0])
        if index != 0 or rank is None:
            return "reduction with unknown rank"
        axes = _int_list(node, "axes", 1)
        if axes is None:
            return "reduction over all or non-constant axes"
        axes = [a % rank for a in axes]
        if trace.axis in axes:
            return "reduction across channels"
        keep = int_attribute(node, "keepdims", 1)
        self.set_output(node, Trace(trace.axis if keep else trace.axis - sum(a < trace.axis for a in axes), trace.atoms))
        return None

    def op_Softmax(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (_, trace), *_ = traced
        rank = _rank(node.inputs[0])
        if rank is None or int_attribute(node, "axis", -1) % rank == trace.axis:
            return "Softmax across channels"
        self.set_output(node, trace)
        return None

    op_LogSoftmax = op_Softmax

    def op_LayerNormalization(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *_ = traced
        rank = _rank(node.inputs[0])
        if index != 0 or rank is None or trace.axis >= int_attribute(node, "axis", -1) % rank:
            return "normalized across channels"
        self.set_output(node, trace)
        return None

    def op_Pad(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *_ = traced
        rank = _rank(node.inputs[0])
        pads = build_time_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if index != 0 or rank is None or pads is None or len(node.inputs) > 3 and node.inputs[3] is not None:
            return "Pad with non-constant pads or axes"
        if pads[trace.axis] or pads[trace.axis + rank]:
            return "Pad on the channel axis"
        self.set_output(node, trace)
        return None

    def op_Transpose(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (_, trace), *_ = traced
        rank = _rank(node.inputs[0])
        perm = _int_list(node, "perm", None)
        if rank is None:
            return "rank unknown"
        perm = perm if perm is not None else list(reversed(range(rank)))
        self.set_output(node, Trace(perm.index(trace.axis), trace.atoms))
        return None

    def op_Unsqueeze(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *_ = traced
        axes = _int_list(node, "axes", 1)
        out_rank = _rank(node.outputs[0])
        if index != 0 or axes is None or out_rank is None:
            return "non-constant axes"
        axes = sorted(a % out_rank for a in axes)
        axis = trace.axis
        for a in axes:
            if a <= axis:
                axis += 1
        self.set_output(node, Trace(axis, trace.atoms))
        return None

    def op_Squeeze(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *_ = traced
        rank = _rank(node.inputs[0])
        axes = _int_list(node, "axes", 1)
        if index != 0 or rank is None or axes is None:
            return "non-constant axes"
        axes = [a % rank for a in axes]
        if trace.axis in axes:
            return "squeezes the channel axis"
        self.set_output(node, Trace(trace.axis - sum(a < trace.axis for a in axes), trace.atoms))
        return None

    def op_Flatten(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        return self.relayout(node, traced)

    def op_Reshape(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        return self.relayout(node, traced, edit=True)

    def relayout(self, node: ir.Node, traced: list[tuple[int, Trace]], edit: bool = False) -> str | None:
        """A new layout keeps the trace when one output axis alone says which channel a position holds."""
        (index, trace), *_ = traced
        in_shape, out_shape = _static_shape(node.inputs[0]), _static_shape(node.outputs[0])
        if index != 0 or in_shape is None or out_shape is None:
            return "reshape of a tensor without a static shape"
        if edit and build_time_array(node.inputs[1]) is None:
            return "Reshape to a computed shape"
        if math.prod(in_shape) > _MAX_LAYOUT:
            return "reshape of a tensor too large to check"
        field_ = np.broadcast_to(_expand(trace.atoms, trace.axis, len(in_shape)), in_shape).reshape(out_shape)
        for axis in range(len(out_shape)):
            moved = np.moveaxis(field_, axis, 0).reshape(out_shape[axis], -1)
            if (moved == moved[:, :1]).all():
                if edit and _reshape_entry(node, axis) != -1:
                    self.edits.append(ShapeEdit(node, "reshape", axis, (moved[:, 0],)))
                self.set_output(node, Trace(axis, moved[:, 0]))
                return None
        return self.split_heads(node, field_, out_shape) if edit else "reshape splits the channels over several axes"

    def split_heads(self, node: ir.Node, field_: np.ndarray, out_shape: tuple[int, ...]) -> str | None:
        """A Reshape of channels into (heads, channels per head) on two adjacent axes: each head is one unit.

        The head's channels are tied together and the trace follows the head axis, one atom per head;
        ops may then mix positions within a head (attention's Q.K contraction, a softmax over bins),
        since a head is kept or removed whole; anything that mixes heads pins them as usual.
        """
        for axis in range(len(out_shape) - 1):
            heads, width = out_shape[axis], out_shape[axis + 1]
            moved = np.moveaxis(field_, (axis, axis + 1), (0, 1)).reshape(heads, width, -1)
            if heads > 1 and width > 1 and (moved == moved[:, :, :1]).all():
                grid = moved[:, :, 0]
                for column in range(1, width):
                    self.tie(grid[:, 0], grid[:, column])
                self.edits.append(ShapeEdit(node, "reshape", axis, (grid[:, 0],)))
                self.set_output(node, Trace(axis, grid[:, 0]))
                return None
        return "reshape splits the channels over several axes"

    def op_MatMul(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        """MatMul of computed operands (attention): heads on a batch axis tie position by position, rows of
        the first operand and columns of the second pass through; the contracted axis mixes channels."""
        a_rank, b_rank, out_rank = _rank(node.inputs[0]), _rank(node.inputs[1]), _rank(node.outputs[0])
        if a_rank is None or b_rank is None or out_rank is None or min(a_rank, b_rank) < 2:
            return "MatMul of operands of unknown or vector shape"
        placed = {}
        for index, trace in traced:
            rank = a_rank if index == 0 else b_rank
            if trace.axis == rank - (1 if index == 0 else 2):
                return "MatMul contracts them"
            placed[index] = out_rank - rank + trace.axis
        if len(set(placed.values())) != 1:
            return "MatMul keeps both operands' channels on different axes"
        axis = placed[traced[0][0]]
        if len(traced) == 2:
            if len(traced[0][1].atoms) != len(traced[1][1].atoms):
                return "MatMul broadcasts them"
            self.tie(traced[0][1].atoms, traced[1][1].atoms)
        elif axis < out_rank - 2:
            other = node.inputs[1 - traced[0][0]]
            if _aligned_dim(other, axis, out_rank) not in (1,):
                return f"operand '{other.name}' spans the heads but is not traced"
        self.set_output(node, Trace(axis, traced[0][1].atoms))
        return None

    def op_Concat(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        rank = _rank(node.outputs[0])
        if rank is None:
            return "rank unknown"
        axis = int_attribute(node, "axis", 0) % rank
        axes = {t.axis for _, t in traced}
        if axes != {axis}:
            if len(axes) == 1 and len(traced) == len([v for v in node.inputs if v is not None]):
                return self.elementwise(node, traced)
            return "concatenated off the channel axis"
        traces = dict(traced)
        parts = []
        for i, value in enumerate(node.inputs):
            if i in traces:
                parts.append(traces[i].atoms)
            else:
                shape = _static_shape(value)
                if shape is None:
                    return f"concatenates '{value.name}' of unknown shape"
                parts.append(np.full(shape[axis], PINNED))
        self.set_output(node, Trace(axis, np.concatenate(parts)))
        return None

    def op_Split(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *_ = traced
        rank = _rank(node.inputs[0])
        if index != 0 or rank is None:
            return "rank unknown"
        axis = int_attribute(node, "axis", 0) % rank
        if axis != trace.axis:
            for i in range(len(node.outputs)):
                self.set_output(node, trace, i)
            return None
        sizes = build_time_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if sizes is None:
            attribute = node.attributes.get("split")
            if attribute is not None:
                sizes = np.asarray(attribute.value)
            else:
                count, width = len(node.outputs), len(trace.atoms)
                if width % count:
                    return "uneven Split without sizes"
                sizes = np.full(count, width // count)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        parts = tuple(trace.atoms[bounds[i] : bounds[i + 1]] for i in range(len(sizes)))
        self.cut(parts)
        self.edits.append(ShapeEdit(node, "split", axis, parts))
        for i, part in enumerate(parts):
            self.set_output(node, Trace(axis, part), i)
        return None

    def op_Slice(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        (index, trace), *_ = traced
        rank = _rank(node.inputs[0])
        starts, ends = build_time_array(node.inputs[1]), build_time_array(node.inputs[2])
        axes = build_time_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = build_time_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if index != 0 or rank is None or starts is None or ends is None:
            return "Slice with non-constant bounds"
        axes = [int(a) % rank for a in (axes if axes is not None else range(len(starts)))]
        if trace.axis not in axes:
            self.set_output(node, trace)
            return None
        k = axes.index(trace.axis)
        step = 1 if steps is None else int(steps[k])
        if step != 1:
            return "Slice with a step on the channel axis"
        start, stop, _ = slice(int(starts[k]), int(ends[k])).indices(len(trace.atoms))
        part = trace.atoms[start:stop]
        self.cut((trace.atoms[:start], part, trace.atoms[stop:]))
        self.edits.append(ShapeEdit(node, "slice", k, (trace.atoms, np.arange(start, stop))))
        self.set_output(node, Trace(trace.axis, part))
        return None

    def op_Conv(self, node: ir.Node, traced: list[tuple[int, Trace]]) -> str | None:
        """A depthwise Conv (one filter per channel) passes channels through; a Conv with computed weights is unknown."""
        (index, trace), *rest = traced
        weight = build_time_array(node.inputs[1]) if len(node.inputs) > 1 else None
        group = int_attribute(node, "group", 1)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if rest or index != 0 or trace.axis != 1 or weight is None or (bias is not None and build_time_array(bias) is None):
            return "Conv with non-constant weights"
        if group != len(trace.atoms):
            return f"depthwise convolution over {group} groups reads {len(trace.atoms)} traced channels"
        self.params.append(ParamSlice(node, 1, 0, trace.atoms))
        if bias is not None:
            self.params.append(ParamSlice(node, 2, 0, trace.atoms))
        self.edits.append(ShapeEdit(node, "group", 1, (trace.atoms,)))
        self.set_output(node, trace)
        return None

    def cut(self, parts: Sequence[np.ndarray]) -> None:
        """Split/Slice boundaries: units on either side are rounded to the channel multiple separately."""
        for part in parts:
            if len(part):
                self.cuts.add(int(part[0]))
                self.cuts.add(int(part[-1]) + 1)


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return None
    return dims  # type: ignore[return-value]


def _aligned_dim(value: ir.Value, axis: int, out_rank: int) -> int | None:
    """The operand's size on output axis `axis` under numpy broadcasting (None: unknown; 1 when absent)."""
    rank = _rank(value)
    if rank is None:
        return None
    position = axis - (out_rank - rank)
    if position < 0:
        return 1
    dim = value.shape[position]  # type: ignore[index]
    return dim if isinstance(dim, int) else None


def _int_list(node: ir.Node, name: str, input_index: int | None) -> list[int] | None:
    """An axes/perm list from the attribute, or from input `input_index` (opset 13+), when constant."""
    attribute = node.attributes.get(name)
    if attribute is not None:
        return [int(a) for a in attribute.value]
    if input_index is not None and len(node.inputs) > input_index and node.inputs[input_index] is not None:
        array = build_time_array(node.inputs[input_index])
        return None if array is None else [int(a) for a in array.reshape(-1)]
    return None


def _reshape_entry(node: ir.Node, axis: int) -> int | None:
    shape = build_time_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if shape is None or axis >= len(shape) else int(shape[axis])


def _expand(atoms: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = len(atoms)
    return atoms.reshape(shape)
