"""Shape and layout MIL ops: reshape, axes, concat/split, slices, pad, tile."""

from __future__ import annotations

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args


@KERNELS.register("reshape")
def _reshape(a: Args) -> np.ndarray:
    x, shape = a("x"), a.ints("shape")
    return np.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


@KERNELS.register("expand_dims")
def _expand_dims(a: Args) -> np.ndarray:
    x, axes = a("x"), a.ints("axes")
    out_rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(ax % out_rank for ax in axes)))


@KERNELS.register("squeeze")
def _squeeze(a: Args) -> np.ndarray:
    x, axes = a("x"), a.ints("axes")
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))


@KERNELS.register("transpose")
def _transpose(a: Args) -> np.ndarray:
    return np.transpose(a("x"), a.ints("perm"))


def _concat_support(a: Args) -> str | None:
    return "interleaved concat is not implemented" if a("interleave", False) else None


@KERNELS.register("concat", supports=_concat_support)
def _concat(a: Args) -> np.ndarray:
    return np.concatenate(a.many("values"), axis=int(a("axis")))


@KERNELS.register("split")
def _split(a: Args) -> list[np.ndarray]:
    x, axis = a("x"), int(a("axis"))
    sizes = a.ints("split_sizes")
    if sizes is None:
        parts = int(a("num_splits"))
        sizes = [x.shape[axis] // parts] * parts
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


@KERNELS.register("slice_by_index")
def _slice_by_index(a: Args) -> np.ndarray:
    x = a("x")
    rank = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * rank)
    begin_mask = a("begin_mask", np.zeros(rank, bool))
    end_mask = a("end_mask", np.zeros(rank, bool))
    squeeze_mask = a("squeeze_mask", np.zeros(rank, bool))
    index = []
    for i in range(rank):
        start = None if begin_mask[i] else begin[i]
        stop = None if end_mask[i] else end[i]
        index.append(begin[i] if squeeze_mask[i] else slice(start, stop, stride[i]))
    return x[tuple(index)]


@KERNELS.register("slice_by_size")
def _slice_by_size(a: Args) -> np.ndarray:
    x, begin, size = a("x"), a.ints("begin"), a.ints("size")
    return x[tuple(slice(b, x.shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))]


#: MIL pad modes other than "constant" -> numpy's name
_PAD_MODES = {"reflect": "reflect", "replicate": "edge"}


def _pad_support(a: Args) -> str | None:
    mode = a("mode", "constant")
    return None if mode == "constant" or mode in _PAD_MODES else f"pad mode {mode!r} is not implemented"


@KERNELS.register("pad", supports=_pad_support)
def _pad(a: Args) -> np.ndarray:
    x, pad, mode = a.f("x"), a.ints("pad"), a("mode", "constant")
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
    if mode == "constant":
        return np.pad(x, pairs, constant_values=float(a("constant_val", 0.0)))
    return np.pad(x, pairs, mode=_PAD_MODES[mode])


@KERNELS.register("tile")
def _tile(a: Args) -> np.ndarray:
    return np.tile(a("x"), a.ints("reps"))
