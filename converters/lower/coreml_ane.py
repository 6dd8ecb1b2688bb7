"""Will this ML Program stay on the Apple Neural Engine? A static check of the converted program.

Core ML decides per op at load time whether it runs on the Neural Engine, the GPU or the CPU, and
Apple publishes no op list for ML Programs. The rules below are the published or widely observed
ones; each finding carries its source, and rules that rest on community observation or on our own
reasoning say "heuristic". Nothing here is measured: only Xcode's performance report or
`MLComputePlan` on a Mac can show the real placement.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from coremltools.converters.mil.mil import Program, types

from edgeopt.runtime.kinds import Precision

__all__ = ["AneFinding", "ane_fit_report"]

APPLE_ANE_TRANSFORMERS = (
    "Apple Machine Learning Research, 'Deploying Transformers on the Apple Neural Engine' (2022), "
    "https://machinelearning.apple.com/research/neural-engine-transformers"
)
COREMLTOOLS_TYPED_EXECUTION = (
    "coremltools docs, 'Typed Execution' (fp16 compute precision is what the Neural Engine runs), "
    "https://apple.github.io/coremltools/docs-guides/source/typed-execution.html"
)
APPLE_FORUM_FLEXIBLE_SHAPES = (
    "Apple Developer Forums thread 724930, answer by an Apple engineer: with range flexibility only the "
    "default shape runs on the Neural Engine; enumerated shapes can (https://developer.apple.com/forums/thread/724930); "
    "coremltools docs 'Flexible Input Shapes'"
)
COREMLTOOLS_QUANT_PERF = (
    "coremltools docs, 'Quantization: Performance' (int8-int8 compute on the Neural Engine from A17 Pro / M4; "
    "activation quantization slows CPU/GPU), https://apple.github.io/coremltools/docs-guides/source/opt-quantization-perf.html"
)
COREMLTOOLS_PALETTIZATION_PERF = (
    "coremltools docs, 'Palettization: Performance' (weights are decompressed at load time or on the fly "
    "depending on OS and compute unit), https://apple.github.io/coremltools/docs-guides/source/opt-palettization-perf.html"
)
HOLLANCE_UNSUPPORTED = (
    "heuristic: community observation from the neural-network model era (M. Hollemans, 'Which Core ML layers "
    "are not supported by the ANE?', https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md); "
    "may differ for ML Programs"
)

_MOVEMENT_OPS = frozenset({"transpose", "reshape", "expand_dims", "squeeze", "concat", "split", "slice_by_index", "slice_by_size"})
_LARGE_DIMENSION = 16384
_MAX_RANK = 5


@dataclass(frozen=True)
class AneFinding:
    """One reason (or a group of ops) that may keep part of the program off the Neural Engine or slow it."""

    rule: str
    severity: str  # "fallback" (runs on CPU/GPU), "performance" (stays but slower), "ok"
    ops: list[str]
    detail: str
    source: str


def _op_label(op: Any) -> str:
    return f"{op.op_type}:{op.name}"


def ane_fit_report(program: Program, precision: Precision, deployment_target: str) -> dict[str, Any]:
    """Findings for the converted MIL program, with a one-word verdict and counts."""
    operations = [op for op in program.functions["main"].operations if op.op_type != "const" and not op.op_type.startswith("constexpr")]
    findings: list[AneFinding] = []

    fp32_ops = [op for op in operations if op.op_type != "cast" and any(o.dtype == types.fp32 for o in op.outputs)]
    if fp32_ops:
        findings.append(AneFinding(
            "fp32-compute", "fallback", [_op_label(op) for op in fp32_ops[:20]],
            f"{len(fp32_ops)} op(s) compute in fp32; the Neural Engine computes in fp16, so they run on the GPU or CPU"
            + (" (precision fp32 was requested)" if precision is Precision.FP32 else ""),
            COREMLTOOLS_TYPED_EXECUTION + "; " + APPLE_ANE_TRANSFORMERS,
        ))

    integer_ops = [
        op for op in operations
        if op.op_type not in ("cast", "quantize", "dequantize")
        and any(o.dtype in (types.int32, types.int64, types.int16, types.bool) for o in op.outputs)
    ]
    if integer_ops:
        findings.append(AneFinding(
            "integer-compute", "fallback", [_op_label(op) for op in integer_ops[:20]],
            f"{len(integer_ops)} op(s) produce int32/bool tensors (e.g. index arithmetic, masks); the Neural Engine "
            "is a fp16 (and int8) engine, so expect these on the CPU",
            "heuristic, from the data types the Neural Engine is documented to compute in (" + COREMLTOOLS_TYPED_EXECUTION + ")",
        ))

    dynamic = [
        _op_label(op) for op in operations for o in op.outputs
        if o.shape is not None and any(not isinstance(d, int) for d in o.shape)
    ]
    findings.append(AneFinding(
        "static-shapes", "fallback" if dynamic else "ok", dynamic[:20],
        f"{len(dynamic)} tensor(s) with dynamic dimensions" if dynamic else "every tensor has a static shape",
        APPLE_FORUM_FLEXIBLE_SHAPES,
    ))

    high_rank = [_op_label(op) for op in operations for o in op.outputs if o.shape is not None and len(o.shape) > _MAX_RANK]
    if high_rank:
        findings.append(AneFinding(
            "tensor-rank", "fallback", high_rank[:20],
            f"{len(high_rank)} tensor(s) of rank > {_MAX_RANK}; the Neural Engine's native layout is 4-D channels-first",
            APPLE_ANE_TRANSFORMERS + " (4-D channels-first is the most conducive format); the rank-5 limit is heuristic",
        ))

    large = [
        _op_label(op) for op in operations for o in op.outputs
        if o.shape is not None and any(isinstance(d, int) and d > _LARGE_DIMENSION for d in o.shape)
    ]
    if large:
        findings.append(AneFinding(
            "large-dimension", "fallback", large[:20],
            f"{len(large)} tensor(s) with an axis longer than {_LARGE_DIMENSION} (very large channel counts or sequence lengths)",
            "heuristic: Neural Engine buffers have per-axis size limits that Apple does not publish; "
            + APPLE_ANE_TRANSFORMERS + " recommends chunking large tensors",
        ))

    gathers = [_op_label(op) for op in operations if op.op_type in ("gather", "gather_along_axis", "gather_nd")]
    if gathers:
        findings.append(AneFinding("gather", "fallback", gathers, "gather (e.g. embedding lookup) has been observed on the CPU", HOLLANCE_UNSUPPORTED))

    dilated = [
        _op_label(op) for op in operations
        if op.op_type in ("conv", "conv_transpose") and op.dilations is not None and any(int(d) != 1 for d in op.dilations.val)
    ]
    if dilated:
        findings.append(AneFinding("dilated-conv", "fallback", dilated, "dilated convolutions have been observed off the Neural Engine", HOLLANCE_UNSUPPORTED))

    unaligned = [
        _op_label(op) for op in operations
        if op.op_type not in ("cast",) and op.outputs and op.outputs[0].shape
        and isinstance(op.outputs[0].shape[-1], int) and op.outputs[0].shape[-1] % 32
        and len(op.outputs[0].shape) >= 2 and op.outputs[0].shape[-1] < 32
    ]
    if unaligned:
        findings.append(AneFinding(
            "last-axis-alignment", "performance", unaligned[:20],
            f"{len(unaligned)} op output(s) have a last axis shorter than 32 fp16 values; Neural Engine buffers pad the "
            "last axis to 64 bytes, so these tensors waste memory bandwidth (a (B, C, 1, S) layout with S on the last axis avoids it)",
            APPLE_ANE_TRANSFORMERS + ", principle 1 (data format)",
        ))

    movement = Counter(op.op_type for op in operations if op.op_type in _MOVEMENT_OPS)
    if movement.get("transpose", 0) + movement.get("reshape", 0) > 8:
        findings.append(AneFinding(
            "memory-copies", "performance", [f"{k}×{v}" for k, v in sorted(movement.items())],
            "many reshapes/transposes: each may be a memory copy on the Neural Engine",
            APPLE_ANE_TRANSFORMERS + ", principle 3 (minimize memory copies)",
        ))

    if precision.quantizes_activations:
        findings.append(AneFinding(
            "w8a8", "performance", [],
            "W8A8 runs int8-int8 on the Neural Engine of A17 Pro / M4 and later; older Neural Engines and the CPU/GPU "
            "dequantize activations at run time, which can be slower than fp16",
            COREMLTOOLS_QUANT_PERF,
        ))
    if precision.compresses_weights_only:
        findings.append(AneFinding(
            "compressed-weights", "ok", [],
            "compressed weights shrink the file; the Neural Engine still computes in fp16 after decompression",
            COREMLTOOLS_PALETTIZATION_PERF if precision.palette_bits else COREMLTOOLS_QUANT_PERF,
        ))

    fallback_ops = {label for f in findings if f.severity == "fallback" for label in f.ops}
    verdict = "gpu-or-cpu" if precision is Precision.FP32 else ("partial-ane" if fallback_ops else "likely-full-ane")
    return {
        "verdict": verdict,
        "ops": len(operations),
        "ops_flagged_fallback": len(fallback_ops),
        "deployment_target": deployment_target,
        "findings": [asdict(f) for f in findings],
        "note": "static rules with sources; the real placement is only visible on a Mac (Xcode performance report, MLComputePlan)",
    }
