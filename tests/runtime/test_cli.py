"""`python -m edgeopt.runtime`: the JSON that remote profiling parses, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgeopt.runtime import benchmark_schema
from tests.runtime.factory import float_bundle, tiny_float_reference


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeopt.runtime", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return float_bundle(tmp_path_factory.mktemp("cli") / "tiny-onnxruntime-cpu")


def test_info_json_lists_device_backends_and_bundle(bundle: Path) -> None:
    done = run("info", bundle, "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert set(document) == {"runtime", "device", "backends", "bundle"}
    assert document["backends"]["onnxruntime"]["available"] is True
    assert document["backends"]["tensorrt"]["install"]
    assert document["bundle"]["backend"] == "onnxruntime" and document["bundle"]["model"] == "model.onnx"
    assert document["device"]["cpu"]["logical_cores"] >= 1


def test_bench_json_validates_against_the_benchmark_schema(bundle: Path) -> None:
    done = run("bench", bundle, "--warmup", "1", "--runs", "5", "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    jsonschema.validate(document, benchmark_schema())
    assert document["runs"] == 5 and document["threads"] == 1


def test_verify_json_passes_with_exit_0(bundle: Path) -> None:
    done = run("verify", bundle, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["passed"] is True


def test_a_failed_verify_exits_3_with_the_result_on_stdout(tmp_path: Path) -> None:
    done = run("verify", float_bundle(tmp_path / "bad", wrong_reference=True), "--json")
    assert done.returncode == 3
    assert json.loads(done.stdout)["passed"] is False
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_predict_reads_npy_and_writes_npz(bundle: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = run("predict", bundle, "--input", tmp_path / "x.npy", "--output", tmp_path / "out" / "y.npz", "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)["outputs"]["y"]
    assert (printed["shape"], printed["dtype"]) == ([1, 3], "float32")
    with np.load(tmp_path / "out" / "y.npz") as saved:
        np.testing.assert_allclose(saved["y"], tiny_float_reference(x), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(printed["values"], np.float32), saved["y"])


def test_an_expected_failure_is_one_line_without_traceback(tmp_path: Path) -> None:
    done = run("bench", tmp_path / "nowhere", "--json")
    assert done.returncode == 2
    assert done.stderr == (
        f"error: {tmp_path / 'nowhere'}: no such file or folder (hint: pass a bundle folder, a .tar.gz bundle or a model file)\n"
    )
    assert "Traceback" not in done.stderr
    assert json.loads(done.stdout)["error"]["type"] == "BundleError"


def test_a_missing_backend_reports_its_install_hint_as_json(bundle: Path) -> None:
    done = run("bench", bundle, "--backend", "coreml", "--json")
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "BackendUnavailableError" and error["hint"]


def test_predict_with_a_pickled_input_is_refused(bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    done = run("predict", bundle, "--input", tmp_path / "x.npy")
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_bad_usage_exits_2() -> None:
    assert run("bench").returncode == 2
