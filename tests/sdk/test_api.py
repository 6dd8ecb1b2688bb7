"""The public Python API: every advertised name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import edgeopt


def test_every_public_name_resolves() -> None:
    for name in edgeopt.__all__:
        assert getattr(edgeopt, name) is not None, name


def test_dir_lists_the_public_api_and_not_the_helpers() -> None:
    names = dir(edgeopt)
    assert set(edgeopt.__all__) <= set(names) and "build" in names and "verify_bundle" in names
    assert not {"importlib", "Any", "annotations", "_LAZY"} & set(names)


def test_the_package_is_marked_typed() -> None:
    """PEP 561: py.typed is in the package, and pyproject ships it as package data in a wheel."""
    from importlib.resources import files

    assert files("edgeopt").joinpath("py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["edgeopt"]


def test_importing_edgeopt_loads_no_converter_or_backend() -> None:
    code = "import sys, edgeopt; print(sorted(m for m in sys.modules if m.startswith(('onnx', 'openvino', 'coremltools', 'edgeopt.converters', 'click'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
