"""The build pipeline: load → validate → simplify → [quantize] → lower → verify → package.

Every stage is timed and reported into the manifest. Pruning and QAT fine-tuning slot in after
simplify and after quantize respectively; they are not part of this release.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import edgeopt
from edgeopt.bundle import SCHEMA_VERSION, artifact_entry, atomic_output, pack, toolchain_fingerprint, write_manifest
from edgeopt.converters.analysis import io_specs, is_qdq, load_model, model_opset, model_stats, unsupported_nodes
from edgeopt.converters.errors import QualityBudgetError, UnsupportedOpsError
from edgeopt.converters.lower import LoweringOptions, LoweringResult, lower
from edgeopt.converters.passes import simplify
from edgeopt.errors import EdgeoptError, VerificationError
from edgeopt.runtime.bundle import sha256_path
from edgeopt.runtime.isa import IsaClass, isa_mismatch
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target, get_target

__all__ = ["BuildResult", "Progress", "build", "tolerance_for"]

log = logging.getLogger(__name__)

#: stage name, done, total (total 0: no sub-steps)
Progress = Callable[[str, int, int], None]

# Element-wise parity budgets against ONNX Runtime fp32, relative to the output's largest magnitude.
_TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8-weights": 5e-2}
_INT8_MIN_COSINE = 0.95


@dataclass
class BuildResult:
    """Where the bundle went and what it holds."""

    bundle: Path
    manifest: dict[str, Any]
    archive: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def summary_text(self) -> str:
        m = self.manifest
        comp = m["compression"]
        ref = m["reference"]["measured"]
        model_bytes = sum(a["bytes"] for a in m["artifacts"] if a["role"] in ("model", "weights"))
        lines = [
            f"built {m['name']} for {m['target']['name']} ({m['target']['artifact_format']}, {m['precision']})",
            f"  bundle   {self.bundle}" + (f"  (+ {self.archive.name})" if self.archive else ""),
            f"  model    {_human(comp['bytes_before'])} -> {_human(model_bytes)}"
            f"  ({comp['bytes_before'] / max(model_bytes, 1):.2f}x)",
            f"  nodes    {comp['nodes_before']} -> {comp['nodes_after']} after simplify;"
            f" {comp['parameters_after']:,} parameters, {comp['macs_after'] / 1e6:.1f} M MACs",
            f"  verify   max |Δ| {ref['max_abs']:.3g} vs ONNX Runtime fp32 on {m['reference']['samples']} input(s)"
            f" ({ref['verified_with']})",
        ]
        if m.get("quality"):
            for metric in m["quality"]["metrics"]:
                lines.append(
                    f"  quality  {metric['name']} {metric['output']}: fp32 {metric['fp32']:.4g}"
                    f" -> {metric['optimized']:.4g} (Δ {metric['delta']:+.4g})"
                )
        if "transpose_ops" in m["lowering"]:
            lines.append(f"  layout   {m['lowering']['transpose_ops']} TRANSPOSE op(s) in the artifact")
        for artifact in m["artifacts"]:
            lines.append(f"  file     {artifact['path']:<32} {_human(artifact['bytes']):>10}  {artifact['role']}")
        lines += [f"  warning  {w}" for w in self.warnings]
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def tolerance_for(precision: str, reference: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """The element-wise parity budget a device must meet for this precision (see docs/bundle.md)."""
    peak = max((float(np.max(np.abs(v))) for sample in reference for v in sample.values() if v.size), default=1.0)
    return {"atol": _TOLERANCES.get(precision, 0.0) * max(peak, 1e-6), "rtol": _TOLERANCES.get(precision, 0.0)}


class _Stages:
    """Times each stage and keeps its report for the manifest."""

    def __init__(self, progress: Progress | None) -> None:
        self.records: list[dict[str, Any]] = []
        self._progress = progress

    def run(self, name: str, func: Callable[[], Any], details: Callable[[Any], dict[str, Any]] | None = None) -> Any:
        if self._progress:
            self._progress(name, 0, 0)
        start = time.perf_counter()
        value = func()
        record = {"name": name, "seconds": round(time.perf_counter() - start, 4), "changed": True, "details": {}}
        if details is not None:
            record["details"] = details(value)
            record["changed"] = bool(record["details"].pop("changed", True))
        self.records.append(record)
        return value

    def step(self, name: str) -> Callable[[int, int], None] | None:
        progress = self._progress
        return None if progress is None else (lambda done, total: progress(name, done, total))


def _resolve_precision(target: Target, precision: str | None, qdq_input: bool) -> str:
    chosen = precision or ("int8" if qdq_input and "int8" in target.precisions else target.default_precision)
    if chosen not in target.precisions:
        raise EdgeoptError(
            f"precision '{chosen}' is not available for {target.name}",
            hint=f"choose one of: {', '.join(target.precisions)}",
        )
    if qdq_input and chosen not in ("int8",):
        raise EdgeoptError(
            f"the model already carries QuantizeLinear/DequantizeLinear (quantization-aware training) but precision '{chosen}' was asked",
            hint="build it with --precision int8 to keep its learned scales",
        )
    return chosen


def _token_bound(model: onnx.ModelProto, input_name: str) -> int:
    """Largest valid index for an integer input that feeds a Gather (an embedding table)."""
    tables = {i.name: i.dims for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name and node.input[0] in tables:
            return int(tables[node.input[0]][0])
    return 2


def _random_inputs(model: onnx.ModelProto, specs: list[TensorSpec], count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = {}
        for spec in specs:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
            if np.issubdtype(np.dtype(spec.dtype), np.integer):
                sample[spec.name] = rng.integers(0, _token_bound(model, spec.name), size=shape).astype(spec.dtype)
            elif spec.dtype == "bool":
                sample[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        samples.append(sample)
    return samples


def _ort_outputs(model: onnx.ModelProto, samples: Iterable[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The model's outputs on ONNX Runtime (a QDQ graph by its exact semantics, see `session`)."""
    from edgeopt.converters.quantize.graph import run_model

    return list(run_model(model, samples, threads=2))


_NHWC_FROM_NCHW = (0, 2, 3, 1)
_NCHW_FROM_NHWC = (0, 3, 1, 2)


def _nhwc_names(specs: list[TensorSpec]) -> set[str]:
    return {s.name for s in specs if s.layout == "NHWC" and len(s.shape) == 4}


def to_artifact_io(
    samples: list[dict[str, np.ndarray]], onnx_names: list[str], specs: list[TensorSpec]
) -> list[dict[str, np.ndarray]]:
    """ONNX-named, ONNX-layout tensors as the artifact names and lays them out.

    Lowerings keep the ONNX order of inputs and outputs but may rename them (Core ML feature names
    cannot contain dots) or choose NHWC (TFLite), and the device compares in the artifact's terms.
    """
    renamed = dict(zip(onnx_names, (s.name for s in specs)))
    nhwc = _nhwc_names(specs)
    converted = []
    for sample in samples:
        out = {}
        for name, value in sample.items():
            name = renamed.get(name, name)
            out[name] = np.ascontiguousarray(value.transpose(_NHWC_FROM_NCHW)) if name in nhwc else value
        converted.append(out)
    return converted


def _artifact_runner(lowered: LoweringResult, staging: Path) -> tuple[Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]], Callable[[], None]]:
    """Run the artifact on ONNX-layout inputs and return ONNX-layout outputs."""
    if lowered.runner is not None:
        run, close = lowered.runner, (lambda: None)
    else:
        from edgeopt.runtime import load

        model = load(staging / lowered.model_file, backend=lowered.verify_backend, threads=2)
        run, close = model.predict, model.close
    nhwc_in, nhwc_out = _nhwc_names(lowered.inputs), _nhwc_names(lowered.outputs)
    if not nhwc_in and not nhwc_out:
        return run, close

    def run_in_onnx_layout(sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v.transpose(_NHWC_FROM_NCHW)) if k in nhwc_in else v for k, v in sample.items()}
        return {k: v.transpose(_NCHW_FROM_NHWC) if k in nhwc_out else v for k, v in run(feeds).items()}

    return run_in_onnx_layout, close


def _compare(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    max_abs, max_rel, cosines = 0.0, 0.0, []
    for ref, got in zip(reference, candidate):
        for name, expected in ref.items():
            actual = np.asarray(got[name], dtype=np.float64).reshape(expected.shape)
            expected = expected.astype(np.float64)
            diff = np.abs(actual - expected)
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            max_rel = max(max_rel, float(diff.max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1e-12)))
            denom = np.linalg.norm(expected) * np.linalg.norm(actual)
            cosines.append(float(np.dot(expected.ravel(), actual.ravel()) / denom) if denom else 1.0)
    return {"max_abs": max_abs, "max_rel": max_rel, "min_cosine": min(cosines, default=1.0)}


def build(
    model: str | Path,
    target: str | Target,
    *,
    output: str | Path | None = None,
    precision: str | None = None,
    calibration: str | Path | Iterable[Mapping[str, np.ndarray]] | None = None,
    calibration_method: str = "minmax",
    evaluation: str | Path | None = None,
    max_accuracy_drop: float | None = None,
    io_layout: str | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    reference_samples: int = 4,
    isa: str | None = None,
    force: bool = False,
    archive: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build a verified bundle of `model` for `target`; see the README for the options' meaning.

    `isa`: the CPU class an int8 bundle is for (`Target.isa_classes`; the profile's default when None).
    """
    model_path = Path(model)
    profile = target if isinstance(target, Target) else get_target(target)
    isa_class = profile.resolve_isa(isa)
    output_path = Path(output) if output is not None else Path("dist") / f"{model_path.stem}-{profile.name}"
    stages = _Stages(progress)

    source = stages.run("load", lambda: load_model(model_path), lambda m: {"opset": model_opset(m) or 0, "nodes": len(m.graph.node), "changed": False})
    inputs, outputs = io_specs(source)
    qdq_input = is_qdq(source)
    chosen = _resolve_precision(profile, precision, qdq_input)

    def validate() -> tuple[Any, Any]:
        """Everything the user gave is checked here, before any work or output."""
        bad = unsupported_nodes(source, profile)
        if bad:
            raise UnsupportedOpsError(profile.name, bad)
        if chosen == "int8" and not qdq_input and calibration is None:
            raise EdgeoptError(
                f"int8 for {profile.name} needs calibration data",
                hint="pass --calibration data.npz (a few hundred representative inputs), or a model with QAT Q/DQ",
            )
        if max_accuracy_drop is not None and evaluation is None:
            raise EdgeoptError("--max-accuracy-drop needs evaluation data to measure against", hint="pass --eval data.npz")
        evaluation_data = _open_data(evaluation, inputs, "evaluation") if evaluation is not None else None
        calibration_data = _open_data(calibration, inputs, "calibration") if calibration is not None else None
        return evaluation_data, calibration_data

    evaluation_set, calibration_set = stages.run(
        "validate", validate, lambda _: {"unsupported": 0, "precision": chosen, "qat_model": qdq_input, "changed": False}
    )
    before = model_stats(source)

    with atomic_output(output_path, force) as staging:
        optimized, simplify_report = stages.run(
            "simplify",
            lambda: simplify(source),
            lambda r: {**r[1].to_dict(), "changed": r[1].nodes_after != r[1].nodes_before},
        )

        quant_report: dict[str, Any] | None = None
        if chosen == "int8":
            from edgeopt.converters.quantize import QuantizeOptions, quantize

            result = stages.run(
                "quantize",
                lambda: quantize(
                    optimized,
                    profile.scheme_for(isa_class),
                    calibration_set,
                    QuantizeOptions(method=calibration_method, max_accuracy_drop=max_accuracy_drop, evaluation=evaluation_set),
                    progress=stages.step("calibrate"),
                ),
                lambda r: {k: r.report[k] for k in ("method", "samples", "qat_imported", "float_fallback") if k in r.report},
            )
            optimized, quant_report = result.model, result.report
        after = model_stats(optimized)

        lowered: LoweringResult = stages.run(
            "lower",
            lambda: lower(
                optimized,
                profile,
                chosen,
                staging,
                LoweringOptions(io_layout=io_layout, input_shapes=input_shapes, model_name=model_path.stem),
            ),
            lambda r: {"format": profile.artifact_format.value, **{k: v for k, v in r.summary.items() if isinstance(v, (int, float, str))}},
        )

        reference_inputs = _reference_inputs(source, inputs, evaluation_set if evaluation_set is not None else calibration_set, reference_samples)
        reference_outputs = _ort_outputs(source, reference_inputs)
        verification = stages.run("verify", lambda: _verify(lowered, staging, chosen, reference_inputs, reference_outputs), lambda v: dict(v))
        quality = (
            stages.run("evaluate", lambda: _evaluate(source, lowered, staging, evaluation_set, evaluation, max_accuracy_drop), lambda q: {"samples": q["samples"]})
            if evaluation_set is not None
            else None
        )

        _save_reference(
            staging,
            to_artifact_io(reference_inputs, [s.name for s in inputs], lowered.inputs),
            to_artifact_io(reference_outputs, [s.name for s in outputs], lowered.outputs),
        )
        manifest = _manifest(
            model_path, source, profile, chosen, lowered, staging, before, after, simplify_report.nodes_after,
            quant_report, quality, verification, reference_outputs, stages.records, isa_class if chosen == "int8" else None,
        )
        from edgeopt.report import write_report

        write_manifest(staging, manifest)
        stages.run("package", lambda: write_report(staging, manifest))
        manifest["stages"] = stages.records
        manifest["artifacts"].append(artifact_entry(staging, "report.html", "html", "report"))
        write_manifest(staging, manifest)

    packed = pack(output_path) if archive else None
    return BuildResult(output_path, manifest, packed, _warnings(lowered, quant_report, manifest))


def _open_data(source: Any, inputs: list[TensorSpec], role: str) -> Any:
    """Open the data and check its first sample now; the rest is checked as it streams."""
    from edgeopt.converters.data import open_dataset

    dataset = open_dataset(source, inputs, role=role)
    for _ in dataset.take(1):
        pass
    return dataset


def _reference_inputs(model: onnx.ModelProto, inputs: list[TensorSpec], data: Any, count: int) -> list[dict[str, np.ndarray]]:
    """A few real inputs when the user gave data (eval first), else seeded random ones."""
    if data is not None:
        taken = []
        for sample in data:
            taken.append({k: np.asarray(v) for k, v in sample.items()})
            if len(taken) == count:
                break
        if taken:
            return taken
    return _random_inputs(model, inputs, count)


def _verify(
    lowered: LoweringResult, staging: Path, precision: str, inputs: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    run, close = _artifact_runner(lowered, staging)
    try:
        outputs = [run(sample) for sample in inputs]
    finally:
        close()
    measured = _compare(reference, outputs)
    measured["verified_with"] = lowered.verified_with or str(lowered.verify_backend)
    if precision in _TOLERANCES:
        budget = _TOLERANCES[precision]
        if measured["max_rel"] > budget:
            raise VerificationError(
                f"the {precision} artifact differs from ONNX Runtime fp32 by {measured['max_rel']:.3g} of the output range"
                f" (budget {budget:g}; max |Δ| {measured['max_abs']:.3g})",
                hint="inspect the model with `edgeopt inspect`; report the model if a lowering is wrong",
            )
    elif measured["min_cosine"] < _INT8_MIN_COSINE:
        raise VerificationError(
            f"the {precision} artifact's outputs have cosine similarity {measured['min_cosine']:.4f} with fp32 (needs ≥ {_INT8_MIN_COSINE})",
            hint="try --calibration-method percentile or entropy, more calibration data, or --max-accuracy-drop to keep sensitive layers in float",
        )
    return measured


def _evaluate(
    source: onnx.ModelProto, lowered: LoweringResult, staging: Path, dataset: Any, data_path: Any, max_drop: float | None
) -> dict[str, Any]:
    from edgeopt.converters.metrics import fidelity

    samples = [{k: np.asarray(v) for k, v in s.items()} for s in dataset]
    reference = _ort_outputs(source, samples)
    run, close = _artifact_runner(lowered, staging)
    try:
        candidate = [run(s) for s in samples]
    finally:
        close()
    figures = fidelity(reference, candidate, labels=dataset.labels)
    metrics = _quality_metrics(figures)
    quality = {"data": str(data_path), "samples": len(samples), "metrics": metrics, "verified_with": lowered.verified_with, "fidelity": figures}
    accuracy = next((m for m in metrics if m["name"] == "accuracy"), None)
    if max_drop is not None and accuracy is not None and -accuracy["delta"] * 100 > max_drop:
        raise QualityBudgetError(
            f"accuracy dropped by {-accuracy['delta'] * 100:.2f} points ({accuracy['fp32']:.4f} -> {accuracy['optimized']:.4f});"
            f" the budget is {max_drop:g}",
            hint="raise --max-accuracy-drop, calibrate on more representative data, or build a higher precision",
        )
    return quality


def _quality_metrics(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten the fidelity figures into (name, output, fp32, optimized, delta) rows."""
    rows = []
    for output, values in figures.get("outputs", {}).items():
        if values.get("accuracy_fp32") is not None:
            rows.append({"name": "accuracy", "output": output, "fp32": values["accuracy_fp32"], "optimized": values["accuracy"], "delta": values["accuracy"] - values["accuracy_fp32"]})
        if values.get("top1_agreement") is not None:
            rows.append({"name": "top1_agreement", "output": output, "fp32": 1.0, "optimized": values["top1_agreement"], "delta": values["top1_agreement"] - 1.0})
        rows.append({"name": "cosine", "output": output, "fp32": 1.0, "optimized": values["cosine"], "delta": values["cosine"] - 1.0})
    return rows


def _save_reference(staging: Path, inputs: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> None:
    folder = staging / "reference"
    folder.mkdir()
    np.savez(folder / "inputs.npz", **{name: np.concatenate([s[name] for s in inputs]) for name in inputs[0]})
    np.savez(folder / "outputs.npz", **{name: np.concatenate([s[name] for s in outputs]) for name in outputs[0]})


def _manifest(
    model_path: Path,
    source: onnx.ModelProto,
    target: Target,
    precision: str,
    lowered: LoweringResult,
    staging: Path,
    before: Any,
    after: Any,
    nodes_after_simplify: int,
    quant_report: dict[str, Any] | None,
    quality: dict[str, Any] | None,
    verification: dict[str, Any],
    reference_outputs: list[dict[str, np.ndarray]],
    stages: list[dict[str, Any]],
    isa: IsaClass | None,
) -> dict[str, Any]:
    artifacts = [artifact_entry(staging, a.path, a.format, a.role) for a in lowered.artifacts]
    artifacts += [artifact_entry(staging, f"reference/{n}.npz", "npz", "reference") for n in ("inputs", "outputs")]
    used = {"numpy", "onnx", "onnx_ir", "onnxruntime", *_BACKEND_LIBRARIES.get(target.artifact_format.value, ())}
    model_bytes = sum(a["bytes"] for a in artifacts if a["role"] in ("model", "weights"))
    return {
        "schema_version": SCHEMA_VERSION,
        "edgeopt_version": edgeopt.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "name": model_path.stem,
        "target": {
            "name": target.name,
            "backend": target.backend,
            "artifact_format": target.artifact_format.value,
            "layout": target.layout,
            "isa": isa.value if isa is not None else None,
        },
        "precision": precision,
        "toolchain": toolchain_fingerprint(used),
        "source_model": {
            "file": model_path.name,
            "sha256": sha256_path(model_path),
            "bytes": model_path.stat().st_size,
            "opset": model_opset(source) or 0,
            "producer": f"{source.producer_name} {source.producer_version}".strip(),
        },
        "artifacts": artifacts,
        "runtime": {
            "backend": lowered.runtime_backend,
            "model": lowered.model_file,
            "install": target.runtime_install,
            "threads": target.default_threads,
            "options": lowered.runtime_options
            if lowered.runtime_options is not None
            else {k: v for k, v in target.options.items() if isinstance(v, (str, int, float, bool))},
        },
        "inputs": [s.to_dict() for s in lowered.inputs],
        "outputs": [s.to_dict() for s in lowered.outputs],
        "compression": {
            "parameters_before": before.parameters,
            "parameters_after": after.parameters,
            "macs_before": before.macs,
            "macs_after": after.macs,
            "bytes_before": model_path.stat().st_size,
            "bytes_after": model_bytes,
            "nodes_before": before.nodes,
            "nodes_after": nodes_after_simplify,
            "pruning_ratio": 0.0,
            "quantized_op_share": (quant_report or {}).get("quantized_op_share", 0.0),
        },
        "quality": quality,
        "reference": {
            "inputs": "reference/inputs.npz",
            "outputs": "reference/outputs.npz",
            "samples": len(reference_outputs),
            "tolerance": _device_tolerance(precision, reference_outputs, verification),
            "measured": verification,
        },
        "stages": stages,
        "quantization": quant_report,
        "lowering": lowered.summary,
        "profiles": [],
        "benchmarks": [],
    }


_BACKEND_LIBRARIES = {"openvino-ir": ("openvino",), "tflite": ("ai_edge_litert", "flatbuffers"), "mlpackage": ("coremltools",)}


def _device_tolerance(precision: str, reference: list[dict[str, np.ndarray]], measured: dict[str, Any]) -> dict[str, float]:
    """Element-wise budget for a device's parity check.

    Float precisions use the fixed budgets above; int8 allows twice what this host measured,
    since a device's integer kernels may round differently from ONNX Runtime's.
    """
    if precision in _TOLERANCES:
        return tolerance_for(precision, reference)
    return {"atol": 2.0 * measured["max_abs"] + 1e-6, "rtol": 0.0}


def _warnings(lowered: LoweringResult, quant_report: dict[str, Any] | None, manifest: dict[str, Any]) -> list[str]:
    notes = [str(w) for w in lowered.summary.get("warnings", [])]
    mismatch = isa_mismatch(manifest["target"]["isa"], lowered.verify_backend)
    if mismatch:
        notes.append(f"verified on a CPU that cannot run this bundle exactly: {mismatch}")
    if quant_report:
        from edgeopt.converters.quantize import describe_adaptations

        notes += [f"adapted: {line}" for line in describe_adaptations(quant_report.get("adaptations", []))]
    return notes
