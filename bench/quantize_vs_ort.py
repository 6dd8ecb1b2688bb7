"""edgeopt int8 vs ONNX Runtime's own quantizer, on the same models, data and session options.

For each model, in one run: the fp32 model (simplified, BatchNorm folded), edgeopt's int8 for the
onnxruntime-cpu target, `onnxruntime.quantization.quantize_static` (QDQ, per-channel, MinMax) and
the best of its other calibrators (Entropy, Percentile, Distribution) by fidelity, plus
`quantize_dynamic` for the transformer. All share the calibration samples and ORT session options
(2 intra-op threads, batch 1). Latency is measured with the variants interleaved run by run
(>= 50 runs each) and reported as median and p90; fidelity is measured against fp32 on held-out data.

It also measures the ORT x86 activation type choice (U8S8 vs S8S8) for edgeopt's scheme, and
(with --memory-only) the peak memory of percentile calibration as the sample count grows.

    python bench/quantize_vs_ort.py [--models digits,resnet50,...] [--runs 60]
    python bench/quantize_vs_ort.py --memory-only

Writes bench/results/quantize_vs_ort.{json,md} (and quantize_vs_ort.memory.{json,md}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeopt.converters.data import model_input_specs, open_dataset  # noqa: E402
from edgeopt.converters.metrics import fidelity  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.converters.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeopt.runtime.kinds import Technique
from edgeopt.targets import get_target  # noqa: E402
from tests import zoo  # noqa: E402

THREADS = 2
MODELS = ("digits", "resnet50", "squeezenet", "shufflenet", "densenet121", "mobilenet_v2_style", "transformer_encoder")
CONV_NETS = {"digits", "resnet50", "squeezenet", "shufflenet", "densenet121", "mobilenet_v2_style"}
LIGHT = {"resnet50", "squeezenet", "shufflenet", "densenet121"}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_all(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    runner = session(model)
    names = [o.name for o in runner.get_outputs()]
    return [dict(zip(names, runner.run(names, s))) for s in samples]


def load(name: str, calib_count: int, eval_count: int) -> tuple[onnx.ModelProto, list, list, np.ndarray | None]:
    if name == "digits":
        model = zoo.digits_cnn()
        with np.load(zoo.DIGITS_DIR / "calib.npz", allow_pickle=False) as calib, np.load(zoo.DIGITS_DIR / "eval.npz", allow_pickle=False) as evaluation:
            input_name = model.graph.input[0].name
            calib_x = calib[input_name] if input_name in calib.files else calib[calib.files[0]]
            eval_x = evaluation[input_name] if input_name in evaluation.files else evaluation[[f for f in evaluation.files if f != "labels"][0]]
            labels = evaluation["labels"] if "labels" in evaluation.files else None
        calibration = [{input_name: calib_x[i : i + 1]} for i in range(min(calib_count, len(calib_x)))]
        evaluation_samples = [{input_name: eval_x[i : i + 1]} for i in range(len(eval_x))]
        return model, calibration, evaluation_samples, labels
    model = zoo.light_model(name) if name in LIGHT else getattr(zoo, name)()
    samples = zoo.random_inputs(model, calib_count + eval_count, seed=1)
    return model, samples[:calib_count], samples[calib_count:], None


class _Reader:
    """ORT's CalibrationDataReader protocol over the same samples edgeopt calibrates on."""

    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self.samples = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.samples, None)


def ort_static(model: onnx.ModelProto, samples: list, method: str, work: Path) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    source, target = work / "fp32.onnx", work / f"ort_{method}.onnx"
    onnx.save(model, source)
    start = time.perf_counter()
    quantize_static(
        str(source), str(target), _Reader(samples), quant_format=QuantFormat.QDQ, per_channel=True,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return onnx.load(target), time.perf_counter() - start


def ort_dynamic(model: onnx.ModelProto, work: Path) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = work / "fp32.onnx", work / "ort_dynamic.onnx"
    onnx.save(model, source)
    start = time.perf_counter()
    quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8)
    return onnx.load(target), time.perf_counter() - start


def edgeopt_int8(model: onnx.ModelProto, samples: list, scheme: Any, method: str = "minmax") -> tuple[onnx.ModelProto, float, dict]:
    dataset = open_dataset(samples, model_input_specs(model))
    start = time.perf_counter()
    result = quantize(model, scheme, dataset, QuantizeOptions(method=method, debug_samples=0))
    return result.model, time.perf_counter() - start, result.report


def latency(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], runs: int) -> dict[str, dict[str, float]]:
    """Interleaved: every run times each variant once, in rotating order, so load changes hit all alike."""
    sessions = {name: session(model) for name, model in models.items()}
    for runner in sessions.values():
        for _ in range(5):
            runner.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for run in range(runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "runs": len(t)} for name, t in times.items()}


def figures(reference: list, candidate: list, labels: np.ndarray | None) -> dict[str, Any]:
    report = fidelity(reference, candidate, labels)
    keep = ("top1_agreement", "accuracy", "accuracy_fp32", "min_cosine", "min_sqnr_db")
    return {k: report[k] for k in keep if k in report}


def score(fid: dict[str, Any]) -> tuple[float, float]:
    """Ranking key for 'best' among ORT's calibrators: accuracy (or top-1 agreement), then cosine."""
    return (fid.get("accuracy", fid.get("top1_agreement", 0.0)), fid.get("min_cosine", 0.0))


def _at_least_as_faithful(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Goal test: the primary metric (accuracy, else top-1 agreement) at least the peer's, and the
    cosine at least the peer's within 1e-4 (the fourth decimal is measurement noise on 32-200 samples)."""
    primary = score(ours)[0] >= score(theirs)[0]
    return primary and ours.get("min_cosine", 0.0) >= theirs.get("min_cosine", 0.0) - 1e-4


def bench_model(name: str, runs: int, calib_count: int, eval_count: int) -> dict[str, Any]:
    raw, calibration, evaluation, labels = load(name, calib_count, eval_count)
    fp32, _ = simplify(raw)
    reference = run_all(fp32, evaluation)
    scheme = get_target("onnxruntime-cpu").quant_scheme
    variants: dict[str, onnx.ModelProto] = {"fp32": fp32}
    info: dict[str, dict[str, Any]] = {"fp32": {"quantize_s": 0.0}}
    edge, seconds, report = edgeopt_int8(fp32, calibration, scheme)
    variants["edgeopt"] = edge
    info["edgeopt"] = {"quantize_s": seconds, "quantized_op_share": report["quantized_op_share"], "bias_correction": (report.get("bias_correction") or {}).get("applied")}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        ort_models = {}
        for method in ("MinMax", "Entropy", "Percentile", "Distribution"):
            try:
                ort_models[method] = ort_static(fp32, calibration, method, work)
            except Exception as error:  # a peer calibrator failing is a result too
                info[f"ort_{method.lower()}_error"] = {"error": f"{type(error).__name__}: {error}"[:300]}
        if name == "transformer_encoder":
            variants["ort_dynamic"], seconds = ort_dynamic(fp32, work)
            info["ort_dynamic"] = {"quantize_s": seconds}
    variants["ort_minmax"], seconds = ort_models["MinMax"]
    info["ort_minmax"] = {"quantize_s": seconds}
    others = {m: ort_models[m] for m in ("Entropy", "Percentile", "Distribution") if m in ort_models}
    other_fidelity = {m: figures(reference, run_all(q, evaluation), labels) for m, (q, _) in others.items()}
    if other_fidelity:
        best = max(other_fidelity, key=lambda m: score(other_fidelity[m]))
        variants["ort_best_other"], seconds = others[best]
        info["ort_best_other"] = {"quantize_s": seconds, "calibrator": best, "all": other_fidelity}
    rows = {}
    timings = latency(variants, evaluation[0], runs)
    for variant, model in variants.items():
        rows[variant] = {
            "bytes": len(model.SerializeToString()),
            **timings[variant],
            "fidelity": figures(reference, run_all(model, evaluation), labels) if variant != "fp32" else {},
            **info.get(variant, {}),
        }
    fp32_ms, fp32_bytes = rows["fp32"]["median_ms"], rows["fp32"]["bytes"]
    for row in rows.values():
        row["speedup_vs_fp32"] = fp32_ms / row["median_ms"]
        row["size_ratio_vs_fp32"] = fp32_bytes / row["bytes"]
    return {"model": name, "calibration_samples": len(calibration), "eval_samples": len(evaluation), "labels": labels is not None, "variants": rows}


def activation_type_choice(runs: int) -> dict[str, Any]:
    """U8S8 vs S8S8 for edgeopt's onnxruntime-cpu scheme on two conv nets: median latency, 2 threads."""
    scheme = get_target("onnxruntime-cpu").quant_scheme
    result = {}
    for name in ("resnet50", "mobilenet_v2_style"):
        raw, calibration, evaluation, _ = load(name, 16, 1)
        fp32, _ = simplify(raw)
        models = {
            dtype: edgeopt_int8(fp32, calibration, dataclasses.replace(scheme, activation_dtype=dtype))[0]
            for dtype in ("uint8", "int8")
        }
        timings = latency({"U8S8": models["uint8"], "S8S8": models["int8"]}, evaluation[0], runs)
        result[name] = {k: v["median_ms"] for k, v in timings.items()}
    return result


def calibration_memory(name: str, counts: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """Peak traced Python memory (MB) of percentile calibration, edgeopt vs ORT, as samples grow.

    ORT's histogram calibrators collect every intermediate tensor of every sample before building
    histograms; edgeopt's streaming histograms keep a fixed number of bins per tensor.
    """
    import tracemalloc

    raw, calibration, _, _ = load(name, max(counts), 1)
    fp32, _ = simplify(raw)
    scheme = get_target("onnxruntime-cpu").quant_scheme
    peaks: dict[str, dict[int, float]] = {"edgeopt": {}, "ort": {}}
    for count in counts:
        samples = calibration[:count]
        with tempfile.TemporaryDirectory() as folder:
            for tool in ("edgeopt", "ort"):
                tracemalloc.start()
                try:
                    if tool == "edgeopt":
                        dataset = open_dataset(samples, model_input_specs(fp32))
                        quantize(fp32, scheme, dataset, QuantizeOptions(method="percentile", techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0))
                    else:
                        ort_static(fp32, samples, "Percentile", Path(folder))
                    peaks[tool][count] = tracemalloc.get_traced_memory()[1] / 1e6
                finally:
                    tracemalloc.stop()
    return peaks


def markdown(results: list[dict[str, Any]], choice: dict[str, Any]) -> str:
    lines = [
        "# edgeopt int8 vs ONNX Runtime quantizer",
        "",
        f"ONNX Runtime {ort.__version__}, {THREADS} threads, batch 1, CPU `{platform.processor() or platform.machine()}`. "
        "Latency: median / p90 over interleaved runs. Fidelity vs fp32 on held-out inputs "
        "(accuracy with labels for digits; top-1 agreement; min cosine over outputs).",
        "",
        "| model | variant | MB | x smaller | median ms | p90 ms | speedup vs fp32 | accuracy | top-1 agree | cosine | SQNR dB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for variant, row in result["variants"].items():
            fid = row["fidelity"]
            label = variant + (f" ({row['calibrator']})" if "calibrator" in row else "")
            acc = f"{fid['accuracy']:.4f}" if "accuracy" in fid else ("" if variant != "fp32" or not result["labels"] else "")
            lines.append(
                f"| {result['model']} | {label} | {row['bytes'] / 1e6:.2f} | {row['size_ratio_vs_fp32']:.2f} | {row['median_ms']:.2f} | "
                f"{row['p90_ms']:.2f} | {row['speedup_vs_fp32']:.2f} | {acc} | {fid.get('top1_agreement', float('nan')):.4f} | "
                f"{fid.get('min_cosine', float('nan')):.4f} | {fid.get('min_sqnr_db', float('nan')):.1f} |"
            )
    lines += ["", "## Goals", "", "Fidelity goal: accuracy (digits) or top-1 agreement at least the peer's, and cosine at least the peer's - 1e-4.", ""]
    for result in results:
        v = result["variants"]
        edge = v["edgeopt"]
        peers = [k for k in ("ort_minmax", "ort_best_other") if k in v]
        faster = all(edge["median_ms"] <= v[p]["median_ms"] for p in peers)
        better = all(_at_least_as_faithful(edge["fidelity"], v[p]["fidelity"]) for p in peers)
        size = edge["size_ratio_vs_fp32"]
        size_goal = "" if result["model"] not in CONV_NETS else f"; size {size:.2f}x {'>=' if size >= 3.8 else '<'} 3.8x"
        peer_ms = ", ".join(f"{p} {v[p]['median_ms']:.2f}" for p in peers)
        lines.append(
            f"- {result['model']}: latency {'met' if faster else 'NOT met'} ({edge['median_ms']:.2f} ms vs {peer_ms}); "
            f"fidelity {'met' if better else 'NOT met'}{size_goal}"
        )
    lines += ["", "## ORT activation type for edgeopt's onnxruntime-cpu scheme (median ms)", ""]
    lines += [f"- {name}: U8S8 {t['U8S8']:.2f}, S8S8 {t['S8S8']:.2f}" for name, t in choice.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--skip-activation-choice", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the calibration memory comparison")
    args = parser.parse_args()
    if args.memory_only:
        peaks = calibration_memory("squeezenet", (16, 64))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantize_vs_ort.memory.json").write_text(json.dumps({"model": "squeezenet", "peak_traced_mb": peaks}, indent=2))
        table = ["# Percentile calibration memory, squeezenet (peak traced Python memory, MB)", "", "| tool | 16 samples | 64 samples |", "|---|---:|---:|"]
        table += [f"| {tool} | {p[16]:.1f} | {p[64]:.1f} |" for tool, p in peaks.items()]
        (args.out / "quantize_vs_ort.memory.md").write_text("\n".join(table) + "\n")
        print("\n".join(table))
        return
    results = []
    for name in args.models.split(","):
        big = name in LIGHT
        started = time.perf_counter()
        results.append(bench_model(name, args.runs, 32 if big else 128, 32 if big else 200))
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    choice = {} if args.skip_activation_choice else activation_type_choice(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "onnxruntime": ort.__version__,
        "threads": THREADS,
        "runs": args.runs,
        "machine": platform.machine(),
        "results": results,
        "activation_type_choice_ms": choice,
    }
    (args.out / "quantize_vs_ort.json").write_text(json.dumps(payload, indent=2))
    (args.out / "quantize_vs_ort.md").write_text(markdown(results, choice))
    print(markdown(results, choice))


if __name__ == "__main__":
    main()
