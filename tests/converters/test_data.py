"""Calibration/eval data: every source form streams validated samples; every bad input is a clear error."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgeopt.converters.data import ImagePreprocessing, open_dataset
from edgeopt.converters.errors import CalibrationDataError
from edgeopt.runtime.spec import TensorSpec

IMAGE = TensorSpec("image", (1, 3, 4, 4), "float32")
TOKENS = TensorSpec("tokens", ("batch", 5), "int64")


def _samples(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 3, 4, 4)).astype(np.float32)


def _png(path: Path, pixels: np.ndarray) -> None:
    """Write an 8-bit RGB PNG using the Paeth filter on every row (exercises the decoder's hardest path)."""
    height, width, _ = pixels.shape
    rows = []
    flat = pixels.reshape(height, width * 3).astype(np.int32)
    previous = np.zeros(width * 3, np.int32)
    for row in flat:
        filtered = np.zeros_like(row)
        for i in range(len(row)):
            left = row[i - 3] if i >= 3 else 0
            up = previous[i]
            upper_left = previous[i - 3] if i >= 3 else 0
            p = left + up - upper_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
            predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else upper_left)
            filtered[i] = (row[i] - predictor) & 0xFF
        rows.append(b"\x04" + filtered.astype(np.uint8).tobytes())
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_npz_named_by_input_streams_batch_one_samples_with_labels(tmp_path: Path) -> None:
    data = _samples(6)
    np.savez_compressed(tmp_path / "calib.npz", image=data, labels=np.arange(6))
    dataset = open_dataset(tmp_path / "calib.npz", [IMAGE])
    samples = list(dataset)
    assert len(dataset) == 6 and len(samples) == 6
    assert samples[2]["image"].shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(samples[2]["image"][0], data[2])
    np.testing.assert_array_equal(dataset.labels, np.arange(6))
    assert len(list(dataset)) == 6  # re-iterable


def test_single_unnamed_array_in_npz_or_npy_feeds_a_single_input_model(tmp_path: Path) -> None:
    data = _samples(3)
    np.savez(tmp_path / "one.npz", data)
    np.save(tmp_path / "one.npy", data)
    for path in (tmp_path / "one.npz", tmp_path / "one.npy"):
        samples = list(open_dataset(path, [IMAGE]))
        np.testing.assert_array_equal(np.concatenate([s["image"] for s in samples]), data)


def test_float64_data_is_cast_to_the_model_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "f64.npy", _samples(2).astype(np.float64))
    assert next(iter(open_dataset(tmp_path / "f64.npy", [IMAGE])))["image"].dtype == np.float32


def test_dynamic_batch_dims_and_integer_inputs() -> None:
    ids = np.arange(20, dtype=np.int64).reshape(4, 5)
    samples = list(open_dataset({"tokens": ids}, [TOKENS]))
    assert [s["tokens"].shape for s in samples] == [(1, 5)] * 4


def test_a_one_shot_generator_is_spooled_so_it_can_be_read_twice() -> None:
    data = _samples(5)
    dataset = open_dataset(({"image": data[i : i + 1]} for i in range(5)), [IMAGE])
    first, second = list(dataset), list(dataset)
    assert len(first) == len(second) == 5
    np.testing.assert_array_equal(second[4]["image"], data[4:5])


def test_take_limits_samples_and_labels() -> None:
    dataset = open_dataset({"image": _samples(8), "labels": np.arange(8)}, [IMAGE])
    head = dataset.take(3)
    assert len(head) == 3 and len(list(head)) == 3
    np.testing.assert_array_equal(head.labels, [0, 1, 2])


def test_image_folder_with_class_subfolders_decodes_png_and_preprocesses(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = {}
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        image = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        _png(tmp_path / label / "a.png", image)
        pixels[label] = image
    prep = ImagePreprocessing(size=(6, 5), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), layout="NCHW")
    spec = TensorSpec("image", (1, 3, 6, 5), "float32")
    dataset = open_dataset(tmp_path, [spec], preprocessing=prep)
    samples = list(dataset)
    np.testing.assert_array_equal(dataset.labels, [0, 1])
    expected = ((pixels["dog"] / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(samples[1]["image"], expected, atol=1e-5)


def test_image_folder_resizes_to_the_model_input(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", np.full((8, 8, 3), 200, np.uint8))
    sample = next(iter(open_dataset(tmp_path, [IMAGE])))
    assert sample["image"].shape == (1, 3, 4, 4)
    np.testing.assert_allclose(sample["image"], 200 / 255.0, atol=1e-6)


# -- every bad input is a CalibrationDataError that names the input, the expected shape and the file --


def test_wrong_shape_names_input_expected_shape_and_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", image=np.zeros((4, 3, 5, 5), np.float32))
    with pytest.raises(CalibrationDataError) as error:
        list(open_dataset(tmp_path / "bad.npz", [IMAGE]))
    message = str(error.value)
    assert "'image'" in message and "(1, 3, 4, 4)" in message and "bad.npz" in message and "(1, 3, 5, 5)" in message


def test_wrong_rank_is_caught_when_opening(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros((4, 48), np.float32))
    with pytest.raises(CalibrationDataError, match=r"'image'.*\(4, 48\).*\(1, 3, 4, 4\)"):
        open_dataset(tmp_path / "flat.npy", [IMAGE])


def test_integer_data_for_a_float_input_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "u8.npy", np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(CalibrationDataError, match="dtype uint8.*float32"):
        list(open_dataset(tmp_path / "u8.npy", [IMAGE]))


def test_nan_is_refused_with_the_sample_index(tmp_path: Path) -> None:
    data = _samples(3)
    data[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", image=data)
    with pytest.raises(CalibrationDataError, match=r"'image'.*sample 1.*NaN"):
        list(open_dataset(tmp_path / "nan.npz", [IMAGE]))


def test_missing_input_name_lists_what_the_file_has(tmp_path: Path) -> None:
    other = TensorSpec("mask", (1, 4), "float32")
    np.savez(tmp_path / "partial.npz", image=_samples(2))
    with pytest.raises(CalibrationDataError, match=r"no array for input 'mask'.*\['image'\]"):
        open_dataset(tmp_path / "partial.npz", [IMAGE, other])


def test_inputs_with_different_sample_counts() -> None:
    other = TensorSpec("mask", (1, 4), "float32")
    with pytest.raises(CalibrationDataError, match="different numbers of samples"):
        open_dataset({"image": _samples(2), "mask": np.zeros((3, 4), np.float32)}, [IMAGE, other])


def test_labels_count_must_match_samples(tmp_path: Path) -> None:
    np.savez(tmp_path / "labels.npz", image=_samples(3), labels=np.arange(2))
    with pytest.raises(CalibrationDataError, match="2 labels for 3 samples"):
        open_dataset(tmp_path / "labels.npz", [IMAGE])


def test_pickled_object_arrays_are_never_loaded(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationDataError, match="objects.npy"):
        open_dataset(tmp_path / "objects.npy", [IMAGE])


def test_missing_file_unknown_format_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="not found"):
        open_dataset(tmp_path / "absent.npz", [IMAGE])
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(CalibrationDataError, match="unknown format '.csv'"):
        open_dataset(tmp_path / "data.csv", [IMAGE])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="no readable samples"):
        open_dataset(tmp_path / "empty", [IMAGE])


def test_unnamed_array_for_a_multi_input_model() -> None:
    other = TensorSpec("mask", (1, 4), "float32")
    with pytest.raises(CalibrationDataError, match="2 inputs"):
        open_dataset(_samples(2), [IMAGE, other])


def test_empty_data_and_empty_generator() -> None:
    with pytest.raises(CalibrationDataError, match="no samples"):
        open_dataset({"image": np.zeros((0, 3, 4, 4), np.float32)}, [IMAGE])
    with pytest.raises(CalibrationDataError, match="no samples"):
        open_dataset(iter(()), [IMAGE])


def test_generator_sample_of_the_wrong_shape_is_caught_while_spooling() -> None:
    with pytest.raises(CalibrationDataError, match=r"'image'.*\(1, 3, 2, 2\)"):
        open_dataset(iter([{"image": np.zeros((1, 3, 2, 2), np.float32)}]), [IMAGE])
