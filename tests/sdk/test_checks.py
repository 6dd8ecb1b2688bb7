"""The build's two checks: lowering parity (a hard rule per precision) and quantization quality
(reported; failing only on the user's budget or a broken result)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.checks import QUALITY_FLOOR_COSINE, check_parity, check_quality, parity_tolerances
from edgeopt.converters.errors import QualityBudgetError
from edgeopt.converters.metrics import cosine, fidelity, sqnr_db
from edgeopt.errors import VerificationError
from edgeopt.runtime.kinds import Precision

RNG = np.random.default_rng(0)


def _outputs(**arrays: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{k: v.astype(np.float32) for k, v in arrays.items()}]


def test_fp32_parity_has_an_absolute_term_so_a_near_empty_map_does_not_misfire() -> None:
    """A DB text map on a photo without text: range 1e-3, float kernels 1.5e-5 apart."""
    text_map = RNG.uniform(0, 1e-3, size=(1, 1, 32, 32))
    tolerances = parity_tolerances(Precision.FP32, _outputs(map=text_map), None)
    measured = check_parity(Precision.FP32, _outputs(map=text_map), _outputs(map=text_map + 1.5e-5), tolerances, "fp32", "here")
    assert measured.checked and measured.outputs["map"]["max_abs"] == pytest.approx(1.5e-5, rel=1e-3)
    with pytest.raises(VerificationError, match="output 'map' differs by max |Δ| 0.001"):
        check_parity(Precision.FP32, _outputs(map=text_map), _outputs(map=text_map + 1e-3), tolerances, "fp32", "here")


def test_each_output_has_its_own_budget() -> None:
    reference = _outputs(boxes=RNG.uniform(0, 320, (1, 8, 4)), scores=RNG.uniform(0, 1, (1, 8)))
    tolerances = parity_tolerances(Precision.FP32, reference, None)
    assert tolerances["boxes"]["atol"] > 100 * tolerances["scores"]["atol"]
    candidate = [{"boxes": reference[0]["boxes"] + 0.01, "scores": reference[0]["scores"]}]
    assert check_parity(Precision.FP32, reference, candidate, tolerances, "fp32", "here").checked


def _dequantized_output_graph(scale: float) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")],
    )
    return helper.make_model(graph)


def test_int8_elements_may_not_leave_the_outputs_scale_plus_two_steps_of_its_grid() -> None:
    reference = _outputs(y=np.array([[0.0, 0.1, 0.2, 0.3]]))
    tolerances = parity_tolerances(Precision.INT8, reference, None)
    assert tolerances["y"]["atol"] == pytest.approx(1.0 * 0.3)
    with pytest.raises(VerificationError, match="differs by max"):
        check_parity(Precision.INT8, reference, [{"y": reference[0]["y"] + 0.6}], tolerances, "QDQ", "here")


def test_an_int8_outputs_scale_is_its_grid_where_the_samples_reach_less_of_it() -> None:
    """A sigmoid text map dequantized from [0, 255/256] on an input with no text (max 0.03): one steep pixel
    rounding the other way (0.2) is inside the output's scale; a value off the grid is not."""
    reference = _outputs(y=np.array([[0.0, 0.01, 0.02, 0.03]]))
    tolerances = parity_tolerances(Precision.INT8, reference, _dequantized_output_graph(1 / 256))
    assert tolerances["y"]["atol"] == pytest.approx(255 / 256 + 2 / 256)
    jumped = reference[0]["y"].copy()
    jumped[0, 3] += 0.2
    check_parity(Precision.INT8, reference, [{"y": jumped}], tolerances, "QDQ", "here")
    with pytest.raises(VerificationError, match="differs by max"):
        check_parity(Precision.INT8, reference, [{"y": reference[0]["y"] + 1.5}], tolerances, "QDQ", "here")


def test_fp16_parity_is_an_sqnr_bound_so_a_steep_maps_jumping_pixel_passes() -> None:
    """A DB text map: near-binary sigmoid output; fp16 rounding moves a pixel at the threshold by
    0.09 (the Core ML lowering of PP-OCRv4's detector), far beyond any element-wise budget."""
    text_map = (RNG.uniform(size=(1, 1, 64, 64)) > 0.9).astype(np.float32)
    tolerances = parity_tolerances(Precision.FP16, _outputs(map=text_map), None)
    flipped = text_map.copy()
    flipped[0, 0, 5, 5] += 0.09
    check_parity(Precision.FP16, _outputs(map=text_map), _outputs(map=flipped), tolerances, "fp32", "here")
    with pytest.raises(VerificationError, match=r"SQNR .* dB against it \(needs ≥ 40 dB"):
        check_parity(Precision.FP16, _outputs(map=text_map), _outputs(map=text_map * 1.05), tolerances, "fp32", "here")


def test_int8_parity_bounds_the_noise_by_the_quantization_noise_so_a_systematic_shift_fails() -> None:
    """Rounding divergence is about one rounding per layer, the size of the quantization noise itself;
    a lowering bug (here: every element 0.2 off) is not bounded by it."""
    fp32 = _outputs(p=np.linspace(0.0, 1.0, 64).reshape(1, 64))
    qdq = [{"p": fp32[0]["p"] + RNG.normal(scale=0.02, size=(1, 64)).astype(np.float32)}]
    tolerances = parity_tolerances(Precision.INT8, qdq, None)
    local = qdq[0]["p"].copy()
    local[0, 10] += 0.15  # one element well off: kernels rounding a near-tie the other way
    measured = check_parity(Precision.INT8, qdq, [{"p": local}], tolerances, "QDQ", "here", fp32)
    assert measured.outputs["p"]["noise_power"] < measured.outputs["p"]["allowed_noise_power"]
    with pytest.raises(VerificationError, match=r"output 'p' is \d+\.\d dB noisier against the QDQ graph than the QDQ graph is against fp32"):
        check_parity(Precision.INT8, qdq, [{"p": qdq[0]["p"] + 0.2}], tolerances, "QDQ", "here", fp32)


def test_weight_compressed_precisions_record_parity_without_gating_it() -> None:
    reference = _outputs(y=np.ones((1, 4)))
    assert parity_tolerances(Precision.PALETTIZED_4, reference, None) is None
    measured = check_parity(Precision.PALETTIZED_4, reference, _outputs(y=np.zeros((1, 4))), None, "fp32", "here")
    assert measured.checked is False and "compresses weights" in (measured.note or "") and measured.max_abs == 1.0


def test_non_finite_artifact_outputs_fail_parity_with_a_number_not_a_traceback() -> None:
    reference = _outputs(y=np.ones((1, 4)))
    tolerances = parity_tolerances(Precision.FP32, reference, None)
    with pytest.raises(VerificationError, match="differs by max"):
        check_parity(Precision.FP32, reference, _outputs(y=np.array([[1.0, np.nan, np.inf, 1.0]])), tolerances, "fp32", "here")


def _classifier_runs(agree: int, total: int = 40) -> tuple[list, list]:
    reference, candidate = [], []
    for index in range(total):
        logits = RNG.normal(size=(1, 10)).astype(np.float32)
        noisy = logits + RNG.normal(scale=1e-4, size=logits.shape).astype(np.float32)
        if index >= agree:
            noisy = noisy.copy()
            noisy[0, (int(np.argmax(logits)) + 1) % 10] = logits.max() + 1.0
        reference.append({"logits": logits})
        candidate.append({"logits": noisy})
    return reference, candidate


def test_quality_is_reported_per_output_with_agreement_and_cosine_percentiles() -> None:
    reference, candidate = _classifier_runs(agree=36)
    quality = check_quality(reference, candidate, None, None, "eval.npz")
    names = {m.name for m in quality.metrics}
    assert names == {"top1_agreement", "cosine", "cosine_mean", "cosine_p5"} and quality.samples == 40
    agreement = next(m for m in quality.metrics if m.name == "top1_agreement")
    assert agreement.optimized == pytest.approx(0.9)


def test_the_users_budget_fails_with_the_figures() -> None:
    reference, candidate = _classifier_runs(agree=36)
    check_quality(reference, candidate, None, 10.0, "eval.npz")
    with pytest.raises(QualityBudgetError, match=r"top-1 disagreement \(%\) is 10 points on 40 samples of eval.npz; the budget .* is 5 points") as info:
        check_quality(reference, candidate, None, 5.0, "eval.npz")
    assert info.value.exit_code == 3


def test_a_broken_result_fails_even_without_a_budget() -> None:
    reference = [{"embedding": RNG.normal(size=(1, 64)).astype(np.float32)} for _ in range(8)]
    unrelated = [{"embedding": RNG.normal(size=(1, 64)).astype(np.float32)} for _ in range(8)]
    with pytest.raises(VerificationError, match=f"has cosine -?0.0.*floor: finite outputs, cosine ≥ {QUALITY_FLOOR_COSINE} over all samples"):
        check_quality(reference, unrelated, None, None, "held-out")
    nan = [{"embedding": np.full((1, 64), np.nan, np.float32)} for _ in range(8)]
    with pytest.raises(VerificationError, match="'embedding' has 512 non-finite values"):
        check_quality(reference, nan, None, None, "held-out")


def test_metrics_are_total_on_identical_zero_and_non_finite_outputs() -> None:
    zeros = np.zeros((1, 8), np.float32)
    assert cosine(zeros, zeros) == 1.0 and cosine(zeros, np.ones((1, 8), np.float32)) == 0.0
    assert cosine(np.ones((1, 8), np.float32), np.full((1, 8), np.inf, np.float32)) == -1.0
    assert sqnr_db(1.0, float("inf")) == -200.0 and sqnr_db(float("nan"), 1.0) == -200.0 and sqnr_db(0.0, 0.0) == 200.0
    report = fidelity([{"y": zeros}], [{"y": np.full((1, 8), np.inf, np.float32)}])
    assert report["outputs"]["y"]["nonfinite"] == 8 and np.isfinite(report["outputs"]["y"]["sqnr_db"])


def test_fp32_budget_grows_with_how_far_the_models_own_outputs_move_with_summation_order() -> None:
    """A model that amplifies float rounding (ORT optimized vs unoptimized 1.1e-4 apart on a softmax) may
    differ from a correct lowering by a few times that; the fixed budget alone (2e-4 here) would call it a
    lowering bug. A miss by the output's own scale still fails."""
    probs = RNG.dirichlet(np.ones(8), size=(1, 4))
    probs[0, 0] = [1.0] + [0.0] * 7
    reference = _outputs(p=probs)
    fixed = parity_tolerances(Precision.FP32, reference, None)
    widened = parity_tolerances(Precision.FP32, reference, None, {"p": 1.1e-4})
    assert fixed["p"]["atol"] == pytest.approx(2e-4) and widened["p"]["atol"] == pytest.approx(8 * 1.1e-4)
    candidate = _outputs(p=probs + 4.1e-4)
    with pytest.raises(VerificationError):
        check_parity(Precision.FP32, reference, candidate, fixed, "fp32", "here")
    assert check_parity(Precision.FP32, reference, candidate, widened, "fp32", "here").checked
    with pytest.raises(VerificationError):
        check_parity(Precision.FP32, reference, _outputs(p=probs[:, ::-1]), widened, "fp32", "here")
    assert parity_tolerances(Precision.INT8, reference, None, {"p": 1.0}) == parity_tolerances(Precision.INT8, reference, None)
