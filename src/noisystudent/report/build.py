"""The run report: one self-contained HTML page and its Markdown twin, rebuilt from a run directory.

    build_report(run_dir) -> {"html": RUN/report/report.html, "md": RUN/report/report.md}

The pieces: :mod:`.collect` reads the run (the one reader, through the names of
:mod:`noisystudent.runtime.rundir`), :mod:`.sections` (with :mod:`.pseudo`, :mod:`.robustness`,
:mod:`.appendix`, :mod:`.gallery`, :mod:`.plots`) turns it into a document (:mod:`.document`),
and :mod:`.html` and :mod:`.markdown` render that twice: HTML with every image embedded as a
data URI, Markdown with the images as PNG files beside it in ``RUN/report/``. Every file is
written atomically (temp file + rename), so a reader never sees half a report and rebuilding
while a run goes on is safe. The report never trains or loads a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..runtime.errors import NoisyStudentError
from ..runtime.rundir import REPORT, REPORT_HTML, REPORT_MD
from .collect import collect_run
from .gallery import PER_STRIP, ImageLoader, pool_loader
from .html import iter_report_images, render_html
from ..runtime.files import atomic_write
from .markdown import render_markdown
from .sections import build_document

# PNG files of RUN/report/ the report owns: stale ones (a plot that no longer applies) are removed
PLOT_PREFIXES = ("accuracy", "training", "confidence-", "class-counts-", "reliability-", "robustness-",
                 "confusion-", "gallery-")

__all__ = ["build_report", "iter_report_images"]


def _write_atomic(path: Path, data: bytes) -> None:
    """The run's one write path (temp file of this process, then rename): a pipeline and a user
    rebuilding the same report never see half a file."""
    atomic_write(path, data)


def build_report(run_dir: str | Path, *, load_image: ImageLoader | None = None, pool=None) -> dict[str, Path]:
    """Write ``RUN/report/report.html`` (self-contained) and ``RUN/report/report.md`` (with its PNG
    images beside it) for a run directory, finished or not. Returns ``{"html": path, "md": path}``.

    Thumbnails of the pseudo labels (:func:`noisystudent.report.gallery.pseudo_label_gallery`)
    need the pool's images: ``pool``, the run's :class:`noisystudent.data.pool.UnlabeledSource`
    (read by ``open_item`` when it has ``random_access``), or ``load_image``, a callable
    ``key -> PIL.Image`` reading one pool image by its pseudo-label store key. Without either the
    report has no thumbnails.

    Raises :class:`~noisystudent.runtime.errors.NoisyStudentError` if ``run_dir`` is not a run
    directory or the report cannot be written; unreadable optional files are listed in the report.
    """
    if not getattr(pool, "random_access", False):
        pool = None  # a pool read only as a stream of shards (WebDataset tars) cannot show single images
    run = collect_run(run_dir, gallery_size=PER_STRIP if load_image is not None or pool is not None else 0)
    if load_image is None and pool is not None:
        load_image = pool_loader(pool, [it.gallery for it in run.iterations])
    out = run.root / REPORT
    try:
        out.mkdir(exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise NoisyStudentError(f"report: cannot write {out}: {e.strerror or e}") from None
    doc = build_document(run, load_image)
    try:
        written = set()
        images = [(p.name, p.png) for p in doc.plots()] + [(s.name, s.png) for s in doc.strips() if s.png]
        for name, png in images:
            _write_atomic(out / f"{name}.png", png)
            written.add(f"{name}.png")
        for stale in out.glob("*.png"):
            if stale.name not in written and stale.name.startswith(PLOT_PREFIXES):
                stale.unlink()
        _write_atomic(out / REPORT_MD, render_markdown(doc).encode("utf-8"))
        _write_atomic(out / REPORT_HTML, render_html(doc).encode("utf-8"))
    except OSError as e:
        raise NoisyStudentError(f"report: cannot write {out}: {e.strerror or e}") from None
    return {"html": out / REPORT_HTML, "md": out / REPORT_MD}
