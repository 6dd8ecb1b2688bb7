"""onnxruntime-cpu: portable, pre-optimized ONNX that ONNX Runtime loads without further work."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.graph.session import ort_session
from edgeopt.converters.lower.base import LoweredArtifact, LoweringOptions, LoweringResult
from edgeopt.converters.lower.onnx_io import graph_io_specs, save_onnx, store_weights_fp16
from edgeopt.runtime.kinds import BackendName, Precision
from edgeopt.targets import Target

__all__ = ["lower"]

log = logging.getLogger(__name__)


def _optimize_offline(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """ORT's basic (hardware-independent) graph optimizations, saved so the device skips them,
    and what was done.

    Extended and layout optimizations are left to load time on the device: they produce
    CPU-specific contrib ops that ONNX Runtime advises against saving across machines. A saved
    model that ONNX Runtime itself cannot load again (1.32 fails with "Attempt to replace the
    existing tensor" on a BERT encoder whose optimized graph it re-folds) is not shipped: the
    model goes out as edgeopt simplified it, which the device optimizes at load time.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source, optimized = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save_onnx(model, source)
        try:
            ort_session(source, optimized_model_path=optimized)
        except Exception as exc:  # ORT raises its own untyped errors
            raise LoweringError(f"ONNX Runtime could not load the model: {exc}") from exc
        try:
            ort_session(optimized, log_severity=4)  # the failure is reported below, once
        except Exception as exc:
            reason = str(exc).split("FAIL :")[-1].strip()[:160]
            log.warning("ONNX Runtime cannot reload its own optimized model (%s); shipping the simplified model", reason)
            return model, f"skipped: ONNX Runtime could not reload its optimized model ({reason})"
        return onnx.load(optimized), "basic"


def lower(
    model: onnx.ModelProto, target: Target, precision: Precision, out_dir: Path, options: LoweringOptions
) -> LoweringResult:
    optimized, offline = _optimize_offline(model)
    summary: dict[str, object] = {"ort_offline_optimization": offline}
    if precision == Precision.FP16:
        optimized, count = store_weights_fp16(optimized)
        summary["fp16_weights"] = count
        summary["note"] = "fp16 storage, fp32 compute (ONNX Runtime's CPU provider has few fp16 kernels)"
    save_onnx(optimized, out_dir / "model.onnx")
    inputs, outputs = graph_io_specs(optimized, target.layout)
    return LoweringResult(
        artifacts=[LoweredArtifact("model.onnx", "onnx")],
        model_file="model.onnx",
        runtime_backend=BackendName.ONNXRUNTIME,
        verify_backend=BackendName.ONNXRUNTIME,
        inputs=inputs,
        outputs=outputs,
        summary=summary,
        verified_with="onnxruntime (CPUExecutionProvider)",
    )
