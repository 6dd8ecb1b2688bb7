"""TensorRT on Jetson: build the engine from the bundle's ONNX on first load, cache it, run it.

Written against the TensorRT 10 Python API (Builder, OnnxParser, IBuilderConfig,
build_serialized_network, Runtime.deserialize_cuda_engine, the name-based I/O tensor API and
IExecutionContext.execute_async_v3) and the CUDA runtime/driver C APIs through ctypes, so the
device needs nothing beyond JetPack's TensorRT Python bindings and numpy. It cannot run on this
build host (no GPU): its tests skip naming what they need.

Engine-build options come from the manifest's `lowering.engine_recipe` (written by the TensorRT
lowering with build_engine.sh), then `runtime.options`:
  precision ("fp16" -> FP16, "int8" -> INT8 + FP16 for explicit Q/DQ; else the manifest's
  precision), mem_pool_workspace_mib / workspace_mib, dla_core (or dla_default -> core 0) with
  GPU fallback, input_shapes ({input: {min, opt, max}}; dynamic dims default to 1/1/max_batch),
  max_batch / triton_max_batch_size, builder_optimization_level, strongly_typed, timing_cache
  (kept in the runtime cache next to the engines, per TensorRT version and GPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import numpy as np

from edgeopt.runtime.backends.base import Backend
from edgeopt.runtime.bundle import cache_root, sha256_path
from edgeopt.runtime.errors import BackendUnavailableError, BundleError, OptionError
from edgeopt.runtime.kinds import BackendName, Precision, unreachable
from edgeopt.runtime.spec import TensorSpec

__all__ = ["EngineBuildOptions", "TensorRTBackend", "builder_flags", "engine_cache_dir", "engine_cache_key"]

log = logging.getLogger(__name__)

CUDA_MEMCPY_HOST_TO_DEVICE = 1
CUDA_MEMCPY_DEVICE_TO_HOST = 2
CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MAJOR = 75
CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MINOR = 76


def engine_cache_dir() -> Path:
    """Built engines live under the runtime's cache ($EDGEOPT_CACHE, else ~/.cache/edgeopt)."""
    return cache_root() / "tensorrt"


class ShapeRange(TypedDict):
    """An optimization profile's shapes for one dynamic input."""

    min: list[int]
    opt: list[int]
    max: list[int]


class EngineBuildOptions(TypedDict):
    """What an engine is built with (part of its cache key, and of the benchmark's backend facts)."""

    precision: Precision
    workspace_mib: int
    dla_core: int | None
    gpu_fallback: bool
    input_shapes: dict[str, ShapeRange]
    max_batch: int
    builder_optimization_level: int | None
    strongly_typed: bool
    timing_cache: bool


class TensorRTFacts(TypedDict):
    gpu: str
    engine: str  # the cached engine file
    engine_cached: bool  # False when this load built it
    build_options: EngineBuildOptions


def builder_flags(precision: Precision) -> tuple[str, ...]:
    """The IBuilderConfig flags a precision sets: int8 (explicit Q/DQ) also lets float layers run in fp16."""
    match precision:
        case Precision.FP16:
            return ("FP16",)
        case Precision.INT8:
            return ("FP16", "INT8")
        case (
            Precision.FP32 | Precision.INT8_WEIGHTS | Precision.PALETTIZED_8 | Precision.PALETTIZED_6
            | Precision.PALETTIZED_4
        ):
            return ()
        case _:
            unreachable(precision)


def engine_cache_key(tensorrt_version: str, gpu: str, model_sha256: str, build_options: Mapping[str, object]) -> str:
    """An engine is only valid for the TensorRT version and GPU that built it, and for its inputs."""
    text = json.dumps(
        {"tensorrt": tensorrt_version, "gpu": gpu, "model": model_sha256, "options": build_options},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class _Cuda:
    """The few CUDA runtime calls a TensorRT engine needs, via ctypes on libcudart."""

    def __init__(self) -> None:
        self.runtime = _load_library("cudart")
        self.driver = _load_library("cuda")

    def check(self, status: int, call: str) -> None:
        if status != 0:
            raise BackendUnavailableError(
                f"CUDA call {call} failed with error {status}",
                hint="check that the GPU is visible (nvidia-smi / tegrastats) and that no other process holds it",
            )

    def device_name(self) -> str:
        self.check(self.driver.cuInit(0), "cuInit")
        device = ctypes.c_int()
        self.check(self.driver.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        name = ctypes.create_string_buffer(256)
        self.check(self.driver.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(
            self.runtime.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MAJOR, 0),
            "cudaDeviceGetAttribute",
        )
        self.check(
            self.runtime.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MINOR, 0),
            "cudaDeviceGetAttribute",
        )
        return f"{name.value.decode()} (sm_{major.value}{minor.value})"

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self.runtime.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return int(pointer.value or 0)

    def free(self, pointer: int) -> None:
        self.runtime.cudaFree(ctypes.c_void_p(pointer))

    def stream(self) -> int:
        stream = ctypes.c_void_p()
        self.check(self.runtime.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return int(stream.value or 0)

    def destroy_stream(self, stream: int) -> None:
        self.runtime.cudaStreamDestroy(ctypes.c_void_p(stream))

    def copy(self, destination: int, source: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(
            self.runtime.cudaMemcpyAsync(
                ctypes.c_void_p(destination), ctypes.c_void_p(source), ctypes.c_size_t(nbytes), kind, ctypes.c_void_p(stream)
            ),
            "cudaMemcpyAsync",
        )

    def synchronize(self, stream: int) -> None:
        self.check(self.runtime.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


def _load_library(name: str) -> ctypes.CDLL:
    candidates = [ctypes.util.find_library(name), f"lib{name}.so", f"/usr/local/cuda/lib64/lib{name}.so"]
    for candidate in filter(None, candidates):
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    raise BackendUnavailableError(
        f"backend 'tensorrt' needs the CUDA library lib{name}.so, which is not found here",
        hint="TensorRT runs on an NVIDIA GPU with CUDA; on Jetson: sudo apt install nvidia-jetpack",
    )


class TensorRTBackend(Backend):
    """A TensorRT engine built from the bundle's TensorRT-ready ONNX; `device` is the GPU index (0).

    One execution context, stream and set of device buffers, which TensorRT does not allow two threads
    to use at once: the Model runs one `infer` at a time.
    """

    name: ClassVar[BackendName] = BackendName.TENSORRT
    suffixes: ClassVar[tuple[str, ...]] = ()
    modules: ClassVar[tuple[str, ...]] = ("tensorrt",)
    distributions: ClassVar[tuple[str, ...]] = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    default_install_hint: ClassVar[str] = (
        "TensorRT ships with JetPack: sudo apt install nvidia-jetpack (Python bindings: python3-libnvinfer)"
    )

    def activate(self) -> None:
        trt = self.import_library()
        self.trt = trt
        self.cuda = _Cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.gpu = self.cuda.device_name()
        self.engine_path, self.engine_was_cached = self._engine_file()
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise BundleError(
                f"{self.engine_path}: TensorRT could not deserialize the cached engine",
                hint="delete the file; the next load rebuilds it",
            )
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}

    # -- engine build and cache ------------------------------------------------------------
    def build_options(self) -> EngineBuildOptions:
        """The engine recipe: the manifest's lowering.engine_recipe, then runtime.options, then defaults."""
        recipe, options = self.config.recipe, self.config.options

        def pick(*keys: str, default: Any = None) -> Any:
            for source in (recipe, options):
                for key in keys:
                    if source.get(key) is not None:
                        return source[key]
            return default

        dla_core = pick("dla_core")
        if dla_core is None and pick("dla_default", default=False):
            dla_core = 0
        precision = pick("precision", default=self.config.precision or Precision.FP32)
        try:
            precision = Precision(precision)
        except ValueError:
            raise OptionError(
                f"TensorRT engine precision {precision!r} is not one of {', '.join(p.value for p in Precision)}",
                hint="fix `precision` in the bundle's lowering.engine_recipe or runtime options",
            ) from None
        return {
            "precision": precision,
            "workspace_mib": int(pick("workspace_mib", "mem_pool_workspace_mib", default=1024)),
            "dla_core": dla_core,
            "gpu_fallback": bool(pick("gpu_fallback", default=True)),
            "input_shapes": pick("input_shapes", default={}),
            "max_batch": max(int(pick("max_batch", "triton_max_batch_size", default=1) or 1), 1),
            "builder_optimization_level": pick("builder_optimization_level"),
            "strongly_typed": bool(pick("strongly_typed", default=False)),
            "timing_cache": bool(pick("timing_cache", default=True)),
        }

    def _engine_file(self) -> tuple[Path, bool]:
        options = self.build_options()
        model_sha = self.config.model_sha256 or sha256_path(self.model_path)
        key = engine_cache_key(self.trt.__version__, self.gpu, model_sha, options)
        path = engine_cache_dir() / f"{self.model_path.stem}-{key}.engine"
        if path.is_file():
            return path, True
        serialized = self._build(options)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as handle:
            handle.write(serialized)
        os.replace(handle.name, path)
        return path, False

    def _build(self, options: EngineBuildOptions) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if options["strongly_typed"] else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(
                f"{self.model_path}: TensorRT's ONNX parser rejected the model: {errors}",
                hint="rebuild the bundle for jetson-orin with this TensorRT version's op support",
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mib"] << 20)
        if not options["strongly_typed"]:
            for flag in builder_flags(options["precision"]):
                config.set_flag(getattr(trt.BuilderFlag, flag))
        if options["dla_core"] is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(options["dla_core"])
            if options["gpu_fallback"]:
                config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        if options["builder_optimization_level"] is not None:
            config.builder_optimization_level = int(options["builder_optimization_level"])
        profile_shapes = self._profile_shapes(network, options)
        if profile_shapes:
            profile = builder.create_optimization_profile()
            for name, (low, optimum, high) in profile_shapes.items():
                profile.set_shape(name, low, optimum, high)
            config.add_optimization_profile(profile)
        timing_file = engine_cache_dir() / f"timing-{engine_cache_key(trt.__version__, self.gpu, '', {})}.cache"
        if options["timing_cache"]:
            cache = config.create_timing_cache(timing_file.read_bytes() if timing_file.is_file() else b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        log.info("building a TensorRT engine for %s on %s (one-time, cached)", self.model_path.name, self.gpu)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BundleError(
                f"{self.model_path}: TensorRT could not build an engine (see TensorRT's log above)",
                hint="try a larger workspace_mib or precision fp16 in the bundle's runtime options",
            )
        if options["timing_cache"]:
            timing_file.parent.mkdir(parents=True, exist_ok=True)
            timing_file.write_bytes(bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    @staticmethod
    def _profile_shapes(network: Any, options: EngineBuildOptions) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max per dynamic input: from input_shapes, else 1 / 1 / max_batch for each dynamic dim."""
        shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            dims = tuple(tensor.shape)
            given = options["input_shapes"].get(tensor.name)
            if given is not None:
                shapes[tensor.name] = (tuple(given["min"]), tuple(given["opt"]), tuple(given["max"]))
            elif any(d < 0 for d in dims):
                one = tuple(1 if d < 0 else d for d in dims)
                shapes[tensor.name] = (one, one, tuple(options["max_batch"] if d < 0 else d for d in dims))
        return shapes

    # -- metadata and inference ------------------------------------------------------------
    def _specs(self, names: list[str]) -> list[TensorSpec]:
        return [
            TensorSpec(
                name=n,
                shape=tuple(None if d < 0 else int(d) for d in self.engine.get_tensor_shape(n)),
                dtype=self._dtypes[n].name,
            )
            for n in names
        ]

    def input_metadata(self) -> list[TensorSpec]:
        return self._specs(self._input_names)

    def output_metadata(self) -> list[TensorSpec]:
        return self._specs(self._output_names)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        """A device buffer per tensor, grown when a larger shape arrives."""
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self.cuda.free(pointer)
            pointer, size = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (pointer, size)
            self.context.set_tensor_address(name, pointer)
        return pointer

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context, stream = self.cuda, self.context, self.stream
        for name in self._input_names:
            value = np.ascontiguousarray(feeds[name])
            context.set_input_shape(name, value.shape)
            pointer = self._device_buffer(name, value.nbytes)
            cuda.copy(pointer, value.ctypes.data, value.nbytes, CUDA_MEMCPY_HOST_TO_DEVICE, stream)
        outputs: dict[str, np.ndarray] = {}
        for name in self._output_names:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self._dtypes[name])
            self._device_buffer(name, outputs[name].nbytes)
        if not context.execute_async_v3(stream):
            raise BackendUnavailableError(
                f"{self.model_path.name}: TensorRT execution failed (see TensorRT's log above)",
                hint="check the input shapes against the engine's optimization profile",
            )
        for name, host in outputs.items():
            cuda.copy(host.ctypes.data, self._buffers[name][0], host.nbytes, CUDA_MEMCPY_DEVICE_TO_HOST, stream)
        cuda.synchronize(stream)
        return outputs

    def raw_call(self) -> tuple[Any, Any]:
        return self.infer, lambda feeds: (feeds,)

    def deactivate(self) -> None:
        for pointer, _ in self._buffers.values():
            self.cuda.free(pointer)
        self.cuda.destroy_stream(self.stream)
        del self.context, self.engine, self._buffers

    def facts(self) -> TensorRTFacts:
        return {
            "gpu": self.gpu,
            "engine": str(self.engine_path),
            "engine_cached": self.engine_was_cached,
            "build_options": self.build_options(),
        }

