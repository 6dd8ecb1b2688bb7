"""Indexing MIL ops: gather, gather_along_axis."""

from __future__ import annotations

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args


def _gather_support(a: Args) -> str | None:
    return "gather with batch_dims is not implemented" if int(a("batch_dims", 0)) else None


@KERNELS.register("gather", supports=_gather_support)
def _gather(a: Args) -> np.ndarray:
    x, indices, axis = a("x"), a("indices").astype(np.int64), int(a("axis", 0))
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take(x, indices, axis=axis)


@KERNELS.register("gather_along_axis")
def _gather_along_axis(a: Args) -> np.ndarray:
    return np.take_along_axis(a("x"), a("indices").astype(np.int64), axis=int(a("axis", 0)))
