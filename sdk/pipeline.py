"""The build pipeline: load → validate → simplify → [prune] → [recover] → [quantize] → [finetune] → lower → verify → package.

`build` parses what the user gave once (precision, target, CPU class) and runs the `BUILD` command,
a list of stages (`edgeopt.stages`) over one `BuildContext`; each stage is timed and reported into
the manifest. `edgeopt prune` (`edgeopt.pruning`) runs the prune step alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
import enum
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edgeopt.context import BuildContext, BuildOptions, Command, Progress, run_command
from edgeopt.errors import EdgeoptError
from edgeopt.runtime.errors import OptionError
from edgeopt.package import PACKAGE, write_build_manifest
from edgeopt.report import all_float, precision_label
from edgeopt.runtime.isa import isa_mismatch
from edgeopt.runtime.kinds import Effort, FinetuneMode, Precision, Technique
from edgeopt.runtime.manifest import Manifest, QualityMetric
from edgeopt.stages import CHECK_OPS, EVALUATE, FINETUNE, LOAD, LOWER, QUANTIZE, SIMPLIFY, VALIDATE, VERIFY
from edgeopt.targets import Target, get_target
from edgeopt.stages import PRUNE, RECOVER
from edgeopt.runtime.kinds import PruneCriterion

if TYPE_CHECKING:
    from edgeopt.converters.finetune.train import FinetuneOptions
    from edgeopt.converters.prune import PruneOptions

E = TypeVar("E", bound=enum.Enum)

__all__ = ["BUILD", "BuildResult", "Progress", "build"]

#: `edgeopt build`: every stage a bundle needs, checks first (nothing is written if they fail).
BUILD = Command(
    checks=(LOAD, VALIDATE),
    steps=(SIMPLIFY, PRUNE, RECOVER, CHECK_OPS, QUANTIZE, FINETUNE, LOWER, VERIFY, EVALUATE, PACKAGE),
    finish=write_build_manifest,
)


def build(
    model: str | Path,
    target: str | Target,
    *,
    output: str | Path | None = None,
    precision: str | Precision | None = None,
    calibration: str | Path | Iterable[Mapping[str, np.ndarray]] | None = None,
    calibration_method: str | None = None,
    effort: str | Effort = Effort.DEFAULT,
    techniques: Mapping[str | Technique, bool] | None = None,
    evaluation: str | Path | None = None,
    max_accuracy_drop: float | None = None,
    io_layout: str | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    reference_samples: int = 4,
    prune: float | None = None,
    prune_criterion: str | PruneCriterion = PruneCriterion.AUTO,
    prune_global: bool = False,
    prune_protected: Iterable[str] = (),
    isa: str | None = None,
    force: bool = False,
    archive: bool = False,
    finetune: str | FinetuneMode | FinetuneOptions | None = None,
    recover: bool | FinetuneOptions = False,
    train_data: Any = None,
    epochs: int | None = None,
    lr: float | None = None,
    finetune_checkpoints: str | Path | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build a verified bundle of `model` for `target`; see the README for the options' meaning.

    `isa`: the CPU class an int8 bundle is for (`Target.isa_classes`; the profile's default when None).
    `prune`: share of each dependency group's channels removed after simplify (0 or None: no pruning),
    ranked by `prune_criterion` ("l1", "l2", "bn-scale", "taylor": on `calibration`; "auto": taylor when `calibration` is
    given and torch is installed, else l2), per group or over all (`prune_global`); kept
    widths are rounded up to the target's channel multiple; `prune_protected` names layers kept whole.
    `effort`: "fast", "default" or "max": which PTQ techniques int8 may try, each kept only if it helps
    on held-out calibration samples. `techniques`: {name: True/False} forces one on or off unmeasured.
    `finetune`: "qad" (distillation from the fp32 model, no labels needed) or "qat" (task loss, labels
    needed), or a `FinetuneOptions`, trains the int8 QDQ graph on `train_data` (a path, a
    `torch.utils.data.DataLoader` or an iterable of input dicts) for at most `epochs` at Adam's `lr`;
    `finetune_checkpoints`: a folder for per-epoch checkpoints that a later build resumes from.
    `recover` (with `prune` and `train_data`): distil the pruned fp32 graph from the unpruned one
    before quantizing, QAD with labels when the data has them; True takes `FinetuneOptions()`'s
    defaults at `RECOVER_LR` (at most 8 epochs at lr 1e-3), a `FinetuneOptions` sets them.
    """
    model_path = Path(model)
    profile = target if isinstance(target, Target) else get_target(target)
    output_path = Path(output) if output is not None else Path("dist") / f"{model_path.stem}-{profile.name}"
    options = BuildOptions(
        model_path=model_path,
        target=profile,
        output=output_path,
        precision=None if precision is None else _parse_precision(precision, profile),
        isa=profile.resolve_isa(isa),
        calibration=calibration,
        calibration_method=calibration_method,
        effort=_parse_named(Effort, effort, "effort"),
        techniques={_parse_named(Technique, name, "technique"): bool(on) for name, on in (techniques or {}).items()},
        evaluation=evaluation,
        max_accuracy_drop=max_accuracy_drop,
        io_layout=io_layout,
        input_shapes=input_shapes,
        reference_samples=reference_samples,
        prune=_prune_options(prune, prune_criterion, prune_global, prune_protected, profile, has_data=calibration is not None),
        force=force,
        archive=archive,
        finetune=_finetune_options(finetune, epochs, lr, finetune_checkpoints),
        recover=_recover_options(recover),
        train_data=train_data,
    )
    context = run_command(BUILD, BuildContext(options, progress))
    assert context.manifest is not None and context.lowered is not None
    packed = output_path.with_name(output_path.name + ".tar.gz") if archive else None
    return BuildResult(output_path, context.manifest, packed, _warnings(context))


def _parse_precision(text: str | Precision, target: Target) -> Precision:
    """The one place a precision name becomes a `Precision`; an unknown name is the target's error."""
    try:
        return Precision(text)
    except ValueError:
        raise EdgeoptError(
            f"precision '{text}' is not available for {target.name}",
            hint=f"choose one of: {', '.join(p.value for p in target.precisions)}",
        ) from None


def _finetune_options(
    finetune: str | FinetuneMode | FinetuneOptions | None, epochs: int | None, lr: float | None, checkpoints: str | Path | None
) -> FinetuneOptions | None:
    """The fine-tuning options from the API's arguments; epochs, lr and checkpoints only with a mode."""
    if finetune is None:
        given = [name for name, value in (("epochs", epochs), ("lr", lr), ("finetune_checkpoints", checkpoints)) if value is not None]
        if given:
            raise OptionError(f"{', '.join(given)} apply only to fine-tuning", hint="add --finetune qad (finetune='qad' in Python), or qat with labels")
        return None
    from edgeopt.converters.finetune.train import FinetuneOptions  # torch is needed only from here on

    options = finetune if isinstance(finetune, FinetuneOptions) else FinetuneOptions(mode=_parse_named(FinetuneMode, finetune, "finetune mode"))
    changes: dict[str, Any] = {"epochs": epochs, "lr": lr, "checkpoint_dir": None if checkpoints is None else Path(checkpoints)}
    return replace(options, **{k: v for k, v in changes.items() if v is not None})


#: Adam's rate for --recover. Every weight of the pruned fp32 student trains at `lr` itself (fine-tuning's
#: relative rates are for quantized latents), and the rate warms up over epoch 1 (at most 64 optimizer steps:
#: `finetune.train.rate_schedule`) and decays to 0 at the last step: at 1e-4
#: the digits CNN pruned at 0.4 (raspberry-pi int8, 300 labelled samples, 150 unseen) went 11.5 -> 13.1 dB
#: min SQNR against the unpruned model (15.0 with a flat 1e-4), at 1e-3 11.5 -> 17.5 dB.
RECOVER_LR = 1e-3


def _recover_options(recover: bool | FinetuneOptions) -> FinetuneOptions | None:
    """The distillation options of --recover; None when not asked."""
    if isinstance(recover, bool):
        if not recover:
            return None
        from edgeopt.converters.finetune.train import FinetuneOptions  # torch is needed only from here on

        return FinetuneOptions(mode=FinetuneMode.QAD, lr=RECOVER_LR)
    return recover


def _prune_options(
    ratio: float | None, criterion: str | PruneCriterion, global_ranking: bool, protected: Iterable[str], target: Target, *, has_data: bool
) -> PruneOptions | None:
    """The pruning options, with the target's channel multiple and `auto` resolved; None when no channel is to go."""
    from edgeopt.converters.prune import PruneOptions, resolve_criterion

    if not ratio:
        return None
    if not 0 < ratio < 1:
        raise OptionError(f"--prune must be a share of channels between 0 and 1, got {ratio}", hint="e.g. --prune 0.3 removes 30% of each group's channels")
    return PruneOptions(
        ratio=ratio,
        criterion=resolve_criterion(_parse_named(PruneCriterion, criterion, "pruning criterion"), has_data=has_data),
        channel_multiple=target.channel_multiple,
        global_ranking=global_ranking,
        protected=tuple(protected),
    )


def _parse_named(kind: type[E], value: str | E, what: str) -> E:
    """A closed set's member from its name (the API edge); an unknown name is an OptionError."""
    try:
        return kind(value)
    except ValueError:
        raise OptionError(f"unknown {what} '{value}'", hint=f"choose one of: {', '.join(m.value for m in kind)}") from None


@dataclass
class BuildResult:
    """Where the bundle went and what it holds."""

    bundle: Path
    contents: Manifest  # the bundle's manifest, typed
    archive: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as written (JSON)."""
        return self.contents.to_json()

    def summary_text(self) -> str:
        m = self.contents
        assert m.target is not None and m.compression is not None and m.reference is not None and m.reference.measured is not None
        comp, ref = m.compression, m.reference.measured
        model_bytes = sum(a.bytes or 0 for a in m.artifacts if a.role in ("model", "weights"))
        lines = [
            f"built {m.name} for {m.target.name} ({m.target.artifact_format}, {precision_label(self.contents)})",
            f"  bundle   {self.bundle}" + (f"  (+ {self.archive.name})" if self.archive else ""),
            f"  model    {_human(comp.bytes_before)} -> {_human(model_bytes)}  ({comp.bytes_before / max(model_bytes, 1):.2f}x)",
            f"  nodes    {comp.nodes_before} -> {comp.nodes_after} after simplify;"
            f" {comp.parameters_after:,} parameters, {comp.macs_after / 1e6:.1f} M MACs",
            f"  parity   max |Δ| {ref.max_abs:.3g} vs the {ref.against} graph on {m.reference.samples} input(s)"
            f" ({ref.verified_with})" + ("" if ref.checked else f"; not checked: {ref.note}"),
        ]
        if m.target.isa is not None:
            lines.append(f"  cpu      built for {m.target.isa.value} CPUs ({m.target.isa.description}); --isa picks another class")
        techniques = (m.quantization or {}).get("techniques")
        if techniques:
            lines += _technique_lines(techniques)
        if m.quality is not None:
            lines.append(f"  quality  vs fp32 on {m.quality.samples} samples of {m.quality.data}")
            lines += [f"           {metric.name} {metric.output}: {_figures(metric)}" for metric in m.quality.metrics]
            budget = m.quality.budget
            if budget is not None:
                lines.append(
                    f"  budget   {budget.metric.removesuffix(' (points)').removesuffix(' (%)')} {budget.drop:.2f} points"
                    f" (--max-accuracy-drop {budget.max_drop:g} points)"
                )
        if "transpose_ops" in m.lowering:
            lines.append(f"  layout   {m.lowering['transpose_ops']} TRANSPOSE op(s) in the artifact")
        lines += [f"  file     {a.path:<32} {_human(a.bytes or 0):>10}  {a.role}" for a in m.artifacts]
        lines += [f"  warning  {w}" for w in self.warnings]
        return "\n".join(lines)


def _technique_lines(techniques: Mapping[str, Any]) -> list[str]:
    """What the int8 technique search kept, and each trial's held-out figure."""
    lines = [f"  int8     effort {techniques['effort']}: {', '.join(techniques['chosen']) or 'min-max ranges only'}"]
    search = techniques.get("search")
    if search:
        lines += [f"           tried {t['technique']}: {t['why']}" + (" (kept)" if t["kept"] else "") for t in search["trials"]]
        lines += [f"           not tried {t['technique']}: {t['why']}" for t in search["not_tried"]]
    mixed = techniques.get("reports", {}).get("mixed_precision")
    if mixed:
        layers = mixed["layers"]
        lines.append(
            f"           mixed precision: {len(layers)} layer(s) float ({100 * mixed['mac_share']:.1f}% of MACs), {mixed['metric']} on {mixed['samples']} calibration samples"
            f" {mixed['drop_int8']:.2f} -> {mixed['drop']:.2f} (goal {mixed['goal_drop']:g}{'' if mixed['met'] else ', not met'})"
        )
        lines += [
            f"           float layers cost {c['backend']}: int8 {c['int8_ms']:.2f} -> mixed {c['mixed_ms']:.2f} ms median ({c['mixed_over_int8']:.2f}x)"
            for c in mixed.get("costs", [])
        ]
    return lines


def _figures(metric: QualityMetric) -> str:
    """A metric's fp32 and optimized values and its delta; shares in percent, their deltas in points."""
    if metric.fp32 is None or metric.optimized is None or metric.delta is None:
        return f"fp32 {metric.fp32} -> {metric.optimized} (not finite)"
    if metric.name in _POINT_METRICS:
        return f"fp32 {100 * metric.fp32:.2f}% -> {100 * metric.optimized:.2f}% (Δ {100 * metric.delta:+.2f} points)"
    return f"fp32 {metric.fp32:.4g} -> {metric.optimized:.4g} (Δ {metric.delta:+.4g})"


#: Quality metrics that are shares (0..1): the summary shows them in percent and their deltas in
#: points, the unit of --max-accuracy-drop.
_POINT_METRICS = frozenset({"accuracy", "top1_agreement"})


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _warnings(context: BuildContext) -> list[str]:
    lowered, quant_report = context.lowered, context.quantization
    manifest = context.manifest
    assert lowered is not None and manifest is not None and manifest.target is not None
    notes = [str(w) for w in lowered.summary.get("warnings", [])]
    mismatch = isa_mismatch(manifest.target.isa, lowered.verify_backend)
    if mismatch:
        notes.append(f"verified on a CPU that cannot run this bundle exactly: {mismatch}")
    if quant_report:
        from edgeopt.converters.quantize import describe_adaptations

        notes += [f"adapted: {line}" for line in describe_adaptations(quant_report.get("adaptations", []))]
        if all_float(manifest):
            budget = quant_report["budget"]
            notes.append(
                f"--max-accuracy-drop {budget['max_drop']:g} held only with all {len(quant_report['float_fallback'])} quantizable"
                " layers in float: this bundle computes in float, with no int8 speed-up; allow a larger drop, or build --precision fp32/fp16"
            )
    return notes
