"""Ctrl-C and SIGTERM mid-build: exit 130/143 with one line, no traceback, no staging folder left,
the previous bundle untouched. A real `edgeopt build` subprocess is signalled once its staging
folder appears, on a model that keeps it busy for a second or more after that."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgeopt

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def _slow_model(path: Path, channels: int = 64, side: int = 64, layers: int = 16) -> Path:
    """A Conv/Relu stack of ~2.4 G MACs per inference: lowering and verifying it take a while."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for index in range(layers):
        weights.append(numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32), f"w{index}"))
        nodes += [
            helper.make_node("Conv", [previous, f"w{index}"], [f"conv{index}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]),
        ]
        previous = f"relu{index}"
    shape = [1, channels, side, side]
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, shape)], weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_build_leaves_the_previous_bundle(tmp_path: Path, signum: int, exit_code: int) -> None:
    bundle = tmp_path / "b"
    edgeopt.build(DIGITS / "model.onnx", "ort", output=bundle)
    previous = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    model = _slow_model(tmp_path / "slow.onnx")
    build = subprocess.Popen(
        [sys.executable, "-m", "edgeopt.cli", "build", str(model), "-t", "ort", "-o", str(bundle), "--force", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".b.*.partial")):
        assert build.poll() is None and time.monotonic() < deadline, "the build ended before its staging folder appeared"
        time.sleep(0.005)
    build.send_signal(signum)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == exit_code, stderr
    assert stderr.strip() == "interrupted; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "slow.onnx"]
    assert hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest() == previous


def _processes_mentioning(text: str, *also: str) -> list[int]:
    """Processes whose command line holds `text` and every one of `also` (read once: a process may end between two reads)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes()
        except OSError:
            continue
        if all(part.encode() in line for part in (text, *also)):
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_a_remote_benchmark_stops_and_cleans_the_device(tmp_path: Path, sshd, signum: int, exit_code: int) -> None:
    """The device is this machine through the test sshd; the bundle's unique name finds this run's
    folder (`<cache>/.run-*/`) and its benchmark process there."""
    name = f"signalled-{signum}-{tmp_path.name}"
    bundle = tmp_path / name
    edgeopt.build(DIGITS / "model.onnx", "ort", output=bundle)
    manifest = (bundle / "manifest.json").read_bytes()
    cache = Path(os.path.expanduser(f"~{sshd.user}")) / ".cache" / "edgeopt"
    argv = [
        sys.executable, "-m", "edgeopt.cli", "profile", str(bundle), "--host", sshd.host, "--port", str(sshd.port),
        "-i", str(sshd.client_key), "-F", str(sshd.ssh_config), "--python", sys.executable, "--runs", "10000000", "--warmup", "0",
    ]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _processes_mentioning(name, "bench"):
        assert run.poll() is None and time.monotonic() < deadline, "the remote benchmark never started"
        time.sleep(0.05)
    assert list(cache.glob(f".run-*/*/{name}")), "this run's folder on the device"
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == exit_code, stderr
    assert stderr.splitlines()[-1] == "interrupted; nothing was written" and "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while (_processes_mentioning(name) or list(cache.glob(f".run-*/*/{name}"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(name) == [], "the benchmark on the device was stopped"
    assert list(cache.glob(f".run-*/*/{name}")) == [], "and this run's folder on the device removed"
    assert (bundle / "manifest.json").read_bytes() == manifest
