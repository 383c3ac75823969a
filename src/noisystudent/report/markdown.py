"""The report as Markdown (GitHub flavour), the HTML page's twin.

Plots are referenced as ``<name>.png`` files next to ``report.md`` (written by
:func:`noisystudent.report.build.build_report`), each gallery strip as one PNG of its thumbnails
side by side with the confidences as text. Spanning table headers become column-name prefixes.
"""

from __future__ import annotations

import html
import re
from typing import Any

from .document import Bullets, Code, Document, Figures, Gallery, Heading, Row, Table, Text


_CODE_SPAN = re.compile(r"(`[^`]+`)")


def _md(text: Any) -> str:
    """Text for Markdown: ``<``, ``>`` and ``&`` become entities outside code spans, so names from
    the data (class folders, pool paths) never become raw HTML where the report is rendered, as the
    HTML page escapes them too; inside a code span HTML is shown as written, and entities would be."""
    return "".join(part if _CODE_SPAN.fullmatch(part) else html.escape(part, quote=False)
                   for part in _CODE_SPAN.split(str(text)))


def _cell(v: Any) -> str:
    return _md(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(b: Table) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in b.full_columns()) + " |",
             "|" + "|".join("---:" if n else "---" for n in b.numeric) + "|"]
    for i, row in enumerate(b.rows):
        cells = [_cell(v) for v in row]
        if i in b.strong_rows:
            cells = [f"**{c}**" if c and c != "–" else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if b.caption:
        lines += ["", f"Table {b.number}. {_md(b.caption)}"]
    return "\n".join(lines)


def _gallery(g: Gallery) -> str:
    out = [_md(g.note)] if g.note else []
    for label, strips in g.rows:
        out.append(f"**{_md(label)}**")
        for s in strips:
            out.append(f"{_md(s.title)}: ![{_cell(label)}, {_cell(s.title)}]({s.name}.png) "
                       + " · ".join(_cell(t.caption) for t in s.thumbs))
    return "\n\n".join(out)


def _block(b: Any) -> str:
    if isinstance(b, Text):
        if b.kind == "warn":
            return f"> {_md(b.text)}"
        return f"_{_md(b.text)}_" if b.kind == "note" and "_" not in b.text else _md(b.text)
    if isinstance(b, Bullets):
        return "\n".join(f"- {_md(x)}" for x in b.items)
    if isinstance(b, Heading):
        return f"### {_md(b.text)}"
    if isinstance(b, Row):
        return "\n\n".join(_block(x) for x in b.blocks)
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figures):
        return "\n\n".join(f"![{_cell(p.alt)}]({p.name}.png)\n\nFigure {p.number}. {_md(p.caption)}"
                           for p in b.plots)
    if isinstance(b, Gallery):
        return _gallery(b)
    if isinstance(b, Code):
        fence = "```"
        while fence in b.text:
            fence += "`"
        body = f"{fence}{b.lang}\n{b.text}\n{fence}"
        return f"<details><summary>{html.escape(b.summary)}</summary>\n\n{body}\n\n</details>" if b.summary else body
    raise TypeError(f"unknown block {type(b).__name__}")


def render_markdown(doc: Document) -> str:
    """The report as Markdown; plots and gallery strips are referenced as ``<name>.png`` beside it."""
    h = doc.headline
    out = [f"# {_md(doc.title)}", "", f"{_md(doc.subtitle)}", ""]
    if h.cards:
        out += ["| " + " | ".join(_cell(c.label) for c in h.cards) + " |",
                "|" + "|".join("---:" for _ in h.cards) + "|",
                "| " + " | ".join(f"**{_cell(c.value)}**" for c in h.cards) + " |",
                "| " + " | ".join(_cell(c.note) for c in h.cards) + " |", ""]
    out += [_md(h.sentence), ""]
    if h.findings:
        out += [f"> - {_md(f)}" for f in h.findings] + [""]
    out += ["Contents: " + " · ".join(f"[{_md(s.title)}](#{s.id})" for s in doc.sections), ""]
    for s in doc.sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {_md(s.title)}", ""]
        for b in s.blocks:
            out += [_block(b), ""]
    out += ["---", "", _md(doc.footer), ""]
    return "\n".join(out)
