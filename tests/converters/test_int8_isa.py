"""int8 on x86 CPU classes: the backends' int8 kernels compute the QDQ graph exactly.

The reference is the QDQ graph's own semantics (ONNX Runtime with graph optimizations off: float
dequantize -> op -> quantize). What is checked against it is each backend's int8 kernels: ONNX
Runtime's fused QLinear kernels and OpenVINO's CPU plugin, on the trained digits CNN and 200 real
held-out digits. Outputs are compared in steps of the output's range / 255.

x86 without VNNI sums u8 x s8 products pairwise in a saturating int16, so which scheme is exact
depends on the CPU: the avx2 class (7-bit pairwise weights) is exact on every CPU and is checked
everywhere; the vnni class (8-bit weights) is checked only where the CPU accumulates in int32, and
its saturation is shown only where the CPU does not. Neither result depends on luck.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest

from edgeopt.converters.data import model_input_specs, open_dataset
from edgeopt.converters.lower import LoweringOptions, lower
from edgeopt.converters.passes import simplify
from edgeopt.converters.quantize import QuantizeOptions, quantize
from edgeopt.runtime.kinds import Technique
from edgeopt.converters.graph.session import ort_session as session
from edgeopt.runtime.isa import IsaClass, host_isa
from edgeopt.targets import get_target
from tests import zoo

TARGETS = ("onnxruntime-cpu", "intel-openvino")
# Kernels requantize with their own rounding; a neighbouring integer per layer stays within one step here.
EXACT_STEPS = 1.0
# On an AVX-512 VNNI host ONNX Runtime's int32 kernels re-round in two places a layer may compound
# (measured: 1.02 steps on the digits model); still far below a saturated sum.
VNNI_EXACT_STEPS = 2.0
# Far past any rounding difference: what a saturated int16 pair sum does to a conv output.
SATURATED_STEPS = 5.0

HOST = host_isa()
needs_int32_sums = pytest.mark.skipif(
    HOST is None or HOST.saturates_pair_sums,
    reason=f"needs a CPU that accumulates int8 products in int32 (VNNI, AMX or Arm64); this one is {HOST and HOST.value}",
)
needs_saturating_sums = pytest.mark.skipif(
    HOST is not IsaClass.AVX2,
    reason=f"shows the saturation of x86 without VNNI; this CPU is {HOST and HOST.value}",
)


@functools.cache
def digits() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    model = simplify(zoo.digits_cnn())[0]
    with np.load(zoo.DIGITS_DIR / "calib.npz", allow_pickle=False) as data:
        calibration = [{"image": data["image"][i : i + 1]} for i in range(64)]
    with np.load(zoo.DIGITS_DIR / "eval.npz", allow_pickle=False) as data:
        evaluation = [{"image": data["image"][i : i + 1]} for i in range(200)]
    return model, calibration, evaluation


@functools.cache
def qdq_for(target: str, isa: str) -> onnx.ModelProto:
    model, calibration, _ = digits()
    dataset = open_dataset(calibration, model_input_specs(model))
    return quantize(model, get_target(target).scheme_for(isa), dataset, QuantizeOptions(debug_samples=0)).model


def kernel_outputs(target: str, qdq: onnx.ModelProto, out_dir: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The lowered artifact on its backend's int8 kernels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = lower(qdq, get_target(target), "int8", out_dir, LoweringOptions())
    path = str(out_dir / result.model_file)
    if target == "onnxruntime-cpu":
        runner = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return [runner.run(None, feed)[0] for feed in feeds]
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return [np.asarray(compiled(feed)[compiled.outputs[0]]) for feed in feeds]


def steps_from_the_qdq_graph(target: str, isa: str, tmp_path: Path) -> float:
    _, _, evaluation = digits()
    qdq = qdq_for(target, isa)
    exact = session(qdq)
    want = np.concatenate([exact.run(None, feed)[0] for feed in evaluation])
    got = np.concatenate(kernel_outputs(target, qdq, tmp_path, evaluation))
    return float(np.abs(want - got.reshape(want.shape)).max() / (np.ptp(want) / 255))


@pytest.mark.parametrize("target", TARGETS)
def test_avx2_class_bundles_run_their_qdq_graph_exactly_on_every_cpu(target: str, tmp_path: Path) -> None:
    assert steps_from_the_qdq_graph(target, "avx2", tmp_path) <= EXACT_STEPS


@needs_int32_sums
@pytest.mark.parametrize("target", TARGETS)
def test_vnni_class_bundles_run_their_qdq_graph_exactly_where_sums_are_int32(target: str, tmp_path: Path) -> None:
    assert steps_from_the_qdq_graph(target, "vnni", tmp_path) <= VNNI_EXACT_STEPS


def positive_conv() -> onnx.ModelProto:
    """Conv 16 -> 16, 3x3, all weights positive: on inputs at the top of the uint8 range every pair
    of products has the same sign, the worst case for an int16 pair sum."""
    from onnx import helper, numpy_helper

    weight = np.abs(np.random.default_rng(0).normal(size=(16, 16, 3, 3))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "positive_conv",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def saturation_steps(target: str, isa: str, out_dir: Path) -> float:
    """Steps between the backend's kernels and the QDQ graph of `positive_conv` on inputs at 1.0."""
    model = positive_conv()
    feeds = [{"x": np.linspace(0.0, 1.0, 16 * 64, dtype=np.float32).reshape(1, 16, 8, 8)}, {"x": np.ones((1, 16, 8, 8), np.float32)}]
    dataset = open_dataset(feeds, model_input_specs(model))
    qdq = quantize(model, get_target(target).scheme_for(isa), dataset, QuantizeOptions(debug_samples=0, techniques={Technique.BIAS_CORRECTION: False})).model
    want = session(qdq).run(None, feeds[1])[0]
    (got,) = kernel_outputs(target, qdq, out_dir, feeds[1:])
    return float(np.abs(want - got).max() / (np.ptp(want) / 255 or 1.0))


@needs_saturating_sums
def test_vnni_class_bundles_saturate_onnxruntime_on_x86_without_vnni(tmp_path: Path) -> None:
    """Why the class exists: if ONNX Runtime stops saturating here, 7-bit weights are no longer needed."""
    assert saturation_steps("onnxruntime-cpu", "avx2", tmp_path / "avx2") <= EXACT_STEPS
    assert saturation_steps("onnxruntime-cpu", "vnni", tmp_path / "vnni") >= SATURATED_STEPS


@pytest.mark.skipif(HOST not in (IsaClass.AVX2, IsaClass.VNNI, IsaClass.AMX), reason="needs an x86-64 CPU")
def test_vnni_class_bundles_saturate_openvino_limited_to_avx2(tmp_path: Path) -> None:
    """OpenVINO's oneDNN honours ONEDNN_MAX_CPU_ISA, so its AVX2 kernels run on any x86 CPU (in a
    subprocess: the variable is read when the plugin loads)."""
    script = (
        "import json, sys; from pathlib import Path; from tests.converters.test_int8_isa import saturation_steps; "
        "print(json.dumps({isa: saturation_steps('intel-openvino', isa, Path(sys.argv[1]) / isa) for isa in ('avx2', 'vnni')}))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, cwd=zoo.REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    steps = json.loads(run.stdout.strip().splitlines()[-1])
    assert steps["avx2"] <= EXACT_STEPS and steps["vnni"] >= SATURATED_STEPS, steps


def test_the_runtime_asks_onnx_runtime_for_exact_sums_only_where_the_cpu_saturates(tmp_path: Path) -> None:
    """U8U8 kernels are exact everywhere but slower (an 8-bit YOLOv8n 1.85x on a VNNI CPU): the switch
    is set only on CPUs whose U8S8 sums saturate; elsewhere U8S8 is already exact."""
    from edgeopt.runtime import load
    from edgeopt.runtime.backends.onnxruntime import X64_QUANT_PRECISION

    qdq = qdq_for("onnxruntime-cpu", "vnni")
    result = lower(qdq, get_target("onnxruntime-cpu"), "int8", tmp_path, LoweringOptions())
    with load(tmp_path / result.model_file) as model:
        options = model.runner.session.get_session_options()
        try:
            switch = options.get_session_config_entry(X64_QUANT_PRECISION)
        except RuntimeError:  # not set
            switch = None
    host = host_isa()
    assert (switch == "1") == (host is not None and host.saturates_pair_sums), (host, switch)


def test_the_runtime_runs_8_bit_onnxruntime_artifacts_exactly_on_every_cpu(tmp_path: Path) -> None:
    """edgeopt.runtime sets ONNX Runtime's x64quantprecision switch: where U8S8 would saturate,
    8-bit weights run on exact U8U8 kernels (7-bit ones keep U8S8)."""
    from edgeopt.runtime import load

    _, _, evaluation = digits()
    qdq = qdq_for("onnxruntime-cpu", "vnni")
    result = lower(qdq, get_target("onnxruntime-cpu"), "int8", tmp_path, LoweringOptions())
    exact = session(qdq)
    want = np.concatenate([exact.run(None, feed)[0] for feed in evaluation])
    with load(tmp_path / result.model_file) as model:
        got = np.concatenate([model.predict(feed)["logits"] for feed in evaluation])
    assert float(np.abs(want - got).max() / (np.ptp(want) / 255)) <= 1.5  # U8U8 requantizes with its own rounding: 1.02 measured
