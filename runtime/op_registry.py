"""One registry pattern for per-op handlers: the handler and its support check side by side.

Used by the TFLite and Core ML lowerings (ONNX ops) and the Core ML reference evaluator (MIL ops),
after ExecuTorch's XNNPACK `operators/`: one small module per op or op family registers itself with
`@REGISTRY.register("Conv", supports=conv_support)`. The registry is the one source of truth for
what a lowering can write: "unsupported op" reports and documentation derive from it.
Standard library only (the runtime's evaluator uses it on devices).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["OpEntry", "OpRegistry"]

HandlerT = TypeVar("HandlerT", bound=Callable[..., object])

#: given what the handler will see, why it cannot handle it (None: it can)
SupportCheck = Callable[..., "str | None"]


@dataclass(frozen=True)
class OpEntry(Generic[HandlerT]):
    op_type: str
    handler: HandlerT
    supports: SupportCheck | None


class OpRegistry(Generic[HandlerT]):
    """op type -> (handler, support check), filled by decorators at import of the op modules."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, OpEntry[HandlerT]] = {}

    def register(self, *op_types: str, supports: SupportCheck | None = None) -> Callable[[HandlerT], HandlerT]:
        """Decorator: `handler` handles `op_types`; `supports(...)` says why not, for the cases it cannot."""

        def add(handler: HandlerT) -> HandlerT:
            for op_type in op_types:
                if op_type in self._entries:
                    raise RuntimeError(f"{self.name}: {op_type} registered twice")
                self._entries[op_type] = OpEntry(op_type, handler, supports)
            return handler

        return add

    def __contains__(self, op_type: object) -> bool:
        return op_type in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, op_type: str) -> OpEntry[HandlerT] | None:
        return self._entries.get(op_type)

    def handler(self, op_type: str) -> HandlerT:
        entry = self._entries.get(op_type)
        if entry is None:
            raise KeyError(f"{self.name} has no handler for {op_type}")
        return entry.handler

    def why_unsupported(self, op_type: str, *context: object) -> str | None:
        """None when the op is registered and its check (given `context`) passes, else the reason."""
        entry = self._entries.get(op_type)
        if entry is None:
            return f"{self.name} does not handle {op_type} yet"
        return entry.supports(*context) if entry.supports is not None else None

    @property
    def op_types(self) -> frozenset[str]:
        return frozenset(self._entries)
