"""Fuse the exported erf form of GELU, x * 0.5 * (1 + erf(x / sqrt(2))), into one Gelu node."""

from __future__ import annotations

__all__ = ["FuseErfGeluPass", "erf_gelu_chain"]

import logging
import math

import numpy as np
import onnx_ir as ir

from edgeopt.converters.graph.rewrite import constant_array
from edgeopt.converters.passes.base import GraphPass

logger = logging.getLogger(__name__)

_QDQ = ("QuantizeLinear", "DequantizeLinear")


class FuseErfGeluPass(GraphPass):
    """Replace each erf-GELU chain, in any of its exported orders, by a default-domain ``Gelu``.

    Runtimes without an Erf kernel (LiteRT) have a GELU one. QDQ graphs put Q->DQ pairs between
    the pattern's nodes: the chain is matched through them, and pairs left dead by the fusion are
    removed. ``Gelu`` exists from opset 20 on, so run this after shape inference, as the last
    rewrite before a lowering reads the graph; ``fused`` counts the chains replaced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for erf in graph if erf.op_type == "Erf" and erf.domain in ("", "ai.onnx") if (m := erf_gelu_chain(erf)) is not None]
        matches = [(x, chain) for x, chain in matches if all(node.graph is graph for node in chain)]  # none inside an If/Loop body
        for x, chain in matches:
            last = chain[-1]
            output = last.outputs[0]
            gelu = ir.Node("", "Gelu", [x], name=f"{chain[1].name or 'gelu'}_gelu")
            graph.insert_before(last, gelu)
            fused = gelu.outputs[0]
            fused.shape, fused.type = output.shape, output.type
            name = output.name
            ir.convenience.replace_all_uses_with(output, fused, replace_graph_outputs=True)
            output.name = None
            fused.name = name
        if matches:
            _remove_dead(graph, {node for _, chain in matches for node in chain})
            logger.info("fused %d erf GELU pattern(s)", len(matches))
        self.fused = len(matches)
        return ir.passes.PassResult(model, modified=bool(matches))


def erf_gelu_chain(erf: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """(x, the chain's nodes ending with the one whose output becomes the Gelu's) for one Erf, or None."""
    scaled = _through_qdq(erf.inputs[0]).producer()
    if scaled is None or scaled.op_type not in ("Div", "Mul"):
        return None
    constant = _scalar(scaled.inputs[1])
    if constant is None:
        return None
    factor = 1.0 / constant if scaled.op_type == "Div" else constant
    if not math.isclose(factor, 1.0 / math.sqrt(2.0), rel_tol=1e-3):
        return None
    x = scaled.inputs[0]
    add = _single_user(erf.outputs[0])
    if add is None or add.op_type != "Add" or _scalar(_other(add, erf.outputs[0])) != 1.0:
        return None
    chain = [scaled, erf, add]
    first = _single_user(add.outputs[0])
    if first is None or first.op_type != "Mul":
        return None
    partner = _other(first, add.outputs[0])
    if _through_qdq(partner) is not _through_qdq(x) and _scalar(partner) != 0.5:
        # 0.5 * x computed first: Mul(x, 0.5) feeds this Mul
        half = _through_qdq(partner).producer()
        if half is None or half.op_type != "Mul" or _through_qdq(half.inputs[0]) is not _through_qdq(x) or _scalar(half.inputs[1]) != 0.5:
            return None
        return x, [*chain, half, first]
    second = _single_user(first.outputs[0])
    if second is None or second.op_type != "Mul":
        return None
    partner2 = _other(second, first.outputs[0])
    if _through_qdq(partner) is _through_qdq(x):
        if _scalar(partner2) != 0.5:
            return None
    elif _through_qdq(partner2) is not _through_qdq(x):
        return None
    return x, [*chain, first, second]


def _through_qdq(value: ir.Value) -> ir.Value:
    """The float tensor behind a Q->DQ pair (QDQ graphs put pairs between the pattern's nodes)."""
    dq = value.producer()
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = dq.inputs[0].producer()
        if q is not None and q.op_type == "QuantizeLinear":
            return q.inputs[0]
    return value


def _single_user(value: ir.Value) -> ir.Node | None:
    """The one node that reads `value`, looking through a Q->DQ pair."""
    users = [use.node for use in value.uses()]
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        dq_users = [use.node for use in users[0].outputs[0].uses()]
        if len(dq_users) == 1 and dq_users[0].op_type == "DequantizeLinear":
            return _single_user(dq_users[0].outputs[0])
    return users[0] if len(users) == 1 and not value.is_graph_output() else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value:
    """The input of a binary node that is not `value` (nor its Q->DQ view)."""
    first, second = node.inputs[0], node.inputs[1]
    return second if _through_qdq(first) is value or first is value else first


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element float constant, also behind a DequantizeLinear of a constant."""
    array = constant_array(value)
    dq = value.producer() if value is not None else None
    if array is None and dq is not None and dq.op_type == "DequantizeLinear" and (stored := constant_array(dq.inputs[0])) is not None:
        scale = constant_array(dq.inputs[1]).astype(np.float64)
        zero_point = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        zero = zero_point.astype(np.float64) if zero_point is not None else 0.0
        array = ((stored.astype(np.float64) - zero) * scale).astype(np.float32)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return round(float(array.reshape(())), 6)


def _remove_dead(graph: ir.Graph, replaced: set[ir.Node]) -> None:
    """The replaced chains, and the Q/DQ pairs that sat inside them, once nothing reads them."""
    removed = True
    while removed:
        removed = False
        for node in reversed(list(graph)):
            if (node in replaced or node.op_type in _QDQ) and not any(out.uses() or out.is_graph_output() for out in node.outputs):
                graph.remove(node, safe=True)
                removed = True
