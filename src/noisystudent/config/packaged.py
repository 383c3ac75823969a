"""The configs shipped inside the package (``noisystudent/configs/*.yaml``), found by name.

So ``noisystudent run fashion-mnist`` and the README's ``noisystudent run configs/fashion-mnist.yaml``
work from an installed wheel in any directory, not only from a clone (where ``configs/`` is a link
to the packaged folder). A path that exists is always read as a path first.
"""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from ..runtime.errors import ConfigError

_SUFFIXES = ("", ".yaml", ".yml")


def packaged_configs() -> dict[str, Traversable]:
    """The shipped configs by name (file name without ``.yaml``), sorted."""
    folder = files("noisystudent") / "configs"
    found = {entry.name.rsplit(".", 1)[0]: entry for entry in folder.iterdir()
             if entry.is_file() and entry.name.endswith(".yaml")}
    return dict(sorted(found.items()))


def resolve_config_path(path: str | Path) -> Path | Traversable:
    """The config file ``path`` names: the file itself when it exists, else the packaged config
    that ``NAME``, ``NAME.yaml`` or ``configs/NAME.yaml`` names. Raises a one-line
    :class:`ConfigError` listing the packaged names when it is neither."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"config {p} is a folder, not a YAML file")
    shipped = packaged_configs()
    if p.parent in (Path("."), Path("configs")) and p.suffix in _SUFFIXES:
        name = p.name[: len(p.name) - len(p.suffix)]
        if name in shipped:
            return shipped[name]
    raise ConfigError(f"config file not found: {p} (packaged configs, usable by name from any folder: "
                      f"{', '.join(shipped)}; see `noisystudent config --list`)")


def config_description(config: Path | Traversable) -> str:
    """The first sentence of a config's leading comment block (what ``config --list`` shows)."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(line for line in lines if line)
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text
