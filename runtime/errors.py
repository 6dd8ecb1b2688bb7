"""The one exception family of edgeopt.

It lives in the runtime because the runtime must stand alone on a device; every other layer
subclasses from here. Each error carries the CLI exit code it maps to (0 ok, 1 unexpected,
2 bad usage or input, 3 quality budget missed or verification failed).
"""

from __future__ import annotations

__all__ = [
    "EdgeoptError",
    "BundleError",
    "BackendUnavailableError",
    "InputSpecError",
    "OptionError",
    "VerificationError",
]


class EdgeoptError(Exception):
    """Base of every expected failure; the CLI prints its message without a traceback."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class BundleError(EdgeoptError):
    """A bundle or artifact is missing, corrupt, has a bad checksum or an unknown schema version."""


class BackendUnavailableError(EdgeoptError):
    """The library a backend needs is not installed here; the hint says how to install it."""


class OptionError(EdgeoptError):
    """An option of a command or API call is out of its range (runs below 1, a port above 65535, a NaN budget)."""


class InputSpecError(EdgeoptError):
    """Inputs given to predict do not match the model's names, shapes or dtypes."""


class VerificationError(EdgeoptError):
    """Outputs differ from the reference beyond tolerance."""

    exit_code = 3
