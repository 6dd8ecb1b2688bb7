"""`edgeopt build` on the digits example and the onnx package's light models, for each target.

Records, per model and target: max |Δ| against ONNX Runtime fp32 on the original model, the
simplify stage's node counts, sizes and build time. Writes bench/results/build_light_models.{json,md}.

    python bench/build_light_models.py [--targets onnxruntime-cpu jetson-orin] [--models resnet50 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgeopt  # noqa: E402
from tests import zoo  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["onnxruntime-cpu", "jetson-orin"])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet50", "squeezenet", "shufflenet", "densenet121"])
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "digits":
                path = ROOT / "examples" / "digits" / "model.onnx"
            else:
                path = Path(tmp) / f"{name}.onnx"
                onnx.save(zoo.light_model(name), path)
            for target in args.targets:
                started = time.perf_counter()
                result = edgeopt.build(path, target, output=Path(tmp) / f"{name}-{target}", precision=args.precision, force=True)
                m = result.manifest
                rows.append({
                    "model": name,
                    "target": target,
                    "precision": m["precision"],
                    "max_abs": m["reference"]["measured"]["max_abs"],
                    "max_rel": m["reference"]["measured"]["max_rel"],
                    "nodes_before": m["compression"]["nodes_before"],
                    "nodes_after": m["compression"]["nodes_after"],
                    "bytes_before": m["compression"]["bytes_before"],
                    "bytes_after": m["compression"]["bytes_after"],
                    "build_seconds": round(time.perf_counter() - started, 2),
                    "verified_with": m["reference"]["measured"]["verified_with"],
                })
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build_light_models.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| model | target | precision | max abs Δ vs ORT fp32 | max Δ / max ref | nodes before → after simplify | size | build s |",
        "|---|---|---|---:|---:|---|---|---:|",
    ]
    for r in rows:
        reduction = 1 - r["nodes_after"] / r["nodes_before"]
        lines.append(
            f"| {r['model']} | {r['target']} | {r['precision']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
            f"{r['nodes_before']} → {r['nodes_after']} (−{reduction:.0%}) | {r['bytes_before'] / 1e6:.2f} → {r['bytes_after'] / 1e6:.2f} MB | {r['build_seconds']} |"
        )
    (RESULTS / "build_light_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
