"""The backend registry: one line per backend, each a module in this folder with one class.

Backend modules import their library only inside `activate`, so importing a backend module (to
read its suffixes or install hint) costs nothing on a device that lacks the library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from edgeopt.runtime.backends.base import Backend, BackendConfig
from edgeopt.runtime.errors import BackendUnavailableError, BundleError

__all__ = [
    "BACKENDS",
    "STAND_INS",
    "Backend",
    "BackendConfig",
    "backend_class",
    "backend_for_file",
    "backends_summary",
    "StandIn",
]

#: name -> "module:Class". The order decides which backend loads a bare file with a shared suffix.
BACKENDS: dict[str, str] = {
    "onnxruntime": "edgeopt.runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "edgeopt.runtime.backends.openvino:OpenVinoBackend",
    "tflite": "edgeopt.runtime.backends.tflite:TfliteBackend",
    "coreml": "edgeopt.runtime.backends.coreml:CoreMLBackend",
    "tensorrt": "edgeopt.runtime.backends.tensorrt:TensorRTBackend",
    "coreml-reference": "edgeopt.runtime.backends.coreml_reference:CoreMLReferenceBackend",
}


@dataclass(frozen=True)
class StandIn:
    """`backend` runs the artifact of `replaces` where that one cannot run; its results carry `note`."""

    replaces: str
    backend: str
    note: str


#: device backend -> the stand-in that `verify` and `bench` run where the device backend cannot run
#: here (Core ML off macOS, TensorRT without an NVIDIA GPU).
STAND_INS: dict[str, StandIn] = {
    stand_in.replaces: stand_in
    for stand_in in (
        StandIn("coreml", "coreml-reference", "reference evaluator, not Core ML: latency is not the device's"),
        StandIn("tensorrt", "onnxruntime", "ONNX Runtime on the TensorRT-ready ONNX, not TensorRT: latency is not the device's"),
    )
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
