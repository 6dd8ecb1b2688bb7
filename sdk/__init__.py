"""edgeopt: take a trained model to an edge device, quantized, lowered, verified and measured.

The public API is imported lazily so that `edgeopt.runtime` stays light on a device that has
nothing but numpy and one backend.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build": "edgeopt.pipeline",
    "prune": "edgeopt.pruning",
    "BuildResult": "edgeopt.pipeline",
    "inspect_model": "edgeopt.inspect",
    "verify_bundle": "edgeopt.verify",
    "EdgeoptError": "edgeopt.errors",
    "get_target": "edgeopt.targets",
    "all_targets": "edgeopt.targets",
}

__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    """The public API (what `__all__` names, loaded lazily) and the module's own dunders."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__") and name.endswith("__"))})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
