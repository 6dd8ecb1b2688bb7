"""ONNX Runtime: the CPU provider by default; TensorRT and CUDA providers when asked for and present."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, TypedDict

import numpy as np

from edgeopt.runtime.backends.base import Backend
from edgeopt.runtime.isa import host_isa
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.spec import TensorSpec

__all__ = ["DISABLED_OPTIMIZERS", "OnnxRuntimeBackend", "ORT_TYPES"]

log = logging.getLogger(__name__)

#: ONNX Runtime's tensor type strings -> numpy dtype names
ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

#: ONNX Runtime's session config key kOrtSessionOptionsAvx2PrecisionMode (onnxruntime_session_options_config_keys.h)
X64_QUANT_PRECISION = "session.x64quantprecision"

#: ONNX Runtime graph transformers every edgeopt session turns off. WeightBiasQuantization (a basic-level
#: transformer, onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.cc) quantizes, per
#: tensor, the float weight of a Conv/Gemm whose input is a DequantizeLinear and whose output reaches a
#: QuantizeLinear: a layer the quantizer kept float on purpose (a sensitive layer, a depthwise conv
#: whose int8 kernel is slower) would run int8 with a coarser grid than any edgeopt chose, and differ
#: from the QDQ graph that verification checks. Unknown names are ignored by older releases.
DISABLED_OPTIMIZERS: tuple[str, ...] = ("WeightBiasQuantization",)

#: what `device=` means for ONNX Runtime, as an ordered provider list (CPU always last)
DEVICE_PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeFacts(TypedDict):
    providers: list[str]  # the session's execution providers, in order


class OnnxRuntimeBackend(Backend):
    """`options`: providers (list of names or [name, {options}] pairs), graph_optimization_level."""

    name: ClassVar[BackendName] = BackendName.ONNXRUNTIME
    suffixes: ClassVar[tuple[str, ...]] = (".onnx", ".ort")
    modules: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    distributions: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")
    default_install_hint: ClassVar[str] = "pip install onnxruntime"
    thread_safe_infer: ClassVar[bool] = True  # InferenceSession.run may be called from several threads

    def activate(self) -> None:
        ort = self.import_library()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.config.threads:
            options.intra_op_num_threads = int(self.config.threads)
        level = self.config.options.get("graph_optimization_level", "ORT_ENABLE_ALL")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, str(level))
        providers = self._providers(ort.get_available_providers())
        # On x86 without VNNI, MLAS's U8S8 kernels sum int8 products pairwise in a saturating int16.
        # This switch runs weights beyond [-64, 64] on exact U8U8 kernels instead (7-bit weights keep
        # U8S8). Only there: on a VNNI CPU ONNX Runtime honours it too, and its U8U8 kernels ran an 8-bit
        # YOLOv8n 1.85x slower than U8S8, which is exact on that CPU (24.3 vs 13.1 ms, 1 thread).
        host = host_isa()
        exact_sums = host is not None and host.saturates_pair_sums
        if exact_sums:
            options.add_session_config_entry(X64_QUANT_PRECISION, "1")
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers, disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as exc:  # ONNX Runtime refuses the switch on int8-activation QLinear graphs
            if not exact_sums or "NOT_IMPLEMENTED" not in str(exc):
                raise
            log.warning("%s: ONNX Runtime cannot run this graph with exact int8 sums here; its int8 kernels may saturate", self.model_path)
            options.add_session_config_entry(X64_QUANT_PRECISION, "0")
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers, disabled_optimizers=list(DISABLED_OPTIMIZERS))
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._run = self.session.run

    def _providers(self, available: list[str]) -> list[Any]:
        """Requested providers that this build of ONNX Runtime has, CPU always kept as fallback."""
        requested: list[Any] = list(self.config.options.get("providers") or [])
        if not requested:
            requested = list(DEVICE_PROVIDERS.get((self.config.device or "cpu").lower(), ["CPUExecutionProvider"]))
        chosen: list[Any] = []
        for provider in requested:
            provider_name = provider[0] if isinstance(provider, (list, tuple)) else provider
            if provider_name in available:
                chosen.append(tuple(provider) if isinstance(provider, list) else provider)
            else:
                log.warning("ONNX Runtime here has no %s; available: %s", provider_name, available)
        if not any((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in chosen):
            chosen.append("CPUExecutionProvider")
        return chosen

    def _specs(self, args: list[Any]) -> list[TensorSpec]:
        return [
            TensorSpec(
                name=a.name,
                shape=tuple(a.shape),
                dtype=ORT_TYPES.get(a.type, a.type),
            )
            for a in args
        ]

    def input_metadata(self) -> list[TensorSpec]:
        return self._specs(self.session.get_inputs())

    def output_metadata(self) -> list[TensorSpec]:
        return self._specs(self.session.get_outputs())

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self._run(self._output_names, feeds)))

    def raw_call(self) -> tuple[Any, Any]:
        names = self._output_names
        return self.session.run, lambda feeds: (names, feeds)

    def deactivate(self) -> None:
        del self.session, self._run

    def facts(self) -> OnnxRuntimeFacts:
        return {"providers": self.session.get_providers()}
