"""Quantization: quantize/dequantize, and the constexpr ops that decompress weights (affine, blockwise, palettes, cast)."""

from __future__ import annotations

import math

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import CAST_NAMES, KERNELS, Args, cast_support, unpack_bits


def _along(param: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[axis % rank] = -1
    return param.reshape(shape)


def _quantize_support(a: Args) -> str | None:
    dtype = a("output_dtype")
    return None if dtype in ("int8", "uint8") else f"quantize to {dtype!r} is not implemented"


@KERNELS.register("quantize", supports=_quantize_support)
def _quantize(a: Args) -> np.ndarray:
    x = a.f("input")
    axis = a("axis")
    rank = x.ndim
    scale = _along(a.f("scale"), None if axis is None else int(axis), rank)
    zero_point = a("zero_point")
    dtype = np.int8 if a("output_dtype") == "int8" else np.uint8
    offset = 0 if zero_point is None else _along(zero_point.astype(np.float32), None if axis is None else int(axis), rank)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + offset, info.min, info.max).astype(dtype)


@KERNELS.register("dequantize")
def _dequantize(a: Args) -> np.ndarray:
    x = a("input").astype(np.float32)
    axis = a("axis")
    rank = x.ndim
    scale = _along(a.f("scale"), None if axis is None else int(axis), rank)
    zero_point = a("zero_point")
    offset = 0 if zero_point is None else _along(zero_point.astype(np.float32), None if axis is None else int(axis), rank)
    return (x - offset) * scale


@KERNELS.register("constexpr_affine_dequantize")
def _affine_dequantize(a: Args) -> np.ndarray:
    data = a("quantized_data").astype(np.float32)
    axis = int(a("axis"))
    scale = _along(a.f("scale"), axis, data.ndim)
    zero_point = _along(a("zero_point").astype(np.float32), axis, data.ndim)
    return (data - zero_point) * scale


def _blockwise(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter (same rank as the data) up to the data's shape."""
    for axis, (size, blocks) in enumerate(zip(shape, param.shape)):
        param = np.repeat(param, size // blocks, axis=axis)
    return param


@KERNELS.register("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a: Args) -> np.ndarray:
    data = a("data").astype(np.float32)
    scale = _blockwise(a.f("scale"), data.shape)
    offset = a("offset")
    return (data - (0 if offset is None else _blockwise(offset.astype(np.float32), data.shape))) * scale


def _lut_to_dense_support(a: Args) -> str | None:
    """iOS 18 tables hold vectors of `lut.shape[-1]` values per index; scalar tables only."""
    if a("shape") is None and a("lut").shape[-1] != 1:
        return "vector palettization is not implemented"
    return None


@KERNELS.register("constexpr_lut_to_dense", supports=_lut_to_dense_support)
def _lut_to_dense(a: Args) -> np.ndarray:
    lut, indices = a.f("lut"), a("indices")
    shape = a.ints("shape")
    if shape is not None:
        # iOS 16/17: a flat lut of 2**n entries and indices packed n bits each into a uint8 stream.
        bits = int(math.log2(lut.shape[-1] if lut.ndim == 1 else lut.size))
        count = math.prod(shape)
        raw = np.asarray(indices, dtype=np.uint8).tobytes()
        return lut.reshape(-1)[unpack_bits(raw, bits, count, signed=False).astype(np.int64)].reshape(shape)
    # iOS 18: indices have the output's shape; lut is [*blocks, 2**n, vector] with one table per block.
    indices = indices.astype(np.int64)
    rank = indices.ndim
    tables = lut[..., 0]
    out = np.empty(indices.shape, np.float32)
    block = [indices.shape[i] // tables.shape[i] for i in range(rank)]
    for position in np.ndindex(*tables.shape[:rank]):
        region = tuple(slice(p * b, (p + 1) * b) for p, b in zip(position, block))
        out[region] = tables[position][indices[region]]
    return out


@KERNELS.register("constexpr_cast", supports=lambda a: cast_support(a, "output_dtype"))
def _constexpr_cast(a: Args) -> np.ndarray:
    return a("source_val").astype(CAST_NAMES[a("output_dtype")])
