"""ONNX→ONNX graph passes, and ``simplify``: the pipeline's simplify stage.

Each pass is a ``GraphPass`` (``base.py``: an ``onnx_ir.passes.InPlacePass`` whose ``ensures``
checks that the graph's input and output names are kept) in its own module, with keyword options
and a ``PassResult`` that says whether it changed the model. Graphs with If/Loop/Scan bodies are
rewritten safely (see ``base.py``). ``simplify`` composes the passes with ones from
``onnx_ir.passes.common`` (shape inference, Constant lifting, dead-node and unused initializer
removal) and reports what each step removed; ``apply_passes`` runs passes on a protobuf model.
"""

from __future__ import annotations

__all__ = [
    "FoldAffineIntoBatchNormPass",
    "FoldBatchNormPass",
    "FixInputShapesPass",
    "FoldConstantsPass",
    "PassSummary",
    "RemoveIdentityPass",
    "SimplifyReport",
    "SumToAddPass",
    "apply_passes",
    "simplify",
]

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from edgeopt.converters.passes.fix_input_shapes import FixInputShapesPass
from edgeopt.converters.passes.fold_affine_into_batchnorm import FoldAffineIntoBatchNormPass
from edgeopt.converters.passes.fold_batchnorm import FoldBatchNormPass
from edgeopt.converters.passes.fold_constants import FoldConstantsPass
from edgeopt.converters.passes.remove_identity import RemoveIdentityPass
from edgeopt.converters.passes.sum_to_add import SumToAddPass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassSummary:
    """What one step of ``simplify`` did."""

    name: str
    modified: bool
    nodes_removed: int


@dataclass
class SimplifyReport:
    """Node counts before and after ``simplify``, and per step."""

    nodes_before: int
    nodes_after: int
    per_pass: list[PassSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "per_pass": [asdict(summary) for summary in self.per_pass],
        }


def _simplify_passes(input_shapes: Mapping[str, tuple[int, ...]] | None) -> list[tuple[str, ir.passes.PassBase]]:
    fix = [("fix_input_shapes", FixInputShapesPass(input_shapes))] if input_shapes else []
    return [
        *fix,
        ("infer_shapes", ir_common.ShapeInferencePass(strict_mode=False)),
        ("lift_constants", ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)),
        ("fold_constants", FoldConstantsPass()),
        ("remove_identity", RemoveIdentityPass()),
        ("sum_to_add", SumToAddPass()),
        ("fold_affine_into_batchnorm", FoldAffineIntoBatchNormPass()),
        ("fold_batchnorm", FoldBatchNormPass()),
        ("remove_unused", ir_common.RemoveUnusedNodesPass()),
        ("infer_shapes", ir_common.ShapeInferencePass(strict_mode=False)),
    ]


def simplify(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[onnx.ModelProto, SimplifyReport]:
    """Constant folding, BatchNorm folding and removal of pass-through and dead nodes.

    `input_shapes` fixes dynamic inputs first, so shape arithmetic on them folds too.

    Returns a new model (the argument is not changed) with the same graph input and output names,
    and a report of node counts. Shape inference runs first, so ``Shape`` of static tensors folds,
    and last, so the result carries value_info for later stages.
    """
    ir_model = _ir_copy(model)
    nodes_before = _count_nodes(ir_model)
    report = SimplifyReport(nodes_before=nodes_before, nodes_after=nodes_before)
    for name, step in _simplify_passes(input_shapes):
        count_before = _count_nodes(ir_model)
        result = step(ir_model)
        ir_model = result.model
        removed = count_before - _count_nodes(ir_model)
        report.per_pass.append(PassSummary(name=name, modified=result.modified, nodes_removed=removed))
        logger.debug("simplify step %s: modified=%s, %d node(s) removed", name, result.modified, removed)
    report.nodes_after = _count_nodes(ir_model)
    logger.info("simplify: %d -> %d nodes", report.nodes_before, report.nodes_after)
    return ir.to_proto(ir_model), report


def apply_passes(model: onnx.ModelProto, *passes: ir.passes.PassBase) -> onnx.ModelProto:
    """The model after ``passes``, run in order, as a new proto (the argument is not changed)."""
    ir_model = _ir_copy(model)
    for step in passes:
        ir_model = step(ir_model).model
    return ir.to_proto(ir_model)


def _ir_copy(model: onnx.ModelProto) -> ir.Model:
    # onnx_ir wraps the proto's tensors without copying, and some passes rename them in place.
    working_copy = onnx.ModelProto()
    working_copy.CopyFrom(model)
    return ir.from_proto(working_copy)


def _count_nodes(model: ir.Model) -> int:
    return len(model.graph)
