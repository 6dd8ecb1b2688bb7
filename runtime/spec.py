"""What a model takes and returns, as the device sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, or str/None for dynamic dims), numpy dtype name, layout and int quantization."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str
    layout: str | None = None
    quantization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": [d if isinstance(d, int) else (d or "?") for d in self.shape],
            "dtype": self.dtype,
            "layout": self.layout,
            "quantization": self.quantization,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TensorSpec":
        return cls(
            name=raw["name"],
            shape=tuple(raw["shape"]),
            dtype=raw["dtype"],
            layout=raw.get("layout"),
            quantization=raw.get("quantization"),
        )
