"""Calibration and evaluation data: one streaming `Dataset` over .npz/.npy files, image folders or iterables.

Samples are read one at a time (an .npz member is read straight from the zip stream, an .npy is
memory-mapped), so calibrating on many samples does not need them all in memory. Every sample is
checked against the model's input specs; a mismatch names the input, the expected shape and dtype,
and the file.
"""

from __future__ import annotations

import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgeopt.converters.errors import CalibrationDataError
from edgeopt.runtime.spec import TensorSpec

__all__ = [
    "Dataset",
    "ImagePreprocessing",
    "IMAGE_SUFFIXES",
    "model_input_specs",
    "open_dataset",
]

LABEL_KEY = "labels"


def _pillow_available() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


#: Image files a folder dataset reads: PNG always (decoded here), every Pillow format when Pillow is installed.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".npy") + ((".jpg", ".jpeg", ".bmp", ".webp") if _pillow_available() else ())


@dataclass(frozen=True)
class ImagePreprocessing:
    """How image files become model input: resize, scale to [0, 1], normalize, lay out.

    `size` is (height, width); None takes it from the model's input shape. `mean`/`std` are per
    channel on the scaled values. `layout` is the model input layout ("NCHW" or "NHWC").
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    channels: int | None = None


def model_input_specs(model: Any) -> list[TensorSpec]:
    """TensorSpecs of an ONNX model's real inputs (graph inputs that are not initializers)."""
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(
            (d.dim_value if d.HasField("dim_value") else (d.dim_param or None)) for d in tensor_type.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=dtype))
    return specs


class Dataset:
    """A re-iterable, validated stream of samples (dict input name -> array with the model's batch dim).

    `labels` holds one label per sample when the source carried them (npz key `labels`, or the
    sub-folder of an image folder), else None.
    """

    def __init__(
        self,
        reader: Callable[[], Iterator[dict[str, np.ndarray]]],
        length: int,
        inputs: Sequence[TensorSpec],
        *,
        source: str,
        role: str,
        labels: np.ndarray | None = None,
        keepalive: Any = None,
    ) -> None:
        self._reader = reader
        self._length = length
        self.inputs = tuple(inputs)
        self.source = source
        self.role = role
        self.labels = labels
        self._keepalive = keepalive  # e.g. the temporary folder an iterator was spooled into

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index, sample in enumerate(self._reader()):
            if index >= self._length:
                return
            yield _validated(sample, self.inputs, self.source, index)

    def take(self, count: int) -> Dataset:
        """The first `count` samples (all if fewer), still streaming."""
        count = min(count, self._length)
        labels = None if self.labels is None else self.labels[:count]
        return Dataset(self._reader, count, self.inputs, source=self.source, role=self.role, labels=labels, keepalive=self._keepalive)

    def skip(self, count: int) -> Dataset:
        """The samples after the first `count`, still streaming (the held-out part of a split)."""
        count = min(count, self._length)
        reader = self._reader

        def rest() -> Iterator[dict[str, np.ndarray]]:
            for index, sample in enumerate(reader()):
                if index >= count:
                    yield sample

        labels = None if self.labels is None else self.labels[count:]
        return Dataset(rest, self._length - count, self.inputs, source=self.source, role=self.role, labels=labels, keepalive=self._keepalive)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "role": self.role, "samples": self._length, "labels": self.labels is not None}


def open_dataset(
    source: str | Path | Iterable[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray] | np.ndarray,
    inputs: Sequence[TensorSpec],
    *,
    preprocessing: ImagePreprocessing | None = None,
    role: str = "calibration",
) -> Dataset:
    """Open calibration/eval data for a model with these inputs.

    - `.npz`: one array per input name (or a single array for a single-input model), samples
      stacked on the batch axis; an optional `labels` array.
    - `.npy`: one array for a single-input model.
    - a folder: image files (PNG, or any Pillow format if Pillow is installed) or .npy samples,
      optionally in one sub-folder per class (labels = sorted class index), with `preprocessing`.
    - an array, a mapping of arrays by input name, or an iterable of {input name: array} samples.
    """
    if not inputs:
        raise CalibrationDataError(f"cannot read {role} data: the model declares no inputs")
    if isinstance(source, np.ndarray):
        return _from_arrays({_single_input(inputs, "<array>").name: source}, None, inputs, "<array>", role)
    if isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        labels = arrays.pop(LABEL_KEY, None)
        return _from_arrays(arrays, labels, inputs, "<mapping>", role)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"{role} data not found: {path}", hint="pass an existing .npz, .npy or image folder")
        if path.is_dir():
            return _from_folder(path, inputs, preprocessing, role)
        if path.suffix == ".npz":
            return _from_npz(path, inputs, role)
        if path.suffix == ".npy":
            return _from_npy(path, inputs, role)
        raise CalibrationDataError(
            f"{role} data {path} has an unknown format '{path.suffix}'",
            hint="use .npz (arrays named by input), .npy (single input) or a folder of images",
        )
    if isinstance(source, Iterable):
        return _from_iterable(source, inputs, role)
    raise CalibrationDataError(f"cannot read {role} data from a {type(source).__name__}")


# -- validation -----------------------------------------------------------------------------------------


def _batch_of(spec: TensorSpec) -> int:
    """Samples per model call: the fixed batch dim, else 1."""
    return spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else 1


def _expected(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in spec.shape)
    return f"shape ({dims}) dtype {spec.dtype}"


def _validated(sample: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec], source: str, index: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name not in sample:
            raise CalibrationDataError(
                f"sample {index} of {source} has no input '{spec.name}' (expected {_expected(spec)}); it has {sorted(sample)}",
                hint="name the arrays after the model inputs",
            )
        array = np.asarray(sample[spec.name])
        out[spec.name] = _checked_array(array, spec, source, f"sample {index}")
    return out


def _checked_array(array: np.ndarray, spec: TensorSpec, source: str, where: str) -> np.ndarray:
    expected_dtype = np.dtype(spec.dtype)
    if array.dtype != expected_dtype:
        same_family = (np.issubdtype(array.dtype, np.floating) and np.issubdtype(expected_dtype, np.floating)) or (
            np.issubdtype(array.dtype, np.integer) and np.issubdtype(expected_dtype, np.integer)
        )
        if not same_family:
            raise CalibrationDataError(
                f"input '{spec.name}' in {source} ({where}) has dtype {array.dtype}; the model expects {_expected(spec)}",
                hint="preprocess the data to the model's input dtype (e.g. images scaled to float32)",
            )
        array = array.astype(expected_dtype)
    if len(array.shape) != len(spec.shape) or any(
        isinstance(want, int) and want > 0 and have != want for have, want in zip(array.shape, spec.shape)
    ):
        raise CalibrationDataError(
            f"input '{spec.name}' in {source} ({where}) has shape {tuple(array.shape)}; the model expects {_expected(spec)}",
            hint="stack samples along the batch axis with the model's per-sample shape",
        )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise CalibrationDataError(
            f"input '{spec.name}' in {source} ({where}) contains NaN or Inf (expected {_expected(spec)})",
            hint="remove or fix the non-finite samples",
        )
    return array


def _single_input(inputs: Sequence[TensorSpec], source: str) -> TensorSpec:
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise CalibrationDataError(
            f"{source} holds one unnamed array but the model has {len(inputs)} inputs ({names})",
            hint="save an .npz with one array per input name",
        )
    return inputs[0]


def _sample_count(shapes: Mapping[str, tuple[int, ...]], inputs: Sequence[TensorSpec], source: str) -> int:
    counts = {}
    for spec in inputs:
        shape = shapes[spec.name]
        if len(shape) != len(spec.shape):
            raise CalibrationDataError(
                f"input '{spec.name}' in {source} has shape {tuple(shape)}; the model expects {_expected(spec)} "
                "with samples stacked on the batch axis",
                hint="stack samples along the batch axis with the model's per-sample shape",
            )
        counts[spec.name] = shape[0] // _batch_of(spec) if shape else 0
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"inputs in {source} hold different numbers of samples: {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise CalibrationDataError(f"{source} holds no samples", hint="provide at least one sample per input")
    return count


def _missing_names(names: Iterable[str], inputs: Sequence[TensorSpec], source: str) -> None:
    names = set(names)
    for spec in inputs:
        if spec.name not in names:
            raise CalibrationDataError(
                f"{source} has no array for input '{spec.name}' (expected {_expected(spec)}); it has {sorted(names)}",
                hint="name the arrays after the model inputs",
            )


def _checked_labels(labels: np.ndarray | None, count: int, source: str) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != count:
        raise CalibrationDataError(f"{source} has {len(labels)} labels for {count} samples", hint="give one label per sample")
    return labels


# -- sources ----------------------------------------------------------------------------------------------


def _from_arrays(
    arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, inputs: Sequence[TensorSpec], source: str, role: str
) -> Dataset:
    if len(arrays) == 1 and len(inputs) == 1 and inputs[0].name not in arrays:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    _missing_names(arrays, inputs, source)
    count = _sample_count({k: v.shape for k, v in arrays.items()}, inputs, source)

    def read() -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            yield {s.name: arrays[s.name][i * _batch_of(s) : (i + 1) * _batch_of(s)] for s in inputs}

    return Dataset(read, count, inputs, source=source, role=role, labels=_checked_labels(labels, count, source))


def _from_npy(path: Path, inputs: Sequence[TensorSpec], role: str) -> Dataset:
    spec = _single_input(inputs, str(path))
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise CalibrationDataError(f"cannot read {path}: {error}", hint="save plain numeric arrays with numpy.save") from error
    return _from_arrays({spec.name: array}, None, inputs, str(path), role)


class _NpyMember:
    """Reads one .npy member of an .npz sample by sample, straight from the (possibly compressed) zip stream."""

    def __init__(self, archive: Path, member: str) -> None:
        self.archive = archive
        self.member = member
        with zipfile.ZipFile(archive) as zf, zf.open(member) as stream:
            self.shape, self.fortran, self.dtype = self._header(stream)

    @staticmethod
    def _header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        return tuple(shape), fortran, dtype

    def rows(self, per_sample: int) -> Iterator[np.ndarray]:
        if self.dtype.hasobject:
            raise CalibrationDataError(f"{self.archive}:{self.member} holds Python objects", hint="save numeric arrays only")
        row_shape = (per_sample, *self.shape[1:])
        row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
        with zipfile.ZipFile(self.archive) as zf, zf.open(self.member) as stream:
            self._header(stream)
            if self.fortran:  # column-major data cannot be cut into rows while streaming
                whole = np.frombuffer(stream.read(), dtype=self.dtype)
                whole = whole.reshape(self.shape, order="F")
                for i in range(self.shape[0] // per_sample):
                    yield np.ascontiguousarray(whole[i * per_sample : (i + 1) * per_sample])
                return
            for _ in range(self.shape[0] // per_sample):
                data = stream.read(row_bytes)
                yield np.frombuffer(data, dtype=self.dtype).reshape(row_shape)


def _from_npz(path: Path, inputs: Sequence[TensorSpec], role: str) -> Dataset:
    try:
        with zipfile.ZipFile(path) as zf:
            members = {name[:-4]: name for name in zf.namelist() if name.endswith(".npy")}
        readers = {name: _NpyMember(path, member) for name, member in members.items()}
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise CalibrationDataError(f"cannot read {path}: {error}", hint="save the data with numpy.savez") from error
    labels = None
    if LABEL_KEY in readers:
        with np.load(path, allow_pickle=False) as archive:
            labels = np.asarray(archive[LABEL_KEY])
        del readers[LABEL_KEY]
    if len(readers) == 1 and len(inputs) == 1 and inputs[0].name not in readers:
        readers = {inputs[0].name: next(iter(readers.values()))}
    _missing_names(readers, inputs, str(path))
    count = _sample_count({k: r.shape for k, r in readers.items()}, inputs, str(path))

    def read() -> Iterator[dict[str, np.ndarray]]:
        streams = {s.name: readers[s.name].rows(_batch_of(s)) for s in inputs}
        for _ in range(count):
            yield {name: next(stream) for name, stream in streams.items()}

    return Dataset(read, count, inputs, source=str(path), role=role, labels=_checked_labels(labels, count, str(path)))


def _from_iterable(source: Iterable[Mapping[str, np.ndarray]], inputs: Sequence[TensorSpec], role: str) -> Dataset:
    """A re-iterable sequence is read in place; a one-shot iterator is spooled to a temporary folder once."""
    name = f"<{type(source).__name__}>"
    if isinstance(source, Sequence):
        samples = source

        def read_sequence() -> Iterator[dict[str, np.ndarray]]:
            for sample in samples:
                yield _as_sample(sample, inputs, name)

        return Dataset(read_sequence, len(samples), inputs, source=name, role=role)
    spool = tempfile.TemporaryDirectory(prefix="edgeopt-data-")
    count = 0
    for index, sample in enumerate(source):
        checked = _validated(_as_sample(sample, inputs, name), inputs, name, index)
        np.savez(Path(spool.name) / f"{index}.npz", **checked)
        count = index + 1
    if count == 0:
        raise CalibrationDataError(f"{role} iterable yielded no samples", hint="provide at least one sample")

    def read_spool() -> Iterator[dict[str, np.ndarray]]:
        for index in range(count):
            with np.load(Path(spool.name) / f"{index}.npz", allow_pickle=False) as archive:
                yield {key: archive[key] for key in archive.files}

    return Dataset(read_spool, count, inputs, source=name, role=role, keepalive=spool)


def _as_sample(sample: Any, inputs: Sequence[TensorSpec], source: str) -> Mapping[str, np.ndarray]:
    if isinstance(sample, Mapping):
        return sample
    if isinstance(sample, np.ndarray):
        return {_single_input(inputs, source).name: sample}
    raise CalibrationDataError(f"{source} yielded a {type(sample).__name__}; expected a dict of arrays by input name")


# -- image folders ------------------------------------------------------------------------------------------


def _from_folder(path: Path, inputs: Sequence[TensorSpec], preprocessing: ImagePreprocessing | None, role: str) -> Dataset:
    spec = _single_input(inputs, str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationDataError(
            f"{path} holds no readable samples (looked for {', '.join(IMAGE_SUFFIXES)})",
            hint="install Pillow for JPEG and other formats" if not _pillow_available() else None,
        )
    classes = sorted({f.parent.relative_to(path).as_posix() for f in files} - {"."})
    labels = np.array([classes.index(f.parent.relative_to(path).as_posix()) for f in files]) if classes else None
    if classes and any(f.parent == path for f in files):
        labels = None
    prep = preprocessing or ImagePreprocessing()

    def read() -> Iterator[dict[str, np.ndarray]]:
        for file in files:
            if file.suffix == ".npy":
                array = np.load(file, allow_pickle=False)
                yield {spec.name: array if array.ndim == len(spec.shape) else array[None]}
            else:
                yield {spec.name: _preprocessed(_read_image(file), spec, prep, file)}

    return Dataset(read, len(files), inputs, source=str(path), role=role, labels=labels)


def _preprocessed(image: np.ndarray, spec: TensorSpec, prep: ImagePreprocessing, file: Path) -> np.ndarray:
    """HWC uint8 image -> one model input sample with a batch axis of 1."""
    layout = prep.layout.upper()
    if len(spec.shape) != 4 or layout not in ("NCHW", "NHWC"):
        raise CalibrationDataError(
            f"input '{spec.name}' expects {_expected(spec)}; image folders feed 4-D NCHW or NHWC inputs ({file})"
        )
    channel_dim = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    channels = prep.channels or (channel_dim if isinstance(channel_dim, int) else image.shape[2])
    if image.shape[2] != channels:
        if channels == 1:
            image = image[..., :3].mean(axis=2, keepdims=True)
        elif image.shape[2] == 1:
            image = np.repeat(image, channels, axis=2)
        else:
            image = image[..., :channels]
    hw = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    size = prep.size or (hw if all(isinstance(d, int) for d in hw) else image.shape[:2])
    image = _resize_bilinear(image.astype(np.float32), size)
    image = image * prep.scale
    image = (image - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    if layout == "NCHW":
        image = image.transpose(2, 0, 1)
    return image[None].astype(np.dtype(spec.dtype))


def _resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centers (what Pillow and OpenCV do for upscaling)."""
    height, width = image.shape[:2]
    out_h, out_w = size
    if (height, width) == (out_h, out_w):
        return image
    ys = np.clip((np.arange(out_h) + 0.5) * height / out_h - 0.5, 0, height - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * width / out_w - 0.5, 0, width - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def _read_image(file: Path) -> np.ndarray:
    """HWC uint8; PNG is decoded here so no imaging library is required."""
    if file.suffix.lower() == ".png":
        return _decode_png(file)
    from PIL import Image

    with Image.open(file) as image:
        array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    return array if array.ndim == 3 else array[..., None]


_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _decode_png(file: Path) -> np.ndarray:
    """Minimal PNG decoder: 8-bit gray/RGB/gray-alpha/RGBA, non-interlaced (what image datasets use)."""
    data = file.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise CalibrationDataError(f"{file} is not a PNG file")
    position, chunks, header = 8, [], None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    if header is None:
        raise CalibrationDataError(f"{file} has no PNG header")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in _PNG_CHANNELS or interlace:
        raise CalibrationDataError(
            f"{file}: only 8-bit non-interlaced gray/RGB(A) PNG is decoded without Pillow",
            hint="install Pillow to read this image",
        )
    channels = _PNG_CHANNELS[color]
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), dtype=np.uint8).reshape(height, stride + 1)
    image = np.zeros((height, stride), dtype=np.int32)
    previous = np.zeros(stride, dtype=np.int32)
    for row in range(height):
        kind, line = raw[row, 0], raw[row, 1:].astype(np.int32)
        if kind == 0:
            current = line
        elif kind == 2:
            current = (line + previous) & 0xFF
        else:
            current = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                left = current[i - channels] if i >= channels else 0
                up = previous[i]
                upper_left = previous[i - channels] if i >= channels else 0
                if kind == 1:
                    predictor = left
                elif kind == 3:
                    predictor = (left + up) >> 1
                else:
                    p = left + up - upper_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                    predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else upper_left)
                current[i] = (line[i] + predictor) & 0xFF
        image[row] = current
        previous = current
    return image.reshape(height, width, channels).astype(np.uint8)
