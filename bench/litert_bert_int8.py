"""The BERT encoder (`zoo.bert_encoder()`) on LiteRT: full int8 against the partly-float int8 it replaced and fp32
(issue 14, goal 3: cosine >= 0.998 with every compute op int8).

Three raspberry-pi builds of the same model, calibrated on the same 128 token sequences (`--effort default`):
- `fp32`;
- `int8_partial`: the raspberry-pi scheme with `int8_transformer` off (stop 23's build: LayerNorm, GELU, the
  bias Adds, mask and embedding sum in float between DEQUANTIZE/QUANTIZE);
- `int8_full`: the profile as shipped.
Fidelity: cosine of each artifact's embedding against ONNX Runtime fp32 on `--eval` sequences (seed 2, not
the calibration's). Ops: every operator of each .tflite with its tensor dtypes (LiteRT without delegates).
Latency: LiteRT with XNNPACK (its default delegate), 1 thread, all three interpreters in one process;
`--rounds` rounds, each runs every artifact `--calls` times in a rotating order and keeps the median
(wall and thread CPU time); ratios are taken per round and their median reported. Load average recorded.

    python bench/litert_bert_int8.py --eval 512 --rounds 15 --calls 200
    python bench/litert_bert_int8.py --size 25m --eval 512 --rounds 9 --calls 30   # 25.7 M parameters
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
VARIANTS = ("fp32", "int8_partial", "int8_full")


def _build(model: Path, variant: str, calibration: Path, out: Path) -> tuple[Path, float]:
    import edgeopt
    from edgeopt.targets import get_target

    target = get_target("raspberry-pi")
    if variant == "int8_partial":
        target = dataclasses.replace(target, quant_scheme=dataclasses.replace(target.quant_scheme, int8_transformer=False))
    started = time.perf_counter()
    edgeopt.build(
        model, target, output=out, precision="fp32" if variant == "fp32" else "int8", calibration=calibration,
        effort="default", reference_samples=2, force=True,
    )
    return out / "model.tflite", time.perf_counter() - started


def _interpreter(path: Path, delegates: bool = True) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter


def _ops(path: Path) -> dict[str, int]:
    """'OP in[dtypes] out[dtypes]' -> count."""
    interpreter = _interpreter(path, delegates=False)
    counts: Counter[str] = Counter()
    for op in interpreter._get_ops_details():
        dtypes = [[interpreter._get_tensor_details(i, 0)["dtype"].__name__ for i in op[k] if i >= 0] for k in ("inputs", "outputs")]
        counts[f"{op['op_name']} in[{','.join(dtypes[0])}] out[{','.join(dtypes[1])}]"] += 1
    return dict(sorted(counts.items()))


def _run(interpreter: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], feed[detail["name"]].astype(detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1).astype(np.float64)


def _fidelity(interpreter: Any, feeds: list[dict[str, np.ndarray]], reference: list[np.ndarray]) -> dict[str, float]:
    cosines, noise, signal = [], 0.0, 0.0
    for feed, want in zip(feeds, reference):
        got = _run(interpreter, feed)
        cosines.append(float(want @ got / np.linalg.norm(want) / np.linalg.norm(got)))
        noise += float(np.sum((got - want) ** 2))
        signal += float(np.sum(want**2))
    values = np.asarray(cosines)
    return {
        "cosine_mean": float(values.mean()), "cosine_p1": float(np.percentile(values, 1)), "cosine_min": float(values.min()),
        "sqnr_db": float(10 * np.log10(signal / noise)) if noise else float("inf"), "samples": len(values),
    }


def _latency(interpreters: dict[str, Any], feed: dict[str, np.ndarray], rounds: int, calls: int) -> dict[str, Any]:
    names = list(interpreters)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    for interpreter in interpreters.values():
        for _ in range(20):
            _run(interpreter, feed)
    loads = [os.getloadavg()[0]]
    for index in range(rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            interpreter, wall, cpu = interpreters[name], [], []
            for _ in range(calls):
                w, c = time.perf_counter(), time.thread_time()
                interpreter.invoke()
                cpu.append(time.thread_time() - c)
                wall.append(time.perf_counter() - w)
            walls[name].append(float(np.median(wall)))
            cpus[name].append(float(np.median(cpu)))
        loads.append(os.getloadavg()[0])
    result: dict[str, Any] = {"rounds": rounds, "calls": calls, "load_1min": [round(min(loads), 2), round(max(loads), 2)]}
    for clock, table in (("wall", walls), ("cpu", cpus)):
        result[clock] = {n: {"median_ms": 1e3 * float(np.median(v))} for n, v in table.items()}
        for name in names:
            for base in ("fp32", "int8_partial"):
                if name != base and base in table:
                    ratios = [a / b for a, b in zip(table[name], table[base])]
                    result[clock][name][f"vs_{base}"] = float(np.median(ratios))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--size", default="small", help="zoo.bert_encoder size: small (0.53 M parameters) or 25m")
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort

    from edgeopt.runtime.isa import REPORTED_FLAGS, host_isa, host_isa_flags
    from tests import zoo

    work = Path(tempfile.mkdtemp(prefix="litert_bert_int8_"))
    model = work / "bert_encoder.onnx"
    onnx.save(zoo.bert_encoder(size=args.size), model)
    calibration = work / "calibration.npz"
    samples = zoo.encoder_inputs(args.calibration, seed=1)
    np.savez(calibration, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    feeds = zoo.encoder_inputs(args.eval, seed=2)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    reference = [session.run(None, feed)[0].reshape(-1).astype(np.float64) for feed in feeds]

    rows: dict[str, Any] = {}
    interpreters = {}
    for variant in VARIANTS:
        path, seconds = _build(model, variant, calibration, work / variant)
        interpreter = _interpreter(path)
        interpreters[variant] = interpreter
        rows[variant] = {"build_s": round(seconds, 1), "bytes": path.stat().st_size, "ops": _ops(path), "fidelity": _fidelity(interpreter, feeds, reference)}
        rows[variant]["float_ops"] = sum(n for op, n in rows[variant]["ops"].items() if "float32" in op)
        print(variant, json.dumps(rows[variant]["fidelity"]), f"float ops {rows[variant]['float_ops']}", flush=True)
    latency = _latency(interpreters, feeds[0], args.rounds, args.calls)
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": f"zoo.bert_encoder(size={args.size!r}) ({'hidden 128, 2 layers, 4 heads' if args.size == 'small' else 'hidden 512, 8 layers, 8 heads'}, 32 tokens)",
        "calibration_samples": args.calibration,
        "isa": {"host": getattr(host_isa(), "value", None), "flags": sorted(f for f in host_isa_flags() if f in REPORTED_FLAGS)},
        "variants": rows,
        "latency": latency,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "litert_bert_int8" + ("" if args.size == "small" else f"_{args.size}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(report: dict[str, Any]) -> str:
    rows, latency = report["variants"], report["latency"]
    lines = [
        "# BERT encoder on LiteRT: full int8 vs partly-float int8 vs fp32", "",
        f"{report['model']}; raspberry-pi builds, {report['calibration_samples']} calibration sequences, `--effort default`; "
        f"{report['created']}. Host ISA class {report['isa']['host']} ({', '.join(report['isa']['flags'])}).", "",
        "| variant | cosine mean | p1 | min | SQNR dB | eval n | float ops | bytes | build s |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        f = row["fidelity"]
        lines.append(
            f"| {name} | {f['cosine_mean']:.6f} | {f['cosine_p1']:.6f} | {f['cosine_min']:.6f} | {f['sqnr_db']:.1f} | {f['samples']} | "
            f"{row['float_ops']} | {row['bytes']} | {row['build_s']} |"
        )
    lines += [
        "", f"Latency: XNNPACK, 1 thread, {latency['rounds']} rounds x {latency['calls']} calls, rotating order; "
        f"load average (1 min) {latency['load_1min'][0]}-{latency['load_1min'][1]}.", "",
        "| variant | wall ms | vs fp32 | vs int8_partial | CPU ms | vs fp32 | vs int8_partial |", "|---|---|---|---|---|---|---|",
    ]
    for name in rows:
        wall, cpu = latency["wall"][name], latency["cpu"][name]
        cell = lambda d, k: f"{d[k]:.2f}x" if k in d else "-"  # noqa: E731
        lines.append(
            f"| {name} | {wall['median_ms']:.3f} | {cell(wall, 'vs_fp32')} | {cell(wall, 'vs_int8_partial')} | "
            f"{cpu['median_ms']:.3f} | {cell(cpu, 'vs_fp32')} | {cell(cpu, 'vs_int8_partial')} |"
        )
    lines += ["", "Ops (LiteRT without delegates; `in[...] out[...]` are the tensor dtypes):", ""]
    for name, row in rows.items():
        if name == "fp32":
            continue
        lines += [f"{name}:", "", *[f"- {n} {op}" for op, n in row["ops"].items()], ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
