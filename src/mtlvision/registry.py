"""Registries of pluggable parts, and the typed `Spec` a config value that names a part becomes.

A config names a part by a mapping, `model.backbone: {name: resnet18, width: 0.5}` (balancing methods:
`{method: pcgrad, ...}`). At config load the part's registry parses that mapping, once, into a
`Spec`: the entry's name and its parameters as the entry's own dataclass (unknown keys and wrong types
are errors naming the config key). Builders receive the Spec and never parse again.

The registries are created here, each with the package whose modules register into it, and that
package is imported on the first lookup. So `config.py` parses specs without importing models,
balancing or data (no import cycle), and adding a part is one module with one decorator.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable, Generic, Optional, TypeVar

from .errors import ConfigError
from .schema import parse, to_dict

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered factory, its typed parameters and a one-line description."""

    name: str
    factory: Callable[..., T]
    params: Optional[type]
    description: str


@dataclasses.dataclass(frozen=True)
class Spec:
    """A chosen part: registry kind, entry name and its validated parameters (a dataclass, or None).

    `where` is the config key it came from (for error messages); `key` the mapping key that names the
    entry ("name", or "method" for balancing methods). Neither takes part in equality.
    """

    kind: str
    name: str
    params: Any = None
    key: str = dataclasses.field(default="name", compare=False)
    where: str = dataclasses.field(default="", compare=False)

    def to_config(self, full: bool = True) -> dict[str, Any]:
        """The mapping this spec is written as in a config: name plus every parameter (`full=False`: only
        those that differ from the entry's defaults)."""
        params = to_dict(self.params) if self.params is not None else {}
        if not full and self.params is not None:
            default = to_dict(type(self.params)())
            params = {k: v for k, v in params.items() if v != default.get(k, object())}
        return {self.key: self.name, **params}

    def __getitem__(self, key: str) -> Any:
        """Read access as to the config mapping: spec["name"], spec["width"] (parameters are typed)."""
        return self.to_config()[key]

    def replace(self, **changes: Any) -> "Spec":
        """The same part with some parameters changed (a ConfigError for a parameter it does not have)."""
        fields = {f.name for f in dataclasses.fields(self.params)} if self.params is not None else set()
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ConfigError(f"{self.where or self.kind}: {self.kind} {self.name!r} has no parameter(s) {unknown}")
        return dataclasses.replace(self, params=dataclasses.replace(self.params, **changes) if changes else self.params)


class Registry(Generic[T]):
    """Name -> factory map whose entries validate their own parameters (a dataclass).

    `plugins` names the package whose modules register entries; it is imported on first lookup.
    """

    def __init__(self, kind: str, plugins: str, key: str = "name") -> None:
        self.kind, self.plugins, self.key = kind, plugins, key
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.plugins)

    def register(self, name: str, params: Optional[type] = None, description: str = "") -> Callable:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            lines = (factory.__doc__ or "").strip().splitlines()
            desc = description or (lines[0] if lines else "")
            self._entries[name] = Entry(name, factory, params, desc)
            return factory

        return deco

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str, where: str = "") -> Entry[T]:
        self._load()
        if name not in self._entries:
            at = f" at {where}" if where else ""
            close = difflib.get_close_matches(str(name), self._entries, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{at}{hint}; valid: {', '.join(self.names())}")
        return self._entries[name]

    def spec(self, value: "Spec | str | dict[str, Any]", where: str = "") -> Spec:
        """Parse a config value (a name, or a mapping with the name under `key` plus parameters) into a Spec.

        A Spec of this registry's kind is returned as it is.
        """
        where = where or self.kind
        if isinstance(value, Spec):
            if value.kind != self.kind:
                raise ConfigError(f"{where}: expected a {self.kind}, got a {value.kind} ({value.name!r})")
            return value
        if isinstance(value, str):
            value = {self.key: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping with '{self.key}' (a {self.kind}), got {value!r}")
        if self.key not in value:
            raise ConfigError(f"{where}.{self.key}: required key is missing; valid: {', '.join(self.names())}")
        name = value[self.key]
        if not isinstance(name, str):
            raise ConfigError(f"{where}.{self.key}: expected a {self.kind} name, got {name!r}")
        entry = self.get(name, where)
        raw = {k: v for k, v in value.items() if k != self.key}
        if entry.params is None:
            if raw:
                raise ConfigError(f"{where}: {self.kind} {name!r} takes no parameters, got {sorted(raw)}")
            params = None
        else:
            params = parse(entry.params, raw, where)
        return Spec(self.kind, name, params, self.key, where)

    def build(self, spec: "Spec | str | dict[str, Any]", *args: Any, **kwargs: Any) -> T:
        """Call the entry's factory with its parameters (if it has any) and the given arguments."""
        spec = self.spec(spec)
        entry = self.get(spec.name, spec.where)
        if entry.params is None:
            return entry.factory(*args, **kwargs)
        return entry.factory(spec.params, *args, **kwargs)


SOURCES: Registry = Registry("data source", "mtlvision.data.sources")
BACKBONES: Registry = Registry("backbone", "mtlvision.models.backbones")
ARCHITECTURES: Registry = Registry("architecture", "mtlvision.models.architectures")
HEADS: Registry = Registry("head", "mtlvision.models.heads")
METHODS: Registry = Registry("balancing method", "mtlvision.balancing", key="method")
