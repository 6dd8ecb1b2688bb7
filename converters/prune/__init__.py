"""Structured channel pruning on the ONNX graph (the build's `prune` stage and `edgeopt prune`).

- `groups`: dependency groups — which channels of which layers must go together, found by
  tracing channels through the graph; what cannot be proven safe is kept and reported
- `importance`: L1/L2 filter norms, BatchNorm scale (read before simplify folds it), and
  `taylor`: first-order Taylor on calibration data, label-free (torch, from the `train` extra)
- `surgery`: `PruneChannelsPass`, which removes the chosen channels for real

`prune` runs the pass on a protobuf model, after refusing a quantized one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from edgeopt.converters.graph.session import has_qdq
from edgeopt.converters.prune.importance import batchnorm_scales, resolve_criterion
from edgeopt.converters.prune.surgery import GroupReport, PruneChannelsPass, PruneOptions, PruneReport
from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.kinds import PruneCriterion

__all__ = ["GroupReport", "PruneChannelsPass", "PruneOptions", "PruneReport", "PruneResult", "batchnorm_scales", "prune", "resolve_criterion"]


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto  # the argument itself when nothing was removed
    report: PruneReport
    changed: bool


def prune(model: onnx.ModelProto, options: PruneOptions, progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """The model with `options.ratio` of each dependency group's channels removed (see `surgery`).

    The model should be simplified (constants folded, shapes inferred with static input shapes):
    a Reshape or Flatten over a tensor of unknown shape keeps its channels.
    """
    if not 0 <= options.ratio < 1:
        raise OptionError(f"the pruning ratio must be at least 0 and below 1, got {options.ratio}", hint="e.g. --prune 0.3 removes 30% of each group's channels")
    if options.channel_multiple < 1:
        raise OptionError(f"the channel multiple must be at least 1, got {options.channel_multiple}", hint="e.g. --channel-multiple 8")
    if options.criterion is PruneCriterion.TAYLOR and not options.samples:
        raise OptionError("the taylor criterion ranks channels on calibration data, and none was given", hint="pass --calibration data.npz, or use --prune-criterion l2")
    if has_qdq(model):
        raise OptionError(
            "the model carries QuantizeLinear/DequantizeLinear: pruning a quantized graph would invalidate its scales",
            hint="prune the float model before quantizing it (edgeopt build --prune quantizes after pruning)",
        )
    working = onnx.ModelProto()
    working.CopyFrom(model)
    step = PruneChannelsPass(options, progress)
    result = step(ir.from_proto(working))
    assert step.report is not None
    return PruneResult(ir.to_proto(result.model) if result.modified else model, step.report, result.modified)
