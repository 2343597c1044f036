"""The one registry shape behind every plug-in point: criteria, architecture families,
exporters and quantizers.

An entry is a frozen dataclass with a ``name``; the module that defines it registers it at
import time (the shape of timm's ``@register_model``). A duplicate name is a programming
error (``ValueError``); an unknown name is the user's, raised as the registry's typed error
with the registered names listed, so a typo names its fix.

Torch-free, like every module a registry is declared in: the HTTP layer validates names
against these registries without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from flow_compress.errors import FlowCompressError


class _Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)


class Registry(Generic[T]):
    """Named entries of one ``kind`` (used in messages), in registration order."""

    def __init__(self, kind: str, unknown: type[FlowCompressError]) -> None:
        self.kind = kind
        self._unknown = unknown
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry``; a name already registered raises ``ValueError``."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry called ``name`` (plug-ins loaded for a while, tests)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises the registry's error, listing
        the registered names."""
        try:
            return self._entries[name]
        except KeyError:
            raise self._unknown(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
