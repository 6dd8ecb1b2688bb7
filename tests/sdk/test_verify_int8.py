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
