"""`edgeopt inspect`: what a model takes and returns, what it costs, what a target cannot run,
where int8 will hurt, and, for a QDQ model, which of the target's Q/DQ rules it breaks."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeopt.converters.analysis import (
    OPSET_CONVERTED_FROM_KEY,
    Advice,
    ModelStats,
    io_specs,
    is_qdq,
    load_model,
    model_stats,
    quantization_advice,
    unsupported_nodes,
)
from edgeopt.converters.lint import Finding, lint_qdq
from edgeopt.runtime.errors import EdgeoptError
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target, get_target

if TYPE_CHECKING:
    import onnx

__all__ = ["InspectReport", "inspect_model"]

DEBUG_SAMPLES = 16
"""Samples the per-layer SQNR report runs (calibration of a float model uses all of them)."""

TOP_OPS = 12
ADVICE_PER_RULE = 5
WORST_LAYERS = 10


@dataclass
class InspectReport:
    """Everything `edgeopt inspect` shows; `to_dict` is the `--json` form, `format_text` the readable one."""

    path: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    stats: ModelStats
    target: str | None
    unsupported: list[tuple[str, str, str]]
    advice: list[Advice]
    lint: list[Finding] | None
    is_qdq: bool
    quant_debug: list[dict[str, Any]] | None = None
    opset_converted_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "stats": self.stats.to_dict(),
            "opset_converted_from": self.opset_converted_from,
            "target": self.target,
            "unsupported": [{"node": node, "op": op, "why": why} for node, op, why in self.unsupported],
            "advice": [a.to_dict() for a in self.advice],
            "is_qdq": self.is_qdq,
            "lint": None if self.lint is None else [f.to_dict() for f in self.lint],
            "quant_debug": self.quant_debug,
        }

    def format_text(self) -> str:
        sections = [
            self._header(),
            _section("Inputs", _table(["name", "shape", "dtype"], [_spec_row(s) for s in self.inputs])),
            _section("Outputs", _table(["name", "shape", "dtype"], [_spec_row(s) for s in self.outputs])),
            self._ops(),
        ]
        if self.target is not None:
            sections.append(self._unsupported())
        sections.append(self._advice())
        if self.lint is not None:
            sections.append(self._lint())
        if self.quant_debug is not None:
            sections.append(self._quant_debug())
        return "\n\n".join(sections) + "\n"

    def _header(self) -> str:
        s = self.stats
        opset = f"opset {s.opset}" + (f" (converted from {self.opset_converted_from})" if self.opset_converted_from else "")
        kind = "QDQ (quantized)" if self.is_qdq else "float"
        lines = [
            self.path,
            f"  {opset}, {kind}, {s.nodes} nodes",
            f"  parameters  {s.parameters:,}",
            f"  MACs        {_human(s.macs)}" + (f"  ({len(s.macs_uncounted)} node(s) without static shapes not counted)" if s.macs_uncounted else ""),
            f"  size        {_human_bytes(s.bytes)}",
        ]
        if self.target is not None:
            lines.append(f"  target      {self.target}")
        return "\n".join(lines)

    def _ops(self) -> str:
        histogram = list(self.stats.op_histogram.items())
        rows = [[op, str(count)] for op, count in histogram[:TOP_OPS]]
        rest = histogram[TOP_OPS:]
        if rest:
            rows.append([f"({len(rest)} more kinds)", str(sum(count for _, count in rest))])
        title = f"Ops ({len(histogram)} kinds)"
        return _section(title, _table(["op", "count"], rows))

    def _unsupported(self) -> str:
        if not self.unsupported:
            return _section("Unsupported nodes", f"  none: every node runs on {self.target}")
        rows = [[node, op, why] for node, op, why in self.unsupported]
        return _section(f"Unsupported nodes ({len(rows)}) on {self.target}", _table(["node", "op", "why"], rows))

    def _advice(self) -> str:
        if not self.advice:
            return _section("Quantization advice", "  none")
        by_rule: dict[str, list[Advice]] = defaultdict(list)
        for advice in self.advice:
            by_rule[advice.rule].append(advice)
        lines = []
        for rule, items in by_rule.items():
            lines.append(f"  {rule} ({len(items)})")
            lines += [f"    {a.node}: {a.message}" for a in items[:ADVICE_PER_RULE]]
            if len(items) > ADVICE_PER_RULE:
                lines.append(f"    ... and {len(items) - ADVICE_PER_RULE} more (see --json)")
        return _section(f"Quantization advice ({len(self.advice)})", "\n".join(lines))

    def _lint(self) -> str:
        findings = self.lint or []
        errors = sum(f.severity == "error" for f in findings)
        title = f"Q/DQ lint for {self.target}: {errors} error(s), {len(findings) - errors} warning(s)"
        if not findings:
            return _section(title, "  the Q/DQ graph follows every rule of the target")
        lines = [f"  {f.severity:<7} {f.rule:<28} {f.node}: {f.message}" for f in findings]
        return _section(title, "\n".join(lines))

    def _quant_debug(self) -> str:
        layers = [entry for entry in self.quant_debug or [] if entry.get("kind") == "layer"]
        activations = [entry for entry in self.quant_debug or [] if entry.get("kind") == "activation"]
        if not layers and not activations:
            return _section("Per-layer SQNR", "  no quantized layers")
        lines = []
        if layers:
            worst = sorted(layers, key=lambda e: e["sqnr_db"])[:WORST_LAYERS]
            rows = [[e["node"], e["op"], f"{e['sqnr_db']:.1f}", f"{e['added_noise']:.2e}"] for e in worst]
            lines.append(_table(["layer (lowest SQNR first)", "op", "SQNR dB", "added noise"], rows))
        if activations:
            worst = sorted(activations, key=lambda e: e["quantization_sqnr_db"])[:WORST_LAYERS]
            rows = [[e["tensor"], f"{e['sqnr_db']:.1f}", f"{e['quantization_sqnr_db']:.1f}"] for e in worst]
            lines.append(_table(["tensor (worst rounding first)", "SQNR dB", "own rounding dB"], rows))
        title = f"Per-layer SQNR ({len(layers)} layers, {len(activations)} quantized tensors)"
        return _section(title, "\n\n".join(lines))


def inspect_model(
    model_path: str | Path,
    target: Target | str | None = None,
    *,
    quant_debug_data: str | Path | None = None,
) -> InspectReport:
    """Load and describe a model; with a target, also what it cannot run and (for QDQ) the lint.

    `quant_debug_data` (.npz or anything `open_dataset` reads) adds per-layer SQNR: a QDQ model is
    compared with its own float form; a float model is first quantized in the target's scheme.
    """
    profile = get_target(target) if isinstance(target, str) else target
    model = load_model(model_path)
    inputs, outputs = io_specs(model)
    qdq = is_qdq(model)
    converted = next((p.value for p in model.metadata_props if p.key == OPSET_CONVERTED_FROM_KEY), None)
    return InspectReport(
        path=str(model_path),
        inputs=inputs,
        outputs=outputs,
        stats=model_stats(model),
        target=profile.name if profile else None,
        unsupported=unsupported_nodes(model, profile) if profile else [],
        advice=quantization_advice(model, profile),
        lint=lint_qdq(model, profile) if profile and qdq else None,
        is_qdq=qdq,
        quant_debug=_quant_debug(model, profile, quant_debug_data, inputs) if quant_debug_data is not None else None,
        opset_converted_from=int(converted) if converted else None,
    )


def _quant_debug(model: onnx.ModelProto, target: Target | None, data: str | Path, inputs: list[TensorSpec]) -> list[dict[str, Any]]:
    try:
        from edgeopt.converters.quantize import QuantizeOptions, layer_sqnr, quantize
        from edgeopt.converters.quantize.qat import strip_qdq
    except ImportError as exc:
        raise EdgeoptError(
            f"--quant-debug needs edgeopt's quantization engine (edgeopt.converters.quantize), which cannot be imported: {exc}",
            hint="reinstall edgeopt with its ONNX extra: pip install 'edgeopt[onnx]'",
        ) from exc
    from edgeopt.converters.data import open_dataset
    from edgeopt.converters.passes import simplify

    dataset = open_dataset(data, inputs, role="calibration")
    if is_qdq(model):
        return layer_sqnr(strip_qdq(model), model, dataset.take(DEBUG_SAMPLES))
    if target is None:
        raise EdgeoptError(
            "--quant-debug on a float model needs --target: the target's scheme decides how it is quantized",
            hint="add e.g. --target jetson-orin, or pass a model that is already QDQ",
        )
    simplified, _ = simplify(model)
    result = quantize(simplified, target.quant_scheme, dataset, QuantizeOptions(debug_samples=DEBUG_SAMPLES))
    return list(result.report["per_layer_sqnr"])


# --------------------------------------------------------------------------------------------
# Text helpers


def _section(title: str, body: str) -> str:
    return f"{title}\n{body}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "  (none)"
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)] + [str(row[-1])]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _spec_row(spec: TensorSpec) -> list[str]:
    shape = "x".join(str(d) if d is not None else "?" for d in spec.shape) or "scalar"
    return [spec.name, shape, spec.dtype]


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
