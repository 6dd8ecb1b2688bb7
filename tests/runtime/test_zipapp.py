"""The runtime zipapp: deterministic bytes, and it runs where nothing of edgeopt is installed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import numpy
import onnxruntime
import pytest

from edgeopt.runtime import benchmark_schema
from edgeopt.zipapp import ZIPAPP_NAME, build_runtime_zipapp
from tests.runtime.factory import float_bundle


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_runtime_zipapp(tmp_path_factory.mktemp("zipapp"))


def _device_python(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A Python that sees numpy and onnxruntime but no edgeopt: no site (so no editable-install
    hook), only the folders holding numpy and onnxruntime on its path."""
    library_dirs = {str(Path(numpy.__file__).parents[1]), str(Path(onnxruntime.__file__).parents[1])}
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sorted(library_dirs)), "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-S", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_the_zipapp_is_deterministic_and_holds_only_the_runtime(pyz: Path, tmp_path: Path) -> None:
    again = build_runtime_zipapp(tmp_path / "again.pyz")
    assert pyz.name == ZIPAPP_NAME
    assert hashlib.sha256(pyz.read_bytes()).hexdigest() == hashlib.sha256(again.read_bytes()).hexdigest()
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    names = zipfile.ZipFile(pyz).namelist()
    assert names == sorted(names)
    assert {"__main__.py", "edgeopt/__init__.py", "edgeopt/runtime/__main__.py", "edgeopt/runtime/benchmark.schema.json"} <= set(names)
    assert all(n in ("__main__.py", "edgeopt/__init__.py") or n.startswith("edgeopt/runtime/") for n in names)
    assert not any("__pycache__" in n for n in names)


def test_the_isolated_interpreter_really_lacks_edgeopt(tmp_path: Path) -> None:
    done = _device_python("-c", "import edgeopt", cwd=tmp_path)
    assert done.returncode == 1 and "No module named 'edgeopt'" in done.stderr


def test_the_zipapp_benches_and_verifies_a_bundle_with_nothing_installed(pyz: Path, tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "tiny bundle")  # a space in the path, as on a real device
    bench = _device_python(pyz, "bench", bundle, "--warmup", "1", "--runs", "5", "--json", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    document = json.loads(bench.stdout)
    jsonschema.validate(document, benchmark_schema())
    assert document["backend"]["name"] == "onnxruntime"
    check = _device_python(pyz, "verify", bundle, "--json", cwd=tmp_path)
    assert check.returncode == 0 and json.loads(check.stdout)["passed"] is True
    info = _device_python(pyz, "info", "--json", cwd=tmp_path)
    assert json.loads(info.stdout)["runtime"]["version"]


def test_a_device_without_numpy_gets_a_one_line_error_with_the_install_command(pyz: Path, tmp_path: Path) -> None:
    """A fresh venv (no system site packages, no pip) is a Python with nothing installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    python = tmp_path / "bare" / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    done = subprocess.run([str(python), str(pyz), "info", "--json"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: the edgeopt runtime needs numpy") and done.stderr.count("\n") == 1
    assert json.loads(done.stdout)["error"]["hint"] == f"{python} -m pip install numpy"
