"""Latent weights start from the fp32 model (off the integer grid), so LSQ's weight-scale gradient is not 0.

The digits model with cross-layer equalization forced on (it rescales its channels, so the stored
weights are not the fp32 ones) with raspberry-pi's scheme narrowed to 3-bit per-tensor weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from edgeopt.converters.data import model_input_specs, open_dataset  # noqa: E402
from edgeopt.converters.finetune import QuantizerMode, TrainableGraph  # noqa: E402
from edgeopt.converters.finetune.latents import fp32_latents  # noqa: E402
from edgeopt.converters.finetune.train import freeze_weight_grids  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.converters.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeopt.runtime.kinds import Effort, Technique  # noqa: E402
from edgeopt.targets import get_target  # noqa: E402

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SCHEME = replace(get_target("raspberry-pi").scheme_for(None), weight_per_channel=False, pairwise_weight_bits=3)


@pytest.fixture(scope="module")
def models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    fp32, _ = simplify(onnx.load(DIGITS / "model.onnx"))
    calibration = open_dataset(DIGITS / "calib.npz", model_input_specs(fp32))
    result = quantize(fp32, SCHEME, calibration, QuantizeOptions(effort=Effort.FAST, techniques={Technique.EQUALIZATION: True}))
    assert "equalization" in result.report["techniques"]["chosen"]  # the stored weights are rescaled fp32 weights
    return fp32, result.model


def _images(count: int) -> torch.Tensor:
    return torch.from_numpy(np.load(DIGITS / "eval.npz")["image"][:count])


def _offsets(graph: TrainableGraph) -> torch.Tensor:
    """Every latent weight's distance from its bin's centre, in grid steps."""
    parts = []
    for record in graph.quant_params():
        if record.kind == "weight":
            scale, zero = record.quantizer.parameters_for(record.latent)
            position = (record.latent / scale + zero).detach()
            parts.append((position - torch.round(position)).flatten())
    return torch.cat(parts)


def test_latents_start_from_the_fp32_weights_inside_the_bins_of_the_stored_codes(models) -> None:
    fp32, qdq = models
    student = TrainableGraph(qdq, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
    images = {"image": _images(64)}
    with torch.no_grad():
        before = student(images)
    assert float(_offsets(student).abs().max()) < 1e-3  # read back from the integers: on the grid
    report = fp32_latents(student, qdq, fp32)
    assert report["weights"] == report["from_fp32"] == 3 and report["codes_matched"] > 0.9, report
    with torch.no_grad():
        after = student(images)
    assert all(torch.equal(before[name], after[name]) for name in before)  # every code kept: the same graph bit for bit
    offsets = _offsets(student).abs()
    assert float(offsets.max()) <= 0.5 - 0.009 and float(offsets.mean()) > 0.15  # off the grid, like fp32 weights (uniform: 0.25)


def test_from_fp32_latents_lsq_gives_weight_scales_a_gradient(models) -> None:
    """On the grid, Σ g·(round(w/s) − w/s) is exactly 0 for every weight scale: it could not learn."""
    fp32, qdq = models
    gradients = {}
    for start in ("grid", "fp32"):
        student = TrainableGraph(qdq, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
        if start == "fp32":
            fp32_latents(student, qdq, fp32)
        output = student({"image": _images(32)})[student.output_names[0]]
        output.square().mean().backward()
        gradients[start] = [float(r.quantizer.scale.grad.abs().sum()) for r in student.quant_params() if r.kind == "weight"]
    # measured: 1e-6, 5e-7, 0 (float32's rounding of x + (round(x) - x)) against 0.43, 0.028, 0.049
    assert all(g < 1e-5 for g in gradients["grid"]) and all(g > 1e-2 for g in gradients["fp32"]), gradients


def test_weight_scales_learn_only_where_latents_start_off_the_grid(models) -> None:
    fp32, qdq = models
    on_grid = TrainableGraph(qdq, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
    from_fp32 = TrainableGraph(qdq, quantizers=QuantizerMode.LEARNED, scheme=SCHEME)
    fp32_latents(from_fp32, qdq, fp32)
    for graph, learns in ((on_grid, False), (from_fp32, True)):
        freeze_weight_grids(graph)
        weights = [r for r in graph.quant_params() if r.kind == "weight"]
        assert weights and all(r.quantizer.scale.requires_grad is learns for r in weights)
        assert all(r.quantizer.scale.requires_grad for r in graph.quant_params() if r.kind == "activation")
