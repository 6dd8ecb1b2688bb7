"""TensorRT and Core ML: written against their documented APIs, run only where they exist.

These tests skip on the Linux build host with a reason naming what they need; the README marks
the two backends as unverified here.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.runtime import TensorSpec, load
from edgeopt.runtime.backends import BackendConfig
from edgeopt.runtime.backends.tensorrt import TensorRTBackend, builder_flags, engine_cache_key
from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.kinds import Precision
from tests.runtime.factory import float_bundle, tiny_float_model, tiny_float_reference, write_bundle

HAS_TENSORRT_GPU = importlib.util.find_spec("tensorrt") is not None and (
    shutil.which("nvidia-smi") is not None or Path("/etc/nv_tegra_release").exists()
)


def test_engine_cache_keys_change_with_tensorrt_version_gpu_model_and_options() -> None:
    base = engine_cache_key("10.3.0", "Orin (sm_87)", "a" * 64, {"precision": "fp16"})
    assert base == engine_cache_key("10.3.0", "Orin (sm_87)", "a" * 64, {"precision": "fp16"})
    assert len({
        base,
        engine_cache_key("10.4.0", "Orin (sm_87)", "a" * 64, {"precision": "fp16"}),
        engine_cache_key("10.3.0", "NVIDIA A100 (sm_80)", "a" * 64, {"precision": "fp16"}),
        engine_cache_key("10.3.0", "Orin (sm_87)", "b" * 64, {"precision": "fp16"}),
        engine_cache_key("10.3.0", "Orin (sm_87)", "a" * 64, {"precision": "int8"}),
    }) == 5


def test_the_engine_recipe_comes_from_the_manifest_lowering_then_runtime_options() -> None:
    """The keys the jetson-orin lowering writes (lowering.engine_recipe, target options)."""
    config = BackendConfig(
        precision=Precision.INT8,
        recipe={"precision": "int8", "dla_core": None, "mem_pool_workspace_mib": 2048, "fp16": True, "int8": True},
        options={"dla_cores": 2, "dla_default": True, "mem_pool_workspace_mib": 4096, "timing_cache": "timing.cache", "triton_max_batch_size": 8},
    )
    options = TensorRTBackend(Path("model.onnx"), config).build_options()
    assert options["precision"] is Precision.INT8 and builder_flags(options["precision"]) == ("FP16", "INT8")
    assert options["workspace_mib"] == 2048  # the recipe wins over the target's default
    assert options["dla_core"] == 0  # dla_default: first DLA core, GPU fallback on
    assert options["gpu_fallback"] is True and options["timing_cache"] is True
    assert options["max_batch"] == 8 and options["input_shapes"] == {}


def test_an_engine_precision_outside_the_closed_set_is_an_option_error() -> None:
    config = BackendConfig(recipe={"precision": "int4"})
    with pytest.raises(OptionError, match="TensorRT engine precision 'int4'"):
        TensorRTBackend(Path("model.onnx"), config).build_options()
    assert builder_flags(Precision.FP32) == () and builder_flags(Precision.FP16) == ("FP16",)


@pytest.mark.skipif(not HAS_TENSORRT_GPU, reason="needs the TensorRT 10 Python bindings and an NVIDIA GPU (Jetson Orin)")
def test_tensorrt_builds_caches_and_runs_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path / "cache"))
    bundle = write_bundle(
        tmp_path / "orin",
        model_file="model.onnx",
        model_bytes=tiny_float_model().SerializeToString(),
        backend="tensorrt",
        target="jetson-orin",
        precision="fp32",
        options={"workspace_mib": 256},
        inputs=[TensorSpec("x", (1, 4), "float32")],
        outputs=[TensorSpec("y", (1, 3), "float32")],
    )
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    with load(bundle) as first:
        assert first.backend_facts()["engine_cached"] is False
        np.testing.assert_allclose(first(x), tiny_float_reference(x), rtol=1e-4, atol=1e-5)
    with load(bundle) as second:
        assert second.backend_facts()["engine_cached"] is True
        np.testing.assert_allclose(second(x), tiny_float_reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TENSORRT_GPU, reason="needs the TensorRT 10 Python bindings and an NVIDIA GPU (Jetson Orin)")
def test_tensorrt_verifies_a_bundle_against_its_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path / "cache"))
    result = load(float_bundle(tmp_path / "b", tolerance={"atol": 1e-4, "rtol": 1e-3}), backend="tensorrt").verify()
    assert result.passed, result.format_text()


@pytest.mark.skipif(sys.platform != "darwin", reason="needs macOS: Core ML prediction runs only there")
def test_core_ml_runs_an_ml_program(tmp_path: Path) -> None:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))])
    def program(x):  # type: ignore[no-untyped-def]
        return mb.matmul(x=x, y=weights, name="y")

    package = tmp_path / "model.mlpackage"
    ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32).save(str(package))
    x = np.ones((1, 4), np.float32)
    with load(package, device="CPU_ONLY") as model:
        assert model.backend == "coreml"
        np.testing.assert_allclose(model.predict({"x": x})["y"], x @ weights, rtol=1e-5)
