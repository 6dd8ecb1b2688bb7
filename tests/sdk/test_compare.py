"""`edgeopt compare`: an fp32 and an int8 build of the digits model, measured here, side by side.

The figures are the runs' own (nothing recomputed differently): ratios against the first run,
quality as differences in points, and a verdict line a person can read in one go.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeopt
from edgeopt.benchmark import benchmark_here
from edgeopt.bundle import write_manifest
from edgeopt.cli import cli
from edgeopt.compare import Run, compare
from edgeopt.remote import profile
from edgeopt.runtime.bundle import read_manifest

from .conftest import SshServer
from .test_report import CHROMIUM, IMAGE, chromium_console, page_problems

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
# A noisy run (p90 over 1.5 × p50: this machine is shared) adds a note in brackets.
VERDICT = re.compile(r"^B is \d+\.\d\d× (faster|slower) at p50 than A, top-1 agreement [−+±]\d+\.\d points, peak memory \d+\.\d\d×( \(noisy: .*\))?$")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """digits built in fp32 and in int8 (both evaluated on the same data), each benchmarked once."""
    root = tmp_path_factory.mktemp("compare")
    fp32, int8 = root / "fp32", root / "int8"
    edgeopt.build(DIGITS / "model.onnx", "ort", output=fp32, evaluation=DIGITS / "eval.npz")
    edgeopt.build(DIGITS / "model.onnx", "ort", output=int8, precision="int8", calibration=DIGITS / "calib.npz", evaluation=DIGITS / "eval.npz")
    for bundle in (fp32, int8):
        benchmark_here(bundle, warmup=5, runs=50)
    return fp32, int8


def _compare(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["compare", *args])
    return result.exit_code, result.stdout


def test_fp32_against_int8_gives_ratios_quality_differences_and_a_verdict(bundles: tuple[Path, Path]) -> None:
    fp32, int8 = bundles
    code, output = _compare(str(fp32), str(int8), "--json")
    assert code == 0, output
    document = json.loads(output)
    figures = {row["name"]: row for row in document["figures"]}
    runs = [read_manifest(b).benchmarks[-1].results for b in bundles]

    p50 = [run["latency_ms"]["p50"] for run in runs]
    assert figures["latency p50"]["values"] == p50
    assert figures["latency p50"]["ratios"] == pytest.approx([1.0, p50[1] / p50[0]])
    assert figures["peak memory"]["values"] == [run["memory"]["peak_rss_bytes"] for run in runs]
    quality = {m.name: m for m in read_manifest(int8).quality.metrics}
    agreement = figures["top-1 agreement"]
    assert agreement["values"] == [1.0, quality["top1_agreement"].optimized]
    assert agreement["differences"][1] == pytest.approx(quality["top1_agreement"].delta)
    assert figures["artifact size"]["ratios"][1] < 0.6  # int8 weights: under 60% of the fp32 artifact

    (verdict,) = document["verdicts"]
    print(verdict)
    assert VERDICT.match(verdict), verdict
    points = 100 * quality["top1_agreement"].delta
    assert f"top-1 agreement {'−' if points < -0.05 else '+'}{abs(points):.1f} points" in verdict or abs(points) < 0.05
    word = "faster" if p50[1] <= p50[0] else "slower"
    assert f"B is {max(p50) / min(p50):.2f}× {word} at p50 than A" in verdict


def test_the_text_table_and_the_html_page(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = bundles
    page = tmp_path / "compare.html"
    code, output = _compare(str(fp32), str(int8), "--html", str(page))
    assert code == 0, output
    print(output)
    lines = output.splitlines()
    assert lines[0].startswith("A  model (fp32, onnxruntime") and lines[1].startswith("B  model (int8, onnxruntime")
    assert any(re.match(r"latency p50 +[\d.]+ ms +[\d.]+ ms +\d+\.\d\d×$", line) for line in lines)
    assert any(re.match(r"top-1 agreement +100\.00% +\d+\.\d\d% +[−+±]\d\.\d pt$", line) for line in lines)
    assert lines[-2].startswith("verdict: B is ") and lines[-1] == f"wrote {page}"
    html = page.read_text(encoding="utf-8")
    assert page_problems(html, {"verdict", "figures", "latency"}) == []
    assert "<script" not in html
    if CHROMIUM is not None:  # the same headless check as report.html's (skipped there, with its reason, without Chromium)
        images = len(IMAGE.findall(html))
        assert chromium_console(page) == [f"edgeopt-probe decoded={images} of {images}"]


def test_a_history_entry_a_device_and_a_bench_json_file_are_runs(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    fp32, int8 = bundles
    runner = CliRunner()
    bench = runner.invoke(cli, ["bench", str(int8), "--runs", "20", "--warmup", "2", "--no-record", "--json"])
    assert bench.exit_code == 0, bench.output
    saved = tmp_path / "int8.json"
    saved.write_text(bench.output)
    host = read_manifest(fp32).benchmarks[0].results["device"]["hostname"]

    code, output = _compare(f"{fp32}#benchmarks:-1", f"{fp32}#{host}", str(saved), "--json")
    assert code == 0, output
    document = json.loads(output)
    assert [r["source"] for r in document["runs"]] == [f"{fp32}#benchmarks:0", f"{fp32}#benchmarks:0", str(saved)]
    agreement = {row["name"]: row for row in document["figures"]}["top-1 agreement"]
    assert agreement["values"][2] == read_manifest(int8).quality.metrics[1].optimized, "the bench JSON's bundle gives its fidelity"
    assert len(document["verdicts"]) == 2


def test_a_bundle_never_measured_compares_on_size_and_fidelity(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    fresh = tmp_path / "fresh"
    shutil.copytree(bundles[1], fresh)
    write_manifest(fresh, replace(read_manifest(fresh), benchmarks=()))  # the int8 build as it was before its benchmark
    code, output = _compare(str(bundles[0]), str(fresh))
    assert code == 0, output
    assert "verdict: B against A: no latency to compare (a build never benchmarked: run `edgeopt bench` on it), top-1 agreement" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{fp32}"], "compare needs at least two runs, got 1"),
        (["{fp32}", "{fp32}#profiles:0"], "the bundle has 0 profiles"),
        (["{fp32}", "{fp32}#no-such-device"], "no benchmark or profile on a device named 'no-such-device'"),
        (["{fp32}", "{missing}"], "no such bundle or file"),
    ],
)
def test_wrong_runs_are_usage_errors(bundles: tuple[Path, Path], tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["compare", *(a.format(fp32=bundles[0], missing=tmp_path / "nothing") for a in args), "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "OptionError" and message in error["message"]


def test_a_disturbed_run_is_called_noisy_in_the_verdict() -> None:
    """A long tail (p90 over 1.5 × p50) or a median in the slow mode (p50 over 2 × the fastest run)
    means the run was disturbed; the verdict says so instead of trusting the ratio."""
    steady = Run("a.json", "benchmark", {"latency_ms": {"p50": 2.0, "p90": 2.2, "min": 1.9}}, {"hostname": "pi"})
    tail = Run("b.json", "benchmark", {"latency_ms": {"p50": 1.0, "p90": 4.0, "min": 0.9}}, {"hostname": "pi"})
    slow_mode = Run("c.json", "benchmark", {"latency_ms": {"p50": 10.0, "p90": 11.0, "min": 2.0}}, {"hostname": "pi"})
    (calm,) = compare([steady, steady]).verdicts
    (tailed,) = compare([steady, tail]).verdicts
    (bimodal,) = compare([steady, slow_mode]).verdicts
    assert calm == "B is 1.00× faster at p50 than A"
    assert tailed == "B is 2.00× faster at p50 than A (noisy: B p90 = 4.0 × p50; repeat on a quiet machine before trusting the ratio)"
    assert bimodal == "B is 5.00× slower at p50 than A (noisy: B p50 = 5.0 × its fastest run; repeat on a quiet machine before trusting the ratio)"


def test_edgeopt_profile_json_output_is_a_run_and_picks_a_device(bundles: tuple[Path, Path], sshd: SshServer, tmp_path: Path) -> None:
    device_bundle = tmp_path / "int8"
    shutil.copytree(bundles[1], device_bundle)
    (result,) = profile(device_bundle, [sshd.host], sshd.profile_options(runs=20, remote_cache=str(tmp_path / "device-cache")))
    saved = tmp_path / "profile.json"
    saved.write_text(json.dumps({"profiles": [result.to_dict()]}))  # what `edgeopt profile --json` prints

    code, output = _compare(str(bundles[0]), f"{saved}#{sshd.host}", "--json")
    assert code == 0, output
    document = json.loads(output)
    assert document["runs"][1] | {"time": None} == {
        "letter": "B", "source": f"{saved}#{sshd.host}", "kind": "profile", "name": "model", "precision": "int8",
        "backend": f"onnxruntime {result.bench['backend']['version']}", "device": sshd.host,
        "cpu": result.device["cpu"]["model"], "threads": result.bench["threads"], "time": None, "runs": 20,
    }
    assert {row["name"]: row for row in document["figures"]}["latency p50"]["values"][1] == result.bench["latency_ms"]["p50"]
    assert _compare(str(bundles[0]), str(saved))[0] == 0  # one device: no need to name it
    code, output = _compare(str(bundles[0]), f"{saved}#someone-else", "--json")
    assert code == 2 and "0 of its profiles match" in json.loads(output)["error"]["message"]
