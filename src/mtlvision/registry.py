"""Registries for pluggable parts: adding a backbone, architecture, method or source is one decorator."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, TypeVar

from .errors import ConfigError
from .schema import parse

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered factory, its typed parameters and a one-line description."""

    name: str
    factory: Callable[..., T]
    params: type | None
    description: str


class Registry(Generic[T]):
    """Name -> factory map whose entries validate their own parameters (a dataclass)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type | None = None, description: str = "") -> Callable:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            lines = (factory.__doc__ or "").strip().splitlines()
            desc = description or (lines[0] if lines else "")
            self._entries[name] = Entry(name, factory, params, desc)
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str, where: str = "") -> Entry[T]:
        if name not in self._entries:
            at = f" at {where}" if where else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{at}; valid: {', '.join(self.names())}")
        return self._entries[name]

    def parse_params(self, name: str, params: dict[str, Any], where: str) -> Any:
        """Validate `params` against the entry's dataclass (unknown keys and wrong types are errors)."""
        entry = self.get(name, where)
        if entry.params is None:
            if params:
                raise ConfigError(f"{where}: {self.kind} {name!r} takes no parameters, got {sorted(params)}")
            return None
        return parse(entry.params, params, where)

    def build(self, name: str, params: Any, *args: Any, **kwargs: Any) -> T:
        entry = self.get(name)
        if entry.params is None:
            return entry.factory(*args, **kwargs)
        return entry.factory(params, *args, **kwargs)
