"""Pooling: max_pool and avg_pool, with ceil_mode and the two ways to count padding."""

from __future__ import annotations

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args
from edgeopt.runtime.backends.coreml_kernels.windows import padding, window_view


@KERNELS.register("max_pool", "avg_pool")
def _pool(a: Args) -> np.ndarray:
    x = a.f("x")
    kernel = a.ints("kernel_sizes")
    spatial = len(kernel)
    strides = a.ints("strides", [1] * spatial)
    pads = padding(a, x.shape[2:], kernel, strides, [1] * spatial)
    if a("ceil_mode", False):
        grown = []
        for size, k, s, (b, e) in zip(x.shape[2:], kernel, strides, pads):
            out = -(-(size + b + e - k) // s) + 1
            if (out - 1) * s >= size + b:
                out -= 1
            grown.append((b, e, max((out - 1) * s + k - (size + b + e), 0)))
    else:
        grown = [(b, e, 0) for b, e in pads]
    is_max = a.op.type == "max_pool"
    fill = -np.inf if is_max else 0.0
    padded = np.pad(x, [(0, 0), (0, 0)] + [(b, e + extra) for b, e, extra in grown], constant_values=fill)
    axes = tuple(range(-spatial, 0))
    windows = window_view(padded, kernel, strides, [1] * spatial)
    if is_max:
        return windows.max(axis=axes)
    ones = np.ones((1, 1, *x.shape[2:]), np.float32)
    if a("exclude_padding_from_average", False):
        counted = np.pad(ones, [(0, 0), (0, 0)] + [(b, e + extra) for b, e, extra in grown])
    else:
        counted = np.pad(ones, [(0, 0), (0, 0)] + [(b, e) for b, e, _ in grown], constant_values=1.0)
        counted = np.pad(counted, [(0, 0), (0, 0)] + [(0, extra) for _, _, extra in grown])
    return windows.sum(axis=axes) / window_view(counted, kernel, strides, [1] * spatial).sum(axis=axes)
