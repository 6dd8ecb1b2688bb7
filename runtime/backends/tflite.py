"""TFLite / LiteRT: ai_edge_litert, else tflite_runtime, else tensorflow.lite; XNNPACK by default."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, TypedDict

import numpy as np

from edgeopt.runtime.backends.base import Backend
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.library_output import library_output_to_log
from edgeopt.runtime.spec import TensorQuantization, TensorSpec

__all__ = ["TfliteBackend"]

log = logging.getLogger(__name__)

#: where each package keeps the Interpreter class
INTERPRETER_MODULES: tuple[str, ...] = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow")


class TfliteFacts(TypedDict):
    interpreter: str  # the package that ran: ai_edge_litert, tflite_runtime or tensorflow
    xnnpack: bool
    threads: int | None


class _QuantizationParameters(TypedDict):
    scales: np.ndarray
    zero_points: np.ndarray
    quantized_dimension: int


class _TensorDetails(TypedDict, total=False):
    """What the interpreter's get_input_details()/get_output_details() give per tensor (the keys read here)."""

    name: str
    index: int
    shape: np.ndarray
    shape_signature: np.ndarray
    dtype: type
    quantization: tuple[float, int]
    quantization_parameters: _QuantizationParameters


class TfliteBackend(Backend):
    """`threads` sets the interpreter's threads; `options`: xnnpack (default true).

    The Interpreter is not thread-safe (set_tensor/invoke/get_tensor share its tensors), so the Model
    runs one `infer` at a time (thread_safe_infer stays False).
    """

    name: ClassVar[BackendName] = BackendName.TFLITE
    suffixes: ClassVar[tuple[str, ...]] = (".tflite",)
    modules: ClassVar[tuple[str, ...]] = INTERPRETER_MODULES
    distributions: ClassVar[tuple[str, ...]] = ("ai-edge-litert", "tflite-runtime", "tensorflow")
    default_install_hint: ClassVar[str] = (
        "pip install ai-edge-litert   (older 32-bit systems: pip install tflite-runtime)"
    )

    def activate(self) -> None:
        module = self.import_library()
        self.library = module.__name__.split(".")[0]
        interpreter_module = module.lite if self.library == "tensorflow" else module
        keyword: dict[str, object] = {}
        self.xnnpack = bool(self.config.options.get("xnnpack", True))
        if not self.xnnpack:
            keyword["experimental_op_resolver_type"] = (
                interpreter_module.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
                if self.library == "tensorflow"
                else interpreter_module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        # the first allocation prints "INFO: Created TensorFlow Lite XNNPACK delegate" from C++
        with library_output_to_log(log, self.library):
            self.interpreter = interpreter_module.Interpreter(
                model_path=str(self.model_path), num_threads=self.config.threads or None, **keyword
            )
            self.interpreter.allocate_tensors()
        self._input_details = self.interpreter.get_input_details()
        self._output_details = self.interpreter.get_output_details()
        self._input_index = {d["name"]: d["index"] for d in self._input_details}
        self._input_shape = {d["name"]: tuple(int(x) for x in d["shape"]) for d in self._input_details}
        self._outputs = [(d["name"], d["index"]) for d in self._output_details]
        self._set_tensor = self.interpreter.set_tensor
        self._invoke = self.interpreter.invoke
        self._get_tensor = self.interpreter.get_tensor

    def _specs(self, details: list[_TensorDetails]) -> list[TensorSpec]:
        specs = []
        for d in details:
            signature = d.get("shape_signature")
            dims = signature if signature is not None and len(signature) else d["shape"]
            specs.append(
                TensorSpec(
                    name=d["name"],
                    shape=tuple(None if int(x) < 0 else int(x) for x in dims),
                    dtype=np.dtype(d["dtype"]).name,
                    quantization=_quantization(d),
                )
            )
        return specs

    def input_metadata(self) -> list[TensorSpec]:
        return self._specs(self._input_details)

    def output_metadata(self) -> list[TensorSpec]:
        return self._specs(self._output_details)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        set_tensor = self._set_tensor
        for name, value in feeds.items():
            if value.shape != self._input_shape[name]:
                self._resize(name, value.shape)
            set_tensor(self._input_index[name], value)
        self._invoke()
        get_tensor = self._get_tensor  # a copy, not a view: the next invoke cannot change it
        return {name: get_tensor(index) for name, index in self._outputs}

    def _resize(self, name: str, shape: tuple[int, ...]) -> None:
        """Dynamic dims: resize the input and re-plan memory (only when the shape changes)."""
        self.interpreter.resize_tensor_input(self._input_index[name], list(shape))
        self.interpreter.allocate_tensors()
        self._input_shape[name] = tuple(shape)

    def raw_call(self) -> tuple[Any, Any]:
        interpreter = self.interpreter
        inputs = self._input_index
        outputs = [index for _, index in self._outputs]

        def call(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            for name, value in feeds.items():
                interpreter.set_tensor(inputs[name], value)
            interpreter.invoke()
            return [interpreter.get_tensor(index) for index in outputs]

        return call, lambda feeds: (feeds,)

    def deactivate(self) -> None:
        del self.interpreter, self._set_tensor, self._invoke, self._get_tensor

    def facts(self) -> TfliteFacts:
        return {"interpreter": self.library, "xnnpack": self.xnnpack, "threads": self.config.threads}


def _quantization(detail: _TensorDetails) -> TensorQuantization | None:
    """Scale and zero point of an integer tensor, as TFLite stores them (lists when per-channel)."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return None
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64)
    zero_points = np.asarray(params.get("zero_points", []), dtype=np.int64)
    if scales.size == 0:
        scale, zero_point = detail.get("quantization", (0.0, 0))
        if not scale:
            return None
        return {"scale": float(scale), "zero_point": int(zero_point)}
    if scales.size == 1:
        return {"scale": float(scales[0]), "zero_point": int(zero_points[0]) if zero_points.size else 0}
    return {
        "scale": scales.tolist(),
        "zero_point": zero_points.tolist(),
        "axis": int(params.get("quantized_dimension", 0)),
    }
