"""Errors raised while reading, transforming and lowering models."""

from __future__ import annotations

from edgeopt.runtime.errors import EdgeoptError

__all__ = [
    "ModelLoadError",
    "UnsupportedOpsError",
    "CalibrationDataError",
    "InputShapeError",
    "LoweringError",
    "ArtifactRejectedError",
    "QualityBudgetError",
]


class ModelLoadError(EdgeoptError):
    """The model file is missing, not ONNX, truncated, or fails the ONNX checker."""


class UnsupportedOpsError(EdgeoptError):
    """Nodes the target (or a lowering) cannot run; lists every one of them at once."""

    def __init__(self, target: str, nodes: list[tuple[str, str, str]], *, hint: str | None = None) -> None:
        self.target = target
        self.nodes = nodes
        lines = "\n".join(f"  - {name or '<unnamed>'} ({op}): {why}" for name, op, why in nodes)
        super().__init__(
            # neutral: each reason says whose limit it is (the device's runtime, or edgeopt's lowering)
            f"{len(nodes)} node(s) cannot be built for {target}:\n{lines}",
            hint=hint or "replace or remove these ops before export, or choose another --target",
        )


class CalibrationDataError(EdgeoptError):
    """Calibration or evaluation data does not match the model's inputs."""


class InputShapeError(EdgeoptError):
    """An --input-shape that names no input, has the wrong rank or contradicts a static dimension."""


class LoweringError(EdgeoptError):
    """A lowering to a device format failed or is not available for this target yet."""


class ArtifactRejectedError(LoweringError):
    """The backend rejects, or crashes on, an artifact edgeopt wrote: a lowering bug."""

    exit_code = 3


class QualityBudgetError(EdgeoptError):
    """The optimized model misses the user's quality budget."""

    exit_code = 3
