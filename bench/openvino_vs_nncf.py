"""OpenVINO int8 IR: edgeopt (QDQ → convert_model) vs NNCF (`nncf.quantize`) vs the fp32 IR.

One run, batch 1, 2 threads, the same calibration samples for both quantizers. Per model: latency
median/p90 (all IRs timed interleaved, so load from other processes hits every row alike), IR size,
fidelity against ONNX Runtime fp32 on held-out inputs (cosine, SQNR, top-1 agreement), build time.

NNCF is a peer tool, not an edgeopt dependency: run this with an interpreter that has it, e.g.

    python -m venv --system-site-packages /tmp/venv-nncf && /tmp/venv-nncf/bin/pip install nncf
    /tmp/venv-nncf/bin/python bench/openvino_vs_nncf.py

Writes bench/results/openvino_vs_nncf.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import zoo  # noqa: E402  (tests/zoo.py: the shared model factory)

from edgeopt.converters.lower import LoweringOptions, lower  # noqa: E402
from edgeopt.targets import QuantScheme, get_target  # noqa: E402

RESULTS = REPO / "bench" / "results"
THREADS = 2
# What every timed IR is compiled with: one stream of 2 threads, latency mode, f32 pinned (see --help).
CPU_CONFIG: dict[str, Any] = {
    "INFERENCE_NUM_THREADS": THREADS,
    "NUM_STREAMS": 1,
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_PRECISION_HINT": "f32",
}

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class BenchModel:
    name: str
    make: Callable[[], onnx.ModelProto]
    transformer: bool = False


MODELS: tuple[BenchModel, ...] = (
    BenchModel("digits", zoo.digits_cnn),
    BenchModel("resnet50", lambda: zoo.light_model("resnet50")),
    BenchModel("squeezenet", lambda: zoo.light_model("squeezenet")),
    BenchModel("shufflenet", lambda: zoo.light_model("shufflenet")),
    BenchModel("densenet121", lambda: zoo.light_model("densenet121")),
    BenchModel("mobilenet_v2_style", zoo.mobilenet_v2_style),
    BenchModel("transformer_encoder", zoo.transformer_encoder, transformer=True),
)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def digits_feeds(calibration: int, evaluation: int) -> tuple[list[Feed], list[Feed]]:
    """The digits example's own calibration and held-out images (examples/digits/*.npz)."""
    feeds = []
    for file, count in (("calib.npz", calibration), ("eval.npz", evaluation)):
        with np.load(zoo.DIGITS_DIR / file, allow_pickle=False) as data:
            images = data["image"][:count]
        feeds.append([{"image": images[i : i + 1]} for i in range(len(images))])
    return feeds[0], feeds[1]


def feeds_for(model: onnx.ModelProto, name: str, calibration: int, evaluation: int) -> tuple[list[Feed], list[Feed]]:
    if name == "digits":
        return digits_feeds(calibration, evaluation)
    return zoo.random_inputs(model, calibration, seed=1), zoo.random_inputs(model, evaluation, seed=2)


# ------------------------------------------------------------------------------------------------
# edgeopt's side
# ------------------------------------------------------------------------------------------------


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    from edgeopt.converters.passes import simplify as edgeopt_simplify

    return edgeopt_simplify(model)[0]


def quantize_with_edgeopt(model: onnx.ModelProto, scheme: QuantScheme, calibration: Sequence[Feed]) -> onnx.ModelProto:
    from edgeopt.converters.data import model_input_specs, open_dataset
    from edgeopt.converters.quantize import QuantizeOptions, quantize

    dataset = open_dataset(list(calibration), model_input_specs(model))
    return quantize(model, scheme, dataset, QuantizeOptions(method="minmax", threads=THREADS)).model


def edgeopt_int8_ir(model: onnx.ModelProto, calibration: Sequence[Feed], out_dir: Path) -> tuple[Path, float]:
    """What `edgeopt build --precision int8` does: simplify → quantize (intel-openvino scheme) → lower."""
    target = get_target("intel-openvino")
    start = time.perf_counter()
    qdq = quantize_with_edgeopt(simplify(model), target.quant_scheme, calibration)
    lower(qdq, target, "int8", out_dir, LoweringOptions())
    return out_dir / "model.xml", time.perf_counter() - start


def float_ir(model: onnx.ModelProto, precision: str, out_dir: Path) -> tuple[Path, float]:
    start = time.perf_counter()
    lower(model, get_target("intel-openvino"), precision, out_dir, LoweringOptions())
    return out_dir / "model.xml", time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# NNCF's side
# ------------------------------------------------------------------------------------------------


def nncf_int8_ir(model: onnx.ModelProto, calibration: Sequence[Feed], transformer: bool, out_dir: Path) -> tuple[Path, float]:
    """NNCF post-training quantization of the same fp32 model, as its documentation shows it."""
    import nncf
    import openvino as ov

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        ov_model = ov.convert_model(str(path))
    dataset = nncf.Dataset(list(calibration))
    options: dict[str, Any] = {"subset_size": len(calibration)}
    if transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(ov_model, dataset, **options)
    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_dir / "model.xml"))
    return out_dir / "model.xml", time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def ort_outputs(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def compile_ir(xml: Path, config: Mapping[str, Any] = CPU_CONFIG) -> Any:
    import openvino as ov

    return ov.Core().compile_model(str(xml), "CPU", dict(config))


def ov_outputs(compiled: Any, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    request = compiled.create_infer_request()
    results = []
    for feed in feeds:
        request.infer(feed)
        results.append([np.array(request.get_output_tensor(i).data) for i in range(len(compiled.outputs))])
    return results


def fidelity(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
    """Against ORT fp32 over all eval samples: mean cosine, SQNR (dB) and top-1 agreement of output 0.

    Top-1 is over the last axis for a [1, classes] output and over channels per pixel for a mask.
    """
    ref = np.concatenate([np.asarray(r[0], np.float64).ravel() for r in reference])
    got = np.concatenate([np.asarray(c[0], np.float64).ravel() for c in candidate])
    noise = float(np.sum((ref - got) ** 2))
    cosines = []
    agree = []
    for r, c in zip(reference, candidate):
        a, b = np.asarray(r[0], np.float64), np.asarray(c[0], np.float64).reshape(np.shape(r[0]))
        cosines.append(float(a.ravel() @ b.ravel() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        axis = 1 if a.ndim == 4 else -1
        agree.append(np.mean(a.argmax(axis=axis) == b.argmax(axis=axis)))
    return {
        "cosine": float(np.mean(cosines)),
        "sqnr_db": float(10 * np.log10(np.sum(ref**2) / noise)) if noise > 0 else float("inf"),
        "top1_agreement": float(np.mean(agree)),
        "max_abs": float(np.max(np.abs(ref - got))),
    }


def interleaved_latency(compiled: Mapping[str, Any], feed: Feed, runs: int, warmup: int = 5) -> dict[str, dict[str, float]]:
    """Milliseconds per inference; each round runs every model once, in rotating order."""
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    for request in requests.values():
        for _ in range(warmup):
            request.infer(feed)
    times: dict[str, list[float]] = {name: [] for name in requests}
    names = list(requests)
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            requests[name].infer(feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": statistics.median(t), "p90_ms": float(np.percentile(t, 90)), "runs": len(t)}
        for name, t in times.items()
    }


def ir_bytes(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def cpu_facts() -> dict[str, Any]:
    import openvino as ov

    core = ov.Core()
    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        pass
    flag_line = next((line for line in flags.splitlines() if line.startswith("Flags:")), "")
    model_line = next((line for line in flags.splitlines() if line.startswith("Model name:")), "")
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")
    return {
        "cpu": model_line.split(":", 1)[-1].strip() or platform.processor(),
        "isa": [flag for flag in interesting if f" {flag}" in flag_line],
        "openvino": ov.get_version(),
        "default_inference_precision_hint": core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
        "optimization_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
    }


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def bench_model(spec: BenchModel, work: Path, calibration_size: int, eval_size: int, runs: int) -> dict[str, Any]:
    import nncf

    model = spec.make()
    calibration, evaluation = feeds_for(model, spec.name, calibration_size, eval_size)
    reference = ort_outputs(model, evaluation)

    fp32_xml, fp32_seconds = float_ir(model, "fp32", work / spec.name / "fp32")
    edgeopt_xml, edgeopt_seconds = edgeopt_int8_ir(model, calibration, work / spec.name / "edgeopt")
    nncf_xml, nncf_seconds = nncf_int8_ir(model, calibration, spec.transformer, work / spec.name / "nncf")

    irs = {"fp32": fp32_xml, "edgeopt int8": edgeopt_xml, "nncf int8": nncf_xml}
    compiled = {name: compile_ir(xml) for name, xml in irs.items()}
    compiled["fp32 (default hint)"] = compile_ir(fp32_xml, {k: v for k, v in CPU_CONFIG.items() if k != "INFERENCE_PRECISION_HINT"})
    latency = interleaved_latency(compiled, evaluation[0], runs)
    build_seconds = {"fp32": fp32_seconds, "edgeopt int8": edgeopt_seconds, "nncf int8": nncf_seconds, "fp32 (default hint)": fp32_seconds}
    rows = {}
    for name, c in compiled.items():
        xml = irs.get(name, fp32_xml)
        rows[name] = {
            **latency[name],
            "bytes": ir_bytes(xml),
            "build_s": build_seconds[name],
            **fidelity(reference, ov_outputs(c, evaluation)),
        }
    return {
        "model": spec.name,
        "calibration_samples": len(calibration),
        "eval_samples": len(evaluation),
        "nncf": {
            "version": nncf.__version__,
            "model_type": "transformer" if spec.transformer else "default (CNN)",
            "preset": "mixed (NNCF's default for transformers)" if spec.transformer else "performance (NNCF's default)",
        },
        "rows": rows,
    }


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    ours, theirs = result["rows"]["edgeopt int8"], result["rows"]["nncf int8"]
    return {
        "latency_le_nncf": ours["median_ms"] <= theirs["median_ms"],
        "fidelity_ge_nncf": ours["sqnr_db"] >= theirs["sqnr_db"] and ours["top1_agreement"] >= theirs["top1_agreement"],
    }


def markdown(results: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    lines = [
        "# OpenVINO int8: edgeopt vs NNCF (CPU plugin, batch 1, 2 threads)",
        "",
        f"CPU: {facts['cpu']} ({', '.join(facts['isa'])}); OpenVINO {facts['openvino']}. "
        f"Default `INFERENCE_PRECISION_HINT` on this CPU: **{facts['default_inference_precision_hint']}** — "
        "the 'fp32' IR then runs in bf16; every row below pins `f32` except 'fp32 (default hint)'.",
        "",
        "Fidelity is against ONNX Runtime fp32 on held-out inputs. Latency: interleaved runs, ms.",
        "",
        "| model | IR | median ms | p90 ms | × NNCF | size KB | build s | cosine | SQNR dB | top-1 agree | latency ≤ NNCF | fidelity ≥ NNCF |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for result in results:
        check = verdict(result)
        nncf_median = result["rows"]["nncf int8"]["median_ms"]
        for name, row in result["rows"].items():
            marks = ("", "")
            if name == "edgeopt int8":
                marks = ("yes" if check["latency_le_nncf"] else "**no**", "yes" if check["fidelity_ge_nncf"] else "**no**")
            lines.append(
                f"| {result['model']} | {name} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {row['median_ms'] / nncf_median:.2f} | {row['bytes'] / 1024:.0f} | "
                f"{row['build_s']:.1f} | {row['cosine']:.5f} | {row['sqnr_db']:.1f} | {row['top1_agreement']:.3f} | {marks[0]} | {marks[1]} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[m.name for m in MODELS], help="subset of models to run")
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples (same for both)")
    parser.add_argument("--eval", type=int, default=32, help="held-out samples for fidelity")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per IR (interleaved)")
    parser.add_argument("--out", type=Path, default=RESULTS / "openvino_vs_nncf")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    facts = cpu_facts()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-ov-") as tmp:
        for spec in MODELS:
            if spec.name not in args.models:
                continue
            print(f"bench {spec.name} ...", file=sys.stderr, flush=True)
            results.append(bench_model(spec, Path(tmp), args.calibration, args.eval, args.runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"facts": facts, "config": {"cpu": CPU_CONFIG, "calibration": args.calibration, "eval": args.eval, "runs": args.runs}}
    payload["results"] = [{**r, "verdict": verdict(r)} for r in results]
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, facts))
    print(markdown(results, facts))


if __name__ == "__main__":
    main()
