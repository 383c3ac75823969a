"""A small typed reader: a dataclass built from plain data (parsed YAML), every value checked
against its field's type, choices and range, errors naming the exact dotted key.

Written by hand because the schema is a few dataclasses and the errors must name the exact dotted
key; pydantic would add a dependency for the same thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from ..runtime.errors import ConfigError


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str, meta: dict) -> Any:
    """``value`` checked against type ``tp`` and the field's ``meta`` (choices, min, max)."""
    base, optional = strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must not be null")
    if is_dataclass_type(base):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return build(base, value, key + ".")
    if typing.get_origin(base) is list:
        (item_tp,) = typing.get_args(base)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item_meta = {"choices": meta["choices"]} if meta.get("choices") else {}  # a list's choices are its items'
        return [coerce(v, item_tp, f"{key}[{i}]", item_meta) for i, v in enumerate(value)]
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range check (all its comparisons are false)
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        allowed = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"config key '{key}' must be one of {allowed}; got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"config key '{key}' must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}' must be <= {hi}, got {value!r}")
    return value


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    """``cls`` from ``raw``: unknown keys refused (with the closest known key), values coerced."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = coerce(raw[name], hints[name], prefix + name, dict(f.metadata))
    return cls(**kwargs)
