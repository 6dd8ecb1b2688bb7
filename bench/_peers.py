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


def nncf_qat_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """Under the NNCF venv: NNCF's QAT of the digits CNN (examples/digits/train.py's model with model.onnx's weights),
    on edgeopt's narrowed weight grid: `nncf.quantize` with per-tensor weights, then each weight quantizer set to the
    symmetric grid [-L, L] with its min-max range (NNCF's hardware config allows 8 bits only; its fake-quant modules
    take any levels), activations at NNCF's int8; then trained with labels on the digits training split, a seeded
    held-out part picking the epoch, as edgeopt's QAT does. Returns the eval logits of the PTQ and each tuned model."""
    import copy

    import nncf
    import onnx
    import torch
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.torch.quantization.layers import SymmetricQuantizer
    from onnx import numpy_helper

    digits = Path(job["digits"])
    sys.path.insert(0, str(digits))
    from train import DigitsCNN, load_splits

    torch.manual_seed(job["seed"])
    torch.set_num_threads(1)
    model = DigitsCNN()
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(digits / "model.onnx").graph.initializer}
    model.load_state_dict({k: torch.from_numpy(initializers[k].copy()) if k in initializers else v for k, v in model.state_dict().items()})
    model.eval()
    weights = {name.replace(".weight", ""): value.detach() for name, value in model.named_parameters() if name.endswith("weight") and value.ndim > 1}
    calibration = np.load(digits / "calib.npz")["image"][:, None]
    evaluation = torch.from_numpy(np.load(digits / "eval.npz")["image"])
    parameters = AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(per_channel=False))
    quantized = nncf.quantize(model, nncf.Dataset([torch.from_numpy(c) for c in calibration]), advanced_parameters=parameters)
    levels = int(job["levels"])

    def weight_quantizers(net: Any) -> dict[str, Any]:
        """layer -> its weight quantizer (hooked on the layer's input port 1: "...pre_hooks.features/0/conv2d/0__1.0")."""
        found = {}
        for name, module in net.named_modules():
            if isinstance(module, SymmetricQuantizer) and name.endswith("__1.0"):
                path = name.split("pre_hooks.")[1].split("/")
                found[".".join(path[:2]) if path[0] == "features" else path[0]] = module
        return found

    def narrow(net: Any) -> None:
        """The grid [-L, L]; again after every load_state_dict, which resets a quantizer's levels to its bit width."""
        for module in weight_quantizers(net).values():
            module.level_low, module.level_high = -levels, levels

    narrow(quantized)
    for layer, module in weight_quantizers(quantized).items():
        with torch.no_grad():
            module.scale.fill_(float(weights[layer].abs().max()))
    narrowed = sorted(weight_quantizers(quantized))

    def weights_of(net: Any, layer: str) -> torch.Tensor:
        """The layer's float weight in the NNCF model (the quantizer reads it on every forward)."""
        return dict(net.named_parameters())[f"{layer}.weight"].detach()

    def logits(net: Any, images: torch.Tensor) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            return net(images).numpy()

    x, _, y, _ = load_splits()
    order = np.random.default_rng(job["seed"]).permutation(len(x))
    held, train = order[: job["held_out"]], order[job["held_out"] :]
    xs, ys = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    held_x, held_y = torch.from_numpy(x[held]), y[held]
    runs = []
    for lr in job["lrs"]:
        net = copy.deepcopy(quantized)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(job["seed"])
        best = (float((logits(net, held_x).argmax(1) == held_y).mean()), 0, copy.deepcopy(net.state_dict()))
        history, began = [best[0]], time.perf_counter()
        for epoch in range(1, job["epochs"] + 1):
            net.train()
            for batch in torch.randperm(len(xs), generator=generator).split(job["batch_size"]):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(net(xs[batch]), ys[batch]).backward()
                optimizer.step()
            history.append(float((logits(net, held_x).argmax(1) == held_y).mean()))
            if history[-1] > best[0]:
                best = (history[-1], epoch, copy.deepcopy(net.state_dict()))
        seconds = time.perf_counter() - began
        net.load_state_dict(best[2])
        narrow(net)
        codes = {layer: len(torch.unique(torch.round(module(weights_of(net, layer)) / module.scale * levels)))
                 for layer, module in weight_quantizers(net).items()}
        runs.append({"lr": lr, "held_out_accuracy": history, "best_epoch": best[1], "seconds": round(seconds, 1),
                     "weight_codes_used": codes, "eval_logits": logits(net, evaluation).tolist()})
    return {"tool": f"nncf {nncf.__version__} (torch {torch.__version__})", "narrowed": narrowed, "levels": levels,
            "train_samples": len(train), "held_out_samples": len(held), "ptq_logits": logits(quantized, evaluation).tolist(), "runs": runs}


_WORKERS = {"nncf": nncf_worker, "aimet": aimet_worker, "nncf_qat": nncf_qat_worker}

if __name__ == "__main__":
    kind, job_file = sys.argv[1], Path(sys.argv[2])
    job_spec = json.loads(job_file.read_text())
    result = _WORKERS[kind](job_spec)
    Path(job_spec["result"]).write_text(json.dumps(result))
