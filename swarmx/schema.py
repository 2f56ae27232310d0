"""Typed decoding of plain data (msgpack bodies, TOML tables) into frozen dataclasses.

One implementation serves the wire protocol and the config file, so both reject bad input the same
way: a `SchemaError` whose `path` names the offending field (``scheduler.listen``,
``body.gpus[0].uuid``).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import msgspec

T = TypeVar("T")


class SchemaError(ValueError):
    """Bad data at a named place; ``str()`` is one line: ``path: message``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "a boolean",
        }.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def decode(cls: type[T], data: Any, path: str = "", *, strict: bool = True) -> T:
    """Build ``cls`` (a dataclass) from ``data``, checking every field's type.

    ``strict`` rejects unknown keys (config files: a typo must not pass silently); the wire protocol
    passes ``strict=False`` so a newer peer may add fields within one protocol version.
    """
    return typing.cast(T, _convert(cls, data, path, strict))


def _convert(tp: Any, value: Any, path: str, strict: bool) -> Any:
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise SchemaError(path, "must not be empty")
        errors: list[SchemaError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, strict)
            except SchemaError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        choices = get_args(tp)
        if value not in choices:
            raise SchemaError(
                path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SchemaError(path, f"expected a list, got {type(value).__name__}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(item_tp, v, f"{path}[{i}]", strict) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            raise SchemaError(path, f"expected a table, got {type(value).__name__}")
        return {
            _convert(key_tp, k, path, strict): _convert(val_tp, v, _join(path, str(k)), strict)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, value, path, strict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise SchemaError(path, f"must be one of {allowed}, got {value!r}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bytes:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise SchemaError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r:.40}")


def _convert_dataclass(cls: type, value: Any, path: str, strict: bool) -> Any:
    if not isinstance(value, Mapping):
        raise SchemaError(path, f"expected a table, got {type(value).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if strict:
        for key in value:
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise SchemaError(_join(path, str(key)), f"unknown key (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], _join(path, name), strict)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SchemaError(_join(path, name), "missing")
    try:
        return cls(**kwargs)
    except SchemaError as exc:  # raised by __post_init__ checks, with a field-relative path
        raise SchemaError(_join(path, exc.path), exc.message) from None


def encode(obj: Any) -> Any:
    """Dataclasses and Structs to plain dicts/lists (enums to values) for msgpack or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, msgspec.Struct):  # the wire messages
        return {name: encode(getattr(obj, name)) for name in obj.__struct_fields__}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    return obj
