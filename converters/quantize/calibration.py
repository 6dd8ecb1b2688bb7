"""Run the fp32 model over the calibration data once and observe the ranges of the tensors to quantize."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx

from edgeopt.converters.data import Dataset
from edgeopt.converters.errors import CalibrationDataError
from edgeopt.converters.graph.session import ort_session
from edgeopt.converters.graph.shapes import with_outputs
from edgeopt.converters.quantize.observers import ChannelMinMaxObserver, Observer, make_observer
from edgeopt.converters.quantize.qdq import qrange

__all__ = ["calibrate"]

Progress = Callable[[int, int], None]


def calibrate(
    model: onnx.ModelProto,
    dataset: Dataset,
    tensors: Iterable[str],
    *,
    method: str,
    percentile: float,
    activation_dtype: str,
    progress: Progress | None = None,
    threads: int = 0,
    channel_axes: Mapping[str, int] | None = None,
    continuing: Mapping[str, Observer] | None = None,
) -> dict[str, Observer]:
    """One streaming pass: every observer sees each sample's tensor values and then lets them go.

    Tensors in `channel_axes` get per-channel min-max on that axis, whatever the method. Tensors in
    `continuing` are observed by those observers (which have seen earlier samples) instead of new ones."""
    names = sorted(set(tensors))
    qmin, qmax = qrange(activation_dtype)
    axes = channel_axes or {}
    kept = continuing or {}
    observers = {
        name: kept[name] if name in kept else ChannelMinMaxObserver(axes[name]) if name in axes else make_observer(method, percentile, qmax - qmin + 1)
        for name in names
    }
    runner = ort_session(with_outputs(model, names), threads=threads)
    available = {o.name for o in runner.get_outputs()}
    wanted = [n for n in names if n in available]
    input_names = [i.name for i in runner.get_inputs()]
    total = len(dataset)
    done = 0
    for sample in dataset:
        values = runner.run(wanted, {name: sample[name] for name in input_names})
        for name, value in zip(wanted, values):
            observers[name].observe(np.asarray(value))
        done += 1
        if progress is not None:
            progress(done, total)
    if done == 0:
        raise CalibrationDataError(f"calibration data {dataset.source} yielded no samples", hint="provide at least one sample")
    return observers
