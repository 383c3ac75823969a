"""The configuration reference (docs/config.md, ``noisystudent config --markdown``) from the schema."""

from __future__ import annotations

import dataclasses
import json
import typing

from .reader import is_dataclass_type, strip_optional
from .schema import Config


def config_reference_markdown() -> str:
    """The configuration reference, generated from the schema's types, defaults and help lines."""
    lines = ["# Configuration reference", "",
             "Generated from `noisystudent.config.schema` by `noisystudent config --markdown`; do not edit.",
             "Override any key on the command line with `--set section.key=value`.", ""]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            tp, _ = strip_optional(hints[f.name])
            if is_dataclass_type(tp):
                subs.append((f, tp))
                continue
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if item is not None and is_dataclass_type(item):
                subs.append((f, item))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = []
            if f.metadata.get("min") is not None:
                bounds.append(f">= {f.metadata['min']}")
            if f.metadata.get("max") is not None:
                bounds.append(f"<= {f.metadata['max']}")
            if f.metadata.get("choices"):
                bounds.append("one of " + ", ".join(str(c) for c in f.metadata["choices"]))
            tname = getattr(tp, "__name__", str(tp))
            rows.append(f"| `{prefix}{f.name}` | {tname} | `{json.dumps(default)}` | "
                        f"{f.metadata.get('help', '')} {'(' + '; '.join(bounds) + ')' if bounds else ''} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "",
                          "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for f, tp in subs:
            is_list = typing.get_origin(strip_optional(hints[f.name])[0]) is list
            walk(tp, f"{prefix}{f.name}{'[i]' if is_list else ''}.")

    walk(Config, "")
    return "\n".join(lines)
