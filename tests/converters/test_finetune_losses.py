"""Distillation losses: what each output kind is matched by (converters/finetune/losses.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edgeopt.converters.finetune.losses import DistillationLoss, OutputKind, detection_loss, normalized_mse, output_kinds  # noqa: E402


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
