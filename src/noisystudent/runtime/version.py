"""The package's version, read once from the installed metadata (pyproject.toml's ``version``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version(name: str = "noisystudent") -> str:
    """The installed version of ``name``; ``0+unknown`` when imported from a source tree that was
    never installed (no metadata to read)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "0+unknown"
