"""Activation MIL ops with parameters (alpha, beta, mode, axis)."""

from __future__ import annotations

import math

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args
from edgeopt.runtime.backends.coreml_kernels.elementwise import erf


@KERNELS.register("sigmoid_hard")
def _sigmoid_hard(a: Args) -> np.ndarray:
    return np.clip(float(a("alpha", 0.2)) * a.f("x") + float(a("beta", 0.5)), 0, 1)


@KERNELS.register("elu")
def _elu(a: Args) -> np.ndarray:
    x = a.f("x")
    return np.where(x > 0, x, float(a("alpha", 1.0)) * (np.exp(np.minimum(x, 0)) - 1))


@KERNELS.register("leaky_relu")
def _leaky_relu(a: Args) -> np.ndarray:
    x = a.f("x")
    return np.where(x >= 0, x, float(a("alpha", 0.01)) * x)


@KERNELS.register("prelu")
def _prelu(a: Args) -> np.ndarray:
    x, alpha = a.f("x"), a.f("alpha")
    alpha = alpha.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, alpha * x)


@KERNELS.register("clip")
def _clip(a: Args) -> np.ndarray:
    return np.clip(a.f("x"), a.f("alpha"), a.f("beta"))


@KERNELS.register("gelu")
def _gelu(a: Args) -> np.ndarray:
    x, mode = a.f("x"), a("mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


@KERNELS.register("softmax")
def _softmax(a: Args) -> np.ndarray:
    x, axis = a.f("x"), int(a("axis", -1))
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)
