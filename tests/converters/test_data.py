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

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_bomb_png(path: Path, side: int = 10_000) -> Path:
    """A valid 8-bit gray PNG of side x side zero pixels (100 MP: 100 MB decoded) in a ~100 KB file.

    Written row block by row block with zlib, so making it costs little memory. 100 MP is inside the
    range where Pillow only warns (its limit is ~89 MP, it refuses above twice that).
    """
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 + a row of zeros
    blocks = [500] * (side // 500) + [side % 500]
    data = b"".join(compressor.compress(row * rows) for rows in blocks) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def write_lying_npz(path: Path, name: str, data: np.ndarray, claimed_samples: int) -> Path:
    """An .npz whose member's .npy header declares `claimed_samples` rows but holds only `data`."""
    import io
    import zipfile

    member = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(data.dtype), "fortran_order": False, "shape": (claimed_samples, *data.shape[1:])}
    np.lib.format.write_array_header_1_0(member, header)
    member.write(np.ascontiguousarray(data).tobytes())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{name}.npy", member.getvalue())
    return path


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


# -- images are decoded by Pillow: every format users have, and a damaged or huge file is an error --


def test_jpeg_bmp_and_webp_images_are_read(tmp_path: Path) -> None:
    from PIL import Image

    for suffix in ("jpg", "bmp", "webp"):
        Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / f"x.{suffix}", quality=95)
    samples = list(open_dataset(tmp_path, [IMAGE]))
    assert len(samples) == 3
    for sample in samples:
        assert sample["image"].shape == (1, 3, 4, 4)
        np.testing.assert_allclose(sample["image"][0, :, 0, 0], np.array([200, 100, 50]) / 255.0, atol=3 / 255.0)


def test_a_gray_model_gets_luma_and_an_rgb_model_gets_gray_replicated(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "rgb").mkdir()
    (tmp_path / "gray").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "rgb" / "red.png")
    Image.new("L", (4, 4), 80).save(tmp_path / "gray" / "g.png")
    gray = next(iter(open_dataset(tmp_path / "rgb", [TensorSpec("image", (1, 1, 4, 4), "float32")])))["image"]
    np.testing.assert_allclose(gray, round(255 * 0.299) / 255.0, atol=1e-6)  # ITU-R 601 luma, as Pillow and torchvision
    nhwc = TensorSpec("image", (1, 4, 4, 3), "float32")
    rgb = next(iter(open_dataset(tmp_path / "gray", [nhwc], preprocessing=ImagePreprocessing(layout="NHWC"))))["image"]
    assert rgb.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(rgb, 80 / 255.0, atol=1e-6)


def test_corrupt_images_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _png(good, np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    with pytest.raises(CalibrationDataError, match="cannot decode image .*junk.png"):
        open_dataset(tmp_path, [IMAGE])  # refused when opening, before any work
    (tmp_path / "junk.png").unlink()
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) - 30])
    dataset = open_dataset(tmp_path, [IMAGE])  # the header is fine; the pixel data is cut
    with pytest.raises(CalibrationDataError, match="cannot decode image .*truncated.png"):
        list(dataset)


@pytest.mark.parametrize("side", [8_200, 10_000], ids=["67MP-over-edgeopt-limit", "100MP-where-pillow-only-warns"])
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path, side: int) -> None:
    bomb = write_bomb_png(tmp_path / "bomb.png", side)
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(CalibrationDataError, match=r"bomb.png has more than 64,000,000 pixels .*decompression bomb"):
        open_dataset(tmp_path, [IMAGE])


# -- labels are class indices; arrays are named after the inputs; headers match the data ---------------


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array(["cat", "dog", "cat"]), "dtype <U3; expected integer class indices"),
        (np.array([0.0, np.nan, 1.0]), r"1 value\(s\) that are not class indices \(label 1 is nan\)"),
        (np.array([0, -1, 1]), r"label 1 is -1"),
        (np.array([0.0, 1.5, 1.0]), r"label 1 is 1.5"),
    ],
    ids=["strings", "nan", "negative", "fractional"],
)
def test_labels_that_are_not_class_indices_are_refused(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    np.savez(tmp_path / "eval.npz", image=_samples(3), labels=labels)
    with pytest.raises(CalibrationDataError, match=message):
        open_dataset(tmp_path / "eval.npz", [IMAGE])


def test_whole_float_labels_become_integers(tmp_path: Path) -> None:
    np.savez(tmp_path / "eval.npz", image=_samples(3), labels=np.array([2.0, 0.0, 1.0]))
    labels = open_dataset(tmp_path / "eval.npz", [IMAGE]).labels
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0, 1]


def test_object_labels_are_refused_without_unpickling(tmp_path: Path) -> None:
    np.savez(tmp_path / "eval.npz", image=_samples(2), labels=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(CalibrationDataError, match=r"eval.npz:labels.npy holds Python objects"):
        open_dataset(tmp_path / "eval.npz", [IMAGE])


def test_arrays_that_feed_no_input_are_refused_with_both_lists(tmp_path: Path) -> None:
    np.savez(tmp_path / "extra.npz", image=_samples(2), mask=_samples(2), other=_samples(2))
    with pytest.raises(CalibrationDataError, match=r"array\(s\) 'mask', 'other' that are not inputs of the model \(its inputs: 'image'\)"):
        open_dataset(tmp_path / "extra.npz", [IMAGE])


def test_a_wrongly_named_single_array_is_not_used_silently(tmp_path: Path) -> None:
    np.savez(tmp_path / "named.npz", pixels=_samples(2))
    with pytest.raises(CalibrationDataError, match=r"'pixels' that are not inputs of the model \(its inputs: 'image'\)"):
        open_dataset(tmp_path / "named.npz", [IMAGE])
    with pytest.raises(CalibrationDataError, match="'pixels'"):
        open_dataset({"pixels": _samples(2)}, [IMAGE])


def test_a_generator_sample_with_extra_keys_is_refused() -> None:
    with pytest.raises(CalibrationDataError, match=r"sample 0 .* has 'label', which the model does not take"):
        open_dataset(iter([{"image": _samples(1), "label": np.array([3])}]), [IMAGE])


def test_an_npz_header_that_claims_more_data_than_it_holds(tmp_path: Path) -> None:
    path = write_lying_npz(tmp_path / "lying.npz", "image", _samples(2), claimed_samples=1_000_000)
    with pytest.raises(CalibrationDataError, match=r"lying.npz:image.npy declares shape \(1000000, 3, 4, 4\) float32 .* but holds 384 bytes"):
        open_dataset(path, [IMAGE])


def test_a_damaged_npz_stream_is_an_error_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, image=_samples(2000))  # stored, not compressed: zero some bytes of the data
    raw = bytearray(path.read_bytes())
    raw[20_000:20_060] = bytes(60)
    path.write_bytes(bytes(raw))
    dataset = open_dataset(path, [IMAGE])  # the header is intact
    with pytest.raises(CalibrationDataError, match=r"cannot read .*calib.npz:image.npy: Bad CRC-32"):
        list(dataset)


def test_a_16_bit_png_keeps_its_scale(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.array([[0, 257 * 100], [257 * 200, 65535]], np.uint16)).save(tmp_path / "deep.png")
    spec = TensorSpec("image", (1, 1, 2, 2), "float32")
    sample = next(iter(open_dataset(tmp_path, [spec])))["image"]
    np.testing.assert_allclose(sample.reshape(-1), np.array([0, 100, 200, 255]) / 255.0, atol=1e-6)
