"""Training data for fine-tuning: the build's readers (.npz with `labels`, .npy, image folders, iterables)
and a user's `torch.utils.data.DataLoader`, as samples in memory with optional labels.

Training visits the samples in a new order every epoch and measures a held-out part after each,
so the samples are read once and kept (the bench's sets: 128-2000 small images, at most ~100 MB).
Every sample goes through `converters.data`'s checks against the model's inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.converters.data import LABEL_KEY, Dataset, open_dataset
from edgeopt.converters.errors import CalibrationDataError
from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.spec import TensorSpec

__all__ = ["MIN_HELD_OUT", "MIN_SAMPLES", "TrainingData", "load_training_data"]

#: Fewest samples fine-tuning accepts: enough for a held-out part that can show a change.
MIN_SAMPLES = 16
#: Fewest held-out samples (a fifth of the data, at most 256, at least this).
MIN_HELD_OUT = 8

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainingData:
    """Samples (each with the model's batch axis, as calibration samples) and one label per sample, or None."""

    samples: tuple[Sample, ...]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.samples)

    def split(self, seed: int = 0) -> tuple[TrainingData, TrainingData]:
        """(train, held out): a seeded shuffle, then a fifth (8..256 samples) held out for fidelity.

        Shuffled first because sample files are often sorted by class.
        """
        count = len(self.samples)
        if count < MIN_SAMPLES:
            raise OptionError(
                f"fine-tuning needs at least {MIN_SAMPLES} training samples ({self.source} holds {count})",
                hint="give a few hundred representative inputs: an .npz, an image folder, or an iterable",
            )
        order = np.random.default_rng(seed).permutation(count)
        held = min(256, max(MIN_HELD_OUT, count // 5))
        return self._subset(order[: count - held]), self._subset(order[count - held :])

    def _subset(self, indices: np.ndarray) -> TrainingData:
        labels = None if self.labels is None else self.labels[indices]
        return TrainingData(tuple(self.samples[i] for i in indices), labels, self.source)


def load_training_data(source: Any, inputs: Sequence[TensorSpec]) -> TrainingData:
    """Read training samples from any source `edgeopt.build` accepts for it.

    - a path (.npz with optional `labels`, .npy, image folder with one sub-folder per class) or a
      `converters.data.Dataset`: read with the calibration readers;
    - a `torch.utils.data.DataLoader` (or any iterable of batches) yielding a dict of tensors by input
      name (labels under `labels`), or `(inputs, labels)` with inputs a tensor (single-input model)
      or such a dict: batches are cut into samples of the model's batch size;
    - an iterable of {input name: array} samples, each optionally with its `labels`.
    """
    if isinstance(source, Dataset):
        return _from_dataset(source)
    if isinstance(source, (str, Path, np.ndarray, Mapping)):
        return _from_dataset(open_dataset(source, inputs, role="training"))
    if _is_data_loader(source):
        return _from_batches(source, inputs, f"<{type(source).__name__}>")
    if isinstance(source, Iterable):
        return _from_batches(source, inputs, f"<{type(source).__name__}>")
    raise CalibrationDataError(f"cannot read training data from a {type(source).__name__}")


def _from_dataset(dataset: Dataset, source: str | None = None) -> TrainingData:
    samples = tuple({k: np.ascontiguousarray(v) for k, v in sample.items()} for sample in dataset)
    return TrainingData(samples, dataset.labels, source or dataset.source)


def _is_data_loader(source: Any) -> bool:
    try:
        from torch.utils.data import DataLoader
    except ImportError:
        return False
    return isinstance(source, DataLoader)


def _numpy(value: Any) -> np.ndarray:
    detach = getattr(value, "detach", None)
    return np.asarray(detach().cpu().numpy() if detach is not None else value)


def _from_batches(source: Iterable[Any], inputs: Sequence[TensorSpec], name: str) -> TrainingData:
    """Batches (or single samples without a batch axis) stacked, then read like an .npz's arrays."""
    columns: dict[str, list[np.ndarray]] = {s.name: [] for s in inputs}
    labels: list[np.ndarray] = []
    for batch in source:
        arrays, batch_labels = _split_batch(batch, inputs, name)
        unbatched = {s.name for s in inputs if s.name in arrays and arrays[s.name].ndim == len(s.shape) - 1}
        for key, array in arrays.items():
            columns.setdefault(key, []).append(array[None] if key in unbatched else array)
        if batch_labels is not None:
            labels.append(batch_labels.reshape(-1))
    if not any(columns.values()):
        raise CalibrationDataError(f"training data {name} yielded no samples", hint="provide at least one sample")
    stacked = {key: np.concatenate(parts) for key, parts in columns.items() if parts}
    if labels:
        stacked[LABEL_KEY] = np.concatenate(labels)
    try:
        dataset = open_dataset(stacked, inputs, role="training")
    except CalibrationDataError as error:
        raise CalibrationDataError(f"training data {name}: {error.message}", hint=error.hint) from None
    return _from_dataset(dataset, source=name)


def _split_batch(batch: Any, inputs: Sequence[TensorSpec], name: str) -> tuple[Sample, np.ndarray | None]:
    """(arrays by input name, labels or None) from a dict batch or an (inputs, labels) pair."""
    labels = None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        batch, labels = batch
        labels = _numpy(labels)
    if isinstance(batch, Mapping):
        arrays = {str(k): _numpy(v) for k, v in batch.items()}
        given = arrays.pop(LABEL_KEY, None)
        labels = given if given is not None else labels
        return arrays, labels
    if len(inputs) == 1:
        return {inputs[0].name: _numpy(batch)}, labels
    raise CalibrationDataError(
        f"training data {name} yielded a {type(batch).__name__}; a model with {len(inputs)} inputs needs a dict of tensors by input name",
        hint="yield {input name: tensor} (labels under 'labels'), or (that dict, labels)",
    )
