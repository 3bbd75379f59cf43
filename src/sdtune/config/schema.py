"""Schema helpers for typed configs: build a dataclass from a mapping, check keys and value types.

A leaf module (it imports only :mod:`sdtune.errors`): the config, the techniques and the model
families all build their sections with it, so none of them has to import another for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from sdtune.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad experiment file: the message names the key, the bad value and the fix."""


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(where, raw, set(fields))
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        values[key] = coerce(value, hints[key], f"{where}.{key}" if where else key)
    missing = [
        name
        for name, spec in fields.items()
        if name not in values
        and spec.default is dataclasses.MISSING
        and spec.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    return cls(**values)


def check_keys(where: str, raw: dict[str, Any], allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"{prefix}{key}: unknown key{hint}; allowed keys: {', '.join(sorted(allowed))}"
            )


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation; numbers written as strings ("1e-5") are parsed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            fail(key, value, "one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            fail(key, value, "a list")
        return [coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, value, "a mapping")
        return value
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):  # a nested section (model.quantize); null = its defaults
        return annotation() if value is None else build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            fail(key, value, "true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "a whole number")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, value, "a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            fail(key, value, "a string")
        return str(value)
    return value


def positive(key: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        fail(key, value, "a positive whole number")


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")
