"""The bundle manifest (docs/bundle.md) as typed, frozen dataclasses, with its one JSON (de)serialiser.

`Manifest.from_json` is the only place a manifest's strings become types (`Precision`,
`BackendName`, `ArtifactFormat`, `IsaClass`), and it checks every type the runtime reads on the
way: a wrong one is a BundleError naming the key path (`inputs[0].shape must be a list ...`),
never a TypeError from deep inside a backend. `Manifest.to_json` writes the same document back.
Standard library only (and numpy for dtype names): devices read manifests without jsonschema; the
SDK's tests check what `to_json` writes against sdk/schemas/manifest.schema.json.

Sections whose keys belong to their producers (the quantizer's report, a lowering's figures, stage
details, fidelity figures, benchmark and profile results) stay JSON objects (`JsonObject`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

import numpy as np

from edgeopt.runtime.errors import BundleError
from edgeopt.runtime.isa import IsaClass
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, Precision
from edgeopt.runtime.spec import TensorSpec

__all__ = [
    "Artifact",
    "Compression",
    "HISTORY_KEYS",
    "HistoryEntry",
    "JsonObject",
    "Manifest",
    "OutputTolerance",
    "Parity",
    "Quality",
    "QualityBudget",
    "QualityMetric",
    "Reference",
    "RuntimeSection",
    "SourceModel",
    "StageReport",
    "TargetInfo",
    "Tolerance",
]

#: A JSON object whose keys belong to the code that wrote it, carried through unchanged.
JsonObject = Mapping[str, Any]
#: The manifest's history: results appended after the build by `edgeopt profile` and `edgeopt bench`.
HISTORY_KEYS = ("profiles", "benchmarks")
_DAMAGED = "the bundle is damaged or was not written by `edgeopt build`; rebuild it"
E = TypeVar("E")


# -- reading, with the key path of every value -------------------------------------------------


@dataclass(frozen=True)
class _At:
    """Where a value sits in the manifest (`reference.tolerance.atol`), for the error that names it."""

    source: str
    path: str = ""

    def key(self, name: str) -> _At:
        return _At(self.source, f"{self.path}.{name}" if self.path else name)

    def index(self, number: int) -> _At:
        return _At(self.source, f"{self.path}[{number}]")

    def fail(self, wanted: str, value: Any) -> NoReturn:
        shown = "missing" if value is None else f"{json.dumps(value)[:60]} ({type(value).__name__})"
        raise BundleError(f"{self.source}: {self.path} must be {wanted}, found {shown}", hint=_DAMAGED)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_dimension(value: Any) -> bool:
    return value is None or isinstance(value, str) or (_is_integer(value) and value >= -1)


def _is_dtype(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(value) and np.dtype(value) is not None
    except TypeError:
        return False


def _value(raw: JsonObject, key: str, at: _At, wanted: str, valid: Callable[[Any], bool], *, required: bool = False) -> Any:
    """raw[key] when `valid` (None when absent and not `required`), else a BundleError naming it."""
    value = raw.get(key)
    if (value is None and not required) or (value is not None and valid(value)):
        return value
    at.key(key).fail(wanted, value)


def _text(raw: JsonObject, key: str, at: _At, *, required: bool = False, wanted: str = "a string") -> Any:
    return _value(raw, key, at, wanted, lambda v: isinstance(v, str) and (bool(v) or not required), required=required)


def _path(raw: JsonObject, key: str, at: _At, *, required: bool = False) -> Any:
    return _value(raw, key, at, "a non-empty string (a path inside the bundle)", lambda v: isinstance(v, str) and bool(v), required=required)


def _count(raw: JsonObject, key: str, at: _At) -> Any:
    return _value(raw, key, at, "a whole number >= 0", lambda v: _is_integer(v) and v >= 0)


def _number(raw: JsonObject, key: str, at: _At) -> Any:
    return _value(raw, key, at, "a number", _is_number)


def _flag(raw: JsonObject, key: str, at: _At) -> Any:
    return _value(raw, key, at, "true or false", lambda v: isinstance(v, bool))


def _object(raw: Any, at: _At) -> JsonObject:
    if not isinstance(raw, dict):
        at.fail("an object", raw)
    return raw


def _section(raw: JsonObject, key: str, at: _At, *, required: bool = False) -> JsonObject | None:
    """raw[key] as an object; None when absent or null (unless `required`)."""
    value = raw.get(key)
    if value is None and not required:
        return None
    return _object(value, at.key(key))


def _items(raw: JsonObject, key: str, at: _At, *, required: bool = False) -> list[Any]:
    value = raw.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        at.key(key).fail("a list", value)
    return value


def _member(raw: JsonObject, key: str, at: _At, kind: type[E]) -> E | None:
    """An enum member from its string value; None when absent."""
    value = raw.get(key)
    if value is None:
        return None
    try:
        return kind(value)  # type: ignore[call-arg]
    except ValueError:
        at.key(key).fail(f"one of {', '.join(m.value for m in kind)}", value)  # type: ignore[attr-defined]


def _without_none(entries: JsonObject, keep: Sequence[str] = ()) -> JsonObject:
    """The entries, less optional ones that are None (those in `keep` are written as null)."""
    return {k: v for k, v in entries.items() if v is not None or k in keep}


# -- the parts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetInfo:
    """The target profile the bundle was built for."""

    name: str | None = None
    backend: BackendName | None = None
    artifact_format: ArtifactFormat | None = None
    layout: str | None = None
    isa: IsaClass | None = None  # the CPU class an int8 bundle is for

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> TargetInfo:
        return cls(
            name=_text(raw, "name", at),
            backend=_member(raw, "backend", at, BackendName),
            artifact_format=_member(raw, "artifact_format", at, ArtifactFormat),
            layout=_text(raw, "layout", at),
            isa=_member(raw, "isa", at, IsaClass),
        )

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "backend": _string(self.backend),
            "artifact_format": _string(self.artifact_format),
            "layout": self.layout,
            "isa": _string(self.isa),
        }


@dataclass(frozen=True)
class SourceModel:
    """The model file the user passed."""

    file: str
    sha256: str
    bytes: int
    opset: int
    producer: str

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> SourceModel:
        return cls(
            file=_text(raw, "file", at),
            sha256=_text(raw, "sha256", at),
            bytes=_count(raw, "bytes", at),
            opset=_value(raw, "opset", at, "a whole number", _is_integer),
            producer=_text(raw, "producer", at),
        )

    def to_json(self) -> JsonObject:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes, "opset": self.opset, "producer": self.producer}


@dataclass(frozen=True)
class Artifact:
    """A file (or folder) the bundle carries, with the byte count and sha256 loading checks."""

    path: str
    format: str  # an artifact format's value, or a support file's kind (npz, html, ...)
    bytes: int | None = None
    sha256: str | None = None
    role: str | None = None  # model, weights, recipe, config, reference or report

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> Artifact:
        return cls(
            path=_path(raw, "path", at, required=True),
            format=_text(raw, "format", at),
            bytes=_count(raw, "bytes", at),
            sha256=_text(raw, "sha256", at),
            role=_text(raw, "role", at),
        )

    def to_json(self) -> JsonObject:
        return {"path": self.path, "format": self.format, "bytes": self.bytes, "sha256": self.sha256, "role": self.role}


@dataclass(frozen=True)
class RuntimeSection:
    """How the device runs the artifact."""

    backend: BackendName
    model: str  # the artifact path the backend loads
    install: str | None = None
    threads: int | None = None
    options: JsonObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> RuntimeSection:
        _text(raw, "backend", at, required=True, wanted="a non-empty string")
        return cls(
            backend=_member(raw, "backend", at, BackendName),  # type: ignore[arg-type]
            model=_path(raw, "model", at, required=True),
            install=_text(raw, "install", at),
            threads=_count(raw, "threads", at),
            options=_section(raw, "options", at) or {},
        )

    def to_json(self) -> JsonObject:
        return {"backend": self.backend.value, "model": self.model, "install": self.install, "threads": self.threads, "options": dict(self.options)}


def _tensor(raw: Any, at: _At) -> TensorSpec:
    raw = _object(raw, at)
    _text(raw, "name", at, required=True, wanted="a non-empty string")
    _value(raw, "shape", at, "a list of whole numbers, strings or nulls", lambda v: isinstance(v, list) and all(_is_dimension(d) for d in v), required=True)
    _value(raw, "dtype", at, "a numpy dtype name (float32, int8, ...)", _is_dtype, required=True)
    _text(raw, "layout", at)
    quantization = _section(raw, "quantization", at)
    if quantization is not None:
        where = at.key("quantization")
        numbers = "a number or a list of numbers"
        _value(quantization, "scale", where, numbers, _is_numbers, required=True)
        _value(quantization, "zero_point", where, numbers, _is_numbers)
        _value(quantization, "axis", where, "a whole number", _is_integer)
    return TensorSpec.from_dict(raw)


def _is_numbers(value: Any) -> bool:
    return _is_number(value) or (isinstance(value, list) and bool(value) and all(_is_number(v) for v in value))


@dataclass(frozen=True)
class Compression:
    """Sizes before and after the build."""

    parameters_before: int
    parameters_after: int
    macs_before: int
    macs_after: int
    bytes_before: int
    bytes_after: int
    nodes_before: int
    nodes_after: int
    pruning_ratio: float = 0.0
    quantized_op_share: float = 0.0

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> Compression:
        counts = {name: _count(raw, name, at) for name in _COMPRESSION_COUNTS}
        return cls(**counts, pruning_ratio=_number(raw, "pruning_ratio", at) or 0.0, quantized_op_share=_number(raw, "quantized_op_share", at) or 0.0)

    def to_json(self) -> JsonObject:
        return {name: getattr(self, name) for name in (*_COMPRESSION_COUNTS, "pruning_ratio", "quantized_op_share")}


_COMPRESSION_COUNTS = (
    "parameters_before", "parameters_after", "macs_before", "macs_after", "bytes_before", "bytes_after", "nodes_before", "nodes_after",
)


@dataclass(frozen=True)
class QualityMetric:
    """One figure of the optimized model against fp32 (None: not finite)."""

    name: str
    output: str
    fp32: float | None
    optimized: float | None
    delta: float | None

    @classmethod
    def from_json(cls, raw: Any, at: _At) -> QualityMetric:
        raw = _object(raw, at)
        return cls(_text(raw, "name", at), _text(raw, "output", at), _number(raw, "fp32", at), _number(raw, "optimized", at), _number(raw, "delta", at))

    def to_json(self) -> JsonObject:
        return {"name": self.name, "output": self.output, "fp32": self.fp32, "optimized": self.optimized, "delta": self.delta}


@dataclass(frozen=True)
class QualityBudget:
    """The user's --max-accuracy-drop and the drop measured against it, in points."""

    metric: str
    max_drop: float
    drop: float

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> QualityBudget:
        return cls(_text(raw, "metric", at), _number(raw, "max_drop", at), _number(raw, "drop", at))

    def to_json(self) -> JsonObject:
        return {"metric": self.metric, "max_drop": self.max_drop, "drop": self.drop}


@dataclass(frozen=True)
class Quality:
    """Quantization quality: the artifact against fp32 on evaluation or held-out data."""

    data: str
    samples: int
    metrics: tuple[QualityMetric, ...]
    fidelity: JsonObject = field(default_factory=dict)
    budget: QualityBudget | None = None
    verified_with: str | None = None

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> Quality:
        budget = _section(raw, "budget", at)
        return cls(
            data=_text(raw, "data", at),
            samples=_count(raw, "samples", at),
            metrics=tuple(QualityMetric.from_json(m, at.key("metrics").index(i)) for i, m in enumerate(_items(raw, "metrics", at))),
            fidelity=_section(raw, "fidelity", at) or {},
            budget=None if budget is None else QualityBudget.from_json(budget, at.key("budget")),
            verified_with=_text(raw, "verified_with", at),
        )

    def to_json(self) -> JsonObject:
        return _without_none(
            {
                "data": self.data,
                "samples": self.samples,
                "metrics": [m.to_json() for m in self.metrics],
                "fidelity": dict(self.fidelity),
                "budget": None if self.budget is None else self.budget.to_json(),
                "verified_with": self.verified_with,
            }
        )


@dataclass(frozen=True)
class OutputTolerance:
    """One output's parity budget on a device: |Δ| ≤ atol + rtol·|ref|, and RMS(Δ) ≤ rms where given."""

    atol: float
    rtol: float = 0.0
    rms: float | None = None
    step: float | None = None  # the output's int8 grid step, where the QDQ graph dequantizes it

    @classmethod
    def from_json(cls, raw: Any, at: _At) -> OutputTolerance:
        raw = _object(raw, at)
        return cls(_number(raw, "atol", at), _number(raw, "rtol", at), _number(raw, "rms", at), _number(raw, "step", at))

    def to_json(self) -> JsonObject:
        return _without_none({"atol": self.atol, "rtol": self.rtol, "step": self.step, "rms": self.rms})


@dataclass(frozen=True)
class Tolerance:
    """The parity budget a device applies to the reference outputs."""

    atol: float | None = None
    rtol: float | None = None
    outputs: Mapping[str, OutputTolerance] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> Tolerance:
        outputs = _section(raw, "outputs", at) or {}
        return cls(
            atol=_number(raw, "atol", at),
            rtol=_number(raw, "rtol", at),
            outputs={name: OutputTolerance.from_json(own, at.key("outputs").key(name)) for name, own in outputs.items()},
        )

    def to_json(self) -> JsonObject:
        return _without_none({"atol": self.atol, "rtol": self.rtol, "outputs": {k: t.to_json() for k, t in self.outputs.items()} or None}, keep=("atol", "rtol"))


@dataclass(frozen=True)
class Parity:
    """Lowering parity as the build measured it: the artifact against the graph it was lowered from."""

    max_abs: float
    max_rel: float
    verified_with: str
    against: str | None = None  # "QDQ" for int8, else "fp32"
    checked: bool | None = None
    outputs: Mapping[str, JsonObject] = field(default_factory=dict)  # per-output figures
    note: str | None = None  # why parity was not checked

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> Parity:
        return cls(
            max_abs=_number(raw, "max_abs", at),
            max_rel=_number(raw, "max_rel", at),
            verified_with=_text(raw, "verified_with", at),
            against=_text(raw, "against", at),
            checked=_flag(raw, "checked", at),
            outputs=_section(raw, "outputs", at) or {},
            note=_text(raw, "note", at),
        )

    def to_json(self) -> JsonObject:
        return _without_none(
            {
                "against": self.against,
                "checked": self.checked,
                "max_abs": self.max_abs,
                "max_rel": self.max_rel,
                "outputs": dict(self.outputs) if self.outputs else None,
                "verified_with": self.verified_with,
                "note": self.note,
            }
        )


@dataclass(frozen=True)
class Reference:
    """Reference inputs and outputs a device checks parity with, and the budget it applies."""

    inputs: str | None = None
    outputs: str | None = None
    samples: int | None = None
    tolerance: Tolerance | None = None
    measured: Parity | None = None

    @classmethod
    def from_json(cls, raw: JsonObject, at: _At) -> Reference:
        tolerance = _section(raw, "tolerance", at)
        measured = _section(raw, "measured", at)
        return cls(
            inputs=_path(raw, "inputs", at),
            outputs=_path(raw, "outputs", at),
            samples=_count(raw, "samples", at),
            tolerance=None if tolerance is None else Tolerance.from_json(tolerance, at.key("tolerance")),
            measured=None if measured is None else Parity.from_json(measured, at.key("measured")),
        )

    def to_json(self) -> JsonObject:
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "samples": self.samples,
            "tolerance": None if self.tolerance is None else self.tolerance.to_json(),
            "measured": None if self.measured is None else self.measured.to_json(),
        }


@dataclass(frozen=True)
class StageReport:
    """One pipeline stage: how long it took, whether it changed the model, and what it reports."""

    name: str
    seconds: float
    changed: bool = True
    details: JsonObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, at: _At) -> StageReport:
        raw = _object(raw, at)
        changed = _flag(raw, "changed", at)
        return cls(_text(raw, "name", at), _number(raw, "seconds", at), True if changed is None else changed, _section(raw, "details", at) or {})

    def to_json(self) -> JsonObject:
        return {"name": self.name, "seconds": self.seconds, "changed": self.changed, "details": dict(self.details)}


@dataclass(frozen=True)
class HistoryEntry:
    """A result appended after the build: when (and on which device, for a profile), and the
    producer's figures (`edgeopt.remote.ProfileResult`, the runtime's `BenchmarkResult`) as JSON."""

    time: str | None = None
    host: str | None = None  # the device a profile ran on
    results: JsonObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, at: _At) -> HistoryEntry:
        raw = _object(raw, at)
        results = {k: v for k, v in raw.items() if k not in ("time", "host")}
        return cls(time=_text(raw, "time", at), host=_text(raw, "host", at), results=results)

    def to_json(self) -> JsonObject:
        return {**_without_none({"host": self.host, "time": self.time}), **self.results}


# -- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed. Only `runtime`, `artifacts`, `inputs` and `outputs` are required to read
    a bundle; `edgeopt build` writes every field."""

    schema_version: str
    runtime: RuntimeSection
    artifacts: tuple[Artifact, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    edgeopt_version: str | None = None
    created_at: str | None = None
    name: str | None = None
    target: TargetInfo | None = None
    precision: Precision | None = None
    toolchain: Mapping[str, str] = field(default_factory=dict)
    source_model: SourceModel | None = None
    compression: Compression | None = None
    quality: Quality | None = None
    reference: Reference | None = None
    stages: tuple[StageReport, ...] = ()
    pruning: JsonObject | None = None  # the pruning report (converters/prune/surgery.py), when --prune ran
    quantization: JsonObject | None = None  # the quantizer's report
    finetune: JsonObject | None = None  # the fine-tuning report (converters/finetune/train.py), when --finetune ran
    lowering: JsonObject = field(default_factory=dict)  # the lowering's figures (TensorRT: engine_recipe)
    profiles: tuple[HistoryEntry, ...] = ()  # appended by `edgeopt profile`
    benchmarks: tuple[HistoryEntry, ...] = ()  # appended by `edgeopt bench`
    unknown: JsonObject = field(default_factory=dict)  # keys of a newer minor schema, kept as they were

    @property
    def model_artifact(self) -> Artifact | None:
        """The artifact the runtime loads."""
        return next((a for a in self.artifacts if a.path == self.runtime.model), None)

    def with_history(self, key: str, entry: JsonObject) -> Manifest:
        """This manifest with `entry` (a result as JSON) appended to `profiles` or `benchmarks`."""
        if key not in HISTORY_KEYS:
            raise BundleError(f"manifest history is one of {', '.join(HISTORY_KEYS)}, not {key!r}")
        history: tuple[HistoryEntry, ...] = getattr(self, key)
        return replace(self, **{key: (*history, HistoryEntry.from_json(entry, _At("result", f"{key}[{len(history)}]")))})

    @classmethod
    def from_json(cls, raw: Any, source: str = "manifest.json") -> Manifest:
        """The manifest from its parsed JSON; BundleError naming the key path of the first wrong type.
        The schema major is the caller's to check (it decides which reader applies)."""
        at = _At(source)
        if not isinstance(raw, dict):
            raise BundleError(f"{source}: expected a JSON object", hint="the bundle is damaged; copy or rebuild it")
        runtime = _section(raw, "runtime", at, required=True)
        sections = {key: _items(raw, key, at, required=True) for key in ("artifacts", "inputs", "outputs")}
        target, source_model, compression = (_section(raw, key, at) for key in ("target", "source_model", "compression"))
        quality, reference = _section(raw, "quality", at), _section(raw, "reference", at)
        return cls(
            schema_version=str(raw.get("schema_version", "")),
            runtime=RuntimeSection.from_json(runtime, at.key("runtime")),  # type: ignore[arg-type]
            artifacts=tuple(Artifact.from_json(_object(a, at.key("artifacts").index(i)), at.key("artifacts").index(i)) for i, a in enumerate(sections["artifacts"])),
            inputs=tuple(_tensor(t, at.key("inputs").index(i)) for i, t in enumerate(sections["inputs"])),
            outputs=tuple(_tensor(t, at.key("outputs").index(i)) for i, t in enumerate(sections["outputs"])),
            edgeopt_version=_text(raw, "edgeopt_version", at),
            created_at=_text(raw, "created_at", at),
            name=_text(raw, "name", at),
            target=None if target is None else TargetInfo.from_json(target, at.key("target")),
            precision=_member(raw, "precision", at, Precision),
            toolchain=_section(raw, "toolchain", at) or {},
            source_model=None if source_model is None else SourceModel.from_json(source_model, at.key("source_model")),
            compression=None if compression is None else Compression.from_json(compression, at.key("compression")),
            quality=None if quality is None else Quality.from_json(quality, at.key("quality")),
            reference=None if reference is None else Reference.from_json(reference, at.key("reference")),
            stages=tuple(StageReport.from_json(s, at.key("stages").index(i)) for i, s in enumerate(_items(raw, "stages", at))),
            pruning=_section(raw, "pruning", at),
            quantization=_section(raw, "quantization", at),
            finetune=_section(raw, "finetune", at),
            lowering=_lowering(raw, at),
            profiles=tuple(HistoryEntry.from_json(p, at.key("profiles").index(i)) for i, p in enumerate(_items(raw, "profiles", at))),
            benchmarks=tuple(HistoryEntry.from_json(b, at.key("benchmarks").index(i)) for i, b in enumerate(_items(raw, "benchmarks", at))),
            unknown={k: v for k, v in raw.items() if k not in _KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON object, keys in the order docs/bundle.md lists them."""
        return {
            "schema_version": self.schema_version,
            "edgeopt_version": self.edgeopt_version,
            "created_at": self.created_at,
            "name": self.name,
            "target": None if self.target is None else self.target.to_json(),
            "precision": _string(self.precision),
            "toolchain": dict(self.toolchain),
            "source_model": None if self.source_model is None else self.source_model.to_json(),
            "artifacts": [a.to_json() for a in self.artifacts],
            "runtime": self.runtime.to_json(),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "compression": None if self.compression is None else self.compression.to_json(),
            "quality": None if self.quality is None else self.quality.to_json(),
            "reference": None if self.reference is None else self.reference.to_json(),
            "stages": [s.to_json() for s in self.stages],
            **({} if self.pruning is None else {"pruning": dict(self.pruning)}),  # only where --prune ran
            "quantization": None if self.quantization is None else dict(self.quantization),
            **({} if self.finetune is None else {"finetune": dict(self.finetune)}),  # only where --finetune ran
            "lowering": dict(self.lowering),
            "profiles": [dict(p.to_json()) for p in self.profiles],
            "benchmarks": [dict(b.to_json()) for b in self.benchmarks],
            **self.unknown,
        }


_KEYS = frozenset(
    ("schema_version", "edgeopt_version", "created_at", "name", "target", "precision", "toolchain", "source_model", "artifacts", "runtime",
     "inputs", "outputs", "compression", "quality", "reference", "stages", "pruning", "quantization", "finetune", "lowering", *HISTORY_KEYS)
)


def _lowering(raw: JsonObject, at: _At) -> JsonObject:
    lowering = _section(raw, "lowering", at) or {}
    _section(lowering, "engine_recipe", at.key("lowering"))
    return lowering


def _string(member: Precision | BackendName | ArtifactFormat | IsaClass | None) -> str | None:
    return None if member is None else member.value
