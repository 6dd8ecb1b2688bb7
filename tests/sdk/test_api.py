"""The public Python API: every advertised name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import edgeopt


def test_every_public_name_resolves() -> None:
    for name in edgeopt.__all__:
        assert getattr(edgeopt, name) is not None, name


def test_importing_edgeopt_loads_no_converter_or_backend() -> None:
    code = "import sys, edgeopt; print(sorted(m for m in sys.modules if m.startswith(('onnx', 'openvino', 'coremltools', 'edgeopt.converters', 'click'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
