"""One lowering per artifact format, dispatched exhaustively on the target's format."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgeopt.converters.lower.base import LoweredArtifact, LoweringOptions, LoweringResult, Runner
from edgeopt.runtime.kinds import ArtifactFormat, Precision, unreachable
from edgeopt.targets import Target

__all__ = ["LoweredArtifact", "LoweringOptions", "LoweringResult", "Runner", "lower"]


def lower(
    model: onnx.ModelProto, target: Target, precision: Precision, out_dir: Path, options: LoweringOptions
) -> LoweringResult:
    """Write `model` (float or QDQ ONNX) into `out_dir` in the target's format.

    Each lowering module is imported only when its format is asked for: their libraries
    (openvino, coremltools, LiteRT's schema) are optional extras.
    """
    match target.artifact_format:
        case ArtifactFormat.ONNX:
            from edgeopt.converters.lower import onnxruntime as module
        case ArtifactFormat.TENSORRT_ONNX:
            from edgeopt.converters.lower import tensorrt as module
        case ArtifactFormat.OPENVINO_IR:
            from edgeopt.converters.lower import openvino as module
        case ArtifactFormat.TFLITE:
            from edgeopt.converters.lower import tflite as module
        case ArtifactFormat.MLPACKAGE:
            from edgeopt.converters.lower import coreml as module
        case _:
            unreachable(target.artifact_format)
    return module.lower(model, target, precision, out_dir, options)
