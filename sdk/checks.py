"""The build's two checks, kept apart (docs/design.md, "Verification").

*Lowering parity* — did the lowering preserve the graph? The artifact against the graph it was
lowered from: the QDQ graph by its exact semantics for int8, the fp32 model for fp32/fp16. Each
output must satisfy |Δ| ≤ atol + rtol · max|ref| (for int8, max|ref| at least the largest value of the
output's int8 grid, + two steps of it, where the QDQ graph dequantizes it). A miss is a lowering bug: VerificationError, exit 3.

*Quantization quality* — how much did quantization cost? The artifact against fp32 on evaluation
data (or calibration samples held out from range estimation), reported per output. It fails only
on the user's budget (QualityBudgetError) or a broken result: non-finite outputs, or a cosine over
all samples below `QUALITY_FLOOR_COSINE` on any output (VerificationError).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.bundle import finite_or_null
from edgeopt.converters.errors import QualityBudgetError
from edgeopt.converters.metrics import fidelity, quality_drop
from edgeopt.errors import VerificationError
from edgeopt.runtime.kinds import Precision
from edgeopt.runtime.manifest import Parity, Quality, QualityBudget, QualityMetric

__all__ = [
    "PARITY",
    "QUALITY_FLOOR_COSINE",
    "check_parity",
    "check_quality",
    "parity_tolerances",
]

Outputs = Mapping[str, np.ndarray]

#: (atol, rtol) of lowering parity per precision; None: weights are compressed inside the lowering,
#: so no graph computes exactly what the artifact should (its cost is measured as quality instead).
PARITY: dict[Precision, tuple[float, float] | None] = {
    Precision.FP32: (1e-4, 1e-4),  # same math, other kernels and summation orders
    # fp16 and int8 round differently from their reference at every layer, and a steep output (a DB
    # text map's sigmoid) turns that into single elements flipping by up to its whole range; their
    # element bound only catches values off the output's scale, the noise bounds below decide.
    Precision.FP16: (0.0, 1.0),
    Precision.INT8: (0.0, 1.0),
    Precision.INT8_WEIGHTS: None,
    Precision.PALETTIZED_8: None,
    Precision.PALETTIZED_6: None,
    Precision.PALETTIZED_4: None,
}
#: An fp32 artifact may differ from its graph by this many times what ONNX Runtime's own graph
#: optimizations move the outputs (`parity_tolerances`' float_spread). A well-conditioned model moves
#: ~1e-5 and the fixed budget above decides; one that amplifies rounding (measured: PP-OCR rec pruned
#: at 0.6 without recovery, ORT optimized vs unoptimized 1.1e-4 on its softmax, XNNPACK 4.1e-4, where
#: the unpruned model moves 1.4e-5 and 8.4e-6) would fail a correct lowering on summation order alone.
#: A lowering bug moves outputs by their own scale, far beyond either.
FLOAT_SPREAD_FACTOR = 8.0
#: Extra int8 allowance in steps of the output's own grid, where the QDQ graph dequantizes the output.
INT8_OUTPUT_STEPS = 2.0
#: int8 also bounds the artifact's noise against the QDQ graph by the QDQ graph's own quantization
#: noise against fp32 (power ratio; 4 = 6 dB): a kernel that re-rounds where the graph rounds
#: diverges by about one rounding per layer, the size of the quantization noise itself; a lowering
#: bug is not bounded by it.
INT8_NOISE_RATIO = 4.0
#: fp16's noise bound: RMS error at most this share of the output's RMS (SQNR ≥ 40 dB against fp32).
FP16_RELATIVE_RMS = 1e-2
#: Below this cosine with fp32 (over all samples at once: a per-sample cosine means nothing on a text
#: map with nothing to detect) an output is unrelated to the model's: a broken build, not a costly one.
QUALITY_FLOOR_COSINE = 0.5


def _output_grids(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Output name -> (its int8 grid step, the largest |value| its grid holds), for outputs produced by a
    per-tensor DequantizeLinear."""
    producers = {o: n for n in model.graph.node for o in n.output}
    arrays = {i.name: i for i in model.graph.initializer}
    grids = {}
    for output in model.graph.output:
        node = producers.get(output.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in arrays:
            scale = numpy_helper.to_array(arrays[node.input[1]])
            zero = numpy_helper.to_array(arrays[node.input[2]]) if len(node.input) > 2 and node.input[2] in arrays else np.uint8(0)
            if scale.size == 1 and zero.size == 1:
                info = np.iinfo(zero.dtype)
                step, zero_point = float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
                grids[output.name] = (step, step * max(abs(info.min - zero_point), abs(info.max - zero_point)))
    return grids


def parity_tolerances(
    precision: Precision,
    reference: Sequence[Outputs],
    graph: onnx.ModelProto | None,
    float_spread: Mapping[str, float] | None = None,
) -> dict[str, dict[str, float]] | None:
    """Per output {atol, rtol=0}: the absolute budget atol_p + rtol_p·max|ref| (+ int8 output steps).

    An int8 output the QDQ graph dequantizes has its grid's largest |value| as its scale when the samples
    reach less of it: verification inputs without anything to detect (no text under a DB map's sigmoid,
    max 0.03) would otherwise leave one steep pixel's rounding no room (PP-OCRv4 det for raspberry-pi
    built from its QDQ graph without data: 0.21 on one pixel against 0.035 allowed, its noise in bounds).
    `float_spread`: per output, max |Δ| between the reference and the same graph run unoptimized; an
    fp32 budget is at least `FLOAT_SPREAD_FACTOR` times it (see there).
    """
    rule = PARITY[precision]
    if rule is None:
        return None
    atol_p, rtol_p = rule
    grids = _output_grids(graph) if precision is Precision.INT8 and graph is not None else {}
    tolerances = {}
    for name in reference[0]:
        finite = [np.abs(s[name][np.isfinite(s[name])]) for s in reference]
        peak = max((float(a.max()) for a in finite if a.size), default=0.0)
        step, grid_peak = grids.get(name, (0.0, 0.0))
        atol = atol_p + rtol_p * max(peak, grid_peak) + INT8_OUTPUT_STEPS * step
        if float_spread and precision is Precision.FP32:
            atol = max(atol, FLOAT_SPREAD_FACTOR * float_spread.get(name, 0.0))
        tolerances[name] = {"atol": atol, "rtol": 0.0}
        if name in grids:
            tolerances[name]["step"] = step
    return tolerances


def check_parity(
    precision: Precision,
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    tolerances: Mapping[str, Mapping[str, float]] | None,
    against: str,
    verified_with: str,
    fp32: Sequence[Outputs] | None = None,
) -> Parity:
    """Per-output max |Δ| (and for int8 noise power) against the reference; VerificationError on a miss.

    `fp32`: the fp32 model's outputs on the same inputs, for int8's noise bound.
    """
    outputs: dict[str, dict[str, float]] = {}
    for name in reference[0]:
        worst, peak, noise, quantization, signal = 0.0, 0.0, 0.0, 0.0, 0.0
        for index, (ref, got) in enumerate(zip(reference, candidate)):
            expected = np.asarray(ref[name], dtype=np.float64)
            actual = np.asarray(got[name], dtype=np.float64).reshape(expected.shape)
            diff = np.abs(actual - expected)
            diff[np.isnan(actual) & np.isnan(expected)] = 0.0
            diff = np.nan_to_num(diff, nan=np.inf)
            worst = max(worst, float(diff.max(initial=0.0)))
            noise += float(np.sum(np.minimum(diff, 1e150) ** 2))
            peak = max(peak, float(np.abs(expected[np.isfinite(expected)]).max(initial=0.0)))
            signal += float(np.sum(np.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0) ** 2))
            if fp32 is not None:
                float_out = np.asarray(fp32[index][name], dtype=np.float64).reshape(expected.shape)
                quantization += float(np.sum(np.nan_to_num(expected - float_out, nan=0.0) ** 2))
        elements = sum(np.asarray(r[name]).size for r in reference)
        outputs[name] = {
            "max_abs": worst, "max_rel": worst / peak if peak else (0.0 if worst == 0 else math.inf), "noise_power": noise, "elements": elements,
        }
        if tolerances is not None:
            outputs[name]["allowed"] = tolerances[name]["atol"]
            # plus one output step (or a float rounding) per element, for outputs that are (nearly) exact
            floor = elements * (tolerances[name].get("step", 0.0) ** 2 + (1e-5 * peak) ** 2)
            if precision is Precision.INT8 and fp32 is not None:
                outputs[name]["allowed_noise_power"] = INT8_NOISE_RATIO * quantization + floor
            elif precision is Precision.FP16:
                outputs[name]["allowed_noise_power"] = FP16_RELATIVE_RMS**2 * signal + floor
    outputs = {k: {f: (v if math.isfinite(v) else 1e308) for f, v in o.items()} for k, o in outputs.items()}
    measured = Parity(
        against=against,
        checked=tolerances is not None,
        max_abs=max(o["max_abs"] for o in outputs.values()),
        max_rel=max(o["max_rel"] for o in outputs.values()),
        outputs=outputs,
        verified_with=verified_with,
        note=None if tolerances is not None else f"{precision} compresses weights inside the lowering: no graph to check parity against; see quality",
    )
    if tolerances is None:
        return measured
    noisy = [(k, o) for k, o in outputs.items() if "allowed_noise_power" in o and not o["noise_power"] <= o["allowed_noise_power"]]
    if noisy and precision is Precision.FP16:
        name, worst = noisy[0]
        raise VerificationError(
            f"the fp16 artifact does not compute its fp32 graph: output '{name}' has SQNR "
            f"{_db(worst['allowed_noise_power'] / FP16_RELATIVE_RMS**2, worst['noise_power'])} against it"
            f" (needs ≥ {-20 * math.log10(FP16_RELATIVE_RMS):.0f} dB; {verified_with}) — a lowering bug",
            hint="please report the model; `edgeopt inspect` shows its ops, and --precision fp32 builds without this lowering path",
        )
    if noisy:
        name, worst = noisy[0]
        raise VerificationError(
            f"the {precision} artifact does not compute its {against} graph: output '{name}' is {_db(worst['noise_power'], worst['allowed_noise_power'] / INT8_NOISE_RATIO)}"
            f" noisier against the QDQ graph than the QDQ graph is against fp32 (allowed: {10 * math.log10(INT8_NOISE_RATIO):.0f} dB; {verified_with}) — a lowering bug",
            hint="please report the model; `edgeopt inspect` shows its ops, and --precision fp32 builds without this lowering path",
        )
    misses = [(k, o) for k, o in outputs.items() if not o["max_abs"] <= o["allowed"]]
    if misses:
        name, worst = max(misses, key=lambda item: item[1]["max_abs"] / max(item[1]["allowed"], 1e-30))
        rule = PARITY[precision]
        raise VerificationError(
            f"the {precision} artifact does not compute its {against} graph: output '{name}' differs by max |Δ| "
            f"{worst['max_abs']:.3g} where {worst['allowed']:.3g} is allowed (atol {rule[0]:g} + rtol {rule[1]:g}·max|ref|"
            + (f" + {INT8_OUTPUT_STEPS:g} output steps" if precision is Precision.INT8 else "")
            + f"; {verified_with}) — a lowering bug",
            hint="please report the model; `edgeopt inspect` shows its ops, and --precision fp32 builds without this lowering path",
        )
    return measured


def _db(power: float, reference: float) -> str:
    if reference <= 0.0:
        return "noisy where the QDQ graph equals fp32"
    return f"{10 * math.log10(max(power, 1e-300) / reference):.1f} dB"


def check_quality(
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    labels: np.ndarray | None,
    max_drop: float | None,
    data: str,
) -> Quality:
    """Fidelity against fp32 per output; raises on a missed budget or a broken result."""
    figures = fidelity(reference, candidate, labels=labels)
    broken = [
        f"'{name}' has {values['nonfinite']} non-finite values" if values.get("nonfinite") else f"'{name}' has cosine {values['cosine']:.3f}"
        for name, values in figures["outputs"].items()
        if values.get("nonfinite") or values["cosine"] < QUALITY_FLOOR_COSINE
    ]
    if broken:
        raise VerificationError(
            f"the optimized model is broken against fp32 on {figures['samples']} samples of {data}: {'; '.join(broken)}"
            f" (floor: finite outputs, cosine ≥ {QUALITY_FLOOR_COSINE} over all samples)",
            hint="see the per-layer SQNR with `edgeopt inspect MODEL --target T --quant-debug DATA`; keep sensitive layers in float"
            " with --max-accuracy-drop, or try --calibration-method percentile|entropy|mse",
        )
    budget = None
    if max_drop is not None:
        drop, metric = quality_drop(figures)
        budget = QualityBudget(metric=metric, max_drop=max_drop, drop=drop)
        if drop > max_drop:
            raise QualityBudgetError(
                f"{metric} is {drop:.3g} points on {figures['samples']} samples of {data}; the budget (--max-accuracy-drop) is {max_drop:g} points",
                hint="raise --max-accuracy-drop, calibrate on more representative data, or build a higher precision;"
                " `edgeopt inspect MODEL --target T --quant-debug DATA` shows which layers lose most",
            )
    finite = finite_or_null(figures)
    return Quality(data=data, samples=finite["samples"], metrics=_rows(finite), fidelity=finite, budget=budget)


def _rows(figures: Mapping[str, Any]) -> tuple[QualityMetric, ...]:
    """The fidelity figures as (name, output, fp32, optimized, delta) rows for the summary and report."""
    rows = []
    for output, values in figures.get("outputs", {}).items():
        if values.get("accuracy_fp32") is not None:
            rows.append(_row("accuracy", output, values["accuracy_fp32"], values["accuracy"]))
        if values.get("top1_agreement") is not None:
            rows.append(_row("top1_agreement", output, 1.0, values["top1_agreement"]))
        rows += [_row(name, output, 1.0, values[name]) for name in ("cosine", "cosine_mean", "cosine_p5")]
    return tuple(rows)


def _row(name: str, output: str, fp32: float, optimized: float | None) -> QualityMetric:
    return QualityMetric(name, output, fp32, optimized, None if optimized is None else optimized - fp32)
