"""Losses of quantization-aware fine-tuning: distillation from the fp32 model (QAD) and the task loss (QAT).

The kind of each output decides how the student is matched to the teacher, once, from the
teacher's outputs on the first batch (`output_kinds`):

- LOGITS: float scores over the last axis of a (batch, classes) or (classes,) output (a classifier
  head, as `metrics.fidelity` counts top-1 on it) -> KL divergence at temperature T, scaled by T².
- PROBABILITIES: an output whose last axis already holds distributions (non-negative, summing to 1:
  a softmax head such as PP-OCR's classifier and recogniser, per position for sequences) -> the
  same KL on its log-probabilities (log p / T is the logit of the tempered distribution).
  Per-position distributions of a sequence, (batch, positions, classes), are distilled at T = 1 whatever
  the option says (`SEQUENCE_TEMPERATURE`): each position is decided by its top class, and tempering a
  vocabulary-wide distribution hands the target's mass to classes that decide nothing. PP-OCR rec's
  6625-way output: at T = 2 its fp32 top-5 classes hold 52% of the tempered mass (76% of its
  probabilities are below the 1e-8 floor), QAD's held-out KL never went below PTQ's in 4 epochs and the
  PTQ graph shipped; at T = 1 it fell 0.198 -> 0.097 and greedy-decoded characters went 91.1% -> 94.5%
  (bench/results/finetune_recovery.md). A (batch, classes) head keeps the option's T.
- DETECTIONS: a YOLOv8-style head output (batch, 4 + classes, anchors) with more anchors than rows:
  four box rows (pixels, some beyond 1), then per-class sigmoid scores in [0, 1] -> the binary KL
  of each class score averaged with weight max(teacher score, student score), + the boxes' squared error
  weighted by the teacher's top class score, over the same weighted teacher mean square. Normalized
  MSE on the whole tensor is the wrong objective there: box coordinates (up to the input size) carry
  all of its weight and the scores, which decide what is detected, none (yolov8n onnxruntime-cpu PTQ:
  its scores alone lose all of the box F1 drop, 0.804 on 512 crops; its boxes alone keep 1.000).
  Weighted by relevance because a detection is decided where a score is, or may become, large: on
  128 crops the 4.8 M scores below 0.05 in both models (99.97%) carried 41% of the plain KL and the
  box term 70% of the loss; QAD with the plain mean recovered 0.10 of the F1 drop, weighted 0.27.
- REGRESSION: everything else (embeddings, feature and detection maps, boxes) -> mean squared error
  divided by the teacher's mean square: the inverse of the SQNR the fidelity report shows, so
  outputs of any scale weigh alike.

The KL is the usual distillation direction (Hinton et al. 2015), Σ p_teacher · log(p_teacher / p_student),
what the issue writes KL(student ∥ teacher): the student is pulled to cover the teacher's distribution.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SEQUENCE_TEMPERATURE", "DistillationLoss", "OutputKind", "TaskLoss", "label_output", "output_kinds"]

#: Probabilities below this are clamped before their logarithm (a softmax output may hold exact zeros).
_MIN_PROBABILITY = 1e-8
#: The temperature of per-position distributions (batch, positions, classes); see the module docstring.
SEQUENCE_TEMPERATURE = 1.0
#: How far a probability row may sum from 1 and still count as a distribution (float32 softmax).
_SUM_TOLERANCE = 1e-3


class OutputKind(str, enum.Enum):
    LOGITS = "logits"
    PROBABILITIES = "probabilities"
    DETECTIONS = "detections"
    REGRESSION = "regression"


def output_kinds(teacher: Mapping[str, torch.Tensor]) -> dict[str, OutputKind]:
    """Each output's kind, from the teacher's values (see the module docstring)."""
    return {name: _kind(value) for name, value in teacher.items()}


def _kind(value: torch.Tensor) -> OutputKind:
    if not value.is_floating_point() or value.ndim == 0 or value.shape[-1] < 2:
        return OutputKind.REGRESSION
    sums = value.sum(dim=-1)
    if bool((value >= 0).all()) and bool(((sums - 1).abs() <= _SUM_TOLERANCE).all()):
        return OutputKind.PROBABILITIES
    if _detections(value):
        return OutputKind.DETECTIONS
    return OutputKind.LOGITS if value.ndim <= 2 else OutputKind.REGRESSION


#: rows of box coordinates before the class scores in a DETECTIONS output (xywh)
BOX_ROWS = 4


def _detections(value: torch.Tensor) -> bool:
    """Whether `value` reads as a YOLOv8 head output: (batch, 4 + classes, anchors), scores in [0, 1], boxes beyond."""
    if value.ndim != 3 or value.shape[1] <= BOX_ROWS or value.shape[2] <= value.shape[1]:
        return False
    scores = value[:, BOX_ROWS:]
    return bool(((scores >= 0) & (scores <= 1)).all()) and bool((value[:, :BOX_ROWS].abs() > 1).any())


def detection_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Binary KL of the class scores, averaged with each score's relevance max(teacher, student) as its weight, +
    the boxes' squared error weighted by the teacher's top score, over the weighted teacher mean square (see the
    module docstring)."""
    t = teacher[:, BOX_ROWS:].clamp(_MIN_PROBABILITY, 1 - _MIN_PROBABILITY)
    s = student[:, BOX_ROWS:].clamp(_MIN_PROBABILITY, 1 - _MIN_PROBABILITY)
    relevance = torch.maximum(t, s.detach())
    kl = t * (t.log() - s.log()) + (1 - t) * (torch.log1p(-t) - torch.log1p(-s))
    scores = (relevance * kl).sum() / relevance.sum()
    weight = teacher[:, BOX_ROWS:].amax(1, keepdim=True)
    boxes = (weight * (student[:, :BOX_ROWS] - teacher[:, :BOX_ROWS]).pow(2)).sum() / (weight * teacher[:, :BOX_ROWS].pow(2)).sum().clamp_min(1e-12)
    return scores + boxes


def label_output(kinds: Mapping[str, OutputKind], teacher: Mapping[str, torch.Tensor]) -> str | None:
    """The output labels are class indices of: the first (batch, classes) distribution output."""
    return next(
        (name for name, kind in kinds.items() if kind in (OutputKind.LOGITS, OutputKind.PROBABILITIES) and teacher[name].ndim == 2),
        None,
    )


def _log_probabilities(value: torch.Tensor, kind: OutputKind, temperature: float) -> torch.Tensor:
    logits = value if kind is OutputKind.LOGITS else value.clamp_min(_MIN_PROBABILITY).log()
    return F.log_softmax(logits.reshape(-1, value.shape[-1]) / temperature, dim=-1)


def _distillation_kl(student: torch.Tensor, teacher: torch.Tensor, kind: OutputKind, temperature: float) -> torch.Tensor:
    target = _log_probabilities(teacher, kind, temperature)
    return F.kl_div(_log_probabilities(student, kind, temperature), target, reduction="batchmean", log_target=True) * temperature**2


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE over the teacher's mean square (1 / linear SQNR)."""
    return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)


@dataclass(frozen=True)
class TaskLoss:
    """Cross-entropy of one classifier output against class-index labels (one per row)."""

    output: str
    kind: OutputKind

    def __call__(self, student: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(_log_probabilities(student[self.output], self.kind, 1.0), labels.reshape(-1))


@dataclass(frozen=True)
class DistillationLoss:
    """QAD: Σ over outputs of KL (distributions, × T²), the detection loss or normalized MSE, + feature_weight × Σ
    normalized MSE on the captured tensors, each × its `feature_scales` entry (the trainer sets 1 / (N · the PTQ
    graph's own error), so the features start at feature_weight in all), + alpha × the task loss when labels are given."""

    kinds: Mapping[str, OutputKind]
    temperature: float = 2.0
    feature_weight: float = 1.0
    feature_scales: Mapping[str, float] | None = None  # per captured tensor: × its term (None: 1 each)
    alpha: float = 0.5
    task: TaskLoss | None = None

    def __call__(
        self,
        student: Mapping[str, torch.Tensor],
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        features: tuple[str, ...] = (),
    ) -> torch.Tensor:
        total = student[next(iter(self.kinds))].new_zeros(())
        for name, kind in self.kinds.items():
            if kind is OutputKind.REGRESSION:
                total = total + normalized_mse(student[name], teacher[name])
            elif kind is OutputKind.DETECTIONS:
                total = total + detection_loss(student[name], teacher[name])
            else:
                temperature = self.temperature if teacher[name].ndim <= 2 else SEQUENCE_TEMPERATURE
                total = total + _distillation_kl(student[name], teacher[name], kind, temperature)
        for name in features:
            scale = 1.0 if self.feature_scales is None else self.feature_scales[name]
            total = total + self.feature_weight * scale * normalized_mse(student[name], teacher[name])
        if labels is not None and self.task is not None:
            total = total + self.alpha * self.task(student, labels)
        return total
