"""Typed parsing of nested dicts into dataclasses, with errors that name the key path.

Hand-written rather than pydantic to keep the dependency list short: configs are small and the
whole validator is the ~80 lines below.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal, Union

from .errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:  # Annotated[T, parse_fn]: the value is parsed by parse_fn(value, where)
        return tp.__metadata__[0](value, where)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if value is None or a is not type(None)]
        if len(options) == 1:  # Optional[X] with a value: X's own error is the useful one
            return _coerce(options[0], value, where)
        matching = []  # branches of the value's own container kind: their error is the useful one
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                kind = typing.get_origin(arg) or arg
                if (isinstance(value, dict) and (kind is dict or dataclasses.is_dataclass(kind))) or (
                        isinstance(value, list) and kind in (list, tuple)):
                    matching.append(exc)
        if len(matching) == 1:
            raise matching[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (arg, *_) = typing.get_args(tp)
        return [_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        _, arg = typing.get_args(tp)
        return {str(k): _coerce(arg, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: take it as the number it spells
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def parse(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from `data`; unknown keys list the valid ones."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'top level of the config'}: unknown key(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing ({_type_name(hints[name])})")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (for YAML/JSON); objects with `to_config()` give that."""
    if hasattr(obj, "to_config"):
        return obj.to_config()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
