"""Parity on the device: run the bundle's reference inputs, compare with the stored fp32 outputs.

An output passes when |y - y_ref| <= atol + rtol * |y_ref| everywhere (numpy.allclose's rule),
with atol and rtol from the manifest's reference.tolerance, and, where the build recorded one, its
RMS error over all reference elements is at most the output's `rms`: the element bound of fp16 and
int8 bundles only catches values off the output's scale, the RMS bound catches drift everywhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.runtime.errors import BundleError, VerificationError
from edgeopt.runtime.kinds import BackendName

if TYPE_CHECKING:
    from edgeopt.runtime.model import Model

__all__ = ["OutputComparison", "VerifyResult", "reference_batches", "verify", "verify_model"]


@dataclass
class OutputComparison:
    """How one output compared with its reference."""

    name: str
    passed: bool
    max_abs: float
    max_rel: float
    mismatched: int
    elements: int
    note: str | None = None
    #: RMS of y - y_ref over every element, and the bound it had to meet (None: no RMS bound)
    rms: float = 0.0
    allowed_rms: float | None = None


@dataclass
class VerifyResult:
    """The outcome of a verify run; `passed` is True only when every output is within tolerance."""

    passed: bool
    bundle: str
    backend: BackendName
    backend_version: str | None
    samples: int
    tolerance: dict[str, float]
    outputs: list[OutputComparison] = field(default_factory=list)
    seconds: float = 0.0
    #: the bundle's own backend when `backend` only stands in for it (e.g. coreml-reference for coreml)
    stand_in_for: BackendName | None = None
    #: what a stand-in's figures are not (e.g. "reference evaluator, not Core ML: ...")
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failures(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    def format_text(self) -> str:
        lines = [
            f"verify {self.bundle} on {self.backend} {self.backend_version or ''}".rstrip(),
            f"  {self.samples} reference sample(s), atol {self.tolerance['atol']:g}, rtol {self.tolerance['rtol']:g}",
        ]
        if self.note:
            lines.append(f"  note: {self.backend} stands in for {self.stand_in_for}: {self.note}")
        for o in self.outputs:
            status = "ok  " if o.passed else "FAIL"
            detail = f"  {o.mismatched}/{o.elements} outside tolerance" if o.mismatched else ""
            rms = f"  rms {o.rms:.3g}" + (f" (≤ {o.allowed_rms:.3g})" if o.allowed_rms is not None else "")
            note = f"  ({o.note})" if o.note else ""
            lines.append(f"  {status} {o.name}: max_abs {o.max_abs:.3g}  max_rel {o.max_rel:.3g}{rms}{detail}{note}")
        lines.append("  PASSED" if self.passed else "  FAILED")
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """A VerificationError (exit code 3) naming the outputs that missed the tolerance."""
        if self.passed:
            return
        worst = ", ".join(
            f"{o.name} (max_abs {o.max_abs:.3g}, {o.mismatched}/{o.elements} elements"
            + (f"; rms {o.rms:.3g} > {o.allowed_rms:.3g}" if o.allowed_rms is not None and not o.rms <= o.allowed_rms else "")
            + ")"
            for o in self.failures()
        )
        raise VerificationError(
            f"{self.bundle}: outputs differ from the reference beyond atol {self.tolerance['atol']:g} "
            f"rtol {self.tolerance['rtol']:g} or their RMS bound on {self.backend}: {worst}",
            hint="check the backend version against the bundle's toolchain, or rebuild with a higher precision",
        )


def verify(
    path: str | os.PathLike[str],
    backend: BackendName | str | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> VerifyResult:
    """Load a bundle and verify it; the result says passed or not (use raise_for_failure to fail).

    Where the bundle's backend cannot run here and none is named, its stand-in runs (marked).
    """
    from edgeopt.runtime.model import load

    with load(path, backend=backend, threads=threads, device=device, allow_stand_in=True) as model:
        return verify_model(model)


def _load_npz(path: Any, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BundleError(f"{path}: the bundle's reference {what} are missing", hint="rebuild the bundle with `edgeopt build`")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read ({exc})", hint="rebuild the bundle with `edgeopt build`") from None


def reference_batches(model: "Model") -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray], str, int]:
    """The reference inputs as predict calls, the expected outputs, and how outputs are joined.

    reference/inputs.npz holds one array per model input, either stacked per sample
    (samples, *input_shape) or as one batch (the input's own shape, or samples along a batch
    axis of size 1). Returns (calls, expected, join, samples) with join "stack", "concat" or "single".
    """
    bundle = model.bundle
    if bundle is None:
        raise BundleError(f"{model.source}: verify needs a bundle (it carries reference data)", hint="pass the bundle folder `edgeopt build` wrote")
    reference = bundle.reference or {}
    inputs = _load_npz(bundle.path(reference.get("inputs", "reference/inputs.npz"), "reference.inputs"), "inputs")
    expected = _load_npz(bundle.path(reference.get("outputs", "reference/outputs.npz"), "reference.outputs"), "outputs")
    missing = [spec.name for spec in model.inputs if spec.name not in inputs]
    if missing:
        raise BundleError(
            f"{bundle.root}: reference inputs lack {', '.join(missing)} (have {', '.join(inputs)})",
            hint="rebuild the bundle with `edgeopt build`",
        )
    first = model.inputs[0]
    array = inputs[first.name]
    rank = len(first.shape)
    if array.ndim == rank + 1:
        count = array.shape[0]
        return [{s.name: inputs[s.name][i] for s in model.inputs} for i in range(count)], expected, "stack", count
    batch = first.shape[0] if rank else None
    if array.ndim == rank and batch == 1 and array.shape[0] > 1:
        count = array.shape[0]
        return [{s.name: inputs[s.name][i : i + 1] for s in model.inputs} for i in range(count)], expected, "concat", count
    samples = int(array.shape[0]) if array.ndim else 1
    return [{s.name: inputs[s.name] for s in model.inputs}], expected, "single", samples


def verify_model(model: "Model") -> VerifyResult:
    started = time.perf_counter()
    bundle = model.bundle
    calls, expected, join, samples = reference_batches(model)
    tolerance = (bundle.reference or {}).get("tolerance") if bundle is not None else None
    if not tolerance or "atol" not in tolerance or "rtol" not in tolerance:
        raise BundleError(f"{model.source}: manifest has no reference.tolerance {{atol, rtol}}", hint="rebuild the bundle with `edgeopt build`")
    atol, rtol = float(tolerance["atol"]), float(tolerance["rtol"])
    per_output = tolerance.get("outputs") or {}  # the build's per-output budgets, where it recorded them
    results = [model.predict(call) for call in calls]
    comparisons = []
    for spec in model.outputs:
        if spec.name not in expected:
            continue
        per_call = [r[spec.name] for r in results]
        if join == "stack":
            actual = np.stack(per_call)
        elif join == "concat":
            actual = np.concatenate(per_call)
        else:
            actual = per_call[0]
        own = per_output.get(spec.name, {})
        allowed_rms = float(own["rms"]) if "rms" in own else None
        comparisons.append(compare(spec.name, actual, expected[spec.name], float(own.get("atol", atol)), float(own.get("rtol", rtol)), allowed_rms))
    if not comparisons:
        raise BundleError(
            f"{model.source}: reference outputs name none of the model's outputs ({', '.join(s.name for s in model.outputs)})",
            hint="rebuild the bundle with `edgeopt build`",
        )
    return VerifyResult(
        passed=all(c.passed for c in comparisons),
        bundle=str(model.source),
        backend=model.backend,
        backend_version=model.backend_version,
        samples=samples,
        tolerance={"atol": atol, "rtol": rtol},
        outputs=comparisons,
        seconds=time.perf_counter() - started,
        stand_in_for=model.stand_in.replaces if model.stand_in is not None else None,
        note=model.stand_in.note if model.stand_in is not None else None,
    )


def compare(name: str, actual: np.ndarray, reference: np.ndarray, atol: float, rtol: float, allowed_rms: float | None = None) -> OutputComparison:
    """Elementwise |y - ref| <= atol + rtol * |ref| (and RMS error <= allowed_rms), with the largest errors."""
    note = None
    if actual.shape != reference.shape:
        if actual.size != reference.size:
            return OutputComparison(name, False, float("inf"), float("inf"), int(reference.size), int(reference.size),
                                    f"shape {actual.shape} vs reference {reference.shape}")
        note = f"reshaped {actual.shape} to reference {reference.shape}"
        actual = actual.reshape(reference.shape)
    y = actual.astype(np.float64)
    ref = reference.astype(np.float64)
    difference = np.abs(y - ref)
    difference[np.isnan(y) & np.isnan(ref)] = 0.0
    difference[np.isnan(difference)] = np.inf
    allowed = atol + rtol * np.abs(ref)
    outside = int(np.count_nonzero(~(difference <= allowed)))
    max_abs = float(difference.max()) if difference.size else 0.0
    relative = difference / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
    max_rel = float(relative.max()) if relative.size else 0.0
    rms = float(np.sqrt(np.mean(np.minimum(difference, 1e150) ** 2))) if difference.size else 0.0
    passed = outside == 0 and (allowed_rms is None or rms <= allowed_rms)
    return OutputComparison(name, passed, max_abs, max_rel, outside, int(ref.size), note, rms, allowed_rms)
