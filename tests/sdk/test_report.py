"""report.html tells the build's story and is redrawn, still checksummed, when results arrive."""

from __future__ import annotations

import json
from pathlib import Path

import edgeopt
from edgeopt.benchmark import benchmark_here
from edgeopt.verify import verify_bundle

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def test_report_draws_stages_sizes_and_quantization(tmp_path: Path) -> None:
    edgeopt.build(DIGITS / "model.onnx", "ort", output=tmp_path / "b", precision="int8",
                  calibration=DIGITS / "calib.npz", evaluation=DIGITS / "eval.npz")
    report = (tmp_path / "b" / "report.html").read_text()
    assert report.count("<svg") >= 3  # sizes, stage times, per-tensor SQNR
    for stage in ("simplify", "quantize", "lower", "verify"):
        assert f">{stage}</text>" in report
    assert "noisiest tensors" in report and "accuracy" in report


def test_benchmark_is_appended_and_drawn_and_the_bundle_still_verifies(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    edgeopt.build(DIGITS / "model.onnx", "ort", output=bundle)
    result = benchmark_here(bundle, warmup=2, runs=30)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (entry,) = manifest["benchmarks"]
    assert entry["latency_ms"]["p50"] == result.to_dict()["latency_ms"]["p50"]
    report = (bundle / "report.html").read_text()
    assert "Benchmark on" in report and "p99;" in report
    assert verify_bundle(bundle).passed  # report.html's checksum was updated with it
