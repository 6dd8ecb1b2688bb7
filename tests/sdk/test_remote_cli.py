"""`edgeopt profile` from the command line, through the real test sshd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import edgeopt

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def test_profile_command_prints_the_table_and_records_the_run(tmp_path: Path, sshd) -> None:
    bundle = tmp_path / "bundle with space"
    edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=bundle)
    argv = [
        sys.executable, "-m", "edgeopt.cli", "profile", str(bundle), "--host", sshd.host,
        "--port", str(sshd.port), "-i", str(sshd.client_key), "-F", str(sshd.ssh_config),
        "--python", sys.executable, "--runs", "5", "--warmup", "1", "--json",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["profiles"]
    assert result["host"] == sshd.host and result["verify"]["passed"]
    assert len(result["bench"]["samples_ms"]) == 5
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [p["host"] for p in manifest["profiles"]] == [sshd.host]


def test_profile_unreachable_host_is_exit_2_without_traceback(tmp_path: Path, sshd) -> None:
    bundle = tmp_path / "b"
    edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=bundle)
    argv = [sys.executable, "-m", "edgeopt.cli", "profile", str(bundle), "--host", "root@127.0.0.1", "--port", "1",
            "-F", str(sshd.ssh_config), "--connect-timeout", "3"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_an_identity_path_ssh_cannot_quote_is_bad_usage(tmp_path: Path, sshd) -> None:
    bundle = tmp_path / "b"
    edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=bundle)
    key = tmp_path / 'key"file'
    key.write_bytes(sshd.client_key.read_bytes())
    argv = [sys.executable, "-m", "edgeopt.cli", "profile", str(bundle), "--host", sshd.host, "--port", str(sshd.port),
            "-i", str(key), "-F", str(sshd.ssh_config), "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["type"] == "OptionError" and "double quote" in error["message"]
