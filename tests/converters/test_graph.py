"""The graph layer every pass and lowering shares: sessions, shape queries, names and bypassing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.graph.rewrite import NameScope, bypass_node, can_bypass
from edgeopt.converters.graph.session import has_qdq, ort_session, run_model
from edgeopt.converters.graph.shapes import tensor_types, with_outputs


def _relu_add(qdq: bool = False) -> onnx.ModelProto:
    """x -> Relu -> (Q -> DQ) -> Add(one) -> y, the intermediate named "r"."""
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    added = "r"
    if qdq:
        nodes += [
            helper.make_node("QuantizeLinear", ["r", "scale", "zero"], ["r_q"]),
            helper.make_node("DequantizeLinear", ["r_q", "scale", "zero"], ["r_dq"]),
        ]
        added = "r_dq"
    nodes.append(helper.make_node("Add", [added, "one"], ["y"]))
    initializers = [numpy_helper.from_array(np.ones(4, np.float32), "one")]
    if qdq:
        initializers += [numpy_helper.from_array(np.array(0.05, np.float32), "scale"), numpy_helper.from_array(np.array(0, np.int8), "zero")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializers
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_qdq_graph_runs_with_its_own_semantics_and_a_float_graph_optimized() -> None:
    assert has_qdq(_relu_add(qdq=True)) and not has_qdq(_relu_add())
    exact = ort_session(_relu_add(qdq=True)).get_session_options().graph_optimization_level
    assert exact == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    default = ort_session(_relu_add(qdq=True), graph_semantics=False).get_session_options().graph_optimization_level
    assert default == ort_session(_relu_add()).get_session_options().graph_optimization_level != exact


def test_offline_optimization_writes_the_optimized_model(tmp_path: Path) -> None:
    source, optimized = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_relu_add(), source)
    ort_session(source, optimized_model_path=optimized)
    assert [n.op_type for n in onnx.load(optimized).graph.node] == ["Relu", "Add"]


def test_run_model_returns_intermediate_tensors_typed_by_inference() -> None:
    model = _relu_add()
    assert tensor_types(model)["r"] == TensorProto.FLOAT
    assert [o.name for o in with_outputs(model, ["r", "y"]).graph.output] == ["y", "r"]
    x = np.array([[-1.0, 0.5, -2.0, 3.0]], np.float32)
    (outputs,) = run_model(model, [{"x": x}], ["r"])
    np.testing.assert_array_equal(outputs["r"], np.maximum(x, 0))
    np.testing.assert_array_equal(outputs["y"], np.maximum(x, 0) + 1)


def _if_reading(outer: str) -> tuple[ir.Model, ir.Node]:
    """An If whose then-branch is Identity(outer) -> "taken" (a branch output), else-branch Neg."""
    then_branch = helper.make_graph(
        [helper.make_node("Identity", [outer], ["taken"])], "then", [], [helper.make_tensor_value_info("taken", TensorProto.FLOAT, [1, 4])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", [outer], ["negated"])], "else", [], [helper.make_tensor_value_info("negated", TensorProto.FLOAT, [1, 4])]
    )
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], [outer]), helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    if_node = next(node for node in model.graph if node.op_type == "If")
    return model, if_node.attributes["then_branch"].as_graph()[0]


def test_fresh_names_avoid_the_names_inside_subgraphs() -> None:
    model, _ = _if_reading("r")
    names = NameScope(model.graph)
    assert names.fresh("taken") == "taken_1" and names.fresh("negated") == "negated_1" and names.fresh("r") == "r_1"


def test_a_branch_output_is_never_bypassed_to_an_outer_scope_value() -> None:
    model, identity = _if_reading("r")
    assert not can_bypass(identity, identity.inputs[0])
    assert not bypass_node(identity, identity.inputs[0])
    session = ort_session(ir.to_proto(model))
    x = np.array([[-1.0, 0.5, -2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x, "cond": np.array(True)})[0], np.maximum(x, 0))
