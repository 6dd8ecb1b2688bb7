"""LSQ/LSQ+ fake quantization: ONNX Runtime's QuantizeLinear/DequantizeLinear bit for bit, LSQ's scaled gradients, scales that learn."""

from __future__ import annotations

import math
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from edgeopt.converters.finetune.fake_quant import FakeQuantizer, QuantSpec, integer_range  # noqa: E402
from edgeopt.converters.graph.session import ort_session  # noqa: E402

RNG = np.random.default_rng(0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (dtype, ONNX type, scale, zero point, axis): symmetric int8, asymmetric uint8, per-channel int8, int16
CASES = [
    ("int8", TensorProto.INT8, np.array(0.0625, np.float32), np.array(0, np.int8), None),
    ("int8", TensorProto.INT8, np.array(0.0137, np.float32), np.array(-5, np.int8), None),
    ("uint8", TensorProto.UINT8, np.array(0.021, np.float32), np.array(37, np.uint8), None),
    ("int8", TensorProto.INT8, np.array([0.01, 0.125, 0.0731], np.float32), np.array([0, 0, 0], np.int8), 1),
    ("int16", TensorProto.INT16, np.array(0.0003, np.float32), np.array(0, np.int16), None),
    ("int4", TensorProto.INT4, np.array(0.25, np.float32), np.array(0, ml_dtypes.int4), None),
    ("uint4", TensorProto.UINT4, np.array(0.1, np.float32), np.array(3, ml_dtypes.uint4), None),
]


def _ort_qdq(x: np.ndarray, onnx_type: int, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(codes, dequantized) of x through ONNX Runtime's QuantizeLinear → DequantizeLinear."""
    attributes = {"axis": axis} if axis is not None else {}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attributes),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attributes),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", onnx_type, list(x.shape)), helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):  # ONNX Runtime cannot hand 4-bit tensors to numpy
        (values,) = ort_session(model).run(["y"], {"x": x})
        return np.round(values / scale.reshape(_channel_shape(axis)) + zero_point.astype(np.float32).reshape(_channel_shape(axis))), values
    codes, values = ort_session(model).run(["q", "y"], {"x": x})
    return codes, values


def _channel_shape(axis: int | None) -> list[int]:
    shape = [1] * 4
    if axis is not None:
        shape[axis] = -1
    return shape


def _inputs(scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, axis: int | None) -> np.ndarray:
    """Random values over and past the range, and exact ties k + 0.5 (round half to even decides them)."""
    shape = (4, 3, 5, 6)
    channel_shape = [1] * 4
    if axis is not None:
        channel_shape[axis] = -1
    s = scale.reshape(channel_shape).astype(np.float32)
    z = zero_point.astype(np.float32).reshape(channel_shape)
    spread = (qmax - qmin) * 0.6
    random = (RNG.uniform(-spread, spread, shape).astype(np.float32) - z) * s
    ties = (RNG.integers(qmin - 3, qmax + 3, shape).astype(np.float32) + np.float32(0.5) - z) * s
    return np.concatenate([random, ties.astype(np.float32)], axis=0).astype(np.float32)


def _quantizer(dtype: str, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, *, trainable: bool, symmetric: bool = False, **spec) -> FakeQuantizer:
    qmin, qmax = integer_range(dtype)
    return FakeQuantizer(QuantSpec(dtype, qmin, qmax, symmetric, axis, **spec), scale, zero_point, trainable=trainable)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "learned"])
@pytest.mark.parametrize("dtype, onnx_type, scale, zero_point, axis", CASES, ids=["int8", "int8_zp", "uint8_asym", "int8_per_channel", "int16", "int4", "uint4_asym"])
def test_fake_quant_equals_onnx_runtime_bit_for_bit(dtype, onnx_type, scale, zero_point, axis, trainable):
    qmin, qmax = integer_range(dtype)
    x = _inputs(scale, zero_point, qmin, qmax, axis)
    codes, values = _ort_qdq(x, onnx_type, scale, zero_point, axis)
    quantizer = _quantizer(dtype, scale, zero_point, axis, trainable=trainable)
    with torch.no_grad():
        ours_codes = quantizer.quantize(torch.from_numpy(x)).numpy()
        ours = quantizer(torch.from_numpy(x)).numpy()
    assert np.array_equal(ours_codes, codes.astype(np.float32))
    assert np.array_equal(ours, values)  # float tolerance 0, ties and saturation included
    assert np.array_equal(quantizer.dequantize(torch.from_numpy(codes.astype(np.float32))).detach().numpy(), values)


@pytest.mark.parametrize("axis", [None, 1], ids=["per_tensor", "per_channel"])
def test_scale_gradient_is_lsq_scaled_by_one_over_sqrt_n_qp(axis):
    scale = np.array(0.05, np.float32) if axis is None else np.array([0.05, 0.02, 0.08], np.float32)
    zero_point = np.zeros(scale.shape, np.int8)
    x = _inputs(scale, zero_point, -128, 127, axis)
    upstream = RNG.normal(size=x.shape).astype(np.float32)
    quantizer = _quantizer("int8", scale, zero_point, axis, trainable=True, symmetric=True)
    quantizer.elements = x[0].size  # N counts the elements of one sample per scale
    x_tensor = torch.from_numpy(x).requires_grad_(True)
    (quantizer(x_tensor) * torch.from_numpy(upstream)).sum().backward()

    shape = [1, -1, 1, 1] if axis is not None else [1, 1, 1, 1]
    v = (x / scale.reshape(shape)).astype(np.float64)  # x / s in float32, as the forward divides
    inside = (np.round(v) >= -128) & (np.round(v) <= 127)
    # LSQ's step-size gradient: round(v) − v inside the range, the bound outside
    per_element = np.where(inside, np.round(v) - v, np.clip(np.round(v), -128, 127))
    channels = 1 if axis is None else scale.size
    g = 1.0 / math.sqrt(x[0].size / channels * 127)
    reduce_axes = (0, 2, 3) if axis is not None else None
    expected = g * (upstream * per_element).sum(axis=reduce_axes)
    assert quantizer.gradient_scale(x_tensor) == pytest.approx(g)
    np.testing.assert_allclose(quantizer.scale.grad.numpy().reshape(-1), np.reshape(expected, -1), rtol=1e-4, atol=1e-6)
    # straight through inside the range, nothing outside
    np.testing.assert_allclose(x_tensor.grad.numpy(), np.where(inside, upstream, 0.0), rtol=1e-6, atol=0)


def test_asymmetric_zero_point_learns_as_lsq_plus_offset_and_stays_integer():
    scale, zero_point = np.array(0.02, np.float32), np.array(10, np.uint8)
    x = _inputs(scale, zero_point, 0, 255, None)
    upstream = RNG.normal(size=x.shape).astype(np.float32)
    quantizer = _quantizer("uint8", scale, zero_point, None, trainable=True)
    assert isinstance(quantizer.zero_point, torch.nn.Parameter)
    (quantizer(torch.from_numpy(x)) * torch.from_numpy(upstream)).sum().backward()
    codes = np.round(x / scale) + 10  # x / s in float32, as the forward divides
    clipped = (codes < 0) | (codes > 255)
    # inside the range the offset cancels; where codes saturate, y = (bound − z)·s moves by −s per unit of z
    g = 1.0 / math.sqrt(x[0].size * 255)
    expected = g * (upstream * np.where(clipped, -np.float64(scale), 0.0)).sum()
    assert clipped.any()
    assert quantizer.zero_point.grad.item() == pytest.approx(expected, rel=1e-4)
    quantizer.zero_point.data += 0.4
    assert quantizer.zero_point_value().tolist() == [10]  # ships rounded


def test_a_learned_scale_moves_towards_lower_error_and_fixed_and_frozen_ones_do_not():
    x = torch.from_numpy(RNG.normal(size=(64, 32)).astype(np.float32))
    learned = _quantizer("int8", np.array(0.002, np.float32), np.array(0, np.int8), None, trainable=True, symmetric=True)
    fixed = _quantizer("uint8", np.array(1 / 256, np.float32), np.array(0, np.uint8), None, trainable=True, fixed=True)
    frozen = _quantizer("int8", np.array(0.002, np.float32), np.array(0, np.int8), None, trainable=False, symmetric=True)
    assert [name for name, _ in fixed.named_parameters()] == [] and [name for name, _ in frozen.named_parameters()] == []
    optimizer = torch.optim.Adam(learned.parameters(), lr=1e-3)
    errors = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = ((learned(x) - x) ** 2).mean()
        loss.backward()
        optimizer.step()
        errors.append(loss.item())
    # 0.002 clips everything beyond ±0.25: training widens the step and the error falls
    assert learned.scale.item() > 0.004
    assert errors[-1] < 0.2 * errors[0]
    assert fixed.scale_value().tolist() == [np.float32(1 / 256)] and frozen.scale_value().tolist() == [np.float32(0.002)]


def test_a_weight_on_its_grid_gives_its_scale_no_lsq_gradient_though_the_loss_depends_on_it():
    """Why fine-tuning keeps weight scales as quantized (train.freeze_weight_grids): a latent weight read
    back from stored integers sits on its grid, where LSQ's scale gradient Σ g·(round(w/s) − w/s) is 0,
    while scaling the codes' grid changes the loss; Adam would turn the noise around that 0 into full steps."""
    spec = QuantSpec("int8", -8, 7, True, None)
    scale = np.float32(0.05)
    latent = torch.from_numpy(RNG.integers(-8, 8, size=256).astype(np.float32) * scale)
    target = torch.from_numpy(RNG.normal(size=256).astype(np.float32))
    quantizer = FakeQuantizer(spec, np.array(scale), None, trainable=True, elements=256)

    def loss() -> torch.Tensor:
        return ((quantizer(latent) - target) ** 2).sum()

    loss().backward()
    assert float(quantizer.scale.grad.abs().max()) == 0.0
    with torch.no_grad():
        quantizer.scale.mul_(1.001)  # every code stays, every dequantized weight grows 0.1%
        larger = float(loss())
        quantizer.scale.div_(1.001)
        assert larger != pytest.approx(float(loss()), rel=1e-6)


def test_power_of_two_scales_stay_powers_of_two():
    quantizer = _quantizer("int8", np.array(0.03, np.float32), np.array(0, np.int8), None, trainable=True, symmetric=True, power_of_two=True)
    x = torch.linspace(-3, 3, 101)
    with torch.no_grad():
        assert np.array_equal(quantizer(x).numpy(), (torch.clamp(torch.round(x / 0.03125), -128, 127) * 0.03125).numpy())
    (quantizer(x) ** 2).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad.item() != 0.0
    assert quantizer.scale_value().tolist() == [0.03125]


def test_without_torch_the_package_says_how_to_install_it():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgeopt.runtime.errors import BackendUnavailableError\n"
        "try:\n    import edgeopt.converters.finetune\nexcept BackendUnavailableError as e:\n    print('HINT', e.hint)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HINT pip install 'edgeopt[train]'" in result.stdout, result.stderr


def test_a_scale_pushed_below_zero_stays_a_positive_scale():
    quantizer = _quantizer("int8", np.array(0.01, np.float32), np.array(0, np.int8), None, trainable=True, symmetric=True)
    with torch.no_grad():
        quantizer.scale.fill_(-0.5)
    y = quantizer(torch.linspace(-1, 1, 11))
    assert torch.isfinite(y).all() and quantizer.scale_value()[0] > 0
