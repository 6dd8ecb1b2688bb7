"""Graph surgery on onnx_ir graphs: constants, fresh names, new initializers, bypassing nodes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["constant_array", "NameScope", "add_initializer", "rename", "can_bypass", "bypass_node"]


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is a true constant: an initializer that is not also a graph input.

    Initializers listed as graph inputs (IR < 4 style) can be overridden at run time, so they are
    not constants.
    """
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    return value.const_value.numpy()


class NameScope:
    """Hands out value names unique in a graph and in every If/Loop/Scan body inside it (ONNX forbids
    a subgraph name that shadows an outer one)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken = _names_in(graph)
        for node in ir.traversal.RecursiveGraphIterator(graph, enter_graph=lambda subgraph: self._taken.update(_names_in(subgraph))):
            self._taken.update(value.name for value in (*node.inputs, *node.outputs) if value is not None and value.name)

    def fresh(self, base: str) -> str:
        name, counter = base, 0
        while name in self._taken:
            counter += 1
            name = f"{base}_{counter}"
        self._taken.add(name)
        return name


def _names_in(graph: ir.Graph | ir.Function) -> set[str]:
    """The names of a graph's inputs and initializers."""
    initializers = graph.initializers.values() if isinstance(graph, ir.Graph) else ()
    return {value.name for value in (*graph.inputs, *initializers) if value.name}


def add_initializer(graph: ir.Graph, names: NameScope, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base`` and return its value."""
    name = names.fresh(base)
    array = np.asarray(array)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def rename(value: ir.Value, name: str) -> None:
    """Rename a value, keeping an initializer's tensor name in step."""
    value.name = name
    if value.const_value is not None and value.is_initializer():
        value.const_value.name = name


def can_bypass(node: ir.Node, source: ir.Value) -> bool:
    """Whether ``node``'s only output can be replaced by ``source`` without changing the interface.

    Same rules as onnx_ir's IdentityEliminationPass: a graph output that would become a graph input
    or initializer (or another graph output) must keep its node. A graph output must also be made
    by a node of its own graph: an If/Loop body may not return an outer-scope value directly.
    """
    output = node.outputs[0]
    if output.is_graph_output():
        producer = source.producer()
        return producer is not None and producer.graph is node.graph and not source.is_graph_output()
    return True


def bypass_node(node: ir.Node, source: ir.Value) -> bool:
    """Remove a pass-through ``node``, wiring its first output's consumers to ``source``."""
    if not can_bypass(node, source):
        return False
    graph = node.graph
    assert graph is not None, "node must belong to a graph"
    output = node.outputs[0]
    if source.shape is None:
        source.shape = output.shape
    if source.type is None:
        source.type = output.type
    was_graph_output = output.is_graph_output()
    name = output.name
    ir.convenience.replace_all_uses_with(output, source, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_graph_output:
        source.name = name
    return True
