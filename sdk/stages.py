"""The pipeline's stages: load → validate → simplify → [prune] → [recover] → check_ops → [quantize] → [finetune] → lower → verify → [evaluate] → package.

Each is a function of the `BuildContext` that fills in its own fields and returns its report.
A command lists the stages it runs (`edgeopt.context.Command`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeopt.context import BuildContext, Samples, Stage
from edgeopt.converters.analysis import io_specs, is_qdq, load_model, model_stats, unsupported_nodes
from edgeopt.converters.errors import InputShapeError, ModelLoadError, UnsupportedOpsError
from edgeopt.converters.graph.opset import onnx_opset
from edgeopt.converters.lower import LoweringOptions, LoweringResult, lower
from edgeopt.converters.passes import FixInputShapesPass, apply_passes, simplify
from edgeopt.errors import EdgeoptError, OptionError, VerificationError
from edgeopt.runtime.isa import isa_mismatch
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, Precision, PruneCriterion
from edgeopt.runtime.manifest import JsonObject, OutputTolerance, Tolerance
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target

__all__ = ["CHECK_OPS", "EVALUATE", "FINETUNE", "LOAD", "LOWER", "PRUNE", "QUANTIZE", "SIMPLIFY", "VALIDATE", "VERIFY", "to_artifact_io"]

#: Quality without --eval: calibration samples held out from range estimation (never fewer than this).
MIN_HELD_OUT = 32
#: int8 parity that fails on the few reference inputs is measured again on this many of the user's
#: samples before it is called a lowering bug. Its noise bound pools a handful of samples, and one at
#: a classifier's decision boundary decides it: the softmax multiplies the logits' one-step
#: differences (a kernel rounding a tie the other way) by p(1-p). ppocr_cls on ONNX Runtime: 4 inputs,
#: one at p = 0.55, 17.1 dB over the bound; on 512 samples the artifact is 16 dB quieter than the QDQ
#: graph's own noise (top-1 99.4% vs 99.2%). Random subsets of those 512 fail the bound 3.3% of the
#: time at 4 samples, 0.8% at 16, never at 32 (99th percentile 3.6 dB under it); a lowering bug
#: (saturating kernels) is systematic and fails on every sample.
INT8_PARITY_RECHECK_SAMPLES = 32


def load(context: BuildContext) -> JsonObject:
    source = context.source = load_model(context.options.model_path)
    context.inputs, context.outputs = io_specs(source)
    context.qat_model = is_qdq(source)
    return {"opset": onnx_opset(source) or 0, "nodes": len(source.graph.node), "changed": False}


def validate(context: BuildContext) -> JsonObject:
    """Everything the user gave is checked here, before any work or output."""
    options = context.options
    precision = context.precision = _resolve_precision(options.target, options.precision, context.qat_model)
    if options.prune is not None and context.qat_model:
        raise OptionError(
            "--prune needs a float model; this one already carries QuantizeLinear/DequantizeLinear (its scales would no longer fit)",
            hint="prune the float model before quantizing it, or build this QAT model without --prune",
        )
    if options.prune is not None and options.prune.criterion is PruneCriterion.TAYLOR:
        import edgeopt.converters.prune.taylor  # noqa: F401  (BackendUnavailableError without torch, before any work)

        if options.calibration is None:
            raise OptionError("--prune-criterion taylor ranks channels on calibration data", hint="pass --calibration data.npz, or use --prune-criterion l2")
    if options.recover is not None and options.prune is None:
        raise OptionError(
            "--recover distils the pruned model from the unpruned one; nothing is pruned without --prune",
            hint="add --prune (e.g. --prune 0.3), or drop --recover",
        )
    if precision.quantizes_activations and not context.qat_model and options.calibration is None:
        raise EdgeoptError(
            f"{precision} for {options.target.name} needs calibration data",
            hint="pass --calibration data.npz (a few hundred representative inputs), or a model with QAT Q/DQ",
        )
    max_drop = options.max_accuracy_drop
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise OptionError(
            f"--max-accuracy-drop must be a finite number of accuracy points >= 0, got {max_drop}",
            hint="e.g. --max-accuracy-drop 1 allows one accuracy point below fp32",
        )
    if max_drop is not None and options.evaluation is None:
        raise EdgeoptError("--max-accuracy-drop needs evaluation data to measure against", hint="pass --eval data.npz")
    if options.evaluation is not None:
        context.evaluation_set = _open_data(options.evaluation, context.inputs, "evaluation")
    if options.calibration is not None:
        context.calibration_set = _open_data(options.calibration, context.inputs, "calibration")
    context.range_set, context.quality_set, context.quality_data = _quality_split(context)
    if options.finetune is not None or options.recover is not None or options.train_data is not None:
        context.training_data = _training_data(context)
    context.static_shapes = _static_shapes(context.inputs, options.input_shapes, _given_data(context))
    _require_static_shapes(options.target, context.inputs, context.static_shapes)
    return {"precision": precision.value, "qat_model": context.qat_model, "changed": False}


def _resolve_precision(target: Target, asked: Precision | None, qat_model: bool) -> Precision:
    chosen = asked or (Precision.INT8 if qat_model and Precision.INT8 in target.precisions else target.default_precision)
    if chosen not in target.precisions:
        raise EdgeoptError(
            f"precision '{chosen}' is not available for {target.name}",
            hint=f"choose one of: {', '.join(p.value for p in target.precisions)}",
        )
    if qat_model and not chosen.quantizes_activations:
        raise EdgeoptError(
            f"the model already carries QuantizeLinear/DequantizeLinear (quantization-aware training) but precision '{chosen}' was asked",
            hint="build it with --precision int8 to keep its learned scales",
        )
    return chosen


def _open_data(source: Any, inputs: list[TensorSpec], role: str) -> Any:
    """Open the data and check its first sample now; the rest is checked as it streams."""
    from edgeopt.converters.data import open_dataset

    dataset = open_dataset(source, inputs, role=role)
    for _ in dataset.take(1):
        pass
    return dataset


def _training_data(context: BuildContext) -> Any:
    """--finetune's and --recover's data, read and checked now; fine-tuning needs an int8 build of an fp32 model and torch."""
    from edgeopt.converters.finetune.data import load_training_data  # BackendUnavailableError without torch
    from edgeopt.converters.finetune.train import check_labels

    options = context.options
    if options.finetune is None and options.recover is None:
        raise OptionError(
            "--train-data is read only by --finetune and --recover",
            hint="add --finetune qad (or qat, with labels) or --prune R --recover, or drop --train-data",
        )
    if options.finetune is None:
        if options.train_data is None:
            raise OptionError("--recover needs training data to distil on", hint="pass --train-data DIR|file.npz (labels as the 'labels' array are used too)")
        return load_training_data(options.train_data, context.inputs)
    mode = options.finetune.mode
    if not context.precision.quantizes_activations:
        raise OptionError(f"--finetune {mode} trains the int8 QDQ graph; precision {context.precision} has none", hint="build with --precision int8")
    if context.qat_model:
        raise OptionError(
            f"--finetune {mode} quantizes and distils from an fp32 model; this one already carries QuantizeLinear/DequantizeLinear",
            hint="fine-tune the fp32 model, or build this QAT model without --finetune to keep its scales",
        )
    if options.train_data is None:
        raise OptionError(f"--finetune {mode} needs training data", hint="pass --train-data DIR|file.npz (labels as the 'labels' array, needed by qat)")
    data = load_training_data(options.train_data, context.inputs)
    check_labels(mode, data)
    return data


def _given_data(context: BuildContext) -> Any:
    """The user's data, evaluation first: where reference inputs and dynamic shapes come from."""
    return context.evaluation_set if context.evaluation_set is not None else context.calibration_set


def _quality_split(context: BuildContext) -> tuple[Any, Any, str]:
    """(range-estimation data, quality data, its description).

    Quality is measured on --eval when given. Without it, an int8 build holds out a quarter of the
    calibration samples (at least MIN_HELD_OUT, at most 256) from range estimation; with fewer than
    2 x MIN_HELD_OUT samples it measures on all of them, in sample, and says so.
    """
    calibration = context.calibration_set
    if context.evaluation_set is not None:
        return calibration, context.evaluation_set, str(context.options.evaluation)
    if not context.precision.quantizes_activations or calibration is None:
        return calibration, None, ""
    total = len(calibration)
    if total < 2 * MIN_HELD_OUT:
        return calibration, calibration, f"the {total} calibration samples (in sample: give --eval or ≥ {2 * MIN_HELD_OUT} samples to hold some out)"
    held_out = min(256, max(MIN_HELD_OUT, total // 4))
    kept = total - held_out
    return calibration.take(kept), calibration.skip(kept), f"{held_out} calibration samples held out from range estimation ({kept} used)"


def _static_shapes(inputs: list[TensorSpec], given: Mapping[str, tuple[int, ...]] | None, data: Any) -> dict[str, tuple[int, ...]]:
    """Shapes for the inputs with dynamic dimensions: --input-shape first, else the data's first sample."""
    shapes = {name: tuple(shape) for name, shape in (given or {}).items()}
    dynamic = [s for s in inputs if s.name not in shapes and not all(isinstance(d, int) and d >= 0 for d in s.shape)]
    if dynamic and data is not None:
        first = next(iter(data.take(1)))
        shapes.update({s.name: tuple(int(d) for d in np.shape(first[s.name])) for s in dynamic if s.name in first})
    return shapes


def _require_static_shapes(target: Target, inputs: list[TensorSpec], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """TFLite runs one static shape: a dynamic size past the batch that neither --input-shape nor the data sets is
    refused before any work. The lowering made such sizes 1, silently: PP-OCR's classifier built for raspberry-pi
    became a 1x1-pixel model (0.1 M MACs), and verify passed it on 1x1 inputs."""
    if target.artifact_format is not ArtifactFormat.TFLITE:
        return
    for spec in inputs:
        sizes = list(spec.shape)
        if spec.name in shapes or all(isinstance(d, int) and d > 0 for d in sizes[1:]):
            continue
        example = ",".join(str(d) if isinstance(d, int) and d > 0 else "1" if i == 0 else "N" for i, d in enumerate(sizes))
        shown = ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in sizes)
        raise InputShapeError(
            f"input '{spec.name}' has dynamic sizes [{shown}] that neither --input-shape nor calibration or evaluation data sets, "
            f"and {target.name}'s TFLite runs one static shape",
            hint=f"pass --input-shape {spec.name}={example} with the sizes the device feeds (N: yours), or data whose first sample has them",
        )


def simplify_model(context: BuildContext) -> JsonObject:
    assert context.source is not None
    # Counted at the shapes the build runs: a source with dynamic height/width (PP-OCR) counted as 1x1
    # made 124k MACs "before" against 16.3M after.
    at_build_shapes = apply_passes(context.source, FixInputShapesPass(context.static_shapes)) if context.static_shapes else context.source
    context.stats_before = model_stats(at_build_shapes)
    context.model, report = simplify(context.source, context.static_shapes)
    context.nodes_after_simplify = report.nodes_after
    return {
        **report.to_dict(),
        "input_shapes": {k: list(v) for k, v in context.static_shapes.items()},
        "changed": report.nodes_after != report.nodes_before,
    }


def prune_model(context: BuildContext) -> JsonObject:
    """Structured pruning of the simplified fp32 graph; widths are multiples of the target's channel multiple.

    The BatchNorm-scale criterion reads |gamma| from the loaded model: simplify has folded every
    BatchNorm into its Conv by now, and the folded filter no longer shows the learned scale apart.
    The Taylor criterion runs on the first `taylor.SAMPLES` calibration samples.
    The pruned graph is what is quantized, so it is also the fp32 reference fine-tuning distils from.
    """
    from edgeopt.converters.prune import batchnorm_scales, prune

    options = context.options.prune
    assert options is not None and context.source is not None
    if options.criterion is PruneCriterion.BN_SCALE:
        options = replace(options, bn_scales=batchnorm_scales(context.source))
    if options.criterion is PruneCriterion.TAYLOR:
        from edgeopt.converters.prune.taylor import SAMPLES

        assert context.calibration_set is not None
        options = replace(options, samples=tuple(context.calibration_set.take(SAMPLES)))
    context.unpruned_model = context.lowered_model
    result = prune(context.lowered_model, options, context.sub_progress("taylor") if options.criterion is PruneCriterion.TAYLOR else None)
    context.model = context.float_model = result.model
    context.pruning = dict(result.report)
    report = result.report
    return {
        "ratio": report["ratio"],
        "groups_pruned": report["groups_pruned"],
        "groups_found": report["groups_found"],
        "macs_before": report["macs_before"],
        "macs_after": report["macs_after"],
        "changed": result.changed,
    }


def check_ops(context: BuildContext) -> JsonObject:
    """After shapes are fixed and constants folded: what is left must run on the target."""
    bad = unsupported_nodes(context.lowered_model, context.options.target)
    if bad:
        raise UnsupportedOpsError(context.options.target.name, bad)
    return {"unsupported": 0, "changed": False}


def quantize(context: BuildContext) -> JsonObject:
    from edgeopt.converters.quantize import QuantizeOptions
    from edgeopt.converters.quantize import quantize as quantize_model

    options = context.options
    context.float_model = context.lowered_model  # fine-tuning's teacher: the fp32 graph quantize received (pruned, if asked)
    result = quantize_model(
        context.lowered_model,
        options.target.scheme_for(options.isa),
        context.range_set,
        QuantizeOptions(
            method=options.calibration_method,
            effort=options.effort,
            techniques=options.techniques,
            max_accuracy_drop=options.max_accuracy_drop,
            evaluation=context.evaluation_set,
            fallback_cost_on=options.target,
        ),
        progress=context.sub_progress("calibrate"),
    )
    context.model, context.quantization = result.model, result.report
    details = {k: result.report[k] for k in ("method", "samples", "qat_imported", "float_fallback") if k in result.report}
    if "techniques" in result.report:
        details["techniques"] = result.report["techniques"]["chosen"]
    return details


def _epoch_progress(context: BuildContext, name: str, epochs: int) -> tuple[Callable[[int, int], None] | None, Callable[[Mapping[str, Any]], None]]:
    """(per-batch progress, per-epoch line) of a training stage; both silent without progress (--quiet, --json)."""
    progress, epoch = context.progress, [1]

    def on_epoch(record: Mapping[str, Any]) -> None:
        epoch[0] = record["epoch"] + 1
        if progress is not None:
            loss = "before training" if record["loss"] is None else f"loss {record['loss']:.4g}"
            progress(f"{name} epoch {record['epoch']}/{epochs}: {loss}, held-out {record['metric']} {record['score']:.4g}", 0, 0)

    return None if progress is None else (lambda done, total: progress(f"{name} epoch {epoch[0]}", done, total)), on_epoch


def recover_model(context: BuildContext) -> JsonObject:
    """Distil the pruned fp32 graph (every float initializer trains) from the unpruned one on --train-data
    (converters/finetune/ with a float student, QAD loss, labels too when given); quantize, fine-tuning
    and verify then start from the recovered graph. The figures go into the manifest's `pruning.recovery`."""
    from edgeopt.converters.finetune.train import finetune

    options = context.options.recover
    assert options is not None and context.training_data is not None and context.unpruned_model is not None and context.pruning is not None
    if context.pruning["groups_pruned"] == 0:  # training the unchanged graph on the task loss would only move it off the original
        return {"skipped": "prune removed no channel: nothing to recover", "changed": False}
    progress, on_epoch = _epoch_progress(context, "recover", options.epochs)
    result = finetune(context.lowered_model, context.unpruned_model, context.training_data, options, progress=progress, on_epoch=on_epoch)
    context.model = context.float_model = result.model
    report = result.report
    recovery = {
        "mode": report["mode"],
        "epochs": report["epochs"],
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "stopped_early": report["stopped_early"],
        "samples": report["samples"],
        "labels": report["labels"],
        "lr": report["lr"],
        "held_out_before": dict(report["held_out_before"]),
        "held_out_after": dict(report["held_out_after"]),
        "float_tensors_written": report["writeback"]["float_tensors"],
        "wall_seconds": report["wall_seconds"],
    }
    context.pruning["recovery"] = recovery
    return {
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "held_out_before": recovery["held_out_before"],
        "held_out_after": recovery["held_out_after"],
        "changed": report["best_epoch"] > 0,
    }


def finetune_model(context: BuildContext) -> JsonObject:
    """QAT or QAD of the QDQ graph (converters/finetune/): the trained weights and scales go back into it."""
    from edgeopt.converters.finetune.train import finetune

    options = context.options
    assert options.finetune is not None and context.training_data is not None and context.float_model is not None
    progress, on_epoch = _epoch_progress(context, "finetune", options.finetune.epochs)
    result = finetune(
        context.lowered_model,
        context.float_model,
        context.training_data,
        options.finetune,
        scheme=options.target.scheme_for(options.isa),
        progress=progress,
        on_epoch=on_epoch,
    )
    context.model, context.finetune = result.model, dict(result.report)
    report = result.report
    return {
        "mode": report["mode"],
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "held_out_before": dict(report["held_out_before"]),
        "held_out_after": dict(report["held_out_after"]),
        "changed": report["best_epoch"] > 0,
    }


def lower_model(context: BuildContext) -> JsonObject:
    options = context.options
    assert context.staging is not None
    lowered = context.lowered = lower(
        context.lowered_model,
        options.target,
        context.precision,
        context.staging,
        LoweringOptions(io_layout=options.io_layout, input_shapes=context.static_shapes or None, model_name=options.model_path.stem),
    )
    scalars = {k: v for k, v in lowered.summary.items() if isinstance(v, (int, float, str))}
    return {"format": options.target.artifact_format.value, **scalars}


def verify(context: BuildContext) -> JsonObject:
    """Lowering parity: the artifact, run here, against the graph it was lowered from."""
    from edgeopt.checks import check_parity, parity_tolerances

    options, lowered, precision = context.options, context.lowered, context.precision
    assert context.source is not None and lowered is not None and context.staging is not None
    inputs = context.reference_inputs = _reference_inputs(context, options.reference_samples)
    quantized = precision.quantizes_activations
    # a pruned build's float graph is the pruned one: the artifact (or the QDQ graph) is made from it
    float_graph = context.float_model if context.pruning is not None and context.float_model is not None else context.source
    against, graph = ("QDQ", context.lowered_model) if quantized else ("fp32", float_graph)
    given = options.evaluation if context.evaluation_set is not None else options.calibration
    data = f"the {len(inputs)} reference input(s)" + (f" taken from {given}" if isinstance(given, (str, Path)) else "")
    reference = context.reference_outputs = _ort_outputs(graph, inputs)
    if not quantized:
        _require_finite(reference, data)
    outputs = _run_artifact(lowered, context.staging, inputs)
    spread = _float_spread(graph, inputs, reference) if precision is Precision.FP32 else None
    tolerances = parity_tolerances(precision, reference, graph, spread)
    mismatch = isa_mismatch(options.isa, lowered.verify_backend) if lowered.verify_backend is BackendName.OPENVINO else None
    # int8's noise bound reads the QDQ graph against its float graph; an imported QDQ graph (QAT, or a QDQ model
    # saved earlier) has none beside it, so it reads the float graph under it: rounding off, ranges kept
    if quantized and (context.quantization or {}).get("qat_imported"):
        from edgeopt.converters.quantize.qat import strip_qdq

        float_graph = strip_qdq(context.source)
    fp32 = _require_finite(_ort_outputs(float_graph, inputs), data) if quantized else None
    try:
        parity = check_parity(precision, reference, outputs, None if mismatch else tolerances, against, _verified_with(lowered), fp32)
    except VerificationError:
        more = _reference_inputs(context, INT8_PARITY_RECHECK_SAMPLES) if quantized else []
        if len(more) <= len(inputs):
            raise
        more_reference = _ort_outputs(graph, more)
        tolerances = parity_tolerances(precision, more_reference, graph)
        more_fp32 = _require_finite(_ort_outputs(float_graph, more), data)
        more_outputs = _run_artifact(lowered, context.staging, more)
        parity = check_parity(precision, more_reference, more_outputs, tolerances, against, _verified_with(lowered), more_fp32)
        parity = replace(parity, note=f"the noise bound failed on the {len(inputs)} reference inputs and held on {len(more)} samples of the data")
    if mismatch:
        parity = replace(parity, note=f"this CPU cannot run the bundle's int8 kernels exactly ({mismatch})")
    context.parity = parity
    context.tolerance = _device_tolerance(tolerances, parity.outputs, lowered)
    return {"against": parity.against, "checked": parity.checked, "max_abs": parity.max_abs}


def evaluate(context: BuildContext) -> JsonObject:
    """Quantization quality: the artifact against fp32 on held-out or evaluation data."""
    from edgeopt.checks import check_quality

    assert context.source is not None and context.lowered is not None and context.staging is not None
    dataset, data = context.quality_set, context.quality_data
    samples = [{k: np.asarray(v) for k, v in s.items()} for s in dataset]
    reference = _require_finite(_ort_outputs(context.source, samples), data)
    candidate = _run_artifact(context.lowered, context.staging, samples)
    quality = check_quality(reference, candidate, dataset.labels, context.options.max_accuracy_drop, data)
    context.quality = replace(quality, verified_with=_verified_with(context.lowered))
    return {"samples": quality.samples, "data": quality.data}


def _verified_with(lowered: LoweringResult) -> str:
    return lowered.verified_with or str(lowered.verify_backend)


LOAD = Stage("load", load)
VALIDATE = Stage("validate", validate)
SIMPLIFY = Stage("simplify", simplify_model)
PRUNE = Stage("prune", prune_model, applies=lambda context: context.options.prune is not None)
RECOVER = Stage("recover", recover_model, applies=lambda context: context.options.recover is not None)
CHECK_OPS = Stage("check_ops", check_ops)
QUANTIZE = Stage("quantize", quantize, applies=lambda context: context.precision.quantizes_activations)
FINETUNE = Stage("finetune", finetune_model, applies=lambda context: context.options.finetune is not None)
LOWER = Stage("lower", lower_model)
VERIFY = Stage("verify", verify)
EVALUATE = Stage("evaluate", evaluate, applies=lambda context: context.quality_set is not None)


# -- running models and artifacts --------------------------------------------------------------


def _ort_outputs(model: onnx.ModelProto, samples: Iterable[Mapping[str, np.ndarray]]) -> Samples:
    """The model's outputs on ONNX Runtime (a QDQ graph by its exact semantics, see `ort_session`)."""
    from edgeopt.converters.graph.session import run_model

    return list(run_model(model, samples, threads=2))


def _float_spread(model: onnx.ModelProto, samples: Samples, reference: Samples) -> dict[str, float]:
    """Per output, max |Δ| of `reference` against the model run unoptimized: its float rounding sensitivity."""
    from edgeopt.converters.graph.session import run_model

    spread: dict[str, float] = {}
    for ref, plain in zip(reference, run_model(model, samples, threads=2, optimizations=False)):
        for name, value in ref.items():
            if np.issubdtype(value.dtype, np.floating):
                diff = np.abs(value.astype(np.float64) - plain[name].astype(np.float64))
                spread[name] = max(spread.get(name, 0.0), float(np.nan_to_num(diff, nan=0.0, posinf=0.0).max(initial=0.0)))
    return spread


def _require_finite(fp32_outputs: Samples, data: str) -> Samples:
    """The fp32 model's outputs, refused when any is NaN or Inf: nothing can be verified against them."""
    bad: dict[str, int] = {}
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


def _token_bound(model: onnx.ModelProto, input_name: str) -> int:
    """Largest valid index for an integer input that feeds a Gather (an embedding table)."""
    tables = {i.name: i.dims for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name and node.input[0] in tables:
            return int(tables[node.input[0]][0])
    return 2


def _random_inputs(
    model: onnx.ModelProto, specs: list[TensorSpec], shapes: Mapping[str, tuple[int, ...]], count: int, seed: int = 0
) -> Samples:
    """Seeded random inputs at the build's static shapes (a dynamic dimension without one: 1)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = {}
        for spec in specs:
            shape = shapes.get(spec.name) or tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
            if np.issubdtype(np.dtype(spec.dtype), np.integer):
                sample[spec.name] = rng.integers(0, _token_bound(model, spec.name), size=shape).astype(spec.dtype)
            elif spec.dtype == "bool":
                sample[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        samples.append(sample)
    return samples


def _reference_inputs(context: BuildContext, count: int) -> Samples:
    """A few real inputs when the user gave data (eval first), else seeded random ones."""
    assert context.source is not None
    data = _given_data(context)
    if data is not None:
        taken = []
        for sample in data:
            taken.append({k: np.asarray(v) for k, v in sample.items()})
            if len(taken) == count:
                break
        if taken:
            return taken
    return _random_inputs(context.source, context.inputs, context.static_shapes, count)


_NHWC_FROM_NCHW = (0, 2, 3, 1)
_NCHW_FROM_NHWC = (0, 3, 1, 2)


def _nhwc_names(specs: list[TensorSpec]) -> set[str]:
    return {s.name for s in specs if s.layout == "NHWC" and len(s.shape) == 4}


def to_artifact_io(samples: Samples, onnx_names: list[str], specs: list[TensorSpec]) -> Samples:
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


def _run_artifact(lowered: LoweringResult, staging: Path, samples: Samples) -> Samples:
    """The artifact's outputs on ONNX-layout inputs, in ONNX layout."""
    run, close = _artifact_runner(lowered, staging)
    try:
        return [run(sample) for sample in samples]
    finally:
        close()


def _artifact_runner(lowered: LoweringResult, staging: Path) -> tuple[Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]], Callable[[], None]]:
    if lowered.runner is not None:
        run, close = lowered.runner, (lambda: None)
    else:
        from edgeopt.runtime import load as load_artifact

        model = load_artifact(staging / lowered.model_file, backend=lowered.verify_backend, threads=2)
        run, close = model.predict, model.close
    nhwc_in, nhwc_out = _nhwc_names(lowered.inputs), _nhwc_names(lowered.outputs)
    if not nhwc_in and not nhwc_out:
        return run, close

    def run_in_onnx_layout(sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v.transpose(_NHWC_FROM_NCHW)) if k in nhwc_in else v for k, v in sample.items()}
        return {k: v.transpose(_NCHW_FROM_NHWC) if k in nhwc_out else v for k, v in run(feeds).items()}

    return run_in_onnx_layout, close


def _device_tolerance(
    tolerances: Mapping[str, Mapping[str, float]] | None, measured: Mapping[str, JsonObject], lowered: LoweringResult
) -> Tolerance:
    """The budget a device's parity check applies, per output under the artifact's output names.

    The build's own rule where there is one; where there is none (weights compressed in the
    lowering), twice what this host measured, so a device is held to what the build saw. fp16 and
    int8 element bounds only catch values off the output's scale, so each output also carries the
    build's noise bound as an RMS error (`rms`): drift spread over every element fails it.
    """
    per_output = {}
    for name, figures in measured.items():
        elements = max(figures["elements"], 1)
        if tolerances is None:
            own = OutputTolerance(atol=2.0 * figures["max_abs"] + 1e-6, rms=2.0 * math.sqrt(figures["noise_power"] / elements) + 1e-6)
        else:
            allowed = figures.get("allowed_noise_power")
            rule = tolerances[name]
            own = OutputTolerance(
                atol=rule["atol"], rtol=rule["rtol"], step=rule.get("step"), rms=None if allowed is None else math.sqrt(allowed / elements)
            )
        per_output[name] = own
    renamed = dict(zip(measured, (s.name for s in lowered.outputs)))
    outputs = {renamed.get(name, name): own for name, own in per_output.items()}
    return Tolerance(atol=max(t.atol for t in outputs.values()), rtol=0.0, outputs=outputs)
