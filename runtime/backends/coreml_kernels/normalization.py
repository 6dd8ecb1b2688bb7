"""Normalizations: batch, instance, layer and local response."""

from __future__ import annotations

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args


@KERNELS.register("batch_norm")
def _batch_norm(a: Args) -> np.ndarray:
    x = a.f("x")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = a.f("mean").reshape(shape), a.f("variance").reshape(shape)
    gamma = a.f("gamma", np.ones(1, np.float32)).reshape(shape)
    beta = a.f("beta", np.zeros(1, np.float32)).reshape(shape)
    return (x - mean) / np.sqrt(var + float(a("epsilon", 1e-5))) * gamma + beta


@KERNELS.register("instance_norm")
def _instance_norm(a: Args) -> np.ndarray:
    x = a.f("x")
    axes = tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    normed = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + float(a("epsilon", 1e-5)))
    gamma, beta = a.f("gamma"), a.f("beta")
    return normed * (1 if gamma is None else gamma.reshape(shape)) + (0 if beta is None else beta.reshape(shape))


@KERNELS.register("layer_norm")
def _layer_norm(a: Args) -> np.ndarray:
    x = a.f("x")
    axes = tuple(a.ints("axes") or range(x.ndim))
    normed = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + float(a("epsilon", 1e-5)))
    gamma, beta = a.f("gamma"), a.f("beta")
    return normed * (1 if gamma is None else gamma) + (0 if beta is None else beta)


@KERNELS.register("local_response_norm")
def _lrn(a: Args) -> np.ndarray:
    x, size = a.f("x"), int(a("size"))
    squares = np.square(x)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = np.pad(squares, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    window = sum(padded[:, i : i + x.shape[1]] for i in range(size))
    return x / (float(a("k", 1.0)) + float(a("alpha", 1e-4)) / size * window) ** float(a("beta", 0.75))
