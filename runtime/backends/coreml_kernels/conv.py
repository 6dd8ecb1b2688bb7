"""Convolutions: conv and conv_transpose (N, C, *spatial), any rank and groups."""

from __future__ import annotations

import numpy as np

from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args
from edgeopt.runtime.backends.coreml_kernels.windows import padding, window_view


def _convolve(x: np.ndarray, weight: np.ndarray, strides: list[int], dilations: list[int], groups: int) -> np.ndarray:
    """Cross-correlation of padded x (N, C, *S) with weight (O, C/groups, *K)."""
    spatial = weight.ndim - 2
    windows = window_view(x, list(weight.shape[2:]), strides, dilations)
    n, c = x.shape[:2]
    out_channels = weight.shape[0]
    out_spatial = windows.shape[2 : 2 + spatial]
    k_axes = tuple(range(2 + spatial, 2 + 2 * spatial))
    if groups == 1:
        result = np.tensordot(windows, weight, axes=((1, *k_axes), (1, *range(2, 2 + spatial))))
        return np.moveaxis(result, -1, 1)
    per_group = c // groups
    group_weights = weight.reshape(groups, out_channels // groups, per_group, *weight.shape[2:])
    grouped = windows.reshape(n, groups, per_group, *windows.shape[2:])
    letters = "hwd"[:spatial]
    kernel_letters = "ijk"[:spatial]
    equation = f"ngc{letters}{kernel_letters},goc{kernel_letters}->ngo{letters}"
    outs = np.einsum(equation, grouped, group_weights, optimize=True)
    return outs.reshape(n, out_channels, *out_spatial)


@KERNELS.register("conv")
def _conv(a: Args) -> np.ndarray:
    x, weight = a.f("x"), a.f("weight")
    spatial = weight.ndim - 2
    strides = a.ints("strides", [1] * spatial)
    dilations = a.ints("dilations", [1] * spatial)
    pads = padding(a, x.shape[2:], list(weight.shape[2:]), strides, dilations)
    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    out = _convolve(padded, weight, strides, dilations, int(a("groups", 1)))
    bias = a.f("bias")
    return out if bias is None else out + bias.reshape((1, -1) + (1,) * spatial)


def _conv_transpose_support(a: Args) -> str | None:
    return None if a("pad_type", "valid") == "custom" else "conv_transpose supports pad_type='custom' only"


@KERNELS.register("conv_transpose", supports=_conv_transpose_support)
def _conv_transpose(a: Args) -> np.ndarray:
    x, weight = a.f("x"), a.f("weight")  # weight: (C_in, C_out / groups, *K)
    spatial = weight.ndim - 2
    strides = a.ints("strides", [1] * spatial)
    dilations = a.ints("dilations", [1] * spatial)
    groups = int(a("groups", 1))
    kernel = list(weight.shape[2:])
    pad = a.ints("pad")
    n, c_in = x.shape[:2]
    dilated = np.zeros((n, c_in, *[(s - 1) * st + 1 for s, st in zip(x.shape[2:], strides)]), dtype=x.dtype)
    dilated[(slice(None), slice(None), *(slice(None, None, st) for st in strides))] = x
    natural = [(s - 1) * st + (k - 1) * d + 1 - pad[2 * i] - pad[2 * i + 1] for i, (s, st, k, d) in enumerate(zip(x.shape[2:], strides, kernel, dilations))]
    output_shape = a.ints("output_shape")
    extra = [0] * spatial if output_shape is None else [o - nat for o, nat in zip(output_shape[2:], natural)]
    pads = [((k - 1) * d - pad[2 * i], (k - 1) * d - pad[2 * i + 1] + extra[i]) for i, (k, d) in enumerate(zip(kernel, dilations))]
    padded = np.pad(dilated, [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in pads])
    crop = tuple(slice(max(-b, 0), padded.shape[2 + i] - max(-e, 0)) for i, (b, e) in enumerate(pads))
    padded = padded[(slice(None), slice(None), *crop)]
    per_group_in, per_group_out = c_in // groups, weight.shape[1]
    flipped = np.flip(weight, axis=tuple(range(2, 2 + spatial)))
    forward = flipped.reshape(groups, per_group_in, per_group_out, *kernel).swapaxes(1, 2).reshape(groups * per_group_out, per_group_in, *kernel)
    out = _convolve(padded, forward, [1] * spatial, dilations, groups)
    bias = a.f("bias")
    return out if bias is None else out + bias.reshape((1, -1) + (1,) * spatial)
