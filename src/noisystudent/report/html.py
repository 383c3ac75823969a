"""The report as one self-contained HTML page, rendered with Jinja2.

The page is ``templates/report.html.j2`` with ``templates/report.css`` inlined: no scripts, no
external resources, every plot and thumbnail a ``data:image/png;base64`` URI, so the single file
can be mailed or attached to an issue. Autoescaping is on; the ``inline`` filter escapes first
and then renders the document model's inline markup (`` `code` ``, ``**bold**``, ``[text](#id)``).
Wide tables wrap their headers, use a smaller font and scroll sideways inside their own box, so
the page itself never does.
"""

from __future__ import annotations

import base64
import functools
import re
import struct
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup, escape

from .document import Cell, Document, Table

TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"


def inline(text: Any) -> Markup:
    """Escape, then render `code`, **bold** and [text](#anchor) links."""
    out = str(escape(str(text)))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\[([^\]]+)\]\((#[\w-]+)\)", r'<a href="\2">\1</a>', out)
    return Markup(out)


def png_size(png: bytes | None) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; (0, 0) if it is not a PNG."""
    if png and png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        return struct.unpack(">II", png[16:24])
    return (0, 0)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _cell_class(t: Table, j: int, starts: set[int], value: Any = None) -> Markup:
    """`` class="num gstart good"`` for cell ``j`` of ``t`` (empty when it has none)."""
    classes = []
    if j < len(t.numeric) and t.numeric[j]:
        classes.append("num")
    if j in starts:
        classes.append("gstart")
    if isinstance(value, Cell) and value.tone:
        classes.append(value.tone)
    return Markup(f' class="{" ".join(classes)}"') if classes else Markup("")


def _unknown(block: Any) -> str:
    raise TypeError(f"unknown block {type(block).__name__}")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("noisystudent.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(inline=inline, data_uri=data_uri)
    env.globals.update(png_size=png_size, cell_class=_cell_class, kind=lambda b: type(b).__name__,
                       unknown=_unknown)
    return env


def stylesheet() -> str:
    return resources.files("noisystudent.report").joinpath("templates", STYLESHEET).read_text(encoding="utf-8")


def render_html(doc: Document) -> str:
    """The report as one self-contained HTML page (inline CSS, images as data URIs, no scripts)."""
    return _environment().get_template(TEMPLATE).render(doc=doc, css=Markup(stylesheet()))


def iter_report_images(html_text: str):
    """The PNG bytes of every data-URI image in a rendered report (for checks and tests)."""
    for m in re.finditer(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text):
        yield base64.b64decode(m.group(1))
