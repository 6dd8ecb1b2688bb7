"""The peer quantizers the accuracy bench runs beside edgeopt, each as its own documentation shows it.

Shared by bench/accuracy_vs_peers.py (and usable by the other benches): ONNX Runtime's
`quantize_static` for one calibrator, NNCF's `nncf.quantize` for one preset and AIMET-ONNX's PTQ
recipe (CLE, AdaRound, sequential MSE). NNCF and AIMET are not edgeopt dependencies: they run in
throwaway venvs as workers (`python bench/_peers.py nncf|aimet JOB.json`), read a job file and write
a result file, so the quantized model they save is evaluated by the caller's ONNX Runtime and OpenVINO.
This module imports only the standard library and numpy at import time: the AIMET venv has no edgeopt.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]

NNCF_PYTHON = Path("/work/venvs/nncf/bin/python")
AIMET_PYTHON = Path("/work/venvs/aimet/bin/python")
ONNX2TF_PYTHON = Path("/work/venvs/onnx2tf/bin/python")

#: ORT's calibrators the bench tries ("Distribution" needs a symmetric-activation setup: not tried).
ORT_CALIBRATORS = ("MinMax", "Entropy", "Percentile")
#: NNCF presets the bench tries: (name, nncf.quantize keyword arguments as JSON-able strings).
NNCF_PRESETS_CNN = ("performance", "mixed", "performance+full_bias_correction")
NNCF_PRESETS_TRANSFORMER = ("transformer", "transformer+no_smoothquant")


def save_feeds(path: Path, feeds: Sequence[Feed]) -> Path:
    """Written to a temporary name and renamed: two bench processes may prepare the same model."""
    staged = path.with_name(f".{path.stem}.{time.monotonic_ns()}.npz")
    np.savez(staged, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    staged.replace(path)
    return path


def load_feeds(path: Path | str) -> list[Feed]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "labels"}
    count = len(next(iter(arrays.values())))
    return [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)]


# ------------------------------------------------------------------------------------------------
# ONNX Runtime quantize_static (in this interpreter)
# ------------------------------------------------------------------------------------------------


class _Reader:
    """ORT's CalibrationDataReader protocol over the same samples every tool calibrates on."""

    def __init__(self, samples: Sequence[Feed]) -> None:
        self.samples = iter(samples)

    def get_next(self) -> Feed | None:
        return next(self.samples, None)


def ort_quantize_static(source: Path, calibration: Sequence[Feed], calibrator: str, target: Path) -> dict[str, Any]:
    """QDQ, per-channel int8 weights, uint8 activations (U8S8, ORT's x86 default); opset < 13 raised to 13."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    info: dict[str, Any] = {"tool": f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}", "calibrator": calibrator,
                            "settings": "QDQ, per_channel=True, activations QUInt8, weights QInt8"}  # fmt: skip
    start = time.perf_counter()
    model = onnx.load(source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        from onnx import version_converter

        model = version_converter.convert_version(model, 13)
        info["note"] = f"opset {opset} converted to 13 first"
    staged = target.with_suffix(".fp32.onnx")
    onnx.save(model, staged)
    extra = {"CalibMaxIntermediateOutputs": 32} if calibrator != "MinMax" else {}
    quantize_static(
        str(staged), str(target), _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, calibrator), extra_options=extra,
    )  # fmt: skip
    staged.unlink()
    info["quantize_s"] = time.perf_counter() - start
    return info


# ------------------------------------------------------------------------------------------------
# Workers in throwaway venvs
# ------------------------------------------------------------------------------------------------


def run_worker(python: Path, kind: str, job: Mapping[str, Any], folder: Path, timeout_s: float) -> dict[str, Any]:
    """Runs `python bench/_peers.py kind job.json`; the worker's result dict, or {'error': ...}."""
    if not python.exists():
        return {"error": f"{python} missing (see bench/accuracy_vs_peers.py's docstring for the venv)"}
    folder.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str(folder / "result.json")}
    (folder / "job.json").write_text(json.dumps(job))
    Path(job["result"]).unlink(missing_ok=True)
    start = time.perf_counter()
    with open(folder / "worker.log", "w") as output:
        worker = subprocess.Popen([str(python), str(Path(__file__).resolve()), kind, str(folder / "job.json")], stdout=output, stderr=subprocess.STDOUT)
        (folder / "worker.pid").write_text(str(worker.pid))
        try:
            returncode = worker.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            worker.kill()
            return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": time.perf_counter() - start}
        finally:
            (folder / "worker.pid").unlink(missing_ok=True)
    if returncode != 0 or not Path(job["result"]).exists():
        log_text = (folder / "worker.log").read_text(errors="replace")
        lines = [line for line in log_text.strip().splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1] if lines else "")
        return {"error": f"worker exit {returncode}: {error[:400]}", "wall_s": time.perf_counter() - start}
    return {**json.loads(Path(job["result"]).read_text()), "wall_s": time.perf_counter() - start}


def wait_for_running_worker(folder: Path, poll_s: float = 10.0) -> dict[str, Any] | None:
    """When another bench process's worker is still running in `folder`, wait for it and return its result."""
    pid_file = folder / "worker.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    while Path(f"/proc/{pid}").exists():
        time.sleep(poll_s)
    pid_file.unlink(missing_ok=True)
    result = folder / "result.json"
    return json.loads(result.read_text()) if result.exists() else None


def nncf_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """Under the NNCF venv: convert_model with static shapes, nncf.quantize with one preset, save the IR."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    feeds = load_feeds(job["calibration"])
    preset = job["preset"]
    start = time.perf_counter()
    model = ov.convert_model(job["model"], input={k: list(v) for k, v in job["shapes"].items()})
    options: dict[str, Any] = {"subset_size": len(feeds)}
    if preset.startswith("transformer"):
        options["model_type"] = nncf.ModelType.TRANSFORMER  # NNCF: mixed preset and SmoothQuant for MatMuls
        if preset.endswith("no_smoothquant"):
            alphas = AdvancedSmoothQuantParameters(matmul=-1, convolution=-1)
            options["advanced_parameters"] = AdvancedQuantizationParameters(smooth_quant_alphas=alphas)
    else:
        options["preset"] = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
        if preset.endswith("full_bias_correction"):
            options["fast_bias_correction"] = False
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    ov.save_model(quantized, job["xml"])
    return {"tool": f"nncf {nncf.__version__} (OpenVINO {ov.get_version()})", "preset": preset,
            "options": {k: str(v) for k, v in options.items()}, "quantize_s": time.perf_counter() - start}  # fmt: skip


def aimet_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """Under the AIMET venv: AIMET-ONNX's PTQ recipe, exported as QDQ ONNX.

    Cross-layer equalization (with BatchNorm folding) on the fp32 graph (CNNs), a QuantizationSimModel
    (AIMET's per-channel config: int8 weights per channel, int8 activations, min-max ranges: sequential MSE refuses the TF-enhanced scheme),
    sequential MSE for the weight encodings, AdaRound on the weight rounding (keeping those
    encodings), activation encodings on all calibration samples; exported with `to_onnx_qdq`.
    """
    import copy

    import aimet_onnx
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    feeds = load_feeds(job["calibration"])
    steps: dict[str, float] = {}
    start = time.perf_counter()
    model = onnx.load(job["model"])
    transformer = job["transformer"]
    if not transformer:
        from aimet_onnx.cross_layer_equalization import equalize_model

        clock = time.perf_counter()
        equalize_model(model)
        steps["cle_s"] = time.perf_counter() - clock
    config = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    skipped: dict[str, str] = {}
    while True:  # a step that fails on this model is recorded and the recipe rebuilt without it
        sim = QuantizationSimModel(copy.deepcopy(model), param_type="int8", activation_type="int8", quant_scheme="min_max", config_file=str(config))
        step = ""
        try:
            if job.get("seq_mse", True) and "seq_mse" not in skipped:
                step, clock = "seq_mse", time.perf_counter()
                aimet_onnx.apply_seq_mse(sim, feeds[: job.get("seq_mse_samples", 32)])
                steps["seq_mse_s"] = time.perf_counter() - clock
            if job.get("adaround_iterations", 0) > 0 and "adaround" not in skipped:  # keeps the seq-MSE weight encodings
                step, clock = "adaround", time.perf_counter()
                aimet_onnx.apply_adaround(sim, feeds[: job.get("adaround_samples", 32)], num_iterations=job["adaround_iterations"])
                steps["adaround_s"] = time.perf_counter() - clock
            break
        except Exception as error:
            skipped[step] = f"{type(error).__name__}: {error}"[:300]
            steps[f"{step}_failed_after_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    sim.compute_encodings(feeds)
    steps["compute_encodings_s"] = time.perf_counter() - clock
    qdq = sim.to_onnx_qdq()
    onnx.save(qdq, job["onnx"])
    from importlib.metadata import version

    return {"tool": f"aimet-onnx {version('aimet-onnx')}", "steps_s": steps, "quantize_s": time.perf_counter() - start,
            "recipe": ("" if transformer else "CLE, ") + ("" if "seq_mse" in skipped else "seq MSE, ")
            + ("" if "adaround" in skipped else f"AdaRound {job.get('adaround_iterations', 0)} it, ") + "min-max encodings, per-channel",
            "failed_steps": skipped}  # fmt: skip


_WORKERS = {"nncf": nncf_worker, "aimet": aimet_worker}

if __name__ == "__main__":
    kind, job_file = sys.argv[1], Path(sys.argv[2])
    job_spec = json.loads(job_file.read_text())
    result = _WORKERS[kind](job_spec)
    Path(job_spec["result"]).write_text(json.dumps(result))
