"""The backend registry: one line per backend, each a module in this folder with one class.

Backend modules import their library only inside `activate`, so importing a backend module (to
read its suffixes or install hint) costs nothing on a device that lacks the library.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgeopt.runtime.backends.base import Backend, BackendConfig
from edgeopt.runtime.errors import BackendUnavailableError, BundleError

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendConfig",
    "backend_class",
    "backend_for_file",
    "backends_summary",
]

#: name -> "module:Class". The order decides which backend loads a bare file with a shared suffix.
BACKENDS: dict[str, str] = {
    "onnxruntime": "edgeopt.runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "edgeopt.runtime.backends.openvino:OpenVinoBackend",
    "tflite": "edgeopt.runtime.backends.tflite:TfliteBackend",
    "coreml": "edgeopt.runtime.backends.coreml:CoreMLBackend",
    "tensorrt": "edgeopt.runtime.backends.tensorrt:TensorRTBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under `name`; an unknown name is a usage error listing the known ones."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendUnavailableError(
            f"unknown backend '{name}'", hint=f"choose one of: {', '.join(BACKENDS)}"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def backend_for_file(path: Path) -> str:
    """The backend that loads a bare artifact, by its suffix."""
    suffix = path.suffix.lower()
    for name in BACKENDS:
        if suffix in backend_class(name).suffixes:
            return name
    known = sorted({s for name in BACKENDS for s in backend_class(name).suffixes})
    raise BundleError(
        f"{path}: no backend loads '{suffix or path.name}' files",
        hint=f"pass a bundle folder, a .tar.gz bundle or one of {', '.join(known)}",
    )


def backends_summary() -> dict[str, dict[str, object]]:
    """Which backends this machine can run, with library versions and install hints."""
    summary: dict[str, dict[str, object]] = {}
    for name in BACKENDS:
        cls = backend_class(name)
        summary[name] = {
            "available": cls.is_available(),
            "library": cls.modules[0],
            "version": cls.library_version(),
            "install": cls.default_install_hint,
        }
    return summary
