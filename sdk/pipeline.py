"""The build pipeline: load → validate → simplify → [quantize] → lower → verify → package.

Every stage is timed and reported into the manifest. Pruning and QAT fine-tuning slot in after
simplify and after quantize respectively; they are not part of this release.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import edgeopt
from edgeopt.bundle import SCHEMA_VERSION, artifact_entry, atomic_output, toolchain_fingerprint, write_manifest
from edgeopt.converters.analysis import io_specs, is_qdq, load_model, model_opset, model_stats, unsupported_nodes
from edgeopt.converters.errors import ModelLoadError, QualityBudgetError, UnsupportedOpsError
from edgeopt.converters.lower import LoweringOptions, LoweringResult, lower
from edgeopt.converters.passes import simplify
from edgeopt.errors import EdgeoptError, OptionError, VerificationError
from edgeopt.report import all_float, precision_label
from edgeopt.runtime.bundle import sha256_path
from edgeopt.runtime.isa import IsaClass, isa_mismatch
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target, get_target

__all__ = ["BuildResult", "Progress", "build"]

log = logging.getLogger(__name__)

#: stage name, done, total (total 0: no sub-steps)
Progress = Callable[[str, int, int], None]

#: Quality without --eval: calibration samples held out from range estimation (never fewer than this).
MIN_HELD_OUT = 32


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
            f"built {m['name']} for {m['target']['name']} ({m['target']['artifact_format']}, {precision_label(m)})",
            f"  bundle   {self.bundle}" + (f"  (+ {self.archive.name})" if self.archive else ""),
            f"  model    {_human(comp['bytes_before'])} -> {_human(model_bytes)}"
            f"  ({comp['bytes_before'] / max(model_bytes, 1):.2f}x)",
            f"  nodes    {comp['nodes_before']} -> {comp['nodes_after']} after simplify;"
            f" {comp['parameters_after']:,} parameters, {comp['macs_after'] / 1e6:.1f} M MACs",
            f"  parity   max |Δ| {ref['max_abs']:.3g} vs the {ref['against']} graph on {m['reference']['samples']} input(s)"
            f" ({ref['verified_with']})" + ("" if ref["checked"] else f"; not checked: {ref['note']}"),
        ]
        isa = m["target"].get("isa")
        if isa:
            lines.append(f"  cpu      built for {isa} CPUs ({IsaClass(isa).description}); --isa picks another class")
        quality = m.get("quality")
        if quality:
            lines.append(f"  quality  vs fp32 on {quality['samples']} samples of {quality['data']}")
            for metric in quality["metrics"]:
                if metric["name"] in _POINT_METRICS:  # shares, shown in points like the budget
                    figures = f"fp32 {100 * metric['fp32']:.2f}% -> {100 * metric['optimized']:.2f}% (Δ {100 * metric['delta']:+.2f} points)"
                else:
                    figures = f"fp32 {metric['fp32']:.4g} -> {metric['optimized']:.4g} (Δ {metric['delta']:+.4g})"
                lines.append(f"           {metric['name']} {metric['output']}: {figures}")
            budget = quality.get("budget")
            if budget:
                lines.append(
                    f"  budget   {budget['metric'].removesuffix(' (points)').removesuffix(' (%)')} {budget['drop']:.2f} points"
                    f" (--max-accuracy-drop {budget['max_drop']:g} points)"
                )
        if "transpose_ops" in m["lowering"]:
            lines.append(f"  layout   {m['lowering']['transpose_ops']} TRANSPOSE op(s) in the artifact")
        for artifact in m["artifacts"]:
            lines.append(f"  file     {artifact['path']:<32} {_human(artifact['bytes']):>10}  {artifact['role']}")
        lines += [f"  warning  {w}" for w in self.warnings]
        return "\n".join(lines)


#: Quality metrics that are shares (0..1): the summary shows them in percent and their deltas in
#: points, the unit of --max-accuracy-drop.
_POINT_METRICS = frozenset({"accuracy", "top1_agreement"})


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


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
    """The model's outputs on ONNX Runtime (a QDQ graph by its exact semantics, see `ort_session`)."""
    from edgeopt.converters.graph.session import run_model

    return list(run_model(model, samples, threads=2))


def _finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: the manifest is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _require_finite(fp32_outputs: list[dict[str, np.ndarray]], data: str) -> list[dict[str, np.ndarray]]:
    """The fp32 model's outputs, refused when any is NaN or Inf: nothing can be verified against them."""
    bad = {}
    for sample in fp32_outputs:
        for name, value in sample.items():
            if np.issubdtype(value.dtype, np.floating):
                bad[name] = bad.get(name, 0) + int(value.size - np.count_nonzero(np.isfinite(value)))
    named = [f"'{name}' ({count} values)" for name, count in bad.items() if count]
    if named:
        raise ModelLoadError(
            f"the fp32 model itself produces NaN or Inf on {data}: output {', '.join(named)}",
            hint="check the data's scale and preprocessing (what the model was trained on); if they are right, the model is broken: re-export it",
        )
    return fp32_outputs


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
        if chosen == "int8" and not qdq_input and calibration is None:
            raise EdgeoptError(
                f"int8 for {profile.name} needs calibration data",
                hint="pass --calibration data.npz (a few hundred representative inputs), or a model with QAT Q/DQ",
            )
        if max_accuracy_drop is not None and not (math.isfinite(max_accuracy_drop) and max_accuracy_drop >= 0):
            raise OptionError(
                f"--max-accuracy-drop must be a finite number of accuracy points >= 0, got {max_accuracy_drop}",
                hint="e.g. --max-accuracy-drop 1 allows one accuracy point below fp32",
            )
        if max_accuracy_drop is not None and evaluation is None:
            raise EdgeoptError("--max-accuracy-drop needs evaluation data to measure against", hint="pass --eval data.npz")
        evaluation_data = _open_data(evaluation, inputs, "evaluation") if evaluation is not None else None
        calibration_data = _open_data(calibration, inputs, "calibration") if calibration is not None else None
        return evaluation_data, calibration_data

    evaluation_set, calibration_set = stages.run(
        "validate", validate, lambda _: {"precision": chosen, "qat_model": qdq_input, "changed": False}
    )
    range_set, quality_set, quality_data = _quality_split(chosen, calibration_set, evaluation_set, evaluation)
    static_shapes = _static_shapes(inputs, input_shapes, evaluation_set if evaluation_set is not None else calibration_set)
    before = model_stats(source)

    with atomic_output(output_path, force, archive=archive) as staging:
        optimized, simplify_report = stages.run(
            "simplify",
            lambda: simplify(source, static_shapes),
            lambda r: {**r[1].to_dict(), "input_shapes": {k: list(v) for k, v in static_shapes.items()}, "changed": r[1].nodes_after != r[1].nodes_before},
        )

        def check_ops() -> None:
            """After shapes are fixed and constants folded: what is left must run on the target."""
            bad = unsupported_nodes(optimized, profile)
            if bad:
                raise UnsupportedOpsError(profile.name, bad)

        stages.run("check_ops", check_ops, lambda _: {"unsupported": 0, "changed": False})

        quant_report: dict[str, Any] | None = None
        if chosen == "int8":
            from edgeopt.converters.quantize import QuantizeOptions, quantize

            result = stages.run(
                "quantize",
                lambda: quantize(
                    optimized,
                    profile.scheme_for(isa_class),
                    range_set,
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
                LoweringOptions(io_layout=io_layout, input_shapes=static_shapes or None, model_name=model_path.stem),
            ),
            lambda r: {"format": profile.artifact_format.value, **{k: v for k, v in r.summary.items() if isinstance(v, (int, float, str))}},
        )

        reference_inputs = _reference_inputs(source, inputs, evaluation_set if evaluation_set is not None else calibration_set, reference_samples)
        against, parity_graph = ("QDQ", optimized) if chosen == "int8" else ("fp32", source)
        reference_outputs = _ort_outputs(parity_graph, reference_inputs)
        reference_data = f"the {len(reference_inputs)} reference input(s)" + (
            f" taken from {evaluation if evaluation_set is not None else calibration}"
            if isinstance(evaluation if evaluation_set is not None else calibration, (str, Path))
            else ""
        )
        if against == "fp32":
            _require_finite(reference_outputs, reference_data)
        verification = stages.run(
            "verify",
            lambda: _verify(lowered, staging, chosen, source, parity_graph, against, reference_inputs, reference_outputs, reference_data, isa_class),
            lambda v: {k: v[k] for k in ("against", "checked", "max_abs")},
        )
        quality = (
            stages.run(
                "evaluate",
                lambda: _evaluate(source, lowered, staging, quality_set, quality_data, max_accuracy_drop),
                lambda q: {"samples": q["samples"], "data": q["data"]},
            )
            if quality_set is not None
            else None
        )

        _save_reference(
            staging,
            to_artifact_io(reference_inputs, [s.name for s in inputs], lowered.inputs),
            to_artifact_io(reference_outputs, [s.name for s in outputs], lowered.outputs),
        )
        manifest = _finite_or_null(_manifest(
            model_path, source, profile, chosen, lowered, staging, before, after, simplify_report.nodes_after,
            quant_report, quality, verification, reference_outputs, stages.records, isa_class if chosen == "int8" else None,
        ))
        from edgeopt.report import write_report

        write_manifest(staging, manifest)
        stages.run("package", lambda: write_report(staging, manifest))
        manifest["stages"] = stages.records
        manifest["artifacts"].append(artifact_entry(staging, "report.html", "html", "report"))
        write_manifest(staging, manifest)

    packed = output_path.with_name(output_path.name + ".tar.gz") if archive else None
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


def _static_shapes(
    inputs: list[TensorSpec], given: Mapping[str, tuple[int, ...]] | None, data: Any
) -> dict[str, tuple[int, ...]]:
    """Shapes for the inputs with dynamic dimensions: --input-shape first, else the data's first sample."""
    shapes = {name: tuple(shape) for name, shape in (given or {}).items()}
    dynamic = [s for s in inputs if s.name not in shapes and not all(isinstance(d, int) and d >= 0 for d in s.shape)]
    if dynamic and data is not None:
        first = next(iter(data.take(1)))
        shapes.update({s.name: tuple(int(d) for d in np.shape(first[s.name])) for s in dynamic if s.name in first})
    return shapes


def _quality_split(precision: str, calibration: Any, evaluation: Any, evaluation_path: Any) -> tuple[Any, Any, str]:
    """(range-estimation data, quality data, its description).

    Quality is measured on --eval when given. Without it, an int8 build holds out a quarter of the
    calibration samples (at least MIN_HELD_OUT, at most 256) from range estimation; with fewer than
    2 x MIN_HELD_OUT samples it measures on all of them, in sample, and says so.
    """
    if evaluation is not None:
        return calibration, evaluation, str(evaluation_path)
    if precision != "int8" or calibration is None:
        return calibration, None, ""
    total = len(calibration)
    if total < 2 * MIN_HELD_OUT:
        return calibration, calibration, f"the {total} calibration samples (in sample: give --eval or ≥ {2 * MIN_HELD_OUT} samples to hold some out)"
    held_out = min(256, max(MIN_HELD_OUT, total // 4))
    kept = total - held_out
    return calibration.take(kept), calibration.skip(kept), f"{held_out} calibration samples held out from range estimation ({kept} used)"


def _verify(
    lowered: LoweringResult,
    staging: Path,
    precision: str,
    source: onnx.ModelProto,
    graph: onnx.ModelProto,
    against: str,
    inputs: list[dict[str, np.ndarray]],
    reference: list[dict[str, np.ndarray]],
    reference_data: str,
    isa: IsaClass | None,
) -> dict[str, Any]:
    """Lowering parity: the artifact, run here, against the graph it was lowered from."""
    from edgeopt.checks import check_parity, parity_tolerances

    run, close = _artifact_runner(lowered, staging)
    try:
        outputs = [run(sample) for sample in inputs]
    finally:
        close()
    verified_with = lowered.verified_with or str(lowered.verify_backend)
    tolerances = parity_tolerances(precision, reference, graph)
    mismatch = isa_mismatch(isa, lowered.verify_backend) if lowered.verify_backend == "openvino" else None
    fp32 = _require_finite(_ort_outputs(source, inputs), reference_data) if precision == "int8" else None
    measured = check_parity(precision, reference, outputs, None if mismatch else tolerances, against, verified_with, fp32)
    if mismatch:
        measured["note"] = f"this CPU cannot run the bundle's int8 kernels exactly ({mismatch})"
    measured["tolerances"] = tolerances
    return measured


def _evaluate(
    source: onnx.ModelProto, lowered: LoweringResult, staging: Path, dataset: Any, data: str, max_drop: float | None
) -> dict[str, Any]:
    """Quantization quality: the artifact against fp32 on held-out or evaluation data."""
    from edgeopt.checks import check_quality

    samples = [{k: np.asarray(v) for k, v in s.items()} for s in dataset]
    reference = _require_finite(_ort_outputs(source, samples), data)
    run, close = _artifact_runner(lowered, staging)
    try:
        candidate = [run(s) for s in samples]
    finally:
        close()
    quality = check_quality(reference, candidate, dataset.labels, max_drop, data)
    quality["verified_with"] = lowered.verified_with or str(lowered.verify_backend)
    return quality


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
            "tolerance": _device_tolerance(verification, lowered),
            "measured": {k: v for k, v in verification.items() if k != "tolerances"},
        },
        "stages": stages,
        "quantization": quant_report,
        "lowering": lowered.summary,
        "profiles": [],
        "benchmarks": [],
    }


_BACKEND_LIBRARIES = {"openvino-ir": ("openvino",), "tflite": ("ai_edge_litert", "flatbuffers"), "mlpackage": ("coremltools",)}


def _device_tolerance(verification: dict[str, Any], lowered: LoweringResult) -> dict[str, Any]:
    """The budget a device's parity check applies, per output under the artifact's output names.

    The build's own rule where there is one; where there is none (weights compressed in the
    lowering), twice what this host measured, so a device is held to what the build saw. fp16 and
    int8 element bounds only catch values off the output's scale, so each output also carries the
    build's noise bound as an RMS error (`rms`): drift spread over every element fails it.
    """
    tolerances = verification["tolerances"]
    measured = verification["outputs"]
    if tolerances is None:
        tolerances = {
            name: {"atol": 2.0 * o["max_abs"] + 1e-6, "rtol": 0.0, "rms": 2.0 * math.sqrt(o["noise_power"] / max(o["elements"], 1)) + 1e-6}
            for name, o in measured.items()
        }
    else:
        tolerances = {
            name: {**t, **({"rms": math.sqrt(measured[name]["allowed_noise_power"] / max(measured[name]["elements"], 1))} if "allowed_noise_power" in measured[name] else {})}
            for name, t in tolerances.items()
        }
    renamed = dict(zip(measured, (s.name for s in lowered.outputs)))
    per_output = {renamed.get(name, name): t for name, t in tolerances.items()}
    return {"atol": max(t["atol"] for t in per_output.values()), "rtol": 0.0, "outputs": per_output}


def _warnings(lowered: LoweringResult, quant_report: dict[str, Any] | None, manifest: dict[str, Any]) -> list[str]:
    notes = [str(w) for w in lowered.summary.get("warnings", [])]
    mismatch = isa_mismatch(manifest["target"]["isa"], lowered.verify_backend)
    if mismatch:
        notes.append(f"verified on a CPU that cannot run this bundle exactly: {mismatch}")
    if quant_report:
        from edgeopt.converters.quantize import describe_adaptations

        notes += [f"adapted: {line}" for line in describe_adaptations(quant_report.get("adaptations", []))]
        if all_float(manifest):
            budget = quant_report["budget"]
            notes.append(
                f"--max-accuracy-drop {budget['max_drop']:g} held only with all {len(quant_report['float_fallback'])} quantizable"
                " layers in float: this bundle computes in float, with no int8 speed-up; allow a larger drop, or build --precision fp32/fp16"
            )
    return notes
