"""A config as plain data: every value in its schema type, and the values that differ from the
schema's defaults (what a config's fingerprint hashes)."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from .reader import strip_optional


def normalised_dict(obj: Any) -> Any:
    """A config dataclass as plain data with every value in its schema type: ints given for float
    keys (the dataclass defaults, or values set in Python) become floats, as loading makes them."""
    if not dataclasses.is_dataclass(obj):
        return obj
    hints = typing.get_type_hints(type(obj))
    return {f.name: _normalised_value(getattr(obj, f.name), hints[f.name]) for f in dataclasses.fields(obj)}


def changed_from_defaults(obj: Any) -> dict:
    """The keys of a config dataclass whose values differ from the schema's defaults, normalised
    (:func:`normalised_dict`); a nested config, and each config in a list (a student), as its own
    changed keys. Two configs differ exactly when these differ, and a key that a later version adds
    at its default is not among them: a fingerprint over them survives the upgrade."""
    hints = typing.get_type_hints(type(obj))
    changed = {}
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        normalised = _normalised_value(value, tp)
        default = _default_of(f)
        # compared as the hash sees them (JSON: a tuple default equals the list a config.yaml reads back)
        if default is not dataclasses.MISSING and _as_json(normalised) == _as_json(_normalised_value(default, tp)):
            continue
        if dataclasses.is_dataclass(value):
            changed[f.name] = changed_from_defaults(value)
        elif isinstance(value, list):  # e.g. students: each one as its own changed keys
            changed[f.name] = [changed_from_defaults(v) if dataclasses.is_dataclass(v) else item
                               for v, item in zip(value, normalised)]
        else:
            changed[f.name] = normalised
    return changed


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _normalised_value(value: Any, tp: Any) -> Any:
    base, _ = strip_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        return normalised_dict(value)
    if typing.get_origin(base) is list and isinstance(value, list):
        (item_tp,) = typing.get_args(base)
        return [_normalised_value(v, item_tp) for v in value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
