"""On-device runtime: load a bundle or a bare artifact, predict, benchmark, verify.

Imports only the standard library and numpy; each backend library is imported on first use.

    from edgeopt.runtime import load
    with load("dist/model-raspberry-pi") as model:
        y = model.predict({"input": x})        # or model(x) for a one-input model
        print(model.benchmark(warmup=10, runs=100).format_text())
"""

from edgeopt.runtime.benchmark import BenchmarkResult, benchmark_schema
from edgeopt.runtime.bundle import SCHEMA_VERSION, Bundle, open_bundle, sha256_path
from edgeopt.runtime.device import device_facts
from edgeopt.runtime.errors import (
    BackendUnavailableError,
    BundleError,
    EdgeoptError,
    InputSpecError,
    VerificationError,
)
from edgeopt.runtime.model import Model, load
from edgeopt.runtime.spec import TensorSpec
from edgeopt.runtime.verify import VerifyResult, verify

__all__ = [
    "SCHEMA_VERSION",
    "BackendUnavailableError",
    "BenchmarkResult",
    "Bundle",
    "BundleError",
    "EdgeoptError",
    "InputSpecError",
    "Model",
    "TensorSpec",
    "VerificationError",
    "VerifyResult",
    "benchmark_schema",
    "device_facts",
    "load",
    "open_bundle",
    "sha256_path",
    "verify",
]
