"""The build context and the stage runner every pipeline command shares.

A command is a list of stages (`Command`). Each stage is a small function that reads the
`BuildContext`, extends it with what it made, and returns its report (a JSON object; `changed`
says whether it changed the model). The runner times each stage, tells the progress callback,
and keeps the reports for the manifest. `build` is one such list; `prune` and `finetune` will be
others over the same stages, with their own stage slotted in after simplify or after quantize.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeopt.bundle import atomic_output, finite_or_null
from edgeopt.runtime.isa import IsaClass
from edgeopt.runtime.kinds import Effort, Precision, Technique
from edgeopt.runtime.manifest import JsonObject, Manifest, Parity, Quality, StageReport, Tolerance
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from edgeopt.converters.analysis import ModelStats
    from edgeopt.converters.data import Dataset
    from edgeopt.converters.finetune.data import TrainingData
    from edgeopt.converters.prune import PruneOptions
    from edgeopt.converters.finetune.train import FinetuneOptions
    from edgeopt.converters.lower import LoweringResult

__all__ = ["BuildContext", "BuildOptions", "Command", "Progress", "Stage", "run_command"]

#: stage name, done, total (total 0: no sub-steps)
Progress = Callable[[str, int, int], None]
Samples = list[dict[str, "np.ndarray"]]


@dataclass(frozen=True)
class BuildOptions:
    """What the user asked for, parsed once at the API edge."""

    model_path: Path
    target: Target
    output: Path
    precision: Precision | None  # None: the target's default (int8 for a QAT model)
    isa: IsaClass | None
    calibration: str | Path | Iterable[Mapping[str, np.ndarray]] | None = None
    calibration_method: str | None = None  # None: min-max, or the per-tensor range search when the effort finds it helps
    effort: Effort = Effort.DEFAULT
    techniques: Mapping[Technique, bool] = field(default_factory=dict)
    evaluation: str | Path | None = None
    max_accuracy_drop: float | None = None
    io_layout: str | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    reference_samples: int = 4
    force: bool = False
    archive: bool = False
    prune: PruneOptions | None = None  # structured pruning after simplify (None: not asked)
    finetune: FinetuneOptions | None = None  # int8 only: QAT/QAD of the QDQ graph after quantize
    recover: FinetuneOptions | None = None  # with prune: distil the pruned fp32 graph from the unpruned one, before quantize
    train_data: Any = None  # for finetune and recover: a path, a torch DataLoader or an iterable of input dicts


@dataclass
class BuildContext:
    """Everything a build has made so far; each stage reads it and fills in its own fields."""

    options: BuildOptions
    progress: Progress | None = None
    reports: list[StageReport] = field(default_factory=list)
    staging: Path | None = None  # the bundle's temporary folder, from the first writing stage on
    # load
    source: onnx.ModelProto | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    qat_model: bool = False
    # validate
    precision: Precision = Precision.FP32  # until validate resolves the asked or default precision
    evaluation_set: Dataset | None = None
    calibration_set: Dataset | None = None
    range_set: Dataset | None = None  # calibration data used for range estimation
    training_data: TrainingData | None = None  # for finetune and recover, read in full
    quality_set: Dataset | None = None  # data quality is measured on (None: not measured)
    quality_data: str = ""
    static_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stats_before: ModelStats | None = None
    # simplify, [quantize]: the graph that is lowered
    model: onnx.ModelProto | None = None
    float_model: onnx.ModelProto | None = None  # the fp32 graph quantize received (finetune's teacher)
    unpruned_model: onnx.ModelProto | None = None  # the simplified graph prune received (recover's teacher)
    nodes_after_simplify: int = 0
    quantization: JsonObject | None = None
    pruning: JsonObject | None = None  # the pruning report
    finetune: JsonObject | None = None  # the fine-tuning report
    # lower
    lowered: LoweringResult | None = None
    # verify
    reference_inputs: Samples = field(default_factory=list)
    reference_outputs: Samples = field(default_factory=list)
    parity: Parity | None = None
    tolerance: Tolerance | None = None
    # evaluate
    quality: Quality | None = None
    # package
    manifest: Manifest | None = None

    def sub_progress(self, name: str) -> Callable[[int, int], None] | None:
        """A (done, total) callback for a stage's sub-steps (calibration batches)."""
        progress = self.progress
        return None if progress is None else (lambda done, total: progress(name, done, total))

    @property
    def lowered_model(self) -> onnx.ModelProto:
        """The graph the artifact was lowered from (QDQ for int8)."""
        assert self.model is not None, "simplify runs before anything reads the lowered graph"
        return self.model


@dataclass(frozen=True)
class Stage:
    """A named step; `applies` says whether this build needs it (quantize only for int8, ...)."""

    name: str
    run: Callable[[BuildContext], JsonObject]
    applies: Callable[[BuildContext], bool] = lambda context: True


@dataclass(frozen=True)
class Command:
    """A pipeline command: `checks` run before the output is touched (a failure leaves it as it
    was), `steps` write into the staging folder that replaces the output when they all succeed."""

    checks: tuple[Stage, ...]
    steps: tuple[Stage, ...]
    finish: Callable[[BuildContext], None]  # after the last step, inside the staging folder


def run_command(command: Command, context: BuildContext) -> BuildContext:
    """Run the command's stages in order over `context`; the output is replaced only if all succeed."""
    for stage in command.checks:
        _run_stage(stage, context)
    options = context.options
    with atomic_output(options.output, options.force, archive=options.archive) as staging:
        context.staging = staging
        for stage in command.steps:
            _run_stage(stage, context)
        command.finish(context)
    return context


def _run_stage(stage: Stage, context: BuildContext) -> None:
    if not stage.applies(context):
        return
    if context.progress is not None:
        context.progress(stage.name, 0, 0)
    start = time.perf_counter()
    details = dict(finite_or_null(stage.run(context)))
    changed = bool(details.pop("changed", True))
    context.reports.append(StageReport(stage.name, round(time.perf_counter() - start, 4), changed, details))
