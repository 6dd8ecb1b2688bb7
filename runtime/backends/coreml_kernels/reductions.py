"""Reductions over axes (reduce_*)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args


_REDUCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_sum": np.sum, "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, **kw: np.sum(np.abs(x), **kw),
    "reduce_l2_norm": lambda x, **kw: np.sqrt(np.sum(np.square(x), **kw)),
    "reduce_sum_square": lambda x, **kw: np.sum(np.square(x), **kw),
}


@KERNELS.register(*_REDUCTIONS)
def _reduce(a: Args) -> np.ndarray:
    x = a.f("x")
    axes = a.ints("axes")
    axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
    return _REDUCTIONS[a.op.type](x, axis=axes, keepdims=bool(a("keep_dims", False)))
