"""Distillation losses: what each output kind is matched by (converters/finetune/losses.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edgeopt.converters.finetune.losses import DistillationLoss, OutputKind, detection_loss, normalized_mse, output_kinds  # noqa: E402
from torch.nn import functional as F  # noqa: E402


def _yolo_output(anchors: int = 300, classes: int = 3) -> torch.Tensor:
    """(1, 4 + classes, anchors): xywh boxes in pixels of a 320 input, background scores, one detection at 0.6."""
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(1, 4, anchors, generator=generator) * 320
    scores = torch.rand(1, classes, anchors, generator=generator) * 1e-3
    scores[0, 1, 7] = 0.6
    return torch.cat([boxes, scores], 1)


def test_a_yolov8_head_output_is_matched_as_detections_and_other_outputs_are_not() -> None:
    teacher = _yolo_output()
    assert output_kinds({"output0": teacher}) == {"output0": OutputKind.DETECTIONS}
    assert output_kinds({"heatmap": torch.rand(1, 6, 300)})["heatmap"] is OutputKind.REGRESSION  # all in [0, 1]: no boxes
    assert output_kinds({"embedding": torch.randn(1, 32, 64)})["embedding"] is OutputKind.REGRESSION


def test_losing_a_detection_costs_more_than_moving_every_box_a_pixel_unlike_mse_on_the_whole_tensor() -> None:
    """What the box F1 counts: a score falling below the 0.25 threshold loses a detection, a box one pixel off
    keeps it (IoU >= 0.5). Normalized MSE on the raw tensor weighs them the other way round."""
    teacher = _yolo_output()
    lost = teacher.clone()
    lost[0, 5, 7] = 0.2
    shifted = teacher.clone()
    shifted[:, :4] += 1.0
    assert detection_loss(lost, teacher) > 10 * detection_loss(shifted, teacher)
    assert normalized_mse(lost, teacher) < normalized_mse(shifted, teacher)
    assert float(detection_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_the_score_gradient_reaches_the_student_logits() -> None:
    teacher = _yolo_output()
    logits = torch.logit(teacher[:, 4:].clamp(1e-6, 1 - 1e-6)).clone()
    logits[0, 1, 7] -= 2.0  # the detection's score 0.6 -> 0.17
    logits.requires_grad_(True)
    student = torch.cat([teacher[:, :4], torch.sigmoid(logits)], 1)
    loss = DistillationLoss({"output0": OutputKind.DETECTIONS})({"output0": student}, {"output0": teacher})
    loss.backward()
    assert logits.grad[0, 1, 7] < 0, "the lowered score is pushed up"
    assert torch.equal(logits.grad.abs().flatten().argmax(), torch.tensor(1 * logits.shape[2] + 7)), "and it gets the largest gradient"


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """KL(teacher || student) of the tempered distributions, per row of the last axis, summed over rows / batch."""
    target = F.log_softmax(teacher.log().reshape(-1, teacher.shape[-1]) / temperature, -1)
    own = F.log_softmax(student.log().reshape(-1, student.shape[-1]) / temperature, -1)
    return float(F.kl_div(own, target, reduction="batchmean", log_target=True)) * temperature**2


def test_a_sequence_of_distributions_is_distilled_at_temperature_one_and_a_classifier_head_at_the_options() -> None:
    """A CTC recogniser's (batch, positions, vocabulary) output is decided position by position by its top class;
    tempered, most of a wide vocabulary's target mass sits on classes that decide nothing."""
    generator = torch.Generator().manual_seed(0)
    teacher, student = (torch.softmax(torch.randn(2, 5, 40, generator=generator) * 2, -1) for _ in range(2))
    kinds = output_kinds({"sequence": teacher})
    assert kinds == {"sequence": OutputKind.PROBABILITIES}
    loss = DistillationLoss(kinds, temperature=2.0)
    assert float(loss({"sequence": student}, {"sequence": teacher})) == pytest.approx(_kl(student, teacher, 1.0), rel=1e-5)
    head_teacher, head_student = teacher[:, 0], student[:, 0]  # (batch, classes): the option's T
    head = DistillationLoss(output_kinds({"probs": head_teacher}), temperature=2.0)
    assert float(head({"probs": head_student}, {"probs": head_teacher})) == pytest.approx(_kl(head_student, head_teacher, 2.0), rel=1e-5)
