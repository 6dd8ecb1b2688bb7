"""Benchmark a loaded model: latency percentiles, throughput, memory and the machine's facts.

One result shape for every backend (runtime/benchmark.schema.json), so results from a laptop, a
Raspberry Pi and a Jetson compare field by field. Latency is wall time around Model.predict,
so it includes the runtime's own checks and (de)quantization, as an application sees it.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from edgeopt.runtime.bundle import SCHEMA_VERSION
from edgeopt.runtime.device import DeviceFacts, ThermalFacts, device_facts, thermal_facts
from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.layer_timings import LayerProfile, LayerProfileDocument, profile_layers
from edgeopt.runtime.memory import current_rss_bytes, peak_rss_bytes
from edgeopt.runtime.spec import TensorSpecDocument

if TYPE_CHECKING:
    from edgeopt.runtime.model import Model

__all__ = ["BenchmarkedBackend", "BenchmarkedModel", "BenchmarkResult", "benchmark_schema", "run_benchmark", "synthetic_inputs"]

BENCHMARK_SCHEMA_VERSION = SCHEMA_VERSION


class BenchmarkedModel(TypedDict):
    """Which model ran: its bundle name (or file stem), where it came from, and what the manifest says."""

    name: str
    source: str
    artifact: str
    target: str | None
    precision: str | None
    sha256: str | None


class BenchmarkedBackend(TypedDict):
    """Which backend ran it; `stand_in_for` and `note` when it only stood in for the bundle's own."""

    name: BackendName
    version: str | None
    facts: Mapping[str, object]
    stand_in_for: BackendName | None
    note: str | None


class LatencyFigures(TypedDict):
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float


@dataclass
class BenchmarkResult:
    """A benchmark run. `to_dict()` matches runtime/benchmark.schema.json."""

    model: BenchmarkedModel
    backend: BenchmarkedBackend
    threads: int | None
    inputs: list[TensorSpecDocument]
    warmup: int
    runs: int
    duration_s: float
    load_ms: float
    bundle_check_ms: float
    first_inference_ms: float | None
    latency_ms: LatencyFigures
    throughput_per_s: float
    memory: dict[str, int | None]
    samples_ms: list[float]
    libraries: dict[str, str | None]
    device: DeviceFacts
    thermal_after: ThermalFacts
    input_source: str
    warnings: list[str]
    #: per-layer times from the backend's profiler (`layers=True`), else None
    layers: LayerProfileDocument | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema_version: str = BENCHMARK_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (runtime/benchmark.schema.json); enum members are str, written as their value."""
        return asdict(self)

    def format_text(self) -> str:
        """A short human summary; the JSON carries everything."""
        latency = self.latency_ms
        memory = self.memory
        cpu = (self.device.get("cpu") or {}).get("model") or "unknown CPU"
        lines = [
            f"{self.model['name']} on {self.backend['name']} {self.backend.get('version') or ''}".rstrip()
            + (f" (stand-in for {self.backend['stand_in_for']})" if self.backend.get("stand_in_for") else "")
            + f"  ({cpu}, threads {self.threads or 'default'})",
            f"  load            {self.load_ms:9.2f} ms   (bundle check {self.bundle_check_ms:.2f} ms)",
            f"  first inference {_ms(self.first_inference_ms)}",
            f"  latency p50     {latency['p50']:9.3f} ms   p90 {latency['p90']:.3f}   p99 {latency['p99']:.3f}",
            f"          mean    {latency['mean']:9.3f} ms   std {latency['std']:.3f}   min {latency['min']:.3f}   max {latency['max']:.3f}",
            f"  throughput      {self.throughput_per_s:9.1f} /s    ({self.runs} runs after {self.warmup} warm-up, {self.duration_s:.2f} s)",
            f"  peak RSS        {_mib(memory.get('peak_rss_bytes'))}   load delta {_mib(memory.get('load_delta_bytes'))}",
        ]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        if self.layers is not None:
            lines.append(LayerProfile.from_dict(self.layers).format_text())
        return "\n".join(lines)


def benchmark_schema() -> dict[str, Any]:
    """The JSON Schema every BenchmarkResult.to_dict() satisfies (shipped next to this module)."""
    text = importlib.resources.files("edgeopt.runtime").joinpath("benchmark.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _ms(value: float | None) -> str:
    return "      n/a" if value is None else f"{value:9.2f} ms"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def synthetic_inputs(model: "Model", seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped like the model's (dynamic dims = 1): normal floats, zeros for integer inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f" or spec.quantization:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32 if dtype.kind != "f" else dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _reference_inputs(model: "Model") -> dict[str, np.ndarray] | None:
    """The bundle's first reference sample: real data makes data-dependent kernels honest."""
    from edgeopt.runtime.errors import BundleError
    from edgeopt.runtime.verify import reference_batches

    if model.bundle is None or not model.bundle.reference:
        return None
    try:
        calls, _, _, _ = reference_batches(model)
    except BundleError:
        return None
    return calls[0] if calls else None


def run_benchmark(
    model: "Model",
    *,
    warmup: int = 10,
    runs: int = 100,
    duration: float | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    layers: bool = False,
    layer_runs: int = 20,
) -> BenchmarkResult:
    """Time `runs` predict calls after `warmup` (or as many as fit in `duration` seconds).

    With `layers`, then `layer_runs` runs on the backend's profiler (runtime/layer_timings.py) give
    the per-layer table in `layers`; the latency figures are taken before, without the profiler.
    """
    if runs < 1 or warmup < 0:
        raise OptionError(f"runs must be >= 1 and warmup >= 0, got runs={runs} warmup={warmup}", hint="e.g. --runs 100 --warmup 10")
    if duration is not None and not 0 < duration < math.inf:
        raise OptionError(f"duration must be a positive number of seconds, got {duration}")
    device = device_facts()
    if inputs is not None:
        feeds, source = dict(inputs), "given"
    else:
        reference = _reference_inputs(model)
        feeds, source = (reference, "reference") if reference is not None else (synthetic_inputs(model), "synthetic")
    predict = model.predict
    if model.first_inference_seconds is None:
        predict(feeds)
    for _ in range(warmup):
        predict(feeds)
    clock = time.perf_counter_ns
    samples: list[int] = []
    started = clock()
    if duration is not None:
        deadline = started + int(duration * 1e9)
        while True:
            before = clock()
            predict(feeds)
            after = clock()
            samples.append(after - before)
            if after >= deadline:
                break
    else:
        for _ in range(runs):
            before = clock()
            predict(feeds)
            samples.append(clock() - before)
    elapsed_s = (clock() - started) / 1e9
    samples_ms = np.asarray(samples, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
    layer_profile = profile_layers(model, feeds, runs=layer_runs, warmup=min(warmup, 3)).to_dict() if layers else None
    rss_before, rss_after = model.rss_before_load, model.rss_after_load
    backend_facts = model.backend_facts()
    return BenchmarkResult(
        model={
            "name": model.bundle.name if model.bundle is not None else model.model_path.stem,
            "source": str(model.source),
            "artifact": model.model_path.name,
            "target": ((model.manifest or {}).get("target") or {}).get("name"),
            "precision": (model.manifest or {}).get("precision"),
            "sha256": model.bundle.model_sha256 if model.bundle is not None else None,
        },
        backend={
            "name": model.backend,
            "version": model.backend_version,
            "facts": backend_facts,
            "stand_in_for": model.stand_in.replaces if model.stand_in is not None else None,
            "note": model.stand_in.note if model.stand_in is not None else None,
        },
        threads=model.threads,
        inputs=[spec.to_dict() for spec in model.inputs],
        warmup=warmup,
        runs=len(samples),
        duration_s=elapsed_s,
        load_ms=model.load_seconds * 1e3,
        bundle_check_ms=model.bundle_check_seconds * 1e3,
        first_inference_ms=None if model.first_inference_seconds is None else model.first_inference_seconds * 1e3,
        latency_ms={
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "mean": float(samples_ms.mean()),
            "std": float(samples_ms.std()),
            "min": float(samples_ms.min()),
            "max": float(samples_ms.max()),
        },
        throughput_per_s=len(samples) / float(samples_ms.sum() / 1e3) if samples_ms.sum() > 0 else 0.0,
        memory={
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_bytes": current_rss_bytes(),
            "rss_before_load_bytes": rss_before,
            "rss_after_load_bytes": rss_after,
            "load_delta_bytes": None if rss_before is None or rss_after is None else rss_after - rss_before,
        },
        samples_ms=[round(float(s), 6) for s in samples_ms],
        libraries={
            "python": platform.python_version(),
            "numpy": np.__version__,
            model.backend: model.backend_version,
        },
        device=device,
        thermal_after=thermal_facts(),
        input_source=source,
        warnings=list(model.warnings),
        layers=layer_profile,
    )
