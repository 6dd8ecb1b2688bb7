"""Fake quantization with learned scales: LSQ (Esser et al., ICLR 2020) and LSQ+ (Bhalgat et al., 2020).

`FakeQuantizer` computes exactly what ONNX Runtime's QuantizeLinear → DequantizeLinear computes
(x / s in float32, round half to even, + z, saturate; (q - z) · s), so a graph run with frozen
quantizers matches the QDQ graph bit for bit, and trained values written back into that graph
keep meaning what they meant in training. In training the rounding is a straight-through
estimator; the scale's gradient is the LSQ one, scaled by g = 1/√(N·Qp) (N: elements per scale,
Qp: the top of the integer range); an asymmetric zero point learns as LSQ+'s offset (β = −z·s),
rounded straight-through so it stays an integer. Fixed scales (TFLite's softmax/logistic outputs)
and power-of-two scales (targets whose integer pipeline shifts) are honoured.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from edgeopt.runtime.errors import BackendUnavailableError

try:
    import torch
    from torch import nn
except ImportError as error:  # torch comes only with the `train` extra
    raise BackendUnavailableError(
        "fine-tuning needs torch, which is not installed", hint="pip install 'edgeopt[train]'"
    ) from error

__all__ = ["FakeQuantizer", "QuantizerMode", "QuantSpec", "integer_range", "round_ste"]

#: the floor of a trained scale: float32's smallest normal number (or the stored scale, if that is smaller)
SMALLEST_SCALE = float(np.finfo(np.float32).tiny)


class QuantizerMode(enum.Enum):
    """How a `TrainableGraph` runs the Q/DQ of a quantized graph (a graph without Q/DQ runs in fp32 either way)."""

    LEARNED = "learned"  # fake-quant with trainable scales (and LSQ+ zero points for asymmetric activations)
    FROZEN = "frozen"  # exact QDQ semantics; scales and zero points get no gradient (weights still train)


#: integer ranges of the ONNX types a QuantizeLinear/DequantizeLinear can carry here
_RANGES = {
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
    "int32": (-(2**31), 2**31 - 1),
}


def integer_range(dtype: str) -> tuple[int, int]:
    """(qmin, qmax) of an integer type name ("int8", "uint8", ...)."""
    return _RANGES[dtype]


@dataclass(frozen=True)
class QuantSpec:
    """The scheme one quantizer must honour (read from the QDQ graph and the target's scheme)."""

    dtype: str  # "int8", "uint8", "int4", "int32" (bias) ...
    qmin: int
    qmax: int
    symmetric: bool  # zero point fixed (0, or the unsigned midpoint); asymmetric ones learn (LSQ+)
    axis: int | None  # per-channel axis of the tensor it quantizes, None: per tensor
    fixed: bool = False  # scale and zero point are the target's constants (TFLite softmax/logistic): never trained
    power_of_two: bool = False  # the scale must stay a power of two


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """torch.round (half to even, as ONNX Runtime) forward; identity gradient (straight-through).

    Exact: round(x) − x is exact in float32 (Sterbenz), so x + (round(x) − x) is round(x) bit for bit.
    Plain tensor ops, not an autograd.Function: those cost 10x the graph's run under torch.func.vmap.
    """
    return x + (torch.round(x) - x).detach()


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x itself (bit for bit: x − x is 0), with its gradient multiplied by `factor`."""
    return x.detach() + (x - x.detach()) * factor


class FakeQuantizer(nn.Module):
    """One scale (per tensor or per channel) and zero point; `quantize` gives integer codes (as floats,
    so gradients flow), `dequantize` maps codes back, `forward` is both.

    `trainable=False` (FROZEN mode, fixed scales) keeps scale and zero point as buffers. A trainable
    asymmetric quantizer's zero point is a float parameter rounded straight-through (LSQ+); `zero_point_value()`
    is the integer that ships. `elements` is N of the gradient scale; activations set it from the first
    tensor they see (the elements of one sample per scale).
    """

    def __init__(self, spec: QuantSpec, scale: np.ndarray, zero_point: np.ndarray | None, *, trainable: bool, elements: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        scale_tensor = torch.tensor(np.asarray(scale, dtype=np.float32).reshape(-1))
        zero_tensor = torch.tensor(np.zeros(scale_tensor.shape, np.float32) if zero_point is None else np.asarray(zero_point).astype(np.float32).reshape(-1))
        if zero_tensor.numel() == 1 and scale_tensor.numel() > 1:
            zero_tensor = zero_tensor.expand_as(scale_tensor).clone()
        train_scale = trainable and not spec.fixed
        if train_scale:
            self.scale = nn.Parameter(scale_tensor)
        else:
            self.register_buffer("scale", scale_tensor)
        if train_scale and not spec.symmetric:
            self.zero_point = nn.Parameter(zero_tensor)
        else:
            self.register_buffer("zero_point", zero_tensor)
        # a stored subnormal scale (PP-OCR rec's dead channels, ~2.6e-42) is its own floor: untrained, it
        # ships bit for bit and its codes round-trip (q·s is exact on the subnormal grid; q·tiny/tiny is not)
        self.register_buffer("scale_floor", torch.clamp(scale_tensor, max=SMALLEST_SCALE), persistent=False)
        self.elements = elements

    @property
    def trains_scale(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def _shape(self, x: torch.Tensor) -> list[int]:
        """Broadcast shape of the scale against `x`."""
        shape = [1] * x.dim()
        if self.spec.axis is not None and self.scale.numel() > 1:
            shape[self.spec.axis] = -1
        return shape

    def gradient_scale(self, x: torch.Tensor) -> float:
        """LSQ's g = 1/√(N·Qp), N the elements per scale."""
        if self.elements is None:
            per_sample = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
            self.elements = per_sample
        per_scale = max(1, self.elements // max(1, self.scale.numel()))
        return 1.0 / math.sqrt(per_scale * max(1, self.spec.qmax))

    def parameters_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) as the forward uses them, shaped to broadcast against `x`."""
        scale, zero = self.scale, self.zero_point
        if self.trains_scale:
            factor = self.gradient_scale(x)
            # an optimizer step may push a scale to or below 0; the floor keeps it a scale
            scale = torch.clamp(_scale_gradient(scale, factor), min=self.scale_floor)
            if isinstance(zero, nn.Parameter):
                zero = _scale_gradient(zero, factor)
        if self.spec.power_of_two:
            scale = torch.exp2(round_ste(torch.log2(scale)))
        if isinstance(zero, nn.Parameter):
            zero = torch.clamp(round_ste(zero), self.spec.qmin, self.spec.qmax)
        shape = self._shape(x)
        return scale.reshape(shape), zero.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.parameters_for(x)
        return torch.clamp(round_ste(x / scale) + zero, self.spec.qmin, self.spec.qmax)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self.parameters_for(codes)
        return (codes - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.parameters_for(x)
        return (torch.clamp(round_ste(x / scale) + zero, self.spec.qmin, self.spec.qmax) - zero) * scale

    def scale_value(self) -> np.ndarray:
        """The float32 scale that ships (a power of two when the scheme asks for one)."""
        scale = torch.clamp(self.scale.detach(), min=self.scale_floor)
        if self.spec.power_of_two:
            scale = torch.exp2(torch.round(torch.log2(scale)))
        return scale.cpu().numpy().astype(np.float32)

    def zero_point_value(self) -> np.ndarray:
        """The integer zero point that ships (rounded, within the type's range), as int64."""
        zero = torch.clamp(torch.round(self.zero_point.detach()), self.spec.qmin, self.spec.qmax)
        return zero.cpu().numpy().astype(np.int64)

    def extra_repr(self) -> str:
        spec = self.spec
        where = "per tensor" if spec.axis is None else f"axis {spec.axis}"
        return f"{spec.dtype} [{spec.qmin}, {spec.qmax}] {where}, {'symmetric' if spec.symmetric else 'asymmetric'}" + (", fixed" if spec.fixed else "") + (", power of two" if spec.power_of_two else "")
