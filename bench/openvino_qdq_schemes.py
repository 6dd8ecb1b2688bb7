"""Which QDQ variant does OpenVINO's CPU plugin run fastest and most accurately?

For each model: edgeopt's quantizer with the intel-openvino scheme, one field changed at a time —
activations int8 symmetric or uint8 asymmetric, Q/DQ on the inputs of quantized ops only or on
every tensor between them (data-movement ops then carry int8 too), all the profile's ops or the
compute ops only — each lowered by edgeopt's OpenVINO lowering and timed interleaved on the CPU
plugin (batch 1, 2 threads, f32 pinned). Fidelity is against ONNX Runtime fp32 on held-out inputs.

Writes bench/results/openvino_qdq_schemes.json and .md. The winner is the intel-openvino
quant_scheme in targets/intel-openvino.toml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openvino_vs_nncf import (  # noqa: E402
    MODELS,
    RESULTS,
    compile_ir,
    feeds_for,
    fidelity,
    float_ir,
    interleaved_latency,
    ir_bytes,
    ort_outputs,
    ov_outputs,
    quantize_with_edgeopt,
    simplify,
)

from edgeopt.converters.errors import LoweringError  # noqa: E402
from edgeopt.converters.lower import LoweringOptions, lower  # noqa: E402
from edgeopt.targets import get_target  # noqa: E402

# The intel-openvino scheme with one field changed at a time (activation range/type, placement, ops).
SCHEME_VARIANTS: dict[str, dict[str, Any]] = {
    "int8 symmetric / inputs": {"activation_dtype": "int8", "activation_symmetric": True, "activation_placement": "inputs"},
    "int8 symmetric / inputs_and_outputs": {"activation_dtype": "int8", "activation_symmetric": True, "activation_placement": "inputs_and_outputs"},
    "uint8 asymmetric / inputs": {"activation_dtype": "uint8", "activation_symmetric": False, "activation_placement": "inputs"},
    "uint8 asymmetric / inputs_and_outputs": {"activation_dtype": "uint8", "activation_symmetric": False, "activation_placement": "inputs_and_outputs"},
    "uint8 asymmetric / inputs_and_outputs / compute ops only": {
        "activation_dtype": "uint8",
        "activation_symmetric": False,
        "activation_placement": "inputs_and_outputs",
        "quantized_ops": ("Conv", "ConvTranspose", "Gemm", "MatMul"),
    },
}


def run_model(name: str, work: Path, calibration_size: int, eval_size: int, runs: int, variants: Sequence[str]) -> dict[str, Any]:
    spec = next(m for m in MODELS if m.name == name)
    model = spec.make()
    calibration, evaluation = feeds_for(model, name, calibration_size, eval_size)
    reference = ort_outputs(model, evaluation)
    simplified = simplify(model)
    target = get_target("intel-openvino")

    irs: dict[str, Path] = {"fp32": float_ir(model, "fp32", work / name / "fp32")[0]}
    rows: dict[str, dict[str, Any]] = {"fp32": {}}
    failures: dict[str, str] = {}
    for index, key in enumerate(variants):
        scheme = dataclasses.replace(target.quant_scheme, **SCHEME_VARIANTS[key])
        start = time.perf_counter()
        qdq = quantize_with_edgeopt(simplified, scheme, calibration)
        out_dir = work / name / f"v{index}"
        try:
            result = lower(qdq, target, "int8", out_dir, LoweringOptions())
        except LoweringError as error:
            failures[key] = error.message
            continue
        irs[key] = out_dir / "model.xml"
        rows[key] = {
            "scheme": SCHEME_VARIANTS[key],
            "build_s": time.perf_counter() - start,
            "fake_quantize": result.summary["fake_quantize"],
            "cpu_execution": result.summary["cpu_execution"],
            "vs_ort_qdq_max_abs": fidelity(ort_outputs(qdq, evaluation), ov_outputs(compile_ir(irs[key]), evaluation))["max_abs"],
        }
    compiled = {key: compile_ir(xml) for key, xml in irs.items()}
    latency = interleaved_latency(compiled, evaluation[0], runs)
    for key, c in compiled.items():
        rows[key].update(latency[key])
        rows[key]["bytes"] = ir_bytes(irs[key])
        rows[key].update(fidelity(reference, ov_outputs(c, evaluation)))
    return {"model": name, "rows": rows, "failures": failures}


def int8_share(cpu_execution: dict[str, dict[str, int]]) -> str:
    total = sum(sum(c.values()) for c in cpu_execution.values())
    integer = sum(n for c in cpu_execution.values() for p, n in c.items() if p in ("u8", "i8"))
    return f"{integer}/{total}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "# QDQ variants on OpenVINO's CPU plugin (batch 1, 2 threads, f32 pinned)",
        "",
        "Latency is interleaved (ms); 'int8 layers' counts Convolution/FullyConnected/MatMul nodes the plugin runs in u8/i8;",
        "fidelity is against ONNX Runtime fp32; 'vs ORT QDQ' is OpenVINO's max |Δ| from ONNX Runtime running the same QDQ graph.",
        "",
        "| model | variant | median ms | p90 ms | × fp32 | int8 layers | SQNR dB | cosine | top-1 agree | vs ORT QDQ | size KB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        base = result["rows"]["fp32"]["median_ms"]
        for key, row in result["rows"].items():
            lines.append(
                f"| {result['model']} | {key} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {row['median_ms'] / base:.2f} | "
                f"{int8_share(row.get('cpu_execution', {})) if key != 'fp32' else '-'} | {row['sqnr_db']:.1f} | {row['cosine']:.5f} | "
                f"{row['top1_agreement']:.3f} | {row.get('vs_ort_qdq_max_abs', 0.0):.3g} | {row['bytes'] / 1024:.0f} |"
            )
        for key, message in result["failures"].items():
            lines.append(f"| {result['model']} | {key} | fails: {message} | | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["digits", "shufflenet", "squeezenet", "mobilenet_v2_style", "transformer_encoder", "densenet121", "resnet50"])
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--variants", nargs="*", default=list(SCHEME_VARIANTS), help="keys of SCHEME_VARIANTS")
    parser.add_argument("--out", type=Path, default=RESULTS / "openvino_qdq_schemes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeopt-ov-schemes-") as tmp:
        for name in args.models:
            print(f"schemes {name} ...", file=sys.stderr, flush=True)
            results.append(run_model(name, Path(tmp), args.calibration, args.eval, args.runs, args.variants))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps({"results": results}, indent=2, default=str) + "\n")
            args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
