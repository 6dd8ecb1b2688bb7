"""The backend registry: one line per backend, each a module in this folder with one class.

Backend modules import their library only inside `activate`, so importing a backend module (to
read its suffixes or install hint) costs nothing on a device that lacks the library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from edgeopt.runtime.backends.base import Backend, BackendConfig
from edgeopt.runtime.errors import BackendUnavailableError, BundleError
from edgeopt.runtime.kinds import BackendName

__all__ = [
    "BACKENDS",
    "STAND_INS",
    "Backend",
    "BackendConfig",
    "BackendSummary",
    "StandIn",
    "backend_class",
    "backend_for_file",
    "backends_summary",
    "parse_backend_name",
]

#: name -> "module:Class". The order decides which backend loads a bare file with a shared suffix.
BACKENDS: dict[BackendName, str] = {
    BackendName.ONNXRUNTIME: "edgeopt.runtime.backends.onnxruntime:OnnxRuntimeBackend",
    BackendName.OPENVINO: "edgeopt.runtime.backends.openvino:OpenVinoBackend",
    BackendName.TFLITE: "edgeopt.runtime.backends.tflite:TfliteBackend",
    BackendName.COREML: "edgeopt.runtime.backends.coreml:CoreMLBackend",
    BackendName.TENSORRT: "edgeopt.runtime.backends.tensorrt:TensorRTBackend",
    BackendName.COREML_REFERENCE: "edgeopt.runtime.backends.coreml_reference:CoreMLReferenceBackend",
}


@dataclass(frozen=True)
class StandIn:
    """`backend` runs the artifact of `replaces` where that one cannot run; its results carry `note`."""

    replaces: BackendName
    backend: BackendName
    note: str


#: device backend -> the stand-in that `verify` and `bench` run where the device backend cannot run
#: here (Core ML off macOS, TensorRT without an NVIDIA GPU).
STAND_INS: dict[BackendName, StandIn] = {
    stand_in.replaces: stand_in
    for stand_in in (
        StandIn(
            BackendName.COREML, BackendName.COREML_REFERENCE,
            "reference evaluator, not Core ML: latency is not the device's",
        ),
        StandIn(
            BackendName.TENSORRT, BackendName.ONNXRUNTIME,
            "ONNX Runtime on the TensorRT-ready ONNX, not TensorRT: latency is not the device's",
        ),
    )
}


def parse_backend_name(name: str) -> BackendName:
    """A backend name from the edge (CLI, manifest, Python caller); an unknown one is a usage error listing the known ones."""
    try:
        return BackendName(name)
    except ValueError:
        raise BackendUnavailableError(
            f"unknown backend '{name}'", hint=f"choose one of: {', '.join(BACKENDS)}"
        ) from None


def backend_class(name: BackendName | str) -> type[Backend]:
    """The class registered under `name` (a string is parsed: an unknown name is a usage error)."""
    module_name, _, class_name = BACKENDS[parse_backend_name(name)].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def backend_for_file(path: Path) -> BackendName:
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


class BackendSummary(TypedDict):
    """One backend in `info`: whether its library is here, which one, and how to install it."""

    available: bool
    library: str
    version: str | None
    install: str


def backends_summary() -> dict[BackendName, BackendSummary]:
    """Which backends this machine can run, with library versions and install hints."""
    summary: dict[BackendName, BackendSummary] = {}
    for name in BACKENDS:
        cls = backend_class(name)
        summary[name] = {
            "available": cls.is_available(),
            "library": cls.modules[0],
            "version": cls.library_version(),
            "install": cls.default_install_hint,
        }
    return summary
