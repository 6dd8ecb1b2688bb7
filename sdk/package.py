"""The package stage: reference data, the typed manifest and the report, into the staging folder.

The manifest is written last (`write_build_manifest`, the command's finish), once the package
stage's own report is in it; the staging folder then replaces the output.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import numpy as np

import edgeopt
from edgeopt.bundle import SCHEMA_VERSION, finite_or_null, measured_artifact, toolchain_fingerprint, write_manifest
from edgeopt.context import BuildContext, Samples, Stage
from edgeopt.converters.analysis import model_stats
from edgeopt.converters.graph.opset import onnx_opset
from edgeopt.runtime.bundle import sha256_path
from edgeopt.runtime.kinds import ArtifactFormat, BackendName
from edgeopt.runtime.manifest import Compression, JsonObject, Manifest, Reference, RuntimeSection, SourceModel, TargetInfo
from edgeopt.stages import to_artifact_io

__all__ = ["PACKAGE", "write_build_manifest"]

REPORT = "report.html"


def package(context: BuildContext) -> JsonObject:
    from edgeopt.report import write_report

    assert context.staging is not None and context.lowered is not None
    _save_reference(
        context.staging,
        to_artifact_io(context.reference_inputs, [s.name for s in context.inputs], context.lowered.inputs),
        to_artifact_io(context.reference_outputs, [s.name for s in context.outputs], context.lowered.outputs),
    )
    context.manifest = _manifest(context)
    write_report(context.staging, context.manifest)
    return {}


PACKAGE = Stage("package", package)


def write_build_manifest(context: BuildContext) -> None:
    """The manifest with every stage's report and the report's checksum, as the bundle's last file."""
    assert context.manifest is not None and context.staging is not None
    report = measured_artifact(context.staging, REPORT, "html", "report")
    context.manifest = replace(context.manifest, stages=tuple(context.reports), artifacts=(*context.manifest.artifacts, report))
    write_manifest(context.staging, context.manifest)


def _save_reference(staging: Path, inputs: Samples, outputs: Samples) -> None:
    folder = staging / "reference"
    folder.mkdir()
    np.savez(folder / "inputs.npz", **{name: np.concatenate([s[name] for s in inputs]) for name in inputs[0]})
    np.savez(folder / "outputs.npz", **{name: np.concatenate([s[name] for s in outputs]) for name in outputs[0]})


#: libraries each format's lowering uses, for the toolchain fingerprint
_FORMAT_LIBRARIES: dict[ArtifactFormat, tuple[str, ...]] = {
    ArtifactFormat.OPENVINO_IR: ("openvino",),
    ArtifactFormat.TFLITE: ("ai_edge_litert", "flatbuffers"),
    ArtifactFormat.MLPACKAGE: ("coremltools",),
}


def _manifest(context: BuildContext) -> Manifest:
    options, lowered, staging = context.options, context.lowered, context.staging
    assert lowered is not None and staging is not None and context.source is not None and context.stats_before is not None
    target, source, before = options.target, context.source, context.stats_before
    after = model_stats(context.lowered_model)
    artifacts = tuple(measured_artifact(staging, a.path, str(a.format), a.role) for a in lowered.artifacts) + tuple(
        measured_artifact(staging, f"reference/{n}.npz", "npz", "reference") for n in ("inputs", "outputs")
    )
    model_bytes = sum(a.bytes or 0 for a in artifacts if a.role in ("model", "weights"))
    source_bytes = options.model_path.stat().st_size
    return Manifest(
        schema_version=SCHEMA_VERSION,
        edgeopt_version=edgeopt.__version__,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        name=options.model_path.stem,
        target=TargetInfo(
            name=target.name,
            backend=target.backend,
            artifact_format=target.artifact_format,
            layout=target.layout,
            isa=options.isa if context.precision.quantizes_activations else None,
        ),
        precision=context.precision,
        toolchain=toolchain_fingerprint({"numpy", "onnx", "onnx_ir", "onnxruntime", *_FORMAT_LIBRARIES.get(target.artifact_format, ())}),
        source_model=SourceModel(
            file=options.model_path.name,
            sha256=sha256_path(options.model_path),
            bytes=source_bytes,
            opset=onnx_opset(source) or 0,
            producer=f"{source.producer_name} {source.producer_version}".strip(),
        ),
        artifacts=artifacts,
        runtime=RuntimeSection(
            backend=BackendName(lowered.runtime_backend),  # a lowering not yet typed may give its value
            model=lowered.model_file,
            install=target.runtime_install,
            threads=target.default_threads,
            options=lowered.runtime_options
            if lowered.runtime_options is not None
            else {k: v for k, v in target.options.items() if isinstance(v, (str, int, float, bool))},
        ),
        inputs=tuple(lowered.inputs),
        outputs=tuple(lowered.outputs),
        compression=Compression(
            parameters_before=before.parameters,
            parameters_after=after.parameters,
            macs_before=before.macs,
            macs_after=after.macs,
            bytes_before=source_bytes,
            bytes_after=model_bytes,
            nodes_before=before.nodes,
            nodes_after=context.nodes_after_simplify,
            pruning_ratio=(context.pruning or {}).get("ratio", 0.0),
            quantized_op_share=(context.quantization or {}).get("quantized_op_share", 0.0),
        ),
        quality=context.quality,
        reference=Reference(
            inputs="reference/inputs.npz",
            outputs="reference/outputs.npz",
            samples=len(context.reference_outputs),
            tolerance=context.tolerance,
            measured=context.parity,
        ),
        stages=tuple(context.reports),
        pruning=finite_or_null(context.pruning),
        quantization=finite_or_null(context.quantization),
        finetune=finite_or_null(context.finetune),
        lowering=finite_or_null(lowered.summary),
        profiles=(),
        benchmarks=(),
    )
