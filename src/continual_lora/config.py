"""Typed configs from plain data: nested dicts -> dataclasses, with errors that name the key.

YAML parsing and ``key=value`` overrides happen in the CLI; this module only sees dicts. Every layer
keeps its own config dataclasses next to the code they configure; this module is how any of them
is built from data. A field whose dataclass depends on the data (the ``benchmark:`` section, whose
``name`` picks the benchmark's own config class) declares a parser in its metadata:
``field(..., metadata={"parse": fn})`` with ``fn(value, dotted_key) -> object``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from .errors import ConfigDeprecationWarning, UserError  # noqa: F401 (ConfigDeprecationWarning: re-exported)

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key is unknown or its value has the wrong type / range. Names the key."""


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields recurse.

    Unknown keys, wrong types and the dataclass's own validation errors raise ConfigError
    with the dotted key (``train.lr``).
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    prefix = f"{path}." if path else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!r}; valid keys here: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        parse = fields[name].metadata.get("parse")
        if parse is not None:
            kwargs[name] = parse(value, prefix + name)
            continue
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value, prefix + name)
            continue
        value = _coerce_sequence(value, hint, prefix + name)
        if not _type_ok(value, hint):
            raise ConfigError(f"config key {prefix}{name}: expected {_describe(hint)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan / .inf
            raise ConfigError(f"config key {prefix}{name}: expected a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and hint is float:
            value = float(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from err


def _coerce_sequence(value: Any, hint: Any, path: str) -> Any:
    """YAML lists -> tuples for tuple fields; dict items -> dataclasses for sequences of dataclasses."""
    if not isinstance(value, list):
        return value
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for option in typing.get_args(hint) if union else (hint,):  # (a tuple hint's own args are its items)
        origin = typing.get_origin(option)
        if origin not in (tuple, list):
            continue
        args = [a for a in typing.get_args(option) if a is not Ellipsis]
        if args and dataclasses.is_dataclass(args[0]):
            value = [from_dict(args[0], v, f"{path}[{i}]") if isinstance(v, dict) else v for i, v in enumerate(value)]
        return tuple(value) if origin is tuple else value
    return value


def _describe(hint: Any) -> str:
    """``one of 'fp32', 'bf16'`` for a Literal, ``int or null`` for a union, else the type's name."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as JSON-able data."""
    if dataclasses.is_dataclass(obj):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        method = getattr(type(obj), "method", None)
        return {"method": method, **out} if isinstance(method, str) and method else out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_ABSENT = object()


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data configs (nested dicts compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new), key=str)
                for k in diff_keys(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def describe_changes(old: dict[str, Any], new: dict[str, Any], keys: list[str], most: int = 5) -> str:
    """``train.lr 0.002 -> 0.5, methods.lilora.rank 8 -> 4`` for the first ``most`` of ``keys``."""

    def get(data: Any, key: str) -> Any:
        for part in key.split("."):
            data = data.get(part, _ABSENT) if isinstance(data, dict) else _ABSENT
        return data

    def show(value: Any) -> str:
        return "(absent)" if value is _ABSENT else repr(value)

    text = ", ".join(f"{k} {show(get(old, k))} -> {show(get(new, k))}" for k in keys[:most])
    return text + (f" (and {len(keys) - most} more)" if len(keys) > most else "")
