"""What a target cannot run: every node, all at once, with the reason, before any work is done."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import onnx
import onnx_ir as ir

from edgeopt.converters.analysis.stats import STANDARD_DOMAINS, node_label, op_key, shape_inferred
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, unreachable
from edgeopt.runtime.op_registry import OpRegistry
from edgeopt.targets import Target

__all__ = ["unsupported_nodes"]

_NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})

#: why a node cannot be built for the target (None: it can)
OpCheck = Callable[[ir.Node], "str | None"]


def unsupported_nodes(model: onnx.ModelProto, target: Target) -> list[tuple[str, str, str]]:
    """Every node `target` cannot run, as (node name, op, why), all at once and in graph order.

    Nodes computed from constants alone are left out: simplification folds them away. What the
    target runs comes from one place per format (see `_op_check`); for TFLite and Core ML that is
    the lowering's op registry, so this report and the lowering never disagree.
    """
    float64 = not _has_float64_kernels(target.backend)
    graph = (shape_inferred(model) if float64 or _lowering_decides(target.artifact_format) else ir.from_proto(model)).graph
    op_check = _op_check(target)
    folded = _foldable_nodes(graph)
    problems: list[tuple[str, str, str]] = []
    for index, node in enumerate(graph.all_nodes()):
        if node in folded:
            continue
        reasons = _why_unsupported(node, target, op_check, float64)
        if reasons:
            problems.append((node_label(node, index), op_key(node), "; ".join(reasons)))
    return problems


def _foldable_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Nodes computed from constants alone: constant folding removes them before lowering, so the
    target never has to run them (e.g. the ConstantOfShape weight generators of the `light` models)."""
    constant: set[ir.Value] = set(graph.initializers.values())
    foldable: set[ir.Node] = set()
    for node in graph:  # ONNX graphs are topologically sorted
        if (
            node.domain in STANDARD_DOMAINS
            and node.op_type not in _NONDETERMINISTIC_OPS
            and not any(isinstance(a, ir.Attr) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
            and all(value in constant for value in node.inputs if value is not None)
        ):
            foldable.add(node)
            constant.update(node.outputs)
    return foldable


def _has_float64_kernels(backend: BackendName) -> bool:
    """TensorRT's DataType has no double; TFLite's builtin kernels and XNNPACK are float32/float16/int8."""
    match backend:
        case BackendName.TENSORRT | BackendName.TFLITE:
            return False
        case BackendName.ONNXRUNTIME | BackendName.OPENVINO | BackendName.COREML | BackendName.COREML_REFERENCE:
            return True
        case _:
            unreachable(backend)


def _lowering_decides(artifact_format: ArtifactFormat) -> bool:
    """Whether edgeopt's own lowering (rather than the device's ONNX reader) says which ops build;
    its support checks read shapes and types, so the model is shape-inferred first."""
    return artifact_format in (ArtifactFormat.TFLITE, ArtifactFormat.MLPACKAGE)


def _op_check(target: Target) -> OpCheck:
    """The one source of what `target` runs, by the format edgeopt writes for it: the lowering's
    op registry where edgeopt writes the format, the profile's list where the device's own ONNX
    reader (TensorRT's parser) decides, every standard op where ONNX Runtime or OpenVINO read it."""
    match target.artifact_format:
        case ArtifactFormat.TFLITE:
            from edgeopt.converters.lower.tflite_ops import REGISTRY as tflite_registry

            return _registry_check(tflite_registry, target)
        case ArtifactFormat.MLPACKAGE:
            from edgeopt.converters.lower.coreml_ops import REGISTRY as coreml_registry

            return _registry_check(coreml_registry, target)
        case ArtifactFormat.TENSORRT_ONNX:
            return _tensorrt_check(target)
        case ArtifactFormat.ONNX | ArtifactFormat.OPENVINO_IR:
            return lambda node: None  # ONNX Runtime and OpenVINO read every standard ONNX op themselves
        case _:
            unreachable(target.artifact_format)


def _registry_check(registry: OpRegistry[Any], target: Target) -> OpCheck:
    def check(node: ir.Node) -> str | None:
        if node.op_type not in registry:
            # edgeopt's limit, not the device's: its lowering has no handler for the op yet
            return f"edgeopt's {target.artifact_format} lowering for {target.name} does not write {node.op_type} yet"
        return registry.why_unsupported(node.op_type, node)

    return check


def _tensorrt_check(target: Target) -> OpCheck:
    def check(node: ir.Node) -> str | None:
        if target.supports(node.op_type):
            return None
        return f"TensorRT's ONNX parser has no importer for {node.op_type} (onnx-tensorrt's operators.md, listed in targets/{target.name}.toml)"

    return check


def _why_unsupported(node: ir.Node, target: Target, op_check: OpCheck, float64: bool) -> list[str]:
    if node.domain not in STANDARD_DOMAINS:
        if target.artifact_format is ArtifactFormat.ONNX and (node.domain, node.op_type) in _onnxruntime_ops():
            return []
        plugin = " (TensorRT would need a plugin for it)" if target.artifact_format is ArtifactFormat.TENSORRT_ONNX else ""
        return [f"op of the non-standard domain '{node.domain}', which {target.name} does not run{plugin}"]
    if not onnx.defs.has(node.op_type):
        return [f"'{node.op_type}' is not an ONNX operator"]
    reasons = [why] if (why := op_check(node)) else []
    if float64 and any(output.dtype == ir.DataType.DOUBLE for output in node.outputs):
        reasons.append(f"computes in float64, which {target.backend} has no kernels for; cast to float32 at export")
    return reasons


@functools.cache
def _onnxruntime_ops() -> frozenset[tuple[str, str]]:
    """(domain, op) of every kernel schema ONNX Runtime registers, contrib ops included."""
    from onnxruntime.capi import onnxruntime_pybind11_state

    return frozenset((s.domain, s.name) for s in onnxruntime_pybind11_state.get_all_operator_schema())
