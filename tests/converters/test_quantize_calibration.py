"""Streaming calibration: fixed-size histograms that widen without losing counts, and memory that
does not grow with the number of calibration samples."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.data import model_input_specs, open_dataset
from edgeopt.converters.quantize.calibration import calibrate
from edgeopt.converters.quantize.observers import HistogramObserver, MinMaxObserver


def test_histogram_widens_by_merging_bins_and_keeps_every_count() -> None:
    observer = HistogramObserver("percentile", bins=64)
    observer.observe(np.linspace(0.0, 1.0, 1000))
    observer.observe(np.array([-3.0, 7.5]))
    observer.observe(np.linspace(-1.0, 1.0, 500))
    assert observer.counts.shape == (64,)
    assert observer.counts.sum() == 1502
    assert observer.origin <= -3.0 and observer.origin + 64 * observer.width >= 7.5
    assert (observer.low, observer.high) == (-3.0, 7.5)


def test_widened_histogram_matches_one_built_on_all_data_at_its_final_edges() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(scale=1 + i, size=2000) for i in range(5)]
    observer = HistogramObserver("percentile", bins=256)
    for batch in batches:
        observer.observe(batch)
    edges = observer.origin + observer.width * np.arange(257)
    direct, _ = np.histogram(np.clip(np.concatenate(batches), edges[0], edges[-1] - 1e-9), bins=edges)
    np.testing.assert_allclose(observer.counts, direct, atol=2)


def test_minmax_and_percentile_ranges() -> None:
    values = np.random.default_rng(1).uniform(-2.0, 4.0, size=100_000)
    minmax = MinMaxObserver()
    minmax.observe(values)
    assert minmax.range(symmetric=False) == (values.min(), values.max())
    percentile = HistogramObserver("percentile", percentile=99.0)
    percentile.observe(values)
    low, high = percentile.range(symmetric=False)
    assert low == pytest.approx(-1.94, abs=0.02) and high == pytest.approx(3.94, abs=0.02)
    low, high = percentile.range(symmetric=True)
    assert high == pytest.approx(3.94, abs=0.02) and low == pytest.approx(-2.0, abs=0.01)  # 1% of |x| lies above 3.94


def test_entropy_on_relu_output_clips_the_long_tail_but_keeps_most_of_the_mass() -> None:
    values = np.maximum(np.random.default_rng(2).normal(size=200_000), 0.0)
    observer = HistogramObserver("entropy")
    observer.observe(values)
    low, high = observer.range(symmetric=False)
    assert low == 0.0 and 2.5 < high < values.max()


def _wide_model() -> onnx.ModelProto:
    weight = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 256])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _peak_bytes(model: onnx.ModelProto, count: int, method: str) -> int:
    data = np.random.default_rng(count).normal(size=(count, 64, 256)).astype(np.float32)
    dataset = open_dataset(data, model_input_specs(model))
    tracemalloc.start()
    try:
        calibrate(model, dataset, ["x", "h", "y"], method=method, percentile=99.99, activation_dtype="int8")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibration_memory_does_not_grow_with_the_number_of_samples(method: str) -> None:
    """500 samples (32 MB of activations per tensor in total) need no more memory than 50."""
    model = _wide_model()
    small, large = _peak_bytes(model, 50, method), _peak_bytes(model, 500, method)
    assert large < 1.2 * small + 256 * 1024, (small, large)
