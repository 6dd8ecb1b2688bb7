"""OpenVINO: an IR (.xml + .bin) or an ONNX file compiled for CPU, GPU, NPU or AUTO."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, ClassVar, TypedDict

import numpy as np

from edgeopt.runtime.backends.base import Backend
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.spec import TensorSpec

__all__ = ["OpenVinoBackend"]

#: manifest option -> OpenVINO property name
PROPERTIES: dict[str, str] = {
    "performance_hint": "PERFORMANCE_HINT",
    "inference_precision": "INFERENCE_PRECISION_HINT",
    "num_streams": "NUM_STREAMS",
    "execution_mode": "EXECUTION_MODE_HINT",
    "cache_dir": "CACHE_DIR",
}


class OpenVinoFacts(TypedDict):
    device: str
    device_name: str | None  # FULL_DEVICE_NAME, when the device is available
    available_devices: list[str]


class OpenVinoBackend(Backend):
    """`device`: CPU (default), GPU, NPU, AUTO...; `options`: performance_hint (default LATENCY) and the keys of PROPERTIES."""

    name: ClassVar[BackendName] = BackendName.OPENVINO
    suffixes: ClassVar[tuple[str, ...]] = (".xml",)
    modules: ClassVar[tuple[str, ...]] = ("openvino",)
    distributions: ClassVar[tuple[str, ...]] = ("openvino",)
    default_install_hint: ClassVar[str] = "pip install openvino"
    thread_safe_infer: ClassVar[bool] = True  # each thread infers on its own request (an infer request is not shared)

    def activate(self) -> None:
        ov = self.import_library()
        self.device = (self.config.device or self.config.options.get("device") or "CPU").upper()
        properties: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        for key, prop in PROPERTIES.items():
            if self.config.options.get(key) is not None:
                properties[prop] = str(self.config.options[key])
        if self.config.threads and self.device.startswith("CPU"):
            properties["INFERENCE_NUM_THREADS"] = str(int(self.config.threads))
        self.core = ov.Core()
        self.compiled = self.core.compile_model(str(self.model_path), self.device, properties)
        self._requests = threading.local()
        self.request = self._thread_request()
        self._output_names = [_port_name(port) for port in self.compiled.outputs]

    def _specs(self, ports: Any) -> list[TensorSpec]:
        specs = []
        for port in ports:
            shape = port.get_partial_shape()
            dims = tuple(d.get_length() if d.is_static else None for d in shape)
            specs.append(
                TensorSpec(name=_port_name(port), shape=dims, dtype=np.dtype(port.get_element_type().to_dtype()).name)
            )
        return specs

    def input_metadata(self) -> list[TensorSpec]:
        return self._specs(self.compiled.inputs)

    def output_metadata(self) -> list[TensorSpec]:
        return self._specs(self.compiled.outputs)

    def _thread_request(self) -> Any:
        """This thread's infer request, created from the compiled model on the thread's first call."""
        try:
            return self._requests.request
        except AttributeError:
            self._requests.request = self.compiled.create_infer_request()
            return self._requests.request

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._thread_request().infer(feeds, share_inputs=True, share_outputs=False)
        return dict(zip(self._output_names, results.to_tuple()))

    def raw_call(self) -> tuple[Any, Any]:
        return partial(self.request.infer, share_inputs=True, share_outputs=False), lambda feeds: (feeds,)

    def deactivate(self) -> None:
        del self.request, self._requests, self.compiled, self.core

    def facts(self) -> OpenVinoFacts:
        return {
            "device": self.device,
            "device_name": self.core.get_property(self.device, "FULL_DEVICE_NAME")
            if self.device in self.core.available_devices
            else None,
            "available_devices": list(self.core.available_devices),
        }


def _port_name(port: Any) -> str:
    """A tensor's name as the source model called it; the node's name when the tensor has none."""
    names = port.get_names()
    if names:
        return port.get_any_name()
    return port.get_node().get_friendly_name()
