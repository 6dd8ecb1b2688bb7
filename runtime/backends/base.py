"""The shape every backend has, after Polygraphy's runner: activate, infer, deactivate, metadata.

A backend owns one loaded model on one library. It is deliberately thin: the Model in
`edgeopt.runtime.model` does input checking and (de)quantization once for every backend, so a
backend's `infer` is the library call plus the few lines that turn its result into a dict.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, ClassVar

import numpy as np

from edgeopt.runtime.errors import BackendUnavailableError
from edgeopt.runtime.kinds import BackendName, Precision
from edgeopt.runtime.spec import TensorSpec

__all__ = ["Backend", "BackendConfig", "distribution_version", "import_first", "installed_distribution"]


class BackendConfig:
    """What `load` passes to a backend: threads, device, the manifest's backend options and recipe."""

    __slots__ = ("threads", "device", "options", "precision", "model_sha256", "install_hint", "recipe")

    def __init__(
        self,
        *,
        threads: int | None = None,
        device: str | None = None,
        options: Mapping[str, Any] | None = None,
        precision: Precision | None = None,
        model_sha256: str | None = None,
        install_hint: str | None = None,
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        self.threads = threads
        self.device = device
        self.options: dict[str, Any] = dict(options or {})
        self.precision = precision
        self.model_sha256 = model_sha256
        self.install_hint = install_hint
        #: the manifest's lowering.engine_recipe (TensorRT), empty for other formats
        self.recipe: dict[str, Any] = dict(recipe or {})


def installed_distribution(*distributions: str) -> tuple[str, str] | None:
    """(name, version) of the first installed distribution, without importing it."""
    for name in distributions:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def distribution_version(*distributions: str) -> str | None:
    """Installed version of the first distribution found, without importing it."""
    found = installed_distribution(*distributions)
    return found[1] if found else None


def import_first(modules: tuple[str, ...], *, backend: BackendName, hint: str) -> ModuleType:
    """Import the first module of `modules` that is installed, else a BackendUnavailableError."""
    failures: list[str] = []
    for name in modules:
        try:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                continue
            return importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
    detail = f" ({'; '.join(failures)})" if failures else ""
    raise BackendUnavailableError(
        f"backend '{backend}' needs {' or '.join(modules)}, which is not importable here{detail}",
        hint=hint,
    )


class Backend:
    """One model loaded on one library. Subclasses set the class attributes and the four hooks."""

    #: registry name
    name: ClassVar[BackendName]
    #: file suffixes this backend loads when no backend is named (".onnx", ".xml", ...)
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: importable modules, in order of preference; the first one found is used
    modules: ClassVar[tuple[str, ...]]
    #: pip distributions whose version is reported (same order as modules)
    distributions: ClassVar[tuple[str, ...]]
    #: how to install the library when no bundle manifest says otherwise
    default_install_hint: ClassVar[str]
    #: True when `infer` may run in several threads at once (ONNX Runtime's session.run; OpenVINO with an
    #: infer request per thread). Otherwise the Model runs one `infer` at a time behind a lock (LiteRT's
    #: interpreter, Core ML, a TensorRT execution context are not thread-safe).
    thread_safe_infer: ClassVar[bool] = False

    def __init__(self, model_path: Path, config: BackendConfig) -> None:
        self.model_path = Path(model_path)
        self.config = config
        self.is_active = False

    # -- discovery -------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        """True when the library can be found (not imported: `info` must stay fast and light)."""
        for name in cls.modules:
            try:
                if importlib.util.find_spec(name.split(".")[0]) is not None:
                    return True
            except (ImportError, ValueError):
                continue
        return False

    @classmethod
    def library_version(cls) -> str | None:
        return distribution_version(*cls.distributions)

    @classmethod
    def library_distribution(cls) -> tuple[str, str] | None:
        """(pip distribution, version) this backend would use here."""
        return installed_distribution(*cls.distributions)

    def import_library(self) -> ModuleType:
        hint = self.config.install_hint or self.default_install_hint
        return import_first(self.modules, backend=self.name, hint=hint)

    # -- the hooks -------------------------------------------------------------------------
    def activate(self) -> None:
        """Load the model into the library (sessions, compiled models, buffers)."""
        raise NotImplementedError

    def input_metadata(self) -> list[TensorSpec]:
        """Inputs as the library sees them; quantization filled in where the artifact carries it."""
        raise NotImplementedError

    def output_metadata(self) -> list[TensorSpec]:
        raise NotImplementedError

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. `feeds` are already checked and in the artifact's dtypes; outputs are fresh arrays
        (copies the library no longer writes to: the Model's lock, if any, is released after `infer`)."""
        raise NotImplementedError

    def raw_call(self) -> tuple[Any, Any]:
        """The library's own call and its argument for `feeds`, used by the overhead benchmark.

        Returns `(function, to_arguments)` where `function(*to_arguments(feeds))` is the bare
        library call that `infer` wraps.
        """
        raise NotImplementedError

    def deactivate(self) -> None:
        """Free what activate allocated."""

    def facts(self) -> Mapping[str, object]:
        """Backend-specific facts for benchmark results (providers, device, delegate ...); each backend's own TypedDict."""
        return {}

    # -- context management ----------------------------------------------------------------
    def __enter__(self) -> "Backend":
        if not self.is_active:
            self.activate()
            self.is_active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.is_active:
            self.is_active = False
            self.deactivate()

