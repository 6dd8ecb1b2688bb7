"""--json: every command, the device runtime's included, prints exactly one JSON object on stdout,
failures and bad usage included; --quiet builds write nothing to stderr, libraries included."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

import edgeopt
from edgeopt.cli import cli
from tests.runtime.factory import float_bundle

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_document(stdout: str) -> Any:
    """The whole of stdout is one JSON document (json.loads refuses anything after it)."""
    return json.loads(stdout)


def assert_error_document(result: Result, error_type: str, exit_code: int) -> dict[str, Any]:
    document = one_document(result.stdout)
    error = document["error"]
    assert (error["type"], error["exit_code"], result.exit_code) == (error_type, exit_code, exit_code), result.stderr
    assert error["message"] and error["hint"]
    assert [line for line in result.stderr.splitlines() if line.startswith(("error: ", "Error: "))], result.stderr
    return document


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("json") / "digits-ort"
    edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=bundle)
    return bundle


@pytest.mark.parametrize(
    ("argv", "error_type"),
    [
        (["inspect", "{missing}.onnx", "--json"], "ModelLoadError"),
        (["build", "{missing}.onnx", "-t", "ort", "--json"], "ModelLoadError"),
        (["build", str(DIGITS / "model.onnx"), "-t", "jetson-orn", "--json"], "UnknownTargetError"),
        (["verify", "{missing}", "--json"], "BundleError"),
        (["bench", "{missing}", "--json"], "BundleError"),
        (["predict", "{missing}", "-i", "{missing}.npy", "--json"], "BundleError"),
        (["profile", "{missing}", "--host", "nobody@127.0.0.1", "--json"], "BundleError"),
    ],
)
def test_an_expected_failure_is_one_error_document(tmp_path: Path, argv: list[str], error_type: str) -> None:
    result = run_cli(*(a.replace("{missing}", str(tmp_path / "missing")) for a in argv))
    assert_error_document(result, error_type, 2)


@pytest.mark.parametrize(
    ("argv", "error_type"),
    [
        (["build", "m.onnx", "-t", "ort", "--calibration-method", "median", "--json"], "BadParameter"),
        (["build", "m.onnx", "-t", "ort", "--input-shape", "image", "--json"], "BadParameter"),
        (["bench", "b", "--runs", "many", "--json"], "BadParameter"),
        (["verify", "--json"], "MissingParameter"),
        (["predict", "b", "--colour", "--json"], "NoSuchOption"),
        (["deploy", "--json"], "NoSuchCommand"),
    ],
)
def test_bad_usage_with_json_is_an_error_document_with_exit_2(argv: list[str], error_type: str) -> None:
    assert_error_document(run_cli(*argv), error_type, 2)


def test_targets_json_is_one_object() -> None:
    result = run_cli("targets", "--json")
    assert result.exit_code == 0
    assert {t["name"] for t in one_document(result.stdout)["targets"]} >= {"apple-ane", "raspberry-pi"}


def drifted_copy(bundle: Path, to: Path) -> Path:
    """A copy whose reference outputs are off by 1 (checksums updated): parity must fail."""
    from edgeopt.bundle import artifact_entry, read_manifest, write_manifest

    shutil.copytree(bundle, to)
    with np.load(to / "reference" / "outputs.npz") as outputs:
        np.savez(to / "reference" / "outputs.npz", **{name: outputs[name] + 1.0 for name in outputs.files})
    manifest = read_manifest(to)
    manifest["artifacts"] = [
        artifact_entry(to, a["path"], a["format"], a["role"]) if a["path"] == "reference/outputs.npz" else a for a in manifest["artifacts"]
    ]
    write_manifest(to, manifest)
    return to


def test_verify_that_fails_prints_its_results_and_the_failure_in_one_document(digits_bundle: Path, tmp_path: Path) -> None:
    bundle = drifted_copy(digits_bundle, tmp_path / "drifted")
    document = assert_error_document(run_cli("verify", bundle, "--json"), "VerificationError", 3)
    assert document["passed"] is False and document["outputs"]


def test_predict_json_carries_the_output_values(digits_bundle: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    with np.load(DIGITS / "eval.npz") as data:
        x = data["image"][:1]
    np.save(tmp_path / "x.npy", x)
    result = run_cli("predict", digits_bundle, "-i", tmp_path / "x.npy", "--json")
    assert result.exit_code == 0, result.stderr
    document = one_document(result.stdout)
    logits = document["outputs"]["logits"]
    assert (logits["shape"], logits["dtype"], document["output_file"]) == ([1, 10], "float32", None)
    (expected,) = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    np.testing.assert_allclose(np.asarray(logits["values"], np.float32), expected, rtol=1e-4, atol=1e-5)


def test_predict_json_leaves_a_large_output_in_an_npz_it_names(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "large.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = run_cli("predict", tmp_path / "large.onnx", "-i", tmp_path / "x.npy", "--json")
    assert result.exit_code == 0, result.stderr
    document = one_document(result.stdout)
    written = Path(document["output_file"])
    try:
        assert document["outputs"]["y"] == {"shape": [1, 3, 64, 64], "dtype": "float32", "file": str(written)}
        assert str(written) in result.stderr  # said where, on stderr
        with np.load(written) as saved:
            np.testing.assert_array_equal(saved["y"], 2 * x)
    finally:
        written.unlink()


def test_profile_of_an_unreachable_host_is_one_error_document(digits_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "ssh_config").write_text("")
    result = run_cli("profile", digits_bundle, "--host", "nobody@127.0.0.1", "--port", "1", "-F", tmp_path / "ssh_config",
                     "--connect-timeout", "3", "--json")
    assert_error_document(result, "HostUnreachableError", 2)


def test_profile_parity_miss_is_one_document_with_the_results_and_the_failure(digits_bundle: Path, tmp_path: Path, sshd) -> None:
    bundle = drifted_copy(digits_bundle, tmp_path / "drifted")
    result = run_cli("profile", bundle, "--host", sshd.host, "--port", str(sshd.port), "-i", sshd.client_key, "-F", sshd.ssh_config,
                     "--python", sys.executable, "--runs", "2", "--warmup", "0", "--json")
    document = assert_error_document(result, "VerificationError", 3)
    (profiled,) = document["profiles"]
    assert profiled["host"] == sshd.host and profiled["verify"]["passed"] is False
    assert sshd.host in document["error"]["message"]


def runtime(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeopt.runtime", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_device_runtime_bad_usage_with_json_is_an_error_document() -> None:
    done = runtime("bench", "--runs", "many", "--json")
    assert done.returncode == 2
    error = one_document(done.stdout)["error"]
    assert error["type"] == "UsageError" and "--runs" in error["message"] and error["exit_code"] == 2
    assert "Traceback" not in done.stderr and "error: " in done.stderr


def test_device_runtime_failed_verify_is_one_document_with_the_failure(tmp_path: Path) -> None:
    done = runtime("verify", float_bundle(tmp_path / "drifted", wrong_reference=True), "--json")
    assert done.returncode == 3
    document = one_document(done.stdout)
    assert document["passed"] is False and document["error"]["type"] == "VerificationError" and document["error"]["exit_code"] == 3


def edgeopt_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("target", ["raspberry-pi", "apple-ane"])
def test_quiet_build_writes_nothing_at_all(target: str, tmp_path: Path) -> None:
    """LiteRT's XNNPACK INFO line and coremltools' warnings and MIL progress bars included."""
    done = edgeopt_cli("build", DIGITS / "model.onnx", "-t", target, "-o", tmp_path / "b", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


@pytest.mark.parametrize("target", ["raspberry-pi", "apple-ane"])
def test_json_build_prints_only_the_document(target: str, tmp_path: Path) -> None:
    done = edgeopt_cli("build", DIGITS / "model.onnx", "-t", target, "-o", tmp_path / "b", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    document = one_document(done.stdout)
    assert document["bundle"] == str(tmp_path / "b") and document["manifest"]["target"]["name"] == target


def single_node_model(path: Path, op_type: str) -> Path:
    """x [1, 8] -> one node: Erf, or TopK with k = 3."""
    if op_type == "TopK":
        node = helper.make_node("TopK", ["x", "k"], ["y", "i"], name="the_node")
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]), helper.make_tensor_value_info("i", TensorProto.INT64, [1, 3])]
    else:
        node = helper.make_node(op_type, ["x"], ["y"], name="the_node")
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])]
    k = [numpy_helper.from_array(np.array([3], np.int64), "k")] if op_type == "TopK" else []
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])], outputs, k)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("op_type", "blame"),
    [
        ("TopK", "edgeopt's tflite lowering for raspberry-pi does not write TopK yet"),  # LiteRT has TOPK_V2
        ("Erf", "LiteRT has no builtin for Erf"),  # no ERF in LiteRT's schema
    ],
)
def test_an_unsupported_op_blames_the_right_party(tmp_path: Path, op_type: str, blame: str) -> None:
    model = single_node_model(tmp_path / f"{op_type}.onnx", op_type)
    error = assert_error_document(run_cli("build", model, "-t", "raspberry-pi", "-o", tmp_path / "b", "--json"), "UnsupportedOpsError", 2)["error"]
    assert blame in error["message"] and "the_node" in error["message"]
    assert "cannot run on raspberry-pi" not in error["message"]


def test_a_signal_mid_build_with_json_is_one_error_document(tmp_path: Path) -> None:
    """SIGTERM once the build's staging folder exists (so edgeopt's handler is in place): exit 143, and
    stdout is still one document."""
    from tests.sdk.test_signals import _slow_model

    build = subprocess.Popen(
        [sys.executable, "-m", "edgeopt.cli", "build", str(_slow_model(tmp_path / "slow.onnx")), "-t", "ort", "-o", str(tmp_path / "b"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".b.*.partial")):
        assert build.poll() is None and time.monotonic() < deadline, "the build ended before its staging folder appeared"
        time.sleep(0.005)
    build.send_signal(signal.SIGTERM)
    stdout, stderr = build.communicate(timeout=60)
    assert build.returncode == 143, stderr
    error = one_document(stdout)["error"]
    assert (error["type"], error["exit_code"]) == ("Interrupted", 143) and "SIGTERM" in error["message"]


def test_a_bug_still_prints_one_json_document_and_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception (a bug, exit 1) keeps its traceback on stderr; --json still gets its document."""
    import edgeopt.targets

    def broken() -> list[Any]:
        raise RuntimeError("profile table lost")

    monkeypatch.setattr(edgeopt.targets, "all_targets", broken)
    result = CliRunner().invoke(cli, ["targets", "--json"])
    error = one_document(result.stdout)["error"]
    assert (error["type"], error["message"], error["exit_code"]) == ("RuntimeError", "profile table lost", 1)
    assert "bug" in error["hint"] and isinstance(result.exception, RuntimeError)
