"""The CLI: every expected failure is one clear line, the documented exit code, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def edgeopt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")], proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_build_prints_a_summary_and_writes_the_bundle(tmp_path: Path) -> None:
    proc = edgeopt("build", str(DIGITS / "model.onnx"), "--target", "jetson-orin", "-o", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert "built model for jetson-orin" in proc.stdout and "build_engine.sh" in proc.stdout
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_json_and_quiet_print_no_progress(tmp_path: Path) -> None:
    proc = edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(tmp_path / "b"), "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    document = json.loads(proc.stdout)
    assert document["bundle"] == str(tmp_path / "b") and document["archive"] is None
    assert document["manifest"]["target"]["name"] == "onnxruntime-cpu"


def test_targets_table_and_json() -> None:
    table = edgeopt("targets")
    assert table.returncode == 0
    for name in ("jetson-orin", "apple-ane", "intel-openvino", "raspberry-pi", "onnxruntime-cpu"):
        assert name in table.stdout
    data = json.loads(edgeopt("targets", "--json").stdout)["targets"]
    assert {d["name"] for d in data} >= {"jetson-orin", "raspberry-pi"}


def test_help_documents_exit_codes() -> None:
    out = edgeopt("build", "--help").stdout
    assert "Exit codes" in out and "3  lowering parity missed (a bug), quality budget missed" in out


def test_missing_file(tmp_path: Path) -> None:
    assert_clean_failure(edgeopt("build", str(tmp_path / "nope.onnx"), "-t", "ort", "-o", str(tmp_path / "b")), 2, "nope.onnx")
    assert not (tmp_path / "b").exists()


def test_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("hello, I am not a model\n")
    assert_clean_failure(edgeopt("build", str(path), "-t", "ort", "-o", str(tmp_path / "b")), 2, "notes.onnx")
    assert not (tmp_path / "b").exists()


def test_truncated_protobuf(tmp_path: Path) -> None:
    data = (DIGITS / "model.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_clean_failure(edgeopt("build", str(path), "-t", "ort", "-o", str(tmp_path / "b")), 2, "cut.onnx")


def test_model_failing_the_checker(tmp_path: Path) -> None:
    # Add's inputs have incompatible static shapes and an undeclared input name.
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "missing"], ["y"], name="bad_add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert_clean_failure(edgeopt("build", str(path), "-t", "ort", "-o", str(tmp_path / "b")), 2, "bad.onnx")


def test_unknown_target_suggests_the_nearest(tmp_path: Path) -> None:
    assert_clean_failure(edgeopt("build", str(DIGITS / "model.onnx"), "-t", "jetson-orn", "-o", str(tmp_path / "b")), 2, "did you mean 'jetson-orin'")


def test_unsupported_ops_are_listed_all_at_once(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Hardmax", ["x"], ["h"], name="first_hardmax"),
            helper.make_node("Relu", ["h"], ["r"], name="fine_relu"),
            helper.make_node("Hardmax", ["r"], ["y"], name="second_hardmax"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    path = tmp_path / "hardmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    proc = edgeopt("build", str(path), "-t", "jetson-orin", "-o", str(tmp_path / "b"))
    assert_clean_failure(proc, 2, "first_hardmax", "second_hardmax", "2 node(s)")
    assert "fine_relu" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(out)), 2, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert_clean_failure(edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(out), "--force"), 2, "not an edgeopt bundle")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(out), "--force", "-q").returncode == 0
    assert edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(out), "--force", "-q").returncode == 0
    assert (out / "manifest.json").is_file()


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert_clean_failure(edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(blocker / "b")), 2, "output folder")


def test_int8_without_calibration_is_bad_usage(tmp_path: Path) -> None:
    assert_clean_failure(edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-p", "int8", "-o", str(tmp_path / "b")), 2, "--calibration")


def test_precision_the_target_lacks(tmp_path: Path) -> None:
    assert_clean_failure(edgeopt("build", str(DIGITS / "model.onnx"), "-t", "jetson-orin", "-p", "palettized-4", "-o", str(tmp_path / "b")), 2, "fp16")


def test_precision_and_backend_names_are_parsed_once_at_the_edge(tmp_path: Path) -> None:
    """An unknown name is a usage error (exit 2) listing the closed set, before any work is done."""
    proc = edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-p", "int4", "-o", str(tmp_path / "b"))
    assert proc.returncode == 2 and "'int4' is not one of 'fp32', 'fp16', 'int8'" in proc.stderr
    proc = edgeopt("verify", str(tmp_path / "b"), "--backend", "tvm")
    assert proc.returncode == 2 and "'tvm' is not one of 'onnxruntime', 'openvino'" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_verify_fails_with_exit_3_when_outputs_drift(tmp_path: Path) -> None:
    from edgeopt.bundle import artifact_entry, read_manifest, write_manifest

    bundle = tmp_path / "b"
    assert edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(bundle), "-q").returncode == 0
    assert edgeopt("verify", str(bundle)).returncode == 0
    outputs = dict(np.load(bundle / "reference" / "outputs.npz"))
    np.savez(bundle / "reference" / "outputs.npz", **{k: v + 1.0 for k, v in outputs.items()})
    manifest = read_manifest(bundle)
    manifest["artifacts"] = [
        artifact_entry(bundle, a["path"], a["format"], a["role"]) if a["path"] == "reference/outputs.npz" else a
        for a in manifest["artifacts"]
    ]
    write_manifest(bundle, manifest)
    proc = edgeopt("verify", str(bundle))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_calibration_data_of_the_wrong_shape_fails_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "calib.npz"
    np.savez(bad, image=np.zeros((16, 1, 4, 4), np.float32))
    proc = edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-p", "int8", "--calibration", str(bad), "-o", str(tmp_path / "b"))
    assert_clean_failure(proc, 2, "image", "calib.npz")
    assert "· simplify" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_budget_without_evaluation_data_is_bad_usage(tmp_path: Path) -> None:
    proc = edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-p", "int8", "--calibration", str(DIGITS / "calib.npz"),
                   "--max-accuracy-drop", "1", "-o", str(tmp_path / "b"))
    assert_clean_failure(proc, 2, "--eval")


def test_budget_met_by_the_digits_int8_build_is_recorded(tmp_path: Path) -> None:
    proc = edgeopt("build", str(DIGITS / "model.onnx"), "-t", "rpi", "-p", "int8", "--calibration", str(DIGITS / "calib.npz"),
                   "--eval", str(DIGITS / "eval.npz"), "--max-accuracy-drop", "1.0", "-o", str(tmp_path / "b"), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)["manifest"]
    accuracy = next(m for m in manifest["quality"]["metrics"] if m["name"] == "accuracy")
    assert -accuracy["delta"] * 100 <= 1.0
    assert manifest["quantization"]["budget"] is not None


def test_predict_and_bench_run_the_bundle_here(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    assert edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "-o", str(bundle), "-q").returncode == 0
    with np.load(DIGITS / "eval.npz") as data:
        x = data["image"][:1]
    np.save(tmp_path / "x.npy", x)
    proc = edgeopt("predict", str(bundle), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz"))
    assert proc.returncode == 0, proc.stderr
    import onnxruntime as ort

    (expected,) = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with np.load(tmp_path / "y.npz") as got:
        assert np.allclose(got["logits"], expected, rtol=1e-4, atol=1e-5)
    bench = edgeopt("bench", str(bundle), "--runs", "20", "--warmup", "2", "--json")
    assert bench.returncode == 0, bench.stderr
    assert len(json.loads(bench.stdout)["samples_ms"]) == 20
    assert len(json.loads((bundle / "manifest.json").read_text())["benchmarks"]) == 1
