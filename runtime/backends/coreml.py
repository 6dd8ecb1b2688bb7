"""Core ML: an .mlpackage (or .mlmodel) run with coremltools' MLModel; prediction needs macOS.

Written against coremltools' documented API (MLModel(path, compute_units=ComputeUnit.X),
MLModel.predict(dict) -> dict, MLModel.get_spec()); it cannot run on this Linux build host.
"""

from __future__ import annotations

import platform
import sys
from typing import Any, ClassVar, TypedDict

import numpy as np

from edgeopt.runtime.backends.base import Backend
from edgeopt.runtime.errors import BackendUnavailableError
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.spec import TensorSpec

__all__ = ["CoreMLBackend"]

#: Core ML ArrayFeatureType data types (FeatureTypes.proto) -> numpy
ARRAY_TYPES: dict[int, str] = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}

COMPUTE_UNITS: tuple[str, ...] = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


class CoreMLBackend(Backend):
    """`device` or options.compute_units: ALL (default), CPU_ONLY, CPU_AND_GPU, CPU_AND_NE.

    MLModel.predict is not documented as thread-safe: the Model runs one `infer` at a time.
    """

    name: ClassVar[BackendName] = BackendName.COREML
    suffixes: ClassVar[tuple[str, ...]] = (".mlpackage", ".mlmodel")
    modules: ClassVar[tuple[str, ...]] = ("coremltools",)
    distributions: ClassVar[tuple[str, ...]] = ("coremltools",)
    default_install_hint: ClassVar[str] = "on a Mac (macOS 13+): pip install coremltools"

    @classmethod
    def is_available(cls) -> bool:
        return sys.platform == "darwin" and super().is_available()

    def activate(self) -> None:
        if sys.platform != "darwin":
            raise BackendUnavailableError(
                f"{self.model_path.name}: Core ML prediction needs macOS; this is {platform.system()} "
                f"{platform.machine()}",
                hint="run it on a Mac (pip install coremltools), or run the numpy reference evaluator "
                "here with --backend coreml-reference (not Core ML's speed)",
            )
        ct = self.import_library()
        units = (self.config.device or self.config.options.get("compute_units") or "ALL").upper()
        if units not in COMPUTE_UNITS:
            raise BackendUnavailableError(
                f"unknown Core ML compute units '{units}'", hint=f"choose one of: {', '.join(COMPUTE_UNITS)}"
            )
        self.compute_units = units
        self.mlmodel = ct.models.MLModel(str(self.model_path), compute_units=ct.ComputeUnit[units])
        description = self.mlmodel.get_spec().description
        self._inputs = [_feature_spec(f) for f in description.input]
        self._outputs = [_feature_spec(f) for f in description.output]
        self._predict = self.mlmodel.predict

    def input_metadata(self) -> list[TensorSpec]:
        return list(self._inputs)

    def output_metadata(self) -> list[TensorSpec]:
        return list(self._outputs)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._predict(feeds)
        return {spec.name: np.asarray(results[spec.name]) for spec in self._outputs}

    def raw_call(self) -> tuple[Any, Any]:
        return self.mlmodel.predict, lambda feeds: (feeds,)

    def deactivate(self) -> None:
        del self.mlmodel, self._predict

    def facts(self) -> CoreMLFacts:
        return {"compute_units": self.compute_units}


class CoreMLFacts(TypedDict):
    compute_units: str  # ALL, CPU_ONLY, CPU_AND_GPU or CPU_AND_NE


def _feature_spec(feature: Any) -> TensorSpec:
    """A multi-array feature's name, shape and dtype (image features report their pixel shape)."""
    kind = feature.type.WhichOneof("Type")
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
        return TensorSpec(
            name=feature.name, shape=tuple(int(d) for d in array.shape), dtype=ARRAY_TYPES.get(array.dataType, "float32")
        )
    if kind == "imageType":
        image = feature.type.imageType
        return TensorSpec(name=feature.name, shape=(1, 3, int(image.height), int(image.width)), dtype="float32")
    return TensorSpec(name=feature.name, shape=(), dtype="float32")
