"""Elementwise MIL ops: binary arithmetic and comparisons, unary math, select and cast."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import CAST_NAMES, KERNELS, Args, cast_support


def erf(x: np.ndarray) -> np.ndarray:
    """Exact erf, elementwise (numpy has none; math.erf is correctly rounded in float64)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


_BINARY: dict[str, Callable[..., np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
    "floor_div": np.floor_divide, "maximum": np.maximum, "minimum": np.minimum, "equal": np.equal,
    "not_equal": np.not_equal, "greater": np.greater, "greater_equal": np.greater_equal, "less": np.less,
    "less_equal": np.less_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}

_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "tanh": np.tanh, "exp": np.exp, "sqrt": np.sqrt,
    "abs": np.abs, "erf": erf, "square": np.square, "floor": np.floor, "ceil": np.ceil,
    "round": np.round, "sign": np.sign, "silu": lambda x: x / (1 + np.exp(-x)), "identity": lambda x: x,
    "softplus": lambda x: np.logaddexp(0, x), "logical_not": np.logical_not, "sin": np.sin, "cos": np.cos,
}


@KERNELS.register(*_BINARY)
def _binary(a: Args) -> np.ndarray:
    return _BINARY[a.op.type](a.f("x"), a.f("y"))


@KERNELS.register(*_UNARY)
def _unary(a: Args) -> np.ndarray:
    return _UNARY[a.op.type](a.f("x"))


@KERNELS.register("rsqrt", "inverse", "log")
def _with_epsilon(a: Args) -> np.ndarray:
    x = a.f("x")
    eps = float(a("epsilon", 1e-12 if a.op.type != "log" else 1e-45))
    match a.op.type:
        case "rsqrt":
            return 1 / np.sqrt(x + eps)
        case "inverse":
            return 1 / (x + eps)
    return np.log(x + eps)


@KERNELS.register("select")
def _select(a: Args) -> np.ndarray:
    return np.where(a("cond"), a.f("a"), a.f("b"))


@KERNELS.register("cast", supports=cast_support)
def _cast(a: Args) -> np.ndarray:
    return np.asarray(a.f("x")).astype(CAST_NAMES[a("dtype")])
