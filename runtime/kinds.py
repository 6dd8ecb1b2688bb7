"""The closed sets edgeopt dispatches on, typed: precision, backend, artifact format, and the
quantizer's effort levels, techniques and calibration methods (named on the CLI and in manifests).

Strings appear only at the edges (CLI options, JSON, TOML profiles, manifests); inside, code takes
these enums and dispatches with `match`, ending in `unreachable(value)` so that a new member is
found by the type checker, not by grep. `typing.assert_never` needs Python 3.11; JetPack 6 ships 3.10.
The runtime reads manifests, so the sets live here (standard library only) and the rest import them.
"""

from __future__ import annotations

import enum
from typing import NoReturn

__all__ = ["ArtifactFormat", "BackendName", "CalibrationMethod", "Effort", "FinetuneMode", "Precision", "PruneCriterion", "Technique", "unreachable"]


def unreachable(value: NoReturn) -> NoReturn:
    """The final case of an exhaustive `match`: reached only by a member nobody handled yet."""
    raise AssertionError(f"unhandled {type(value).__name__} {value!r}")


class _Named(str, enum.Enum):
    """A closed set of names: `str()` and f-strings give the name as written at the edges, on every Python."""

    def __str__(self) -> str:
        return self.value


class Precision(_Named):
    """What a build computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # weights and activations (QDQ)
    INT8_WEIGHTS = "int8-weights"  # weights stored int8, computed in float
    PALETTIZED_8 = "palettized-8"  # Core ML weight palettes (k-means LUT)
    PALETTIZED_6 = "palettized-6"
    PALETTIZED_4 = "palettized-4"

    @property
    def quantizes_activations(self) -> bool:
        """Needs calibration data and a QDQ graph."""
        return self is Precision.INT8

    @property
    def compresses_weights_only(self) -> bool:
        return self in (Precision.INT8_WEIGHTS, Precision.PALETTIZED_8, Precision.PALETTIZED_6, Precision.PALETTIZED_4)

    @property
    def palette_bits(self) -> int | None:
        match self:
            case Precision.PALETTIZED_8:
                return 8
            case Precision.PALETTIZED_6:
                return 6
            case Precision.PALETTIZED_4:
                return 4
            case Precision.FP32 | Precision.FP16 | Precision.INT8 | Precision.INT8_WEIGHTS:
                return None
            case _:
                unreachable(self)


class BackendName(_Named):
    """The runtime backends; each has one module in runtime/backends/ and one registry line."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TFLITE = "tflite"
    COREML = "coreml"
    TENSORRT = "tensorrt"
    COREML_REFERENCE = "coreml-reference"  # MIL evaluator standing in for Core ML off macOS


class ArtifactFormat(_Named):
    """What a lowering writes; each member has exactly one lowering module."""

    ONNX = "onnx"
    TENSORRT_ONNX = "tensorrt-onnx"
    OPENVINO_IR = "openvino-ir"
    TFLITE = "tflite"
    MLPACKAGE = "mlpackage"

    @property
    def extension(self) -> str:
        match self:
            case ArtifactFormat.ONNX | ArtifactFormat.TENSORRT_ONNX:
                return ".onnx"
            case ArtifactFormat.OPENVINO_IR:
                return ".xml"
            case ArtifactFormat.TFLITE:
                return ".tflite"
            case ArtifactFormat.MLPACKAGE:
                return ".mlpackage"
            case _:
                unreachable(self)


class Effort(_Named):
    """How much int8 build time a user gives for fidelity (converters/quantize/techniques.py)."""

    FAST = "fast"
    DEFAULT = "default"
    MAX = "max"


class Technique(_Named):
    """One post-training quantization technique, as the CLI, the manifest and the report name it."""

    EQUALIZATION = "equalization"  # cross-layer equalization (quantize/equalize.py)
    BIAS_ABSORPTION = "bias_absorption"  # high-bias absorption (quantize/equalize.py)
    SMOOTHQUANT = "smoothquant"  # outlier migration into MatMul/Gemm weights (quantize/smooth.py)
    RANGE_SEARCH = "range_search"  # per-tensor range by consumer output error (quantize/range_search.py)
    ADAROUND = "adaround"  # learned weight rounding (quantize/adaround.py)
    BIAS_CORRECTION = "bias_correction"  # empirical bias correction (quantize/bias_correction.py)
    MIXED_PRECISION = "mixed_precision"  # the most sensitive layers stay float (quantize/mixed_precision.py)


class FinetuneMode(_Named):
    """How an int8 build fine-tunes its QDQ graph (converters/finetune/): with labels, or from the fp32 model."""

    QAT = "qat"  # quantization-aware training on the task loss (needs labels)
    QAD = "qad"  # quantization-aware distillation from the fp32 model (labels optional)


class PruneCriterion(_Named):
    """How structured pruning ranks channels (converters/prune/importance.py)."""

    L1 = "l1"  # L1 norm of each output filter
    L2 = "l2"  # L2 norm of each output filter
    BN_SCALE = "bn-scale"  # |gamma| of the BatchNormalization after the layer, read before simplify folds it
    TAYLOR = "taylor"  # first-order Taylor (activation x gradient) on calibration data, label-free (needs torch)
    AUTO = "auto"  # taylor where calibration data and torch are at hand, else l2 (`resolve_criterion`, before any ranking)


class CalibrationMethod(_Named):
    """An activation range estimator; AUTO chooses one per tensor by the error in its consumer's output."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    AUTO = "auto"
