"""Where the time goes inside a model: per-kernel times from each backend's own profiler.

Users of trtexec (`--dumpProfile`), OpenVINO's benchmark_app (`-pc`) and TFLite's benchmark_model
(`--enable_op_profiling`) read a table of layers. This module gives the same table for every
backend, in one shape: each kernel the backend ran (a fused kernel is one row), the ONNX node
names it came from, whether it computed in int8 or float, its median time over the profiled runs
and its share of the summed layer time. `LayerProfile.summary()` says what a user looks for
first: "3 layers ran in float and cost 40% of layer time".

Profilers slow a run down and do not see everything (input copies, the runtime's own checks), so
a profile carries the wall time of its own profiled runs and, when a benchmark ran beside it, the
unprofiled median: `coverage` (per profiled run, its summed layer times / its wall time; the median)
and `overhead` (profiled run / unprofiled run) say how far the table can be trusted.

Standard library and numpy only at import time; each backend's library is imported when used.
"""

from __future__ import annotations

import bisect
import enum
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from edgeopt.runtime.errors import BundleError, OptionError
from edgeopt.runtime.kinds import BackendName, unreachable

if TYPE_CHECKING:
    from edgeopt.runtime.model import Model

__all__ = [
    "OnnxNodeMapper",
    "LayerPrecision",
    "LayerProfile",
    "LayerProfileDocument",
    "LayerTiming",
    "LayerTimingDocument",
    "profile_layers",
    "read_onnx_graph",
    "trtexec_layer_profile",
]


class LayerPrecision(str, enum.Enum):
    """What a kernel computes in: int8 arithmetic, float (fp32/fp16/bf16), or no arithmetic at all
    (layout changes, copies, quantize/dequantize conversions: `other`)."""

    INT8 = "int8"
    FLOAT = "float"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


class LayerTimingDocument(TypedDict):
    """One row of the JSON (`layers` in a LayerProfileDocument)."""

    kernel: str  # the backend's name for the kernel (ORT node, OpenVINO layer, TensorRT layer, TFLite op)
    op_type: str  # the backend's op type (QLinearConv, Convolution, CONV_2D, ...)
    implementation: str | None  # which implementation ran (ORT provider, OpenVINO exec_type, TensorRT tactic)
    nodes: list[str]  # the ONNX node names this kernel computes (several when fused; empty when unknown)
    precision: str  # LayerPrecision value
    time_ms: float  # median over the profiled runs
    share: float  # of the summed layer time, 0..1


class LayerProfileDocument(TypedDict):
    """`layers` in a benchmark or profile result (runtime/benchmark.schema.json, $defs/layer_profile)."""

    backend: str
    profiler: str  # which profiler produced it, e.g. "onnxruntime session profiling"
    available: bool  # False: this backend/library exposes no per-layer times here (see `reason`)
    reason: str | None  # why not available, and what would give the figures
    runs: int  # profiled runs the medians are over
    layers: list[LayerTimingDocument]  # slowest first
    layer_total_ms: float | None  # sum of the layers' median times
    profiled_run_ms: float | None  # median wall time of a profiled run
    unprofiled_run_ms: float | None  # median wall time without the profiler (the benchmark's p50), if measured
    coverage: float | None  # median over profiled runs of (the run's summed layer times / its wall time)
    overhead: float | None  # profiled_run_ms / unprofiled_run_ms
    by_precision: dict[str, dict[str, float]]  # precision -> {"layers": n, "time_ms": t, "share": s}
    unmapped_kernels: int  # kernels whose ONNX nodes could not be named
    summary: str
    notes: list[str]


@dataclass(frozen=True)
class LayerTiming:
    """One kernel the backend ran, its ONNX nodes, precision, median time and share of the layer total."""

    kernel: str
    op_type: str
    nodes: tuple[str, ...]
    precision: LayerPrecision
    time_ms: float
    share: float = 0.0
    implementation: str | None = None

    def to_dict(self) -> LayerTimingDocument:
        return {
            "kernel": self.kernel,
            "op_type": self.op_type,
            "implementation": self.implementation,
            "nodes": list(self.nodes),
            "precision": self.precision.value,
            "time_ms": round(self.time_ms, 6),
            "share": round(self.share, 6),
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "LayerTiming":
        return cls(
            kernel=str(document["kernel"]),
            op_type=str(document["op_type"]),
            nodes=tuple(document.get("nodes") or ()),
            precision=LayerPrecision(document["precision"]),
            time_ms=float(document["time_ms"]),
            share=float(document.get("share") or 0.0),
            implementation=document.get("implementation"),
        )


@dataclass
class LayerProfile:
    """The layer table of one backend run; `to_dict()` is the JSON in bench and profile results."""

    backend: str
    profiler: str
    runs: int
    layers: list[LayerTiming]
    profiled_run_ms: float | None = None
    unprofiled_run_ms: float | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    #: median over the profiled runs of (that run's summed layer times / its wall time); see `measured`
    coverage: float | None = None

    @classmethod
    def measured(
        cls,
        backend: str,
        profiler: str,
        runs: int,
        layers: Iterable[LayerTiming],
        *,
        profiled_run_ms: float | None = None,
        unprofiled_run_ms: float | None = None,
        run_coverage: Iterable[float] = (),
        notes: Iterable[str] = (),
    ) -> "LayerProfile":
        """A profile from raw rows: shares are computed here and rows sorted slowest first.

        `run_coverage` holds each profiled run's summed layer time over its wall time; its median is
        the profile's coverage. Without it (trtexec's averages), coverage is the summed layer time
        over `profiled_run_ms`. The per-run ratio is the one to trust on a busy machine: a run that
        was preempted inside some kernel raises that kernel's time in that run only, so the sum of
        per-kernel medians falls below the median run while each run's own layers still cover it.
        """
        rows = [replace(row, time_ms=round(row.time_ms, 6)) for row in layers]  # ns resolution: JSON round trips exactly
        total = sum(row.time_ms for row in rows)
        rows = [replace(row, share=row.time_ms / total if total > 0 else 0.0) for row in rows]
        rows.sort(key=lambda row: (-row.time_ms, row.kernel))
        ratios = list(run_coverage)
        if ratios:
            coverage: float | None = float(np.median(ratios))
        else:
            coverage = total / profiled_run_ms if profiled_run_ms else None
        return cls(
            backend=backend, profiler=profiler, runs=runs, layers=rows, profiled_run_ms=profiled_run_ms,
            unprofiled_run_ms=unprofiled_run_ms, notes=list(notes), coverage=coverage,
        )

    @classmethod
    def unavailable(cls, backend: str, profiler: str, reason: str) -> "LayerProfile":
        """No per-layer figures on this backend here; `reason` says why and what would give them."""
        return cls(backend=backend, profiler=profiler, runs=0, layers=[], reason=reason)

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def layer_total_ms(self) -> float | None:
        return sum(row.time_ms for row in self.layers) if self.available else None

    @property
    def overhead(self) -> float | None:
        if not self.profiled_run_ms or not self.unprofiled_run_ms:
            return None
        return self.profiled_run_ms / self.unprofiled_run_ms

    def by_precision(self) -> dict[str, dict[str, float]]:
        """precision -> layers, summed median time and share of the layer total (only precisions present)."""
        groups: dict[str, dict[str, float]] = {}
        for row in self.layers:
            group = groups.setdefault(row.precision.value, {"layers": 0, "time_ms": 0.0})
            group["layers"] += 1
            group["time_ms"] += row.time_ms
        total = sum(row.time_ms for row in self.layers)
        return {
            key: {"layers": int(v["layers"]), "time_ms": round(v["time_ms"], 6), "share": round(v["time_ms"] / total, 6) if total > 0 else 0.0}
            for key, v in groups.items()
        }

    def summary(self) -> str:
        """One line: what ran in float and what it cost, e.g. '3 of 52 layers ran in float and cost 40% of layer time'."""
        if not self.available:
            return f"no layer timings on {self.backend}: {self.reason}"
        if not self.layers:
            return f"{self.backend}: the profiler reported no layers"
        groups = self.by_precision()
        total = len(self.layers)
        floats = groups.get(LayerPrecision.FLOAT.value)
        int8 = groups.get(LayerPrecision.INT8.value)
        if floats and int8:
            return (
                f"{floats['layers']} of {total} layers ran in float and cost {floats['share']:.0%} of layer time; "
                f"{int8['layers']} int8 layers {int8['share']:.0%}"
            )
        if int8:
            return f"all {int8['layers']} compute layers ran in int8 ({int8['share']:.0%} of layer time; the rest moves data)"
        if floats:
            return f"no int8 layers: {floats['layers']} of {total} layers ran in float ({floats['share']:.0%} of layer time)"
        return f"{total} layers, none computing (data movement only)"

    def top(self, count: int = 5) -> list[LayerTiming]:
        return self.layers[:count]

    def unmapped_kernels(self) -> int:
        return sum(1 for row in self.layers if not row.nodes)

    def to_dict(self) -> LayerProfileDocument:
        return {
            "backend": self.backend,
            "profiler": self.profiler,
            "available": self.available,
            "reason": self.reason,
            "runs": self.runs,
            "layers": [row.to_dict() for row in self.layers],
            "layer_total_ms": _rounded(self.layer_total_ms),
            "profiled_run_ms": _rounded(self.profiled_run_ms),
            "unprofiled_run_ms": _rounded(self.unprofiled_run_ms),
            "coverage": _rounded(self.coverage),
            "overhead": _rounded(self.overhead),
            "by_precision": self.by_precision(),
            "unmapped_kernels": self.unmapped_kernels(),
            "summary": self.summary(),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "LayerProfile":
        return cls(
            backend=str(document["backend"]),
            profiler=str(document["profiler"]),
            runs=int(document["runs"]),
            layers=[LayerTiming.from_dict(row) for row in document.get("layers") or ()],
            profiled_run_ms=document.get("profiled_run_ms"),
            unprofiled_run_ms=document.get("unprofiled_run_ms"),
            reason=document.get("reason"),
            notes=list(document.get("notes") or ()),
            coverage=document.get("coverage"),
        )

    def format_text(self, top: int = 10) -> str:
        """The summary, coverage and overhead, then the slowest `top` layers as a table."""
        lines = [f"layers ({self.profiler}): {self.summary()}"]
        if not self.available:
            return "\n".join(lines)
        figures = [f"{len(self.layers)} kernels over {self.runs} profiled runs"]
        if self.layer_total_ms is not None:
            figures.append(f"sum {self.layer_total_ms:.3f} ms")
        if self.coverage is not None:
            figures.append(f"layers cover {self.coverage:.0%} of a profiled run ({self.profiled_run_ms:.3f} ms median)")
        if self.overhead is not None:
            figures.append(f"profiler overhead x{self.overhead:.2f}")
        lines.append("  " + ", ".join(figures))
        for row in self.top(top):
            nodes = ", ".join(row.nodes) if row.nodes else "?"
            if len(nodes) > 60:
                nodes = nodes[:57] + "..."
            lines.append(f"  {row.time_ms:9.3f} ms {row.share:6.1%}  {row.precision.value:5}  {row.op_type:22.22} {nodes}")
        if len(self.layers) > top:
            lines.append(f"  ... {len(self.layers) - top} more in the JSON")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


# -- measuring ---------------------------------------------------------------------------------


def profile_layers(model: "Model", inputs: Mapping[str, Any], *, runs: int = 20, warmup: int = 3) -> LayerProfile:
    """Per-kernel times of `model` on its backend's own profiler, over `runs` runs of `inputs` after `warmup`.

    The profiler runs on a second session/compiled model of the same artifact with the same threads
    and options (profiling is a load-time switch in ONNX Runtime and OpenVINO), so the model's own
    session stays unprofiled. Backends without a profiler reachable from Python give an
    `unavailable` profile that says what would measure them.
    """
    if runs < 1 or warmup < 0:
        raise OptionError(f"layer profiling needs runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    feeds = model.prepare(inputs)
    runner = model.runner
    function, to_arguments = runner.raw_call()
    arguments = to_arguments(feeds)
    baseline = lambda: function(*arguments)  # noqa: E731 - the model's own, unprofiled session
    name = BackendName(runner.name)
    match name:
        case BackendName.ONNXRUNTIME:
            profile = _onnxruntime_layers(runner, feeds, runs, warmup, baseline)
        case BackendName.OPENVINO:
            profile = _openvino_layers(runner, feeds, runs, warmup, baseline)
        case BackendName.TFLITE:
            profile = LayerProfile.unavailable(name.value, "LiteRT op profiling", LITERT_UNAVAILABLE)
        case BackendName.TENSORRT:
            profile = trtexec_layer_profile_in(runner.model_path.parent)
        case BackendName.COREML | BackendName.COREML_REFERENCE:
            profile = LayerProfile.unavailable(name.value, "Core ML", COREML_UNAVAILABLE)
        case _:
            unreachable(name)
    if model.stand_in is not None:
        profile.notes.append(f"measured on {name}, standing in for {model.stand_in.replaces}: not the device's layer times")
    return profile


LITERT_UNAVAILABLE = (
    "LiteRT's Python API has no op profiler: the Interpreter takes no profiler and has no profiling method "
    "(experimental_op_resolver_type only picks kernels), CompiledModel's options have no profiling switch, and the "
    "C profiler libLiteRt.so exports (LiteRtCompiledModelGetProfiler, LiteRtGetProfilerEvents) is only enabled by "
    "runtime options this wheel does not export; its tools/benchmark_litert_model.py times whole runs only, and no "
    "benchmark_model binary is shipped. On the device, LiteRT's benchmark_model --graph=model.tflite "
    "--enable_op_profiling=true --num_threads=N prints the per-op table"
)
COREML_UNAVAILABLE = (
    "Core ML reports no per-layer times to Python; Xcode's Core ML performance report (Instruments) shows them on a Mac"
)
TENSORRT_NOT_PROFILED = (
    "no trtexec layer profile next to the engine: run ./build_engine.sh --profile on the Jetson "
    "(trtexec --profilingVerbosity=detailed --exportLayerInfo --exportProfile --exportTimes), then profile again"
)

#: ops that move or convert data rather than compute on it (ONNX Runtime op names, incl. its contrib ops)
ORT_DATA_OPS = frozenset(
    {
        "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "GatherElements",
        "Identity", "Expand", "Tile", "Pad", "Cast", "Shape", "Size", "DepthToSpace", "SpaceToDepth",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ReorderInput", "ReorderOutput",
        "MemcpyToHost", "MemcpyFromHost", "ScatterND", "ScatterElements",
    }
)
#: ONNX Runtime kernels that compute in int8 whatever their first input (quantized contrib ops)
ORT_INT8_OPS = frozenset(
    {"QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization"}
)
INTEGER_TYPES = frozenset({"int8", "uint8", "int4", "uint4"})


def _ort_precision(op_name: str, first_input_type: str | None) -> LayerPrecision:
    """ONNX Runtime kernel precision: QLinear*/QGemm/...Integer compute in int8, data ops are `other`,
    anything else computes in the type of its first input (NhwcMaxPool on uint8 is int8)."""
    if op_name in ORT_DATA_OPS:
        return LayerPrecision.OTHER
    if op_name in ORT_INT8_OPS or op_name.startswith(("QLinear", "NhwcQLinear")) or first_input_type in INTEGER_TYPES:
        return LayerPrecision.INT8
    return LayerPrecision.FLOAT


def _interleaved(
    profiled: Callable[[], object], baseline: Callable[[], object], runs: int, after_profiled: Callable[[], None] = lambda: None
) -> tuple[list[float], list[float]]:
    """Wall ms of each run of `profiled` and of `baseline` (the same artifact without the profiler), run in
    alternation, which one goes first swapped every pair, so that both see the same machine load and
    cache state; `after_profiled` reads the profiler's counters."""
    profiled_ms: list[float] = []
    baseline_ms: list[float] = []
    clock = time.perf_counter_ns

    def timed(call: Callable[[], object], into: list[float]) -> None:
        started = clock()
        call()
        into.append((clock() - started) / 1e6)

    for index in range(runs):
        if index % 2:
            timed(baseline, baseline_ms)
        timed(profiled, profiled_ms)
        after_profiled()
        if not index % 2:
            timed(baseline, baseline_ms)
    return profiled_ms, baseline_ms


def _onnxruntime_layers(runner: Any, feeds: dict[str, np.ndarray], runs: int, warmup: int, baseline: Callable[[], object]) -> LayerProfile:
    """ONNX Runtime's session profiling (a Chrome trace): one `<node>_kernel_time` event per kernel per run."""
    import onnxruntime as ort

    from edgeopt.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS

    session = runner.session
    options = session.get_session_options()
    options.enable_profiling = True
    providers = session.get_providers()
    provider_options = session.get_provider_options()
    with tempfile.TemporaryDirectory(prefix="edgeopt-ort-profile-") as folder:
        options.profile_file_prefix = os.path.join(folder, "ort")
        profiled = ort.InferenceSession(
            str(runner.model_path),
            sess_options=options,
            providers=providers,
            provider_options=[provider_options.get(p, {}) for p in providers],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
        run = profiled.run
        for _ in range(warmup):
            run(None, feeds)
            baseline()
        profiled_ms, unprofiled_ms = _interleaved(lambda: run(None, feeds), baseline, runs)
        with open(profiled.end_profiling(), encoding="utf-8") as stream:
            events = json.load(stream)
    per_run, kernels = _ort_kernel_times(events, skip=warmup)
    notes = []
    try:
        claims = OnnxNodeMapper.from_file(runner.model_path).claim_kernels(kernels)
    except (BundleError, IndexError, UnicodeDecodeError) as error:  # an .ort flatbuffer, or not a protobuf we can read
        claims = {}
        notes.append(f"kernels not mapped to ONNX nodes: {runner.model_path.name} is not an ONNX protobuf this reader can read ({error})")
    rows = [
        LayerTiming(
            kernel=kernel,
            op_type=op,
            nodes=claims.get(kernel, ()),
            precision=_ort_precision(op, first_type),
            time_ms=float(np.median([times.get(kernel, 0.0) for times in per_run])),
            implementation=provider,
        )
        for kernel, (op, provider, first_type) in kernels.items()
    ]
    notes.insert(
        0,
        "kernel = ONNX Runtime's node in its optimized graph; nodes = the artifact's ONNX nodes it computes "
        "(fused Q/DQ and activations included); time = the kernel event's duration",
    )
    return LayerProfile.measured(
        BackendName.ONNXRUNTIME.value, "onnxruntime session profiling", len(per_run), rows,
        profiled_run_ms=float(np.median(profiled_ms)), unprofiled_run_ms=float(np.median(unprofiled_ms)),
        run_coverage=[sum(times.values()) / wall for times, wall in zip(per_run, profiled_ms) if wall > 0], notes=notes,
    )


def _ort_kernel_times(events: list[dict[str, Any]], skip: int) -> tuple[list[dict[str, float]], dict[str, tuple[str, str | None, str | None]]]:
    """Per timed run: kernel -> summed ms; and kernel -> (op, provider, first input's type), in run order.

    Runs are the trace's `model_run` windows; the first `skip` (warm-up) are left out.
    """
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")[skip:]
    per_run: list[dict[str, float]] = [{} for _ in windows]
    kernels: dict[str, tuple[str, str | None, str | None]] = {}
    starts = [start for start, _ in windows]
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        index = bisect.bisect_right(starts, event["ts"]) - 1
        if index < 0 or event["ts"] > windows[index][1]:
            continue
        kernel = name[: -len("_kernel_time")]
        args = event.get("args") or {}
        if kernel not in kernels:
            shapes = args.get("input_type_shape") or [{}]
            first_type = next(iter(shapes[0]), None) if shapes and isinstance(shapes[0], dict) else None
            kernels[kernel] = (str(args.get("op_name", "?")), args.get("provider"), first_type)
        per_run[index][kernel] = per_run[index].get(kernel, 0.0) + event["dur"] / 1e3
    return per_run, kernels


# -- OpenVINO ------------------------------------------------------------------------------------

#: OpenVINO CPU plugin layer types that move or convert data
OV_DATA_TYPES = frozenset(
    {"Reorder", "Reshape", "Input", "Output", "Parameter", "Result", "Const", "Convert", "Transpose", "Concatenation",
     "Concat", "Split", "Gather", "StridedSlice", "Broadcast", "Pad", "Squeeze", "Unsqueeze", "ShapeOf", "FakeQuantize"}
)
#: suffixes OpenVINO's ONNX frontend adds to the names of the ops it decomposes a node into
OV_FRONTEND_SUFFIXES = ("/WithoutBiases", "/DequantizationMultiply", "/DequantizationSubtract", "/sink_port_0")
#: IR op types that only (de)quantize: a fused layer made of these is a conversion, not a float fallback
OV_QUANTIZE_TYPES = frozenset({"FakeQuantize", "Convert", "Multiply", "Subtract", "Const", "Constant"})


def _ov_precision(layer_type: str, exec_type: str, original_types: Iterable[str]) -> LayerPrecision:
    """`exec_type` names the kernel and its precision (brgconv_avx512_I8, jit_avx2_FP32, ref_any_f16)."""
    if layer_type in OV_DATA_TYPES:
        return LayerPrecision.OTHER
    types = set(original_types)
    if types and types <= OV_QUANTIZE_TYPES and "FakeQuantize" in types:
        return LayerPrecision.OTHER  # the input quantization, fused into an eltwise Subgraph
    suffix = exec_type.rsplit("_", 1)[-1].upper()
    if suffix in {"I8", "U8", "I4", "U4"}:
        return LayerPrecision.INT8
    return LayerPrecision.FLOAT


def _openvino_layers(runner: Any, feeds: dict[str, np.ndarray], runs: int, warmup: int, baseline: Callable[[], object]) -> LayerProfile:
    """OpenVINO's performance counters (PERF_COUNT): per executed layer, its real time on the last inference."""
    compiled_here = runner.compiled
    properties: dict[str, Any] = {"PERF_COUNT": True}
    for key in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS", "EXECUTION_MODE_HINT"):
        try:
            properties[key] = compiled_here.get_property(key)
        except RuntimeError:  # a property this device does not report
            continue
    compiled = runner.core.compile_model(str(runner.model_path), runner.device, properties)
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer(feeds)
        baseline()
    per_run: list[dict[str, float]] = []
    kernels: dict[str, tuple[str, str]] = {}

    def read_counters() -> None:  # the counters of the request's last inference
        times: dict[str, float] = {}
        for info in request.get_profiling_info():
            if info.status.name != "EXECUTED":
                continue
            kernels.setdefault(info.node_name, (info.node_type, info.exec_type))
            times[info.node_name] = times.get(info.node_name, 0.0) + info.real_time.total_seconds() * 1e3
        per_run.append(times)

    profiled_ms, unprofiled_ms = _interleaved(lambda: request.infer(feeds), baseline, runs, read_counters)
    ir_types = {op.get_friendly_name(): _ov_role(op) for op in runner.core.read_model(str(runner.model_path)).get_ordered_ops()}
    originals = {
        op.get_friendly_name(): [n for n in op.get_rt_info()["originalLayersNames"].astype(str).split(",") if n]
        for op in compiled.get_runtime_model().get_ordered_ops()
    }
    rows = []
    for kernel, (layer_type, exec_type) in kernels.items():
        names = [n for n in originals.get(kernel, [kernel]) if n in ir_types]  # others were made by OpenVINO's transformations
        rows.append(
            LayerTiming(
                kernel=kernel,
                op_type=layer_type,
                nodes=tuple(dict.fromkeys(_ov_node_name(n) for n in names)),
                precision=_ov_precision(layer_type, exec_type, (ir_types[n] for n in names)),
                time_ms=float(np.median([times.get(kernel, 0.0) for times in per_run])),
                implementation=exec_type,
            )
        )
    notes = [
        "kernel = OpenVINO's executed layer; nodes = the IR layers fused into it (originalLayersNames), which OpenVINO's "
        "ONNX frontend names after the ONNX nodes; time = the layer's real time",
    ]
    return LayerProfile.measured(
        BackendName.OPENVINO.value, "openvino performance counters", runs, rows,
        profiled_run_ms=float(np.median(profiled_ms)), unprofiled_run_ms=float(np.median(unprofiled_ms)),
        run_coverage=[sum(times.values()) / wall for times, wall in zip(per_run, profiled_ms) if wall > 0], notes=notes,
    )


def _ov_role(op: Any) -> str:
    """An IR op's type, with a Multiply/Subtract that scales a constant (weight dequantization) told
    apart from one on activations (HardSwish's multiply is float compute, not a conversion)."""
    kind = op.get_type_name()
    if kind in {"Multiply", "Subtract"}:
        sources = {value.get_node().get_type_name() for value in op.input_values()}
        return kind if sources & {"Constant", "Convert"} else f"{kind}(activations)"
    return kind


def _ov_node_name(ir_name: str) -> str:
    for suffix in OV_FRONTEND_SUFFIXES:
        if ir_name.endswith(suffix):
            return ir_name[: -len(suffix)]
    return ir_name


# -- TensorRT (trtexec's exported JSON) ---------------------------------------------------------

#: what build_engine.sh --profile writes next to model.plan (trtexec --exportProfile/--exportLayerInfo/--exportTimes)
TRTEXEC_PROFILE, TRTEXEC_LAYERS, TRTEXEC_TIMES = "profile.json", "layers.json", "times.json"
ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def trtexec_layer_profile_in(folder: Path) -> LayerProfile:
    """The TensorRT layer profile from the trtexec files in `folder`, or `unavailable` when they are not there."""
    profile, layers, times = folder / TRTEXEC_PROFILE, folder / TRTEXEC_LAYERS, folder / TRTEXEC_TIMES
    if not profile.is_file():
        return LayerProfile.unavailable(BackendName.TENSORRT.value, "trtexec --exportProfile", TENSORRT_NOT_PROFILED)
    return trtexec_layer_profile(profile, layers if layers.is_file() else None, times if times.is_file() else None)


def trtexec_layer_profile(profile: Path, layers: Path | None = None, times: Path | None = None) -> LayerProfile:
    """Parse trtexec's `--exportProfile` JSON (a `{"count": N}` record, then one record per layer with
    name, timeMs, averageMs, medianMs (TensorRT 10), percentage), mapped back to ONNX nodes through
    `--exportLayerInfo` (needs `--profilingVerbosity=detailed`: each layer's Metadata carries
    `[ONNX Layer: name]` for every ONNX node fused into it, and its Inputs/Outputs their Format/Datatype),
    with the whole-model time from `--exportTimes` (per-iteration latencyMs) when given."""
    records = _read_json(profile)
    if not isinstance(records, list) or not records:
        raise BundleError(f"{profile}: not a trtexec --exportProfile file (expected a JSON list of layer records)")
    count = next((int(r["count"]) for r in records if isinstance(r, dict) and "count" in r), 0)
    details = {layer["Name"]: layer for layer in _trtexec_layers(layers)} if layers is not None else {}
    rows = []
    for record in records:
        if not isinstance(record, dict) or "name" not in record:
            continue
        name = str(record["name"])
        detail = details.get(name, {})
        time_ms = record.get("medianMs", record.get("averageMs"))
        if time_ms is None:
            raise BundleError(f"{profile}: layer {name!r} has neither medianMs nor averageMs", hint="re-export with trtexec --exportProfile")
        rows.append(
            LayerTiming(
                kernel=name,
                op_type=str(detail.get("ParameterType") or detail.get("LayerType") or "?"),
                nodes=tuple(dict.fromkeys(ONNX_LAYER.findall(str(detail.get("Metadata") or "")))),
                precision=_trt_precision(detail) if detail else LayerPrecision.OTHER if name.startswith("Reformatting") else LayerPrecision.FLOAT,
                time_ms=float(time_ms),
                implementation=detail.get("TacticName") or detail.get("LayerType"),
            )
        )
    whole = None
    if times is not None:
        latencies = [float(r["latencyMs"]) for r in _read_json(times) if isinstance(r, dict) and "latencyMs" in r]
        whole = float(np.median(latencies)) if latencies else None
    notes = [
        "trtexec's per-layer profile of the engine build_engine.sh built on the device (same ONNX and recipe as the runtime's); "
        "nodes from the layer info's [ONNX Layer] metadata; whole-run time from --exportTimes"
    ]
    if not details:
        notes.append("no --exportLayerInfo file: layers are not mapped to ONNX nodes and their precision is a guess")
    return LayerProfile.measured(BackendName.TENSORRT.value, "trtexec --exportProfile", count, rows, profiled_run_ms=whole, notes=notes)


def _trtexec_layers(path: Path) -> list[dict[str, Any]]:
    document = _read_json(path)
    layers = document.get("Layers") if isinstance(document, dict) else None
    if not isinstance(layers, list) or (layers and not isinstance(layers[0], dict)):
        raise BundleError(
            f"{path}: no detailed layer information",
            hint="build the engine with trtexec --profilingVerbosity=detailed --exportLayerInfo=layers.json",
        )
    return layers


def _trt_precision(layer: Mapping[str, Any]) -> LayerPrecision:
    """From the layer's tensor formats ("Thirty-two wide channel vectorized row major Int8 format", "Row major linear FP32")."""
    if layer.get("LayerType") in {"Reformat", "NoOp", "Shuffle"} or layer.get("ParameterType") in {"Reformat", "NoOp", "Shuffle"}:
        return LayerPrecision.OTHER
    formats = [str(t.get("Format/Datatype", "")) for t in [*(layer.get("Inputs") or ()), *(layer.get("Outputs") or ())]]
    first = formats[0] if formats else ""
    if re.search(r"\bU?INT8\b|\bU?Int8\b", first, re.IGNORECASE):
        return LayerPrecision.INT8
    return LayerPrecision.FLOAT


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: cannot read trtexec JSON ({error})", hint="re-run build_engine.sh --profile on the device") from None


# -- ONNX nodes: the names layer times are mapped back to ---------------------------------------


@dataclass(frozen=True)
class OnnxNode:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def label(self) -> str:
        """The node's name; an unnamed node (exporters leave Q/DQ nodes unnamed) as `OpType(first output)`."""
        return self.name or f"{self.op_type}({self.outputs[0] if self.outputs else ''})"


class OnnxNodeMapper:
    """Maps a backend's kernel names to the ONNX nodes of the artifact (read with a small protobuf
    reader: the runtime does not depend on the onnx package).

    ONNX Runtime keeps a node's name when it fuses into it (QDQ -> QLinearConv keeps the Conv's),
    appends `_token_<n>` when its layout transformer rewrites a node, `/duplicated` to the copies of a
    shared DequantizeLinear, names NCHWc kernels after their output tensor plus `_nchwc`, and an
    unnamed node `<OpType>_<index in the graph>`. Each kernel's node is its anchor; the nodes fused into it are
    found by walking back from the anchor through producers whose outputs feed only this kernel
    (DequantizeLinear of weights and inputs, an activation's Conv), then each QuantizeLinear left
    joins the kernel that produced its input (the kernel requantizes its own output).
    """

    def __init__(self, nodes: Iterable[OnnxNode], graph_outputs: Iterable[str] = ()) -> None:
        self.nodes = list(nodes)
        self.by_name = {node.name: node for node in self.nodes if node.name}
        self.producer = {tensor: node for node in self.nodes for tensor in node.outputs if tensor}
        self.consumers: dict[str, list[OnnxNode]] = {}
        for node in self.nodes:
            for tensor in node.inputs:
                self.consumers.setdefault(tensor, []).append(node)
        self.graph_outputs = frozenset(graph_outputs)

    @classmethod
    def from_file(cls, path: Path) -> "OnnxNodeMapper":
        nodes, outputs = read_onnx_graph(Path(path))
        return cls(nodes, outputs)

    def anchor(self, kernel: str) -> OnnxNode | None:
        """The ONNX node a kernel's name points at, if any."""
        if kernel in self.by_name:
            return self.by_name[kernel]
        stripped = TOKEN_SUFFIX.sub("", kernel).removesuffix(DUPLICATED_SUFFIX)
        if stripped in self.by_name:
            return self.by_name[stripped]
        if kernel.endswith("_nchwc"):
            return self.producer.get(kernel[: -len("_nchwc")])
        generated = GENERATED_NAME.match(stripped)  # ONNX Runtime names an unnamed node `<OpType>_<its index>`
        if generated is not None and int(generated[2]) < len(self.nodes):
            node = self.nodes[int(generated[2])]
            if not node.name and node.op_type == generated[1]:
                return node
        return None

    def claim_kernels(self, kernels: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """kernel -> the ONNX node names it computes, its anchor first (kernels nothing points at are left out)."""
        owner: dict[int, str] = {}
        groups: dict[str, list[OnnxNode]] = {}
        for kernel in kernels:
            node = self.anchor(kernel)
            if node is not None and id(node) not in owner:
                owner[id(node)] = kernel
                groups[kernel] = [node]
        for kernel, group in groups.items():
            stack = list(group)
            while stack:
                for tensor in stack.pop().inputs:
                    producer = self.producer.get(tensor)
                    if producer is None or id(producer) in owner or producer.op_type == "QuantizeLinear":
                        continue
                    feeds_only_this = all(
                        owner.get(id(consumer)) == kernel for out in producer.outputs for consumer in self.consumers.get(out, [])
                    ) and not any(out in self.graph_outputs for out in producer.outputs)
                    if feeds_only_this:
                        owner[id(producer)] = kernel
                        group.append(producer)
                        stack.append(producer)
        for node in self.nodes:
            if id(node) in owner:
                continue
            if node.op_type == "QuantizeLinear" and node.inputs and (producer := self.producer.get(node.inputs[0])) is not None:
                kernel = owner.get(id(producer))
                if kernel is not None:
                    owner[id(node)] = kernel
                    groups[kernel].append(node)
        for node in self.nodes:  # a DequantizeLinear read by several kernels (a residual branch) belongs to each
            if id(node) in owner or node.op_type != "DequantizeLinear":
                continue
            for kernel in dict.fromkeys(owner[id(c)] for out in node.outputs for c in self.consumers.get(out, []) if id(c) in owner):
                groups[kernel].append(node)
        order = {id(node): index for index, node in enumerate(self.nodes)}
        return {
            kernel: (group[0].label, *(n.label for n in sorted(group[1:], key=lambda n: order[id(n)])))
            for kernel, group in groups.items()
        }


TOKEN_SUFFIX = re.compile(r"(_token_\d+)+$")
#: ONNX Runtime copies a DequantizeLinear read by several nodes (one per reader), named `<name>/duplicated`
DUPLICATED_SUFFIX = "/duplicated"
GENERATED_NAME = re.compile(r"^([A-Za-z]+)_(\d+)$")


def read_onnx_graph(path: Path) -> tuple[list[OnnxNode], list[str]]:
    """The main graph's nodes (name, op_type, inputs, outputs) and output names of an ONNX file.

    Reads the protobuf wire format directly (ModelProto.graph = 7; GraphProto.node = 1, output = 12;
    NodeProto.input = 1, output = 2, name = 3, op_type = 4; ValueInfoProto.name = 1); initializers are skipped.
    """
    data = memoryview(path.read_bytes())
    graph = next((value for number, value in _fields(data) if number == 7), None)
    if not isinstance(graph, memoryview):
        raise BundleError(f"{path}: no graph in this ONNX file")
    nodes, outputs = [], []
    for number, value in _fields(graph):
        if number == 1 and isinstance(value, memoryview):
            fields: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: []}
            for field_number, field_value in _fields(value):
                if field_number in fields and isinstance(field_value, memoryview):
                    fields[field_number].append(bytes(field_value).decode("utf-8"))
            nodes.append(OnnxNode((fields[3] or [""])[0], (fields[4] or [""])[0], tuple(fields[1]), tuple(fields[2])))
        elif number == 12 and isinstance(value, memoryview):
            outputs += [bytes(v).decode("utf-8") for n, v in _fields(value) if n == 1 and isinstance(v, memoryview)]
    return nodes, outputs


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited fields as views."""
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
            yield number, value
        elif wire == 2:
            length, position = _varint(data, position)
            yield number, data[position : position + length]
            position += length
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire} in an ONNX file")


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
