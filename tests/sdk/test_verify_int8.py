"""int8 lowering parity: a correct artifact is not called a lowering bug because one of a few
reference inputs sits at a classifier's decision boundary.

The case that failed (issue 14): ppocr_cls on ONNX Runtime, 128 real calibration crops, the
technique search's held-out split. One of the 4 reference inputs has fp32 p = 0.55: ONNX Runtime's
fused QLinearConv rounds one element of one conv output one step away from the QDQ graph's float
conv (a tie), the difference spreads through the later requantizations, and the 2-class softmax
turns it into 0.57 → 0.40 — 17.1 dB over the noise bound pooled on 4 samples, while on 512 eval
samples the artifact is 16 dB quieter than the QDQ graph's own noise and as faithful to fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeopt
from edgeopt.stages import INT8_PARITY_RECHECK_SAMPLES
from tests import zoo

pytestmark = pytest.mark.zoo


def test_a_borderline_reference_input_does_not_fail_a_faithful_int8_build(tmp_path: Path) -> None:
    calibration = zoo.real_inputs("ppocr_cls", 128, split="calibration")
    data = tmp_path / "calibration.npz"
    np.savez(data, **{k: np.concatenate([s[k] for s in calibration]) for k in calibration[0]})
    shapes = {k: tuple(v) for k, v in zoo.REAL_MODELS["ppocr_cls"].inputs.items()}
    off = {"range_search": False, "equalization": False, "bias_absorption": False, "smoothquant": False}
    result = edgeopt.build(
        zoo.require_real_model("ppocr_cls"), "onnxruntime-cpu", output=tmp_path / "b", precision="int8",
        calibration=data, input_shapes=shapes, effort="default", techniques=off,
    )  # fmt: skip
    measured = result.manifest["reference"]["measured"]
    assert measured["checked"]
    figures = measured["outputs"]["save_infer_model/scale_0.tmp_1"]
    assert figures["noise_power"] <= figures["allowed_noise_power"]
    # where the 4 reference inputs alone fail the bound (this host's kernels), the build says it
    # measured again and on how many samples
    if measured.get("note"):
        assert measured["note"] == f"the noise bound failed on the 4 reference inputs and held on {INT8_PARITY_RECHECK_SAMPLES} samples of the data"
        assert figures["elements"] == 2 * INT8_PARITY_RECHECK_SAMPLES
    quality = {m["name"]: m["optimized"] for m in result.manifest["quality"]["metrics"]}
    assert quality["top1_agreement"] >= 0.95, quality


def test_a_qdq_graph_edgeopt_quantized_earlier_builds_again_with_its_bound_from_the_float_graph_under_it(tmp_path: Path) -> None:
    """A QDQ model arrives with no fp32 beside it (QAT, or edgeopt's own PTQ saved and built again): int8's noise
    bound reads it against `strip_qdq`'s float graph. It read it against itself, a bound of one output step, and
    called ppocr_cls's faithful TFLite artifact (42 dB against the QDQ graph) a lowering bug, 16.1 dB over."""
    from edgeopt.converters.data import model_input_specs, open_dataset
    from edgeopt.converters.passes import simplify
    from edgeopt.converters.quantize import QuantizeOptions, quantize
    from edgeopt.runtime.kinds import Effort
    from edgeopt.targets import get_target

    shapes = {k: tuple(v) for k, v in zoo.REAL_MODELS["ppocr_cls"].inputs.items()}
    fp32, _ = simplify(onnx.load(zoo.require_real_model("ppocr_cls")), shapes)
    calibration = zoo.real_inputs("ppocr_cls", 64, split="calibration")
    qdq = quantize(fp32, get_target("raspberry-pi").scheme_for(None), open_dataset(calibration, model_input_specs(fp32)), QuantizeOptions(effort=Effort.FAST)).model
    onnx.save(qdq, tmp_path / "ppocr_cls_int8.onnx")
    data = tmp_path / "reference.npz"
    np.savez(data, **{k: np.concatenate([s[k] for s in calibration]) for k in calibration[0]})
    result = edgeopt.build(tmp_path / "ppocr_cls_int8.onnx", "raspberry-pi", output=tmp_path / "b", precision="int8", calibration=data, input_shapes=shapes)
    assert result.manifest["quantization"]["qat_imported"]
    measured = result.manifest["reference"]["measured"]
    figures = measured["outputs"]["save_infer_model/scale_0.tmp_1"]
    step_floor = figures["elements"] / 256**2  # one output step per element: the whole bound before
    assert measured["checked"] and figures["noise_power"] <= figures["allowed_noise_power"]
    assert figures["allowed_noise_power"] > 10 * step_floor, "the bound holds the QDQ graph's own rounding noise"


def test_a_text_detectors_qdq_graph_builds_without_data_though_no_verify_input_shows_text(tmp_path: Path) -> None:
    """Without data, verification inputs show no text: the DB map's sigmoid peaks near 0.03 on them, and one steep
    pixel rounding the other way in LiteRT (0.21) was called a lowering bug against an element bound of that peak.
    The output's scale is its int8 grid ([0, 1)): the build passes, its noise inside int8's bound."""
    from edgeopt.converters.data import model_input_specs, open_dataset
    from edgeopt.converters.passes import simplify
    from edgeopt.converters.quantize import QuantizeOptions, quantize
    from edgeopt.runtime.kinds import Effort
    from edgeopt.targets import get_target

    shapes = {k: tuple(v) for k, v in zoo.REAL_MODELS["ppocr_det"].inputs.items()}
    fp32, _ = simplify(onnx.load(zoo.require_real_model("ppocr_det")), shapes)
    calibration = open_dataset(zoo.real_inputs("ppocr_det", 128, split="calibration"), model_input_specs(fp32))
    qdq = quantize(fp32, get_target("raspberry-pi").scheme_for(None), calibration, QuantizeOptions(effort=Effort.DEFAULT)).model
    onnx.save(qdq, tmp_path / "ppocr_det_int8.onnx")
    result = edgeopt.build(tmp_path / "ppocr_det_int8.onnx", "raspberry-pi", output=tmp_path / "b", precision="int8", input_shapes=shapes)
    measured = result.manifest["reference"]["measured"]
    figures = measured["outputs"]["sigmoid_0.tmp_0"]
    assert measured["checked"] and figures["noise_power"] <= figures["allowed_noise_power"]
    assert figures["allowed"] > 0.99, "the element bound spans the sigmoid's grid"
