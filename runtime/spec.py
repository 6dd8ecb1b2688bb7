"""What a model takes and returns, as the device sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

__all__ = ["TensorQuantization", "TensorSpec", "TensorSpecDocument"]


class _Scale(TypedDict):
    scale: float | list[float]


class TensorQuantization(_Scale, total=False):
    """How an integer tensor maps to floats: x = (q - zero_point) * scale; lists (one per channel
    along `axis`) for per-channel quantization. zero_point defaults to 0."""

    zero_point: int | list[int]
    axis: int


class TensorSpecDocument(TypedDict):
    """A TensorSpec as JSON (manifest inputs/outputs, benchmark results): dynamic dims as a name or "?"."""

    name: str
    shape: list[int | str]
    dtype: str
    layout: str | None
    quantization: TensorQuantization | None


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, or str/None for dynamic dims), numpy dtype name, layout and int quantization."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str
    layout: str | None = None
    quantization: TensorQuantization | None = None

    def to_dict(self) -> TensorSpecDocument:
        return {
            "name": self.name,
            "shape": [d if isinstance(d, int) else (d or "?") for d in self.shape],
            "dtype": self.dtype,
            "layout": self.layout,
            "quantization": self.quantization,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "TensorSpec":
        """From a checked JSON object (the manifest's reader validates it first)."""
        return cls(
            name=raw["name"],
            shape=tuple(raw["shape"]),
            dtype=raw["dtype"],
            layout=raw.get("layout"),
            quantization=raw.get("quantization"),
        )
