"""Every error edgeopt raises, in one place, with the CLI exit code each maps to."""

from __future__ import annotations

from edgeopt.converters.errors import (
    CalibrationDataError,
    LoweringError,
    ModelLoadError,
    QualityBudgetError,
    UnsupportedOpsError,
)
from edgeopt.runtime.errors import (
    BackendUnavailableError,
    BundleError,
    EdgeoptError,
    InputSpecError,
    OptionError,
    VerificationError,
)
from edgeopt.targets import UnknownTargetError

__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "CalibrationDataError",
    "EdgeoptError",
    "InputSpecError",
    "LoweringError",
    "ModelLoadError",
    "OptionError",
    "OutputError",
    "QualityBudgetError",
    "RemoteError",
    "UnknownTargetError",
    "UnsupportedOpsError",
    "VerificationError",
]


class OutputError(EdgeoptError):
    """The output path exists (without --force) or cannot be written."""


class RemoteError(EdgeoptError):
    """A remote device could not be reached, refused us, or a command on it failed."""
