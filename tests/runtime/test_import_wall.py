"""The runtime's wall: importing it pulls in numpy and the standard library, nothing else of note."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = [
    "onnx", "onnx_ir", "click", "onnxruntime", "openvino", "coremltools", "torch", "tensorrt",
    "ai_edge_litert", "tflite_runtime", "tensorflow", "edgeopt.converters", "edgeopt.targets",
    "edgeopt.pipeline", "edgeopt.cli",
]


def test_importing_the_runtime_imports_no_backend_and_no_sdk_module() -> None:
    code = (
        "import json, sys, edgeopt.runtime, edgeopt.runtime.__main__;"
        "from edgeopt.runtime.backends import BACKENDS, backend_class;"
        "[backend_class(name) for name in BACKENDS];"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(json.loads(done.stdout))
    assert [name for name in FORBIDDEN if name in loaded] == []
