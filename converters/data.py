"""Calibration and evaluation data: one streaming `Dataset` over .npz/.npy files, image folders or iterables.

Samples are read one at a time (an .npz member is read straight from the zip stream, an .npy is
memory-mapped), so calibrating on many samples does not need them all in memory. Every sample is
checked against the model's input specs; a mismatch names the input, the expected shape and dtype,
and the file.
"""

from __future__ import annotations

import math
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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

#: The name numpy gives an unnamed array (`numpy.savez(path, array)`): it feeds a single-input model.
UNNAMED_ARRAY = "arr_0"

#: Files a folder dataset reads: images Pillow decodes, and .npy samples.
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".npy",
)

#: Largest image a folder dataset decodes, checked from the file's header before decoding: a small
#: file that claims more (a decompression bomb) is refused. Pillow itself only warns below twice its
#: own limit of ~89 MP, which lets a 356 MB bomb through.
MAX_IMAGE_PIXELS = 64_000_000


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
    - a folder: image files (PNG, JPEG, BMP, WebP, ... decoded with Pillow) or .npy samples,
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
    unexpected = sorted(set(sample) - {spec.name for spec in inputs})
    if unexpected:
        raise CalibrationDataError(
            f"sample {index} of {source} has {_quoted(unexpected)}, which the model does not take "
            f"(its inputs: {_quoted(s.name for s in inputs)})",
            hint="name the arrays after the model inputs, and leave out the rest",
        )
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


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _matched_names(names: Iterable[str], inputs: Sequence[TensorSpec], source: str) -> dict[str, str]:
    """Input name -> the array that feeds it. Every input needs its own array; an array that feeds no
    input is an error (not silently skipped), except numpy's unnamed `arr_0` for a single-input model."""
    names = sorted(names)
    expected = _quoted(s.name for s in inputs)
    if len(inputs) == 1 and names == [UNNAMED_ARRAY] and inputs[0].name != UNNAMED_ARRAY:
        return {inputs[0].name: UNNAMED_ARRAY}
    unexpected = [name for name in names if name not in {s.name for s in inputs}]
    if unexpected:
        raise CalibrationDataError(
            f"{source} has array(s) {_quoted(unexpected)} that are not inputs of the model (its inputs: {expected})",
            hint=f"name the arrays after the model inputs ({expected}), labels '{LABEL_KEY}', and leave out the rest",
        )
    for spec in inputs:
        if spec.name not in names:
            raise CalibrationDataError(
                f"{source} has no array for input '{spec.name}' (expected {_expected(spec)}); it has {names}",
                hint="name the arrays after the model inputs",
            )
    return {spec.name: spec.name for spec in inputs}


def _checked_labels(labels: np.ndarray | None, count: int, source: str) -> np.ndarray | None:
    """Labels are class indices compared with the argmax of the output: whole numbers >= 0, one per sample."""
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != count:
        raise CalibrationDataError(f"{source} has {len(labels)} labels for {count} samples", hint="give one label per sample")
    hint = "save labels as integer class indices (0, 1, 2, ...), one per sample"
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise CalibrationDataError(f"labels in {source} have dtype {labels.dtype}; expected integer class indices", hint=hint)
    bad = ~np.isfinite(labels) | (labels < 0) | (labels != np.round(labels)) if labels.dtype.kind == "f" else labels < 0
    if np.any(bad):
        first = int(np.argmax(bad))
        raise CalibrationDataError(
            f"labels in {source} hold {int(bad.sum())} value(s) that are not class indices (label {first} is {labels[first]})",
            hint=hint,
        )
    return labels.astype(np.int64)


# -- sources ----------------------------------------------------------------------------------------------


def _from_arrays(
    arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, inputs: Sequence[TensorSpec], source: str, role: str
) -> Dataset:
    arrays = {name: arrays[key] for name, key in _matched_names(arrays, inputs, source).items()}
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


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError)


class _NpyMember:
    """Reads one .npy member of an .npz sample by sample, straight from the (possibly compressed) zip stream.

    The header's shape and dtype are checked against the member's size when it is opened, so a
    header that claims more (or less) data than the member holds is an error before any work.
    """

    def __init__(self, archive: Path, member: str) -> None:
        self.archive = archive
        self.member = member
        self.where = f"{archive}:{member}"
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as stream:
                self.shape, self.fortran, self.dtype = self._header(stream)
                data_bytes = info.file_size - stream.tell()
        if self.dtype.hasobject:
            raise CalibrationDataError(f"{self.where} holds Python objects", hint="save numeric arrays only")
        declared = self._bytes(self.shape)
        if declared != data_bytes:
            raise CalibrationDataError(
                f"{self.where} declares shape {self.shape} {self.dtype} ({declared} bytes) but holds {data_bytes} bytes of data",
                hint="the file is damaged or was not written by numpy; save it again with numpy.savez",
            )

    @staticmethod
    def _header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        return tuple(shape), fortran, dtype

    def _bytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * self.dtype.itemsize

    @contextmanager
    def _data(self) -> Iterator[Callable[[int], bytes]]:
        """A reader of exactly n bytes after the header; damage in the stream is a CalibrationDataError."""

        def read(count: int) -> bytes:
            data = stream.read(count)
            if len(data) != count:
                raise CalibrationDataError(f"{self.where} ends early", hint="the file is damaged; save it again with numpy.savez")
            return data

        try:
            with zipfile.ZipFile(self.archive) as zf, zf.open(self.member) as stream:
                self._header(stream)
                yield read
        except _ZIP_ERRORS as error:
            raise CalibrationDataError(f"cannot read {self.where}: {error}", hint="the file is damaged; save it again with numpy.savez") from error

    def array(self) -> np.ndarray:
        """The whole member at once (for labels: one small vector)."""
        with self._data() as read:
            data = read(self._bytes(self.shape))
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape, order="F" if self.fortran else "C")

    def rows(self, per_sample: int) -> Iterator[np.ndarray]:
        row_shape = (per_sample, *self.shape[1:])
        count = self.shape[0] // per_sample
        if self.fortran:  # column-major data cannot be cut into rows while streaming
            whole = self.array()
            for i in range(count):
                yield np.ascontiguousarray(whole[i * per_sample : (i + 1) * per_sample])
            return
        with self._data() as read:
            for _ in range(count):
                yield np.frombuffer(read(self._bytes(row_shape)), dtype=self.dtype).reshape(row_shape)


def _from_npz(path: Path, inputs: Sequence[TensorSpec], role: str) -> Dataset:
    try:
        with zipfile.ZipFile(path) as zf:
            members = {name[:-4]: name for name in zf.namelist() if name.endswith(".npy")}
        readers = {name: _NpyMember(path, member) for name, member in members.items()}
    except _ZIP_ERRORS as error:
        raise CalibrationDataError(f"cannot read {path}: {error}", hint="save the data with numpy.savez") from error
    labels_member = readers.pop(LABEL_KEY, None)
    labels = labels_member.array() if labels_member is not None else None
    readers = {name: readers[key] for name, key in _matched_names(readers, inputs, str(path)).items()}
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
        raise CalibrationDataError(f"{path} holds no readable samples (looked for {', '.join(IMAGE_SUFFIXES)})")
    for file in files:  # every image's header now: a file that is no image, or a bomb, fails before any work
        if file.suffix.lower() != ".npy":
            with _opened_image(file):
                pass
    classes = sorted({f.parent.relative_to(path).as_posix() for f in files} - {"."})
    labels = np.array([classes.index(f.parent.relative_to(path).as_posix()) for f in files]) if classes else None
    if classes and any(f.parent == path for f in files):
        labels = None
    prep = preprocessing or ImagePreprocessing()

    def read() -> Iterator[dict[str, np.ndarray]]:
        for file in files:
            if file.suffix.lower() == ".npy":
                array = _npy_sample(file)
                yield {spec.name: array if array.ndim == len(spec.shape) else array[None]}
            else:
                yield {spec.name: _image_sample(file, spec, prep)}

    return Dataset(read, len(files), inputs, source=str(path), role=role, labels=labels)


def _npy_sample(file: Path) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CalibrationDataError(f"cannot read {file}: {error}", hint="save plain numeric arrays with numpy.save") from error


#: Pillow mode for a model input with this many channels.
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@contextmanager
def _opened_image(file: Path) -> Iterator[Any]:
    """The image, opened by Pillow (header only) and refused when larger than MAX_IMAGE_PIXELS.

    Anything Pillow raises while the body decodes it is a CalibrationDataError naming the file.
    """
    import struct

    from PIL import Image

    failures = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
    bombs = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"it is {image.width}x{image.height}")
                yield image
    except bombs as error:
        raise CalibrationDataError(
            f"image {file} has more than {MAX_IMAGE_PIXELS:,} pixels ({error}): refused as a possible decompression bomb",
            hint="resize the image to about the model's input size before calibrating",
        ) from error
    except failures as error:
        raise CalibrationDataError(f"cannot decode image {file}: {error}", hint="remove or replace the damaged file") from error


def _image_sample(file: Path, spec: TensorSpec, prep: ImagePreprocessing) -> np.ndarray:
    """An image file -> one model input sample with a batch axis of 1.

    Converted to the model's channels (gray, RGB, RGBA), resized bilinearly to its height and
    width, scaled, normalized per channel and laid out as NCHW or NHWC.
    """
    from PIL import Image

    layout = prep.layout.upper()
    if len(spec.shape) != 4 or layout not in ("NCHW", "NHWC"):
        raise CalibrationDataError(
            f"input '{spec.name}' expects {_expected(spec)}; image folders feed 4-D NCHW or NHWC inputs ({file})"
        )
    channel_dim = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    channels = prep.channels or (channel_dim if isinstance(channel_dim, int) else None)
    if channels is not None and channels not in _MODES:
        raise CalibrationDataError(
            f"input '{spec.name}' expects {_expected(spec)}: {channels} channels, but images have 1 (gray), 3 (RGB) or 4 (RGBA) ({file})",
            hint="feed this model .npy samples instead of images",
        )
    hw = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    with _opened_image(file) as image:
        if image.mode.startswith("I"):  # 16-bit gray: keep its precision, on the 8-bit scale prep.scale expects
            image = Image.fromarray(np.asarray(image, dtype=np.float32) / 257.0)
        gray = image.mode in ("1", "L", "F")
        mode = _MODES[channels] if channels is not None else ("L" if gray else "RGB")
        converted = image if mode == "L" and image.mode == "F" else image.convert(mode)
        height, width = prep.size or (hw if all(isinstance(d, int) for d in hw) else (converted.height, converted.width))
        if (converted.height, converted.width) != (height, width):
            converted = converted.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(converted, dtype=np.float32)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    pixels = (pixels * prep.scale - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    if layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return pixels[None].astype(np.dtype(spec.dtype))
