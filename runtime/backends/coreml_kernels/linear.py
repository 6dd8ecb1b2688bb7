"""Matrix products: linear, matmul, scaled dot-product attention."""

from __future__ import annotations

import math

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args


@KERNELS.register("linear")
def _linear(a: Args) -> np.ndarray:
    y = a.f("x") @ a.f("weight").T
    bias = a.f("bias")
    return y if bias is None else y + bias


@KERNELS.register("matmul")
def _matmul(a: Args) -> np.ndarray:
    x, y = a.f("x"), a.f("y")
    if a("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@KERNELS.register("scaled_dot_product_attention")
def _sdpa(a: Args) -> np.ndarray:
    query, key, value = a.f("query"), a.f("key"), a.f("value")
    scores = query @ np.swapaxes(key, -1, -2) / math.sqrt(query.shape[-1])
    mask = a("attn_mask")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask.astype(np.float32)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ value
