"""Where the time goes inside a model: per-kernel times from each backend's own profiler.

Users of trtexec (`--dumpProfile`), OpenVINO's benchmark_app (`-pc`) and TFLite's benchmark_model
(`--enable_op_profiling`) read a table of layers. This module gives the same table for every
backend, in one shape: each kernel the backend ran (a fused kernel is one row), the ONNX node
names it came from, whether it computed in int8 or float, its median time over the profiled runs
and its share of the summed layer time. `LayerProfile.summary()` says what a user looks for
first: "3 layers ran in float and cost 40% of layer time".

Profilers slow a run down and do not see everything (input copies, the runtime's own checks), so
a profile carries the wall time of its own profiled runs and, when a benchmark ran beside it, the
unprofiled median: `coverage` (summed layers / profiled run) and `overhead` (profiled run /
unprofiled run) say how far the table can be trusted.

Standard library and numpy only at import time; each backend's library is imported when used.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

__all__ = [
    "LayerPrecision",
    "LayerProfile",
    "LayerProfileDocument",
    "LayerTiming",
    "LayerTimingDocument",
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
    coverage: float | None  # layer_total_ms / profiled_run_ms
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

    @classmethod
    def measured(
        cls,
        backend: str,
        profiler: str,
        runs: int,
        layers: Iterable[LayerTiming],
        *,
        profiled_run_ms: float | None = None,
        notes: Iterable[str] = (),
    ) -> "LayerProfile":
        """A profile from raw rows: shares are computed here and rows sorted slowest first."""
        rows = list(layers)
        total = sum(row.time_ms for row in rows)
        rows = [replace(row, share=row.time_ms / total if total > 0 else 0.0) for row in rows]
        rows.sort(key=lambda row: (-row.time_ms, row.kernel))
        return cls(backend=backend, profiler=profiler, runs=runs, layers=rows, profiled_run_ms=profiled_run_ms, notes=list(notes))

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
    def coverage(self) -> float | None:
        total = self.layer_total_ms
        if total is None or not self.profiled_run_ms:
            return None
        return total / self.profiled_run_ms

    @property
    def overhead(self) -> float | None:
        if not self.profiled_run_ms or not self.unprofiled_run_ms:
            return None
        return self.profiled_run_ms / self.unprofiled_run_ms

    def by_precision(self) -> dict[str, dict[str, float]]:
        """precision -> layers, summed median time and share of the layer total (only precisions present)."""
        groups: dict[str, dict[str, float]] = {}
        for row in self.layers:
            group = groups.setdefault(row.precision.value, {"layers": 0, "time_ms": 0.0, "share": 0.0})
            group["layers"] += 1
            group["time_ms"] += row.time_ms
            group["share"] += row.share
        return {key: {"layers": int(v["layers"]), "time_ms": round(v["time_ms"], 6), "share": round(v["share"], 6)} for key, v in groups.items()}

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
            figures.append(f"coverage {self.coverage:.0%} of the profiled run ({self.profiled_run_ms:.3f} ms)")
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
