"""The run report: ``build_report(run_dir)`` writes ``RUN/report/report.html`` and ``report.md``.

Modules: :mod:`.collect` (the one reader of a run directory), :mod:`.document` (the document
model and number formatting), :mod:`.sections`, :mod:`.pseudo`, :mod:`.robustness`,
:mod:`.appendix` (the sections), :mod:`.gallery` (pseudo-label thumbnails), :mod:`.plots`,
:mod:`.html` (Jinja2, ``templates/``), :mod:`.markdown`, and :mod:`.build` (writing the files).
"""

from .build import build_report

__all__ = ["build_report"]
