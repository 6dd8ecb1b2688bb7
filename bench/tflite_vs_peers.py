"""edgeopt's ONNX→TFLite lowering against its peers, in one run: batch 1, 2 threads.

For each model: edgeopt's fp32 and int8 `.tflite` on LiteRT (XNNPACK) against ONNX Runtime fp32 and
int8 (the same QDQ graph on ORT's CPU provider), and, when a throwaway venv with onnx2tf and
TensorFlow exists (`--onnx2tf-python /tmp/venv-onnx2tf/bin/python`), onnx2tf's fp32 `.tflite`.
Reported: latency median/p90, artifact size, fidelity against ORT fp32, conversion time, TRANSPOSE
count. Writes bench/results/tflite_vs_peers.json and .md.

    python bench/tflite_vs_peers.py [--models mobilenet_v2_style resnet50 ...] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from edgeopt.converters.data import model_input_specs, open_dataset  # noqa: E402
from edgeopt.converters.lower.base import LoweringOptions  # noqa: E402
from edgeopt.converters.lower.tflite import lower_to_bytes  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.converters.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeopt.runtime.kinds import Technique
from edgeopt.targets import get_target  # noqa: E402
from tests import zoo  # noqa: E402

THREADS = 2
DEFAULT_MODELS = ["mobilenet_v2_style", "unet_style", "transformer_encoder", "squeezenet", "resnet50", "inception_v1"]
RESULTS = REPO / "bench" / "results"


def model_for(name: str) -> onnx.ModelProto:
    return zoo.light_model(name) if name in zoo.LIGHT_MODELS else getattr(zoo, name)()


def timed(run: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": round(float(np.median(samples)), 3), "p90_ms": round(float(np.percentile(samples, 90)), 3)}


def litert_runner(flatbuffer: bytes, feed: Mapping[str, np.ndarray]) -> tuple[Callable[[], None], Callable[[], list[np.ndarray]]]:
    interpreter = Interpreter(model_content=flatbuffer, num_threads=THREADS)
    interpreter.allocate_tensors()
    details = {d["name"]: d for d in interpreter.get_input_details()}
    for name, value in feed.items():
        interpreter.set_tensor(details[name]["index"], value.astype(details[name]["dtype"]))
    outputs = interpreter.get_output_details()
    return interpreter.invoke, lambda: [interpreter.get_tensor(o["index"]) for o in outputs]


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def transposes(flatbuffer: bytes) -> int:
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    codes = [c.builtinCode for c in model.operatorCodes]
    return sum(1 for op in model.subgraphs[0].operators if codes[op.opcodeIndex] == schema.BuiltinOperator.TRANSPOSE)


def fidelity(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, Any]:
    y, r = outputs[0].astype(np.float64), reference[0].astype(np.float64)
    return {
        "max_abs_rel": float(np.abs(y - r).max() / max(np.abs(r).max(), 1e-12)),
        "top1_agree": bool(np.argmax(y.reshape(-1)) == np.argmax(r.reshape(-1))) if y.ndim == 2 else None,
    }


def _onnx2tf_failure(log: str) -> str:
    """The exception and the ONNX node onnx2tf names when it gives up."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines()]
    error = next((line for line in lines if re.match(r"^\w+(Error|Exception):", line)), "")
    node = next((line.split("onnx_op_name:", 1)[1].strip() for line in lines if "onnx_op_name:" in line), "")
    return f"{error[:160]} (at {node})" if node else (error or (lines[-1] if lines else "no output"))[:200]


def onnx2tf_peer(python: str, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], reference: list[np.ndarray], runs: int) -> dict[str, Any]:
    """onnx2tf's fp32 .tflite, converted in its own venv and timed here on the same LiteRT."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "model.onnx"
        onnx.save(model, source)
        # onnx2tf checks image models on sample images it otherwise downloads; it reads them from the cwd first.
        samples = np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)
        np.save(Path(folder) / "calibration_image_sample_data_20x128x128x3_float32.npy", samples)
        start = time.perf_counter()
        done = subprocess.run(
            [python, "-m", "onnx2tf", "-i", str(source), "-o", str(Path(folder) / "out"), "-n"],
            capture_output=True, text=True, timeout=1800, cwd=folder,
        )
        seconds = time.perf_counter() - start
        produced = sorted((Path(folder) / "out").glob("*_float32.tflite"))
        if done.returncode != 0 or not produced:
            return {"error": _onnx2tf_failure(done.stdout + done.stderr), "convert_s": round(seconds, 1)}
        flatbuffer = produced[0].read_bytes()
    # onnx2tf turns NCHW inputs into NHWC ones.
    interpreter = Interpreter(model_content=flatbuffer, num_threads=THREADS)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    value = next(iter(feed.values()))
    if value.ndim == 4 and tuple(detail["shape"]) != value.shape:
        value = value.transpose(0, 2, 3, 1)
    interpreter.set_tensor(detail["index"], value.astype(detail["dtype"]))
    latency = timed(interpreter.invoke, 3, runs)
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    if out.ndim == 4 and out.shape != reference[0].shape:
        out = out.transpose(0, 3, 1, 2)
    return {"convert_s": round(seconds, 1), "bytes": len(flatbuffer), "transpose_ops": transposes(flatbuffer), **latency, **fidelity([out], reference)}


def bench_model(name: str, runs: int, onnx2tf_python: str | None) -> dict[str, Any]:
    model = model_for(name)
    feeds = zoo.random_inputs(model, 9, seed=5)
    feed = feeds[0]
    reference = ort_session(model).run(None, feed)
    row: dict[str, Any] = {"model": name}

    start = time.perf_counter()
    simple, _ = simplify(model)
    dataset = open_dataset(feeds[1:], model_input_specs(simple), role="calibration")
    qdq = quantize(simple, get_target("raspberry-pi").quant_scheme, dataset, QuantizeOptions(techniques={Technique.BIAS_CORRECTION: False}, debug_samples=0)).model
    row["quantize_s"] = round(time.perf_counter() - start, 2)

    for label, source in (("ort_fp32", model), ("ort_int8", qdq)):
        session = ort_session(source)
        outputs = session.run(None, feed)
        row[label] = {"bytes": len(source.SerializeToString()), **timed(lambda s=session: s.run(None, feed), 3, runs), **fidelity(outputs, reference)}

    for label, source, precision in (("edgeopt_fp32", model, "fp32"), ("edgeopt_int8", qdq, "int8")):
        start = time.perf_counter()
        flatbuffer, _, _, summary = lower_to_bytes(source, precision, LoweringOptions())
        seconds = time.perf_counter() - start
        invoke, read = litert_runner(flatbuffer, feed)
        latency = timed(invoke, 3, runs)
        row[label] = {
            "convert_s": round(seconds, 2), "bytes": len(flatbuffer), "transpose_ops": summary["transpose_ops"],
            **latency, **fidelity(read(), reference),
        }
    row["int8_speedup_litert"] = round(row["edgeopt_fp32"]["median_ms"] / row["edgeopt_int8"]["median_ms"], 2)
    if onnx2tf_python:
        try:
            row["onnx2tf_fp32"] = onnx2tf_peer(onnx2tf_python, model, feed, reference, runs)
        except (subprocess.TimeoutExpired, OSError) as exc:
            row["onnx2tf_fp32"] = {"error": str(exc)[:300]}
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# edgeopt TFLite lowering vs peers",
        "",
        f"One run on {meta['machine']} (load average {meta['load_average_at_start']} at start: a shared machine, "
        "so medians move by up to 2x between runs), batch 1, "
        f"{THREADS} threads, {meta['runs']} timed runs after 3 warm-ups; "
        f"LiteRT {meta['litert']}, ONNX Runtime {meta['onnxruntime']}. Fidelity: max|Δ| / max|ref| against ONNX Runtime fp32 "
        "(int8 rows include quantization error, not only lowering error).",
        "",
        "| model | runtime | median ms | p90 ms | size MB | max rel err | top-1 = fp32 | convert s | TRANSPOSE |",
        "|---|---|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for row in rows:
        for label in ("edgeopt_fp32", "edgeopt_int8", "ort_fp32", "ort_int8", "onnx2tf_fp32"):
            cell = row.get(label)
            if cell is None:
                continue
            if "error" in cell:
                lines.append(f"| {row['model']} | {label} | failed: {cell['error'][:120]} | | | | | {cell.get('convert_s', '')} | |")
                continue
            top1 = {True: "yes", False: "no", None: "-"}[cell.get("top1_agree")]
            lines.append(
                f"| {row['model']} | {label} | {cell['median_ms']:.2f} | {cell['p90_ms']:.2f} | {cell['bytes'] / 1e6:.2f} | "
                f"{cell['max_abs_rel']:.2g} | {top1} | {cell.get('convert_s', row['quantize_s'] if label == 'ort_int8' else '-')} | "
                f"{cell.get('transpose_ops', '-')} |"
            )
    lines += ["", "| model | LiteRT int8 speed-up over LiteRT fp32 | LiteRT int8 vs ORT int8 (median ratio) |", "|---|---:|---:|"]
    for row in rows:
        ratio = row["ort_int8"]["median_ms"] / row["edgeopt_int8"]["median_ms"]
        lines.append(f"| {row['model']} | {row['int8_speedup_litert']:.2f}x | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--onnx2tf-python", default=None, help="python of a throwaway venv with onnx2tf and tensorflow")
    parser.add_argument("--out", type=Path, default=RESULTS / "tflite_vs_peers")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    from importlib.metadata import version

    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({platform.system()})".strip(),
        "threads": THREADS, "runs": args.runs, "litert": version("ai-edge-litert"), "onnxruntime": ort.__version__,
        "onnx2tf": args.onnx2tf_python is not None,
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
    }
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args.runs, args.onnx2tf_python))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
