"""`load` a bundle or a bare artifact and get a Model: checked inputs, float in and float out.

`Model.predict` may be called from several threads at once, on every backend: backends whose
library call is thread-safe run concurrently (ONNX Runtime; OpenVINO with an infer request per
thread), the others one call at a time behind a lock per model (LiteRT, Core ML, TensorRT; see
`Backend.thread_safe_infer`). `reload` and `close` must not race with predict.

The predict path is kept lean on purpose (the runtime-overhead benchmark holds it to tens of
microseconds): everything that can be decided once — names, dtypes, static shapes, quantization
constants — is decided in `Model.__init__`, and `predict` only compares and converts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.runtime.backends import (
    STAND_INS,
    Backend,
    BackendConfig,
    StandIn,
    backend_class,
    backend_for_file,
    parse_backend_name,
)
from edgeopt.runtime.bundle import Bundle, is_bundle, open_bundle
from edgeopt.runtime.errors import BackendUnavailableError, BundleError, EdgeoptError, InputSpecError
from edgeopt.runtime.isa import isa_mismatch
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.memory import current_rss_bytes
from edgeopt.runtime.spec import TensorSpec

if TYPE_CHECKING:
    from edgeopt.runtime.benchmark import BenchmarkResult
    from edgeopt.runtime.verify import VerifyResult

__all__ = ["Model", "isa_warnings", "load", "toolchain_warnings"]

log = logging.getLogger(__name__)


def load(
    path: str | os.PathLike[str],
    backend: BackendName | str | None = None,
    threads: int | None = None,
    device: str | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    allow_stand_in: bool = False,
) -> "Model":
    """Load a bundle folder, a .tar.gz bundle, or a bare .onnx/.tflite/.xml/.mlpackage.

    The backend comes from the manifest's runtime.backend (bundles) or the file type; `backend`
    overrides it (e.g. "onnxruntime" to run a jetson-orin bundle's model.onnx on a host).
    `threads`, `device` and `options` override the manifest's runtime defaults.
    With `allow_stand_in` (verify and bench), a device backend that cannot run here and was not
    named is replaced by its stand-in (STAND_INS: Core ML -> coreml-reference, TensorRT ->
    onnxruntime); a model on a stand-in, named or not, says so in `stand_in` and `warnings`.
    """
    source = Path(path)
    named = parse_backend_name(backend) if backend is not None else None
    rss_before = current_rss_bytes()
    started = time.perf_counter()
    bundle: Bundle | None = None
    if is_bundle(source):
        bundle = open_bundle(source)
        model_path = bundle.model_path
        name = named or bundle.backend
        config = BackendConfig(
            threads=threads if threads is not None else bundle.threads,
            device=device,
            options={**bundle.options, **(options or {})},
            precision=bundle.precision,
            model_sha256=bundle.model_sha256,
            install_hint=bundle.install_hint if name == bundle.backend else None,
            recipe=(bundle.manifest.get("lowering") or {}).get("engine_recipe"),
        )
    else:
        if not source.exists():
            raise BundleError(f"{source}: no such file or folder", hint="pass a bundle folder, a .tar.gz bundle or a model file")
        if source.is_dir() and source.suffix.lower() != ".mlpackage":
            raise BundleError(f"{source}: folder without manifest.json", hint="pass the bundle folder `edgeopt build` wrote")
        model_path = source
        name = named or backend_for_file(source)
        config = BackendConfig(threads=threads, device=device, options=options)
    checked = time.perf_counter()
    intended = bundle.backend if bundle is not None else name if named is None else _file_backend(source)
    stand_in = STAND_INS.get(intended)
    reason = None
    try:
        runner = _start(name, model_path, config)
    except BackendUnavailableError as missing:
        if named is not None or not allow_stand_in or stand_in is None:
            raise
        runner = _start_stand_in(stand_in, missing, model_path, config)
        reason = f"{name} cannot run here: {missing.message}"
    loaded = time.perf_counter()
    try:
        return Model(
            runner,
            bundle=bundle,
            source=source,
            load_seconds=loaded - checked,
            bundle_check_seconds=checked - started,
            rss_before_load=rss_before,
            rss_after_load=current_rss_bytes(),
            stand_in=stand_in if stand_in is not None and runner.name == stand_in.backend else None,
            stand_in_reason=reason,
        )
    except BaseException:
        runner.close()
        raise


def _file_backend(source: Path) -> BackendName | None:
    """The backend a bare file's suffix names, or None when no backend claims it."""
    try:
        return backend_for_file(source)
    except BundleError:
        return None


def _start(name: BackendName, model_path: Path, config: BackendConfig) -> Backend:
    """The backend `name`, activated on `model_path`; a library that refuses the artifact is a BundleError."""
    runner = backend_class(name)(model_path, config)
    try:
        runner.__enter__()
    except EdgeoptError:
        raise
    except Exception as error:  # the library refused the artifact: say which file and which library
        raise BundleError(
            f"{model_path}: {name} could not load it ({type(error).__name__}: {' '.join(str(error).split())[:400]})",
            hint="check that the file is a complete model for this backend, or rebuild the bundle",
        ) from error
    return runner


def _start_stand_in(stand_in: StandIn, missing: BackendUnavailableError, model_path: Path, config: BackendConfig) -> Backend:
    """The stand-in backend; when it cannot run either, one error that names both."""
    config.install_hint = None  # the manifest's install command is the device backend's
    try:
        return _start(stand_in.backend, model_path, config)
    except BackendUnavailableError as also_missing:
        raise BackendUnavailableError(
            f"{missing.message}; its stand-in {stand_in.backend} cannot run either: {also_missing.message}",
            hint=also_missing.hint or missing.hint,
        ) from None


class _Quantization:
    """float <-> integer with a scale and zero point (per tensor, or per channel along `axis`)."""

    __slots__ = ("scale", "zero_point", "dtype", "low", "high")

    def __init__(self, spec: TensorSpec, dtype: np.dtype, rank: int) -> None:
        raw = spec.quantization or {}
        scale = np.asarray(raw["scale"], dtype=np.float32)
        zero_point = np.asarray(raw.get("zero_point", 0), dtype=np.float32)
        if scale.ndim == 1 and scale.size > 1:
            axis = raw.get("axis", 1 if spec.layout == "NCHW" else -1) % max(rank, 1)
            broadcast = [1] * rank
            broadcast[axis] = scale.size
            scale = scale.reshape(broadcast)
            zero_point = np.broadcast_to(zero_point, (scale.size,)).reshape(broadcast)
        self.scale = scale
        self.zero_point = zero_point
        self.dtype = dtype
        info = np.iinfo(dtype)
        self.low, self.high = float(info.min), float(info.max)

    def quantize(self, value: np.ndarray) -> np.ndarray:
        """q = clip(round(x / scale) + zero_point), rounding half to even as ONNX QuantizeLinear does."""
        scaled = np.divide(value, self.scale, dtype=np.float32)
        np.rint(scaled, out=scaled)
        scaled += self.zero_point
        np.clip(scaled, self.low, self.high, out=scaled)
        return scaled.astype(self.dtype)

    def dequantize(self, value: np.ndarray) -> np.ndarray:
        """x = (q - zero_point) * scale."""
        result = value.astype(np.float32)
        result -= self.zero_point
        result *= self.scale
        return result


class _InputPlan:
    """Everything predict needs to check and convert one input, decided once."""

    __slots__ = ("spec", "feed_name", "dtype", "shape", "static_shape", "quantization")

    def __init__(self, spec: TensorSpec, feed_name: str) -> None:
        self.spec = spec
        self.feed_name = feed_name
        self.dtype = np.dtype(spec.dtype)
        self.shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in spec.shape)
        self.static_shape = self.shape if None not in self.shape else None
        integer = self.dtype.kind in "iu"
        self.quantization = _Quantization(spec, self.dtype, len(self.shape)) if integer and spec.quantization else None

    def prepare(self, value: Any, raw: bool) -> np.ndarray:
        if type(value) is not np.ndarray:
            value = np.asarray(value)
        if value.shape != self.static_shape and not self._shape_matches(value.shape):
            raise self._error(f"has shape {value.shape}")
        if self.quantization is not None and not raw:
            if value.dtype.kind != "f":
                raise self._error(f"is {value.dtype}; this input takes float values (quantized for you), or pass raw=True with {self.dtype}")
            return self.quantization.quantize(value)
        if value.dtype != self.dtype:
            if value.dtype.kind == "f" and self.dtype.kind == "f":
                return value.astype(self.dtype)
            raise self._error(f"is {value.dtype}")
        return value

    def _shape_matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(e is None or e == d for e, d in zip(self.shape, shape))

    def _error(self, problem: str) -> InputSpecError:
        expected = self.spec.to_dict()
        return InputSpecError(
            f"input '{self.spec.name}' {problem}; expected shape {expected['shape']} dtype "
            f"{self.spec.dtype if self.quantization is None else 'float (quantized to ' + self.spec.dtype + ')'}",
            hint="reshape or cast the array to match (see Model.inputs)",
        )


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def toolchain_warnings(bundle: Bundle, backend: Backend) -> list[str]:
    """Differences between the library that verified the bundle and the one running it here.

    Not errors: a device rarely has the build host's exact version. They are reported (logged,
    and carried in benchmark results) so a parity failure can be traced to its cause.
    """
    toolchain = bundle.manifest.get("toolchain") or {}
    installed = backend.library_distribution()
    if installed is None:
        return []
    name, version = installed
    key = name.replace("-", "_")
    recorded = toolchain.get(key)
    if recorded is None:
        others = [f"{d.replace('-', '_')} {toolchain[d.replace('-', '_')]}" for d in backend.distributions if d.replace("-", "_") in toolchain]
        return [f"the bundle was verified with {', '.join(others)}; this machine runs {name} {version}"] if others else []
    if _major_minor(str(recorded)) != _major_minor(version):
        return [f"the bundle was built with {key} {recorded}; this machine runs {version} (run verify to check parity)"]
    return []


def isa_warnings(bundle: Bundle, backend: Backend) -> list[str]:
    """A warning when this CPU's int8 arithmetic differs from the CPU class the bundle was built for."""
    warning = isa_mismatch((bundle.manifest.get("target") or {}).get("isa"), backend.name)
    return [warning] if warning else []


def _pair(declared: list[TensorSpec], actual: list[TensorSpec], kind: str, where: Path) -> list[tuple[TensorSpec, TensorSpec]]:
    """Match the manifest's specs with the backend's: by name, else by position."""
    by_name = {spec.name: spec for spec in actual}
    if all(spec.name in by_name for spec in declared) and len(declared) == len(actual):
        return [(spec, by_name[spec.name]) for spec in declared]
    if len(declared) == len(actual):
        return list(zip(declared, actual))
    raise BundleError(
        f"{where}: manifest lists {len(declared)} {kind} but the model has {len(actual)} "
        f"({', '.join(s.name for s in actual)})",
        hint="rebuild the bundle with `edgeopt build`",
    )


def _merge(declared: TensorSpec, actual: TensorSpec) -> TensorSpec:
    """The user's view: the manifest's name, shape, layout and scales on the artifact's real dtype."""
    integer = np.dtype(actual.dtype).kind in "iu"
    quantization = (declared.quantization or actual.quantization) if integer else None
    shape = declared.shape if len(declared.shape) == len(actual.shape) else actual.shape
    return TensorSpec(declared.name, tuple(shape), actual.dtype, declared.layout or actual.layout, quantization)


def _thread_safe(backend: Backend) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """`backend.infer`, behind a lock of its own unless the backend says its infer is thread-safe."""
    if backend.thread_safe_infer:
        return backend.infer
    lock = threading.Lock()
    infer = backend.infer

    def infer_one_at_a_time(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with lock:
            return infer(feeds)

    return infer_one_at_a_time


class Model:
    """A loaded model: `predict`, `benchmark`, `verify`; close it (or use `with`) to free the backend.

    `predict` (and `model(x)`) is safe to call from several threads on every backend.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bundle: Bundle | None,
        source: Path,
        load_seconds: float,
        bundle_check_seconds: float = 0.0,
        rss_before_load: int | None = None,
        rss_after_load: int | None = None,
        stand_in: StandIn | None = None,
        stand_in_reason: str | None = None,
    ) -> None:
        self._backend = backend
        #: set when this model runs on a stand-in for the bundle's backend (its figures are not the device's)
        self.stand_in = stand_in
        self.bundle = bundle
        self.source = source
        self.load_seconds = load_seconds
        self.bundle_check_seconds = bundle_check_seconds
        self.rss_before_load = rss_before_load
        self.rss_after_load = rss_after_load
        self.first_inference_seconds: float | None = None
        self.warnings = [*toolchain_warnings(bundle, backend), *isa_warnings(bundle, backend)] if bundle is not None else []
        if stand_in is not None:
            self.warnings.insert(0, stand_in.note if stand_in_reason is None else f"{stand_in.note} ({stand_in_reason})")
        for warning in self.warnings:
            log.warning("%s: %s", source, warning)
        backend_inputs, backend_outputs = backend.input_metadata(), backend.output_metadata()
        if bundle is not None:
            input_pairs = _pair(bundle.inputs, backend_inputs, "inputs", bundle.root)
            output_pairs = _pair(bundle.outputs, backend_outputs, "outputs", bundle.root)
        else:
            input_pairs = [(spec, spec) for spec in backend_inputs]
            output_pairs = [(spec, spec) for spec in backend_outputs]
        self._plans = [_InputPlan(_merge(d, a), a.name) for d, a in input_pairs]
        self._inputs = tuple(plan.spec for plan in self._plans)
        self._input_names = frozenset(spec.name for spec in self._inputs)
        merged_outputs = [(_merge(d, a), a.name) for d, a in output_pairs]
        self._outputs = tuple(spec for spec, _ in merged_outputs)
        self._renamed = any(spec.name != feed for spec, feed in merged_outputs) or any(
            p.spec.name != p.feed_name for p in self._plans
        )
        self._output_map = [(feed, spec.name) for spec, feed in merged_outputs]
        self._dequantize = [
            (spec.name, _Quantization(spec, np.dtype(spec.dtype), len(spec.shape)))
            for spec, _ in merged_outputs
            if spec.quantization and np.dtype(spec.dtype).kind in "iu"
        ]
        self._single_input = self._plans[0].spec.name if len(self._plans) == 1 else None
        self._run = _thread_safe(backend)
        self._infer = self._first_infer

    # -- description -----------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def backend(self) -> BackendName:
        return self._backend.name

    @property
    def backend_version(self) -> str | None:
        return self._backend.library_version()

    @property
    def threads(self) -> int | None:
        return self._backend.config.threads

    @property
    def model_path(self) -> Path:
        return self._backend.model_path

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.bundle.manifest if self.bundle is not None else None

    @property
    def runner(self) -> Backend:
        """The backend object (session, compiled model, interpreter) behind this model."""
        return self._backend

    def backend_facts(self) -> Mapping[str, object]:
        return self._backend.facts()

    def __repr__(self) -> str:
        return f"Model({str(self.source)!r}, backend={self.backend.value!r}, inputs={[s.name for s in self._inputs]})"

    # -- inference -------------------------------------------------------------------------
    def predict(self, inputs: Mapping[str, Any] | np.ndarray, raw: bool = False) -> dict[str, np.ndarray]:
        """Run once. `inputs` maps input names to arrays (or is one array for a one-input model).

        Integer-I/O artifacts take and return floats (quantized with the manifest's scales);
        `raw=True` passes and returns the artifact's own integer tensors.
        """
        if not isinstance(inputs, Mapping):
            if self._single_input is None:
                raise InputSpecError(
                    f"this model has {len(self._plans)} inputs ({', '.join(self._input_names)}); pass a dict",
                    hint="model.predict({'name': array, ...})",
                )
            inputs = {self._single_input: inputs}
        outputs = self._infer(self.prepare(inputs, raw))
        if self._renamed:
            outputs = {name: outputs[feed] for feed, name in self._output_map}
        if not raw:
            for name, quantization in self._dequantize:
                outputs[name] = quantization.dequantize(outputs[name])
        return outputs

    def prepare(self, inputs: Mapping[str, Any], raw: bool = False) -> dict[str, np.ndarray]:
        """The feeds the backend's library takes for `inputs`: checked, in the artifact's names and dtypes
        (quantized unless `raw`). `predict` runs these; a profiler runs them on its own session."""
        if inputs.keys() != self._input_names:
            raise self._name_error(inputs)
        return {plan.feed_name: plan.prepare(inputs[plan.spec.name], raw) for plan in self._plans}

    def __call__(self, x: Mapping[str, Any] | np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """model(x): the output array for a one-output model, else the dict predict returns."""
        outputs = self.predict(x)
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        return outputs

    def _first_infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The first call is timed on its own (lazy allocation, kernel selection), then replaced."""
        started = time.perf_counter()
        outputs = self._run(feeds)
        self.first_inference_seconds = time.perf_counter() - started
        self._infer = self._run
        return outputs

    def _name_error(self, inputs: Mapping[str, Any]) -> InputSpecError:
        missing = sorted(self._input_names - inputs.keys())
        unknown = sorted(set(inputs.keys()) - self._input_names)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(map(str, unknown))}")
        expected = "; ".join(f"{s.name}: {s.to_dict()['shape']} {s.dtype}" for s in self._inputs)
        return InputSpecError(f"inputs do not match the model ({', '.join(parts)}); expected {expected}", hint="see Model.inputs")

    # -- measuring and checking ------------------------------------------------------------
    def benchmark(
        self,
        warmup: int = 10,
        runs: int = 100,
        duration: float | None = None,
        threads: int | None = None,
        inputs: Mapping[str, np.ndarray] | None = None,
        layers: bool = False,
        layer_runs: int = 20,
    ) -> "BenchmarkResult":
        """Latency percentiles, throughput and memory on this machine; see BenchmarkResult.
        `layers` adds per-layer times from the backend's profiler over `layer_runs` runs."""
        from edgeopt.runtime.benchmark import run_benchmark

        if threads is not None and threads != self.threads:
            self.reload(threads=threads)
        return run_benchmark(self, warmup=warmup, runs=runs, duration=duration, inputs=inputs, layers=layers, layer_runs=layer_runs)

    def verify(self) -> "VerifyResult":
        """Run the bundle's reference inputs and compare with its stored outputs at its tolerance."""
        from edgeopt.runtime.verify import verify_model

        return verify_model(self)

    def reload(self, *, threads: int | None = None) -> None:
        """Re-create the backend (e.g. with another thread count); load and first-inference times are re-measured."""
        config = self._backend.config
        config.threads = threads
        self._backend.close()
        rss_before = current_rss_bytes()
        started = time.perf_counter()
        self._backend = type(self._backend)(self._backend.model_path, config)
        self._backend.__enter__()
        self.load_seconds = time.perf_counter() - started
        self.rss_before_load, self.rss_after_load = rss_before, current_rss_bytes()
        self.first_inference_seconds = None
        self._run = _thread_safe(self._backend)
        self._infer = self._first_infer

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
