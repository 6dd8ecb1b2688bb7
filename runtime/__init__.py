"""On-device runtime: load a bundle or a bare artifact, predict, benchmark, verify.

Imports only the standard library and numpy; each backend library is imported on first use.
"""

from edgeopt.runtime.errors import (
    BackendUnavailableError,
    BundleError,
    EdgeoptError,
    InputSpecError,
    VerificationError,
)

__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "EdgeoptError",
    "InputSpecError",
    "VerificationError",
]
