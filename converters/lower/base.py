"""What every lowering returns, so the pipeline can package and verify any format the same way."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgeopt.runtime.kinds import ArtifactFormat, BackendName
from edgeopt.runtime.manifest import JsonObject
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import OptionValue

__all__ = ["LoweredArtifact", "LoweringOptions", "LoweringResult", "Runner"]

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class LoweredArtifact:
    """A file or folder written into the bundle folder; `path` is relative to it.

    `format` is an ArtifactFormat for what a backend loads, and a plain kind ("shell",
    "triton-config") for the support files beside it, which no backend reads.
    """

    path: str
    format: ArtifactFormat | str
    role: str = "model"


@dataclass(frozen=True)
class LoweringOptions:
    """User choices that reach a lowering; each lowering reads the fields it understands."""

    io_layout: str | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    model_name: str = "model"
    extra: Mapping[str, OptionValue] = field(default_factory=dict)


@dataclass
class LoweringResult:
    """The artifacts a lowering wrote and how the device (and this host) runs them.

    `runtime_backend` is what the device uses, with `runtime_options` (the backend's own option
    keys; None means the target profile's options); `verify_backend` is the edgeopt.runtime backend
    that can run the same artifact here (None when none can, in which case `runner` must be set,
    e.g. a reference evaluator).
    """

    artifacts: list[LoweredArtifact]
    model_file: str
    runtime_backend: BackendName
    verify_backend: BackendName | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    summary: JsonObject = field(default_factory=dict)  # the manifest's `lowering` figures
    runner: Runner | None = None
    verified_with: str = ""
    runtime_options: Mapping[str, OptionValue] | None = None
