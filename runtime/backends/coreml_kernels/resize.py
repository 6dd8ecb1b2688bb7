"""Resizing: bilinear and nearest-neighbour, by target size or by scale factor."""

from __future__ import annotations

import math

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args


def _interpolate(x: np.ndarray, axis: int, grid: np.ndarray) -> np.ndarray:
    low = np.clip(np.floor(grid).astype(np.int64), 0, x.shape[axis] - 1)
    high = np.clip(low + 1, 0, x.shape[axis] - 1)
    frac = (grid - low).reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)])
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


#: resize_bilinear's sampling modes (MIL docs)
_SAMPLING_MODES = ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS")


def _grid(size_in: int, size_out: int, mode: str) -> np.ndarray:
    """Sampling positions of resize_bilinear's `sampling_mode` (MIL docs, 1-D case)."""
    i = np.arange(size_out, dtype=np.float64)
    match mode:
        case "STRICT_ALIGN_CORNERS" | "ALIGN_CORNERS":
            if size_out == 1:
                return np.array([(size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0])
            grid = i * (size_in - 1) / (size_out - 1)
        case "DEFAULT":
            grid = i * (size_in - size_in / size_out) / max(size_out - 1, 1)
        case "OFFSET_CORNERS":
            delta = max(1, size_in - 1) / size_out
            grid = 0.5 * delta + i * delta
        case "UNALIGN_CORNERS":
            spacing = size_in / size_out
            grid = i * spacing + 0.5 * spacing - 0.5
        case _:
            raise AssertionError(f"sampling_mode {mode} passed no support check")
    return np.clip(grid, 0, size_in - 1)


def _resize_bilinear_support(a: Args) -> str | None:
    mode = a("sampling_mode", "DEFAULT")
    return None if mode in _SAMPLING_MODES else f"unknown sampling_mode {mode}"


@KERNELS.register("resize_bilinear", supports=_resize_bilinear_support)
def _resize_bilinear(a: Args) -> np.ndarray:
    x, mode = a.f("x"), a("sampling_mode", "DEFAULT")
    height, width = int(a("target_size_height", 1)), int(a("target_size_width", 1))
    out = _interpolate(x, -2, _grid(x.shape[-2], height, mode))
    return _interpolate(out, -1, _grid(x.shape[-1], width, mode))


@KERNELS.register("upsample_bilinear")
def _upsample_bilinear(a: Args) -> np.ndarray:
    x = a.f("x")
    scale_h, scale_w = float(a("scale_factor_height", 1)), float(a("scale_factor_width", 1))
    height, width = int(math.floor(x.shape[-2] * scale_h)), int(math.floor(x.shape[-1] * scale_w))
    align = bool(a("align_corners", True))
    half_pixel = bool(a("half_pixel_centers", not align))
    mode = "ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half_pixel else "DEFAULT")
    if mode == "DEFAULT":
        grid_h, grid_w = (np.clip(np.arange(n) / s, 0, m - 1) for n, s, m in ((height, scale_h, x.shape[-2]), (width, scale_w, x.shape[-1])))
    else:
        grid_h, grid_w = _grid(x.shape[-2], height, mode), _grid(x.shape[-1], width, mode)
    return _interpolate(_interpolate(x, -2, grid_h), -1, grid_w)


@KERNELS.register("upsample_nearest_neighbor")
def _upsample_nearest(a: Args) -> np.ndarray:
    x = a("x")
    scale_h, scale_w = float(a("scale_factor_height", 1)), float(a("scale_factor_width", 1))
    rows = np.floor(np.arange(int(x.shape[-2] * scale_h)) / scale_h).astype(np.int64)
    cols = np.floor(np.arange(int(x.shape[-1] * scale_w)) / scale_w).astype(np.int64)
    return np.take(np.take(x, rows, axis=-2), cols, axis=-1)


@KERNELS.register("resize_nearest_neighbor")
def _resize_nearest(a: Args) -> np.ndarray:
    x = a("x")
    height, width = int(a("target_size_height")), int(a("target_size_width"))
    rows = np.minimum(np.floor(np.arange(height) * x.shape[-2] / height), x.shape[-2] - 1).astype(np.int64)
    cols = np.minimum(np.floor(np.arange(width) * x.shape[-1] / width), x.shape[-1] - 1).astype(np.int64)
    return np.take(np.take(x, rows, axis=-2), cols, axis=-1)
