"""The report's document model and number formatting.

The report is assembled once as a tree of plain blocks (text, tables, figures, thumbnail
galleries, code) grouped in sections, and rendered twice: to HTML (:mod:`.html`) and to Markdown
(:mod:`.markdown`). Sections are built by :mod:`.sections`, :mod:`.pseudo`, :mod:`.robustness` and
:mod:`.appendix` from what :mod:`.collect` read; nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

# ============================================================================ blocks


@dataclass
class Cell:
    """A table cell with a CSS class (``good``/``bad``/``muted``) for tone."""

    text: str
    tone: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass
class Text:
    """A paragraph. ``kind``: p, note (muted), warn (boxed). Inline: **bold**, `code`, [a](#id)."""

    text: str
    kind: str = "p"


@dataclass
class Bullets:
    items: list[str]
    kind: str = "p"


@dataclass
class Heading:
    """A sub-heading inside a section; ``id`` makes it a link target."""

    text: str
    id: str = ""


@dataclass
class Table:
    """Rows of cells; ``numeric`` per column (right-aligned), ``groups`` a spanning header row."""

    columns: list[str]
    rows: list[list[str | Cell]]
    numeric: list[bool]
    caption: str = ""
    strong_rows: tuple[int, ...] = ()
    number: int = 0
    groups: list[tuple[str, int]] | None = None  # a header row above: (label, columns spanned)

    def full_columns(self) -> list[str]:
        """Column names with their group prefixed (Markdown has no spanning headers)."""
        if not self.groups:
            return list(self.columns)
        out, i = [], 0
        for label, span in self.groups:
            out += [f"{label} {c}" if label else c for c in self.columns[i:i + span]]
            i += span
        return out + list(self.columns[i:])

    def group_starts(self) -> set[int]:
        """Indices of the first column of each labeled group after the first column (a rule on its left)."""
        starts, i = set(), 0
        for label, span in self.groups or []:
            if label and i:
                starts.add(i)
            i += span
        return starts


@dataclass
class Plot:
    """A PNG figure; ``name`` is its file stem in ``RUN/report/`` (the Markdown twin links it)."""

    name: str
    png: bytes
    caption: str
    alt: str
    number: int = 0


@dataclass
class Figures:
    """Plots shown side by side in HTML (one after another in Markdown)."""

    plots: list[Plot]


@dataclass
class Thumb:
    """A small image of a gallery strip with its caption (e.g. the teacher's confidence)."""

    png: bytes | None  # None: the loader could not read the image
    caption: str
    alt: str


@dataclass
class Strip:
    """A row of thumbnails. ``name``: file stem of the strip's composed PNG in the Markdown twin."""

    title: str
    thumbs: list[Thumb]
    name: str
    png: bytes | None = None  # the thumbnails side by side (for Markdown)


@dataclass
class Gallery:
    """Thumbnail strips grouped in rows (e.g. one row per class: its label and its strips)."""

    rows: list[tuple[str, list[Strip]]]
    note: str = ""


@dataclass
class Row:
    """Blocks (tables, figures) side by side in HTML, one after another in Markdown."""

    blocks: list


@dataclass
class Code:
    text: str
    lang: str = ""
    summary: str = ""  # non-empty: collapsible in HTML


@dataclass
class Card:
    label: str
    value: str
    note: str = ""
    tone: str = ""


@dataclass
class Headline:
    cards: list[Card]
    sentence: str
    findings: list[str] = field(default_factory=list)


@dataclass
class Section:
    id: str
    title: str
    blocks: list


@dataclass
class Document:
    title: str
    subtitle: str
    headline: Headline
    sections: list[Section]
    footer: str

    def plots(self) -> list[Plot]:
        return [p for s in self.sections for b in walk(s.blocks) if isinstance(b, Figures) for p in b.plots]

    def strips(self) -> list[Strip]:
        return [st for s in self.sections for b in walk(s.blocks) if isinstance(b, Gallery)
                for _, strips in b.rows for st in strips]

    def number(self) -> None:
        """Number tables and figures in reading order (Table 1, Figure 1, ...)."""
        tables = figures = 0
        for s in self.sections:
            for b in walk(s.blocks):
                if isinstance(b, Table):
                    tables += 1
                    b.number = tables
                elif isinstance(b, Figures):
                    for p in b.plots:
                        figures += 1
                        p.number = figures


def walk(blocks: list) -> Iterable:
    """Every block, with the blocks of a :class:`Row` in place of the row."""
    for b in blocks:
        if isinstance(b, Row):
            yield from walk(b.blocks)
        else:
            yield b


# ============================================================================ formatting


def is_num(v: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals, or an en dash when absent."""
    return f"{float(v):,.{digits}f}" if is_num(v) else "–"


def fmt_value(v: Any) -> str:
    """An integer as such, any other number with two decimals."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}"
    return fmt(v)


def fmt_int(v: Any) -> str:
    return f"{int(v):,}" if is_num(v) else "–"


def fmt_pct(part: Any, whole: Any, digits: int = 1) -> str:
    """``part`` as a percentage of ``whole``, or an en dash."""
    return f"{100 * part / whole:.{digits}f}%" if is_num(part) and is_num(whole) and whole else "–"


def fmt_delta(v: Any, digits: int = 2, unit: str = "") -> Cell:
    """A signed difference, green when positive and red when negative."""
    if not is_num(v):
        return Cell("–")
    tone = "good" if v > 0 else "bad" if v < 0 else ""
    return Cell(f"{float(v):+.{digits}f}{unit}", tone)


def fmt_seconds(s: Any) -> str:
    if not is_num(s):
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_params(p: Any) -> str:
    if not is_num(p):
        return "–"
    return f"{p / 1e6:.2f} M" if p >= 1e5 else f"{p / 1e3:.1f} k"


def fmt_epochs(v: Any) -> str:
    """3 for 3.0, 1.5 for 1.5."""
    return fmt(v, 0 if is_num(v) and float(v).is_integer() else 1)
