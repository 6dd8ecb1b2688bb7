"""ONNX (float or QDQ) → Core ML ML Program (`model.mlpackage`) for the Apple Neural Engine.

coremltools no longer converts ONNX, so the graph is rebuilt op by op with its MIL builder
(`coreml_ops`), converted with `ct.convert` at the profile's deployment target and fp16 compute
precision, optionally compressed with `coremltools.optimize.coreml`, and saved. Saving works on any
OS; running needs macOS, so off macOS the build verifies with the runtime's `coreml-reference`
backend (runtime/backends/coreml_reference.py), a numpy evaluator that reads the saved package and
nothing else — the same one `edgeopt verify` and `bench` stand in with for Core ML off macOS.
"""

from __future__ import annotations

import logging
import platform
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lower.base import LoweredArtifact, LoweringOptions, LoweringResult
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, Precision, unreachable
from edgeopt.runtime.library_output import library_output_to_log
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target

if TYPE_CHECKING:  # coremltools is imported when a lowering runs
    from edgeopt.converters.lower.coreml_ops import GraphInput

__all__ = ["PACKAGE_NAME", "lower", "parse_deployment_target"]

log = logging.getLogger(__name__)

PACKAGE_NAME = "model.mlpackage"
_DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
_W8A8_MINIMUM = {"iOS": 17, "macOS": 14}


def parse_deployment_target(name: str) -> Any:
    """`ct.target` member for a profile option such as "iOS17" or "macOS14"."""
    import coremltools as ct

    match = next((t for t in _DEPLOYMENT_TARGETS if t.lower() == name.strip().lower()), None)
    if match is None:
        raise LoweringError(
            f"unknown Core ML deployment target '{name}'",
            hint=f"use one of {', '.join(_DEPLOYMENT_TARGETS)} (option deployment_target)",
        )
    return getattr(ct.target, match)


def _static_inputs(graph: ir.Graph) -> list[GraphInput]:
    """The graph's inputs with their static shapes (fixed by --input-shape in `prepare` where given)."""
    from edgeopt.converters.lower.coreml_ops import GraphInput

    inputs = []
    for value in graph.inputs:
        dims = [d if isinstance(d, int) and d > 0 else (getattr(d, "value", None) or "?") for d in (value.shape or ())]
        if any(not isinstance(d, int) for d in dims):
            example = ",".join(str(d) if isinstance(d, int) else "1" for d in dims)
            raise LoweringError(
                f"input '{value.name}' has dynamic shape {dims}; the Neural Engine needs static shapes",
                hint=f"fix it with --input-shape {value.name}={example} (options.input_shapes)",
            )
        inputs.append(GraphInput(value.name, tuple(dims), np.dtype(value.dtype.numpy())))
    return inputs


def _compression_config(precision: Precision, settings: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The coremltools.optimize call for a weight-compressed precision (None for the others)."""
    import coremltools.optimize.coreml as cto

    threshold = int(settings.get("weight_threshold", 2048))
    match precision:
        case Precision.INT8_WEIGHTS:
            config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=threshold)
            return "linear_quantize_weights", cto.OptimizationConfig(global_config=config)
        case Precision.PALETTIZED_8 | Precision.PALETTIZED_6 | Precision.PALETTIZED_4:
            mode = str(settings.get("palettization_mode", "kmeans"))
            config = cto.OpPalettizerConfig(mode=mode, nbits=precision.palette_bits, granularity="per_tensor", weight_threshold=threshold)
            return "palettize_weights", cto.OptimizationConfig(global_config=config)
        case Precision.FP32 | Precision.FP16 | Precision.INT8:
            return None
        case _:
            unreachable(precision)


def _check_precision(model: onnx.ModelProto, target: Target, precision: Precision, deployment: str) -> None:
    if precision not in target.precisions:
        raise LoweringError(
            f"precision '{precision}' is not offered by {target.name}",
            hint=f"choose one of {', '.join(target.precisions)}",
        )
    if precision.quantizes_activations:
        if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            raise LoweringError(
                "precision int8 needs a QDQ model (QuantizeLinear/DequantizeLinear pairs with calibrated scales)",
                hint="run the quantize stage first (edgeopt build … --precision int8 --calibration data.npz)",
            )
        family = "macOS" if deployment.startswith("macOS") else "iOS"
        if int(deployment.removeprefix(family)) < _W8A8_MINIMUM[family]:
            raise LoweringError(
                f"W8A8 (quantize/dequantize ops) needs iOS17/macOS14 or later; the deployment target is {deployment}",
                hint="set the option deployment_target=iOS17 (or later), or use --precision int8-weights",
            )


def _tensor_spec(name: str, feature: Any) -> TensorSpec:
    from coremltools.proto import FeatureTypes_pb2

    kinds = FeatureTypes_pb2.ArrayFeatureType
    array = feature.type.multiArrayType
    dtype = {kinds.FLOAT32: "float32", kinds.FLOAT16: "float16", kinds.INT32: "int32", kinds.DOUBLE: "float64"}[array.dataType]
    shape = tuple(int(d) for d in array.shape)
    return TensorSpec(name=name, shape=shape, dtype=dtype, layout="NCHW" if len(shape) == 4 else None)


def lower(
    model: onnx.ModelProto, target: Target, precision: Precision, out_dir: Path, options: LoweringOptions
) -> LoweringResult:
    """Write `out_dir/model.mlpackage` and return how to run and verify it."""
    with library_output_to_log(log, "coremltools"):  # import-time warnings
        import coremltools as ct
        import coremltools.optimize.coreml as cto

    from edgeopt.converters.lower.coreml_ane import ane_fit_report
    from edgeopt.converters.lower.coreml_ops import build_program, check_supported, mil_name, prepare
    from edgeopt.runtime.backends.coreml_reference import MilReferenceEvaluator

    settings = {**target.options, **options.extra}
    deployment = str(settings.get("deployment_target", "iOS17"))
    opset = parse_deployment_target(deployment)
    _check_precision(model, target, precision, deployment)
    prepared = prepare(model, options.input_shapes)
    check_supported(prepared, target.name)
    inputs = _static_inputs(prepared.graph)

    program, output_names = build_program(prepared, inputs, opset, target.name)
    compute = ct.precision.FLOAT32 if precision is Precision.FP32 else ct.precision.FLOAT16  # the rest compute in fp16
    log.info("converting MIL program to an ML Program (%s, compute %s)", deployment, compute.value)
    with library_output_to_log(log, "coremltools"):  # a progress bar per MIL pass pipeline
        mlmodel = ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=opset,
            compute_precision=compute,
            compute_units=getattr(ct.ComputeUnit, str(settings.get("compute_units", "ALL"))),
            skip_model_load=platform.system() != "Darwin",
        )
    compression = _compression_config(precision, settings)
    if compression is not None:
        method, config = compression
        log.info("compressing weights: %s", method)
        with library_output_to_log(log, "coremltools"):
            mlmodel = getattr(cto, method)(mlmodel, config)

    out_dir.mkdir(parents=True, exist_ok=True)
    package = out_dir / PACKAGE_NAME
    mlmodel.short_description = f"{options.model_name} for {target.name} ({precision}), written by edgeopt"
    mlmodel.save(str(package))

    spec = mlmodel.get_spec()
    feature_names = {i.name: mil_name(i.name) for i in inputs} | output_names
    described = {f.name: f for f in (*spec.description.input, *spec.description.output)}
    input_specs = [_tensor_spec(feature_names[i.name], described[feature_names[i.name]]) for i in inputs]
    output_specs = [_tensor_spec(output_names[o.name], described[output_names[o.name]]) for o in model.graph.output]
    mil_ops = Counter(op.op_type for op in mlmodel._mil_program.functions["main"].operations if op.op_type != "const")
    compressed = sum(count for op, count in mil_ops.items() if op.startswith("constexpr"))

    on_mac = platform.system() == "Darwin"
    # Core ML predicts on macOS only; elsewhere the numpy evaluator runs the saved package.
    predict = ct.models.MLModel(str(package)).predict if on_mac else MilReferenceEvaluator(package)
    feature_dtypes = {spec.name: np.dtype(spec.dtype) for spec in input_specs}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ONNX-named feeds in, ONNX-named outputs out (int64 ids become the int32 Core ML takes)."""
        features = {feature_names.get(name, name): np.asarray(value) for name, value in feeds.items()}
        features = {name: value.astype(feature_dtypes.get(name, value.dtype)) for name, value in features.items()}
        results = predict(features)
        return {onnx_name: np.asarray(results[feature]) for onnx_name, feature in output_names.items()}

    summary: dict[str, Any] = {
        "deployment_target": deployment,
        "compute_precision": "fp32" if compute == ct.precision.FLOAT32 else "fp16",
        "compression": compression[0] if compression else ("qdq-w8a8" if precision.quantizes_activations else None),
        "compressed_weights": compressed,
        "package_bytes": sum(f.stat().st_size for f in package.rglob("*") if f.is_file()),
        "feature_names": {k: v for k, v in feature_names.items() if k != v},
        "mil_ops": dict(sorted(mil_ops.items())),
        "ane_fit": ane_fit_report(mlmodel._mil_program, precision, deployment),
    }
    return LoweringResult(
        artifacts=[LoweredArtifact(path=PACKAGE_NAME, format=ArtifactFormat.MLPACKAGE, role="model")],
        model_file=PACKAGE_NAME,
        runtime_backend=BackendName.COREML,
        verify_backend=BackendName.COREML if on_mac else BackendName.COREML_REFERENCE,
        inputs=input_specs,
        outputs=output_specs,
        summary=summary,
        runner=run,
        verified_with="coreml" if on_mac else "coreml-reference (numpy evaluator of the saved program), not Core ML",
    )
