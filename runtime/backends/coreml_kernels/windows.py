"""Padding and sliding windows shared by convolution and pooling."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgeopt.runtime.backends.coreml_kernels.base import Args


def same_pads(size: int, kernel: int, stride: int, dilation: int, lower: bool) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (large, small) if lower else (small, large)


def padding(a: Args, spatial_in: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = a("pad_type", "valid")
    if pad_type == "custom":
        pad = a.ints("pad")
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(kernel))]
    if pad_type in ("same", "same_lower"):
        return [same_pads(n, k, s, d, pad_type == "same_lower") for n, k, s, d in zip(spatial_in, kernel, strides, dilations)]
    return [(0, 0)] * len(kernel)


def window_view(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int]) -> np.ndarray:
    """(N, C, *out, *kernel) view of all (dilated, strided) windows of a padded NC* tensor."""
    spatial = len(kernel)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, extent, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)
    return view[index]
