"""Progress bars (tqdm, with rate and ETA) that switch off when quiet or not on a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled(requested: bool = True) -> bool:
    return requested and sys.stderr.isatty()


def progress_bar(iterable: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
                 enabled: bool = True) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when enabled and stderr is a terminal."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, dynamic_ncols=True,
                disable=not progress_enabled(enabled))
