"""The run report: one self-contained HTML page and its Markdown twin, rebuilt from a run directory.

    build_report(run_dir) -> {"html": RUN/report/report.html, "md": RUN/report/report.md}

The report reads only what the pipeline wrote (config.yaml, manifest.json, data.json,
summary.json, <stage>/metrics.json(l), label-i/pseudo_labels.parquet, label-i/probe.parquet,
select-i/selection.json, finetune/metrics.json, evaluate/robustness.json); every file but the run
directory itself is optional, so a report can be built for a run that is still going, crashed, or
was made by an older version: it shows what exists and says what is missing. It never trains,
loads a model, or imports torch.

The content is assembled once as a small document model (sections of text, tables, figures,
code) and rendered twice: to HTML with the plots embedded as base64 PNG data URIs (a single file
that can be mailed or attached to an issue), and to Markdown with the plots as PNG files next to
it in ``RUN/report/``. Every file is written atomically (temp file + rename), so a reader never
sees half a report and rebuilding while a run goes on is safe.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import plots
from ..runtime.errors import NoisyStudentError

REPORT_DIR = "report"
HTML_NAME = "report.html"
MD_NAME = "report.md"
PLOT_PREFIXES = ("accuracy", "training", "confidence-", "class-counts-", "reliability-", "robustness-")
HIST_BINS = 40
RELIABILITY_BINS = 10
MAX_CLASS_ROWS = 60  # above this many classes the per-class table is summarised

__all__ = ["build_report", "collect_run", "build_document", "render_html", "render_markdown",
           "RunData", "REPORT_DIR"]


# ============================================================================ document model


@dataclass
class Cell:
    """A table cell with a CSS class (``good``/``bad``/``muted``) for tone."""

    text: str
    tone: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass
class Text:
    """A paragraph. ``kind``: p, note (muted), warn (boxed). Inline: **bold**, `code`."""

    text: str
    kind: str = "p"


@dataclass
class Bullets:
    items: list[str]
    kind: str = "p"


@dataclass
class Heading:
    text: str
    id: str = ""


@dataclass
class Table:
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


@dataclass
class Plot:
    name: str  # file stem in RUN/report/
    png: bytes
    caption: str
    alt: str
    number: int = 0


@dataclass
class Figures:
    """Plots shown side by side in HTML (one after another in Markdown)."""

    plots: list[Plot]


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
        return [p for s in self.sections for b in _walk(s.blocks) if isinstance(b, Figures) for p in b.plots]


def _walk(blocks: list) -> Iterable:
    for b in blocks:
        if isinstance(b, Row):
            yield from _walk(b.blocks)
        else:
            yield b


# ============================================================================ reading a run


@dataclass
class Iteration:
    """What the run holds about one labeling + selection step."""

    index: int
    teacher: str = ""  # the stage that labeled
    labels: dict | None = None  # scan of pseudo_labels.parquet
    selection: dict | None = None  # selection.json
    probe: dict | None = None  # arrays from probe.parquet


@dataclass
class RunData:
    """Everything the report shows, read from a run directory (absent files are None)."""

    root: Path
    config: dict | None = None
    config_text: str | None = None
    manifest: dict | None = None
    data: dict | None = None
    summary: dict | None = None
    stages: list[dict] = field(default_factory=list)
    curves: dict[str, list[dict]] = field(default_factory=dict)
    iterations: list[Iteration] = field(default_factory=list)
    finetune: dict | None = None
    robustness: dict | None = None
    problems: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if isinstance(node, list):
                try:
                    node = node[int(part)]
                except (ValueError, IndexError):
                    return default
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return default
        return node

    @property
    def classes(self) -> list[str]:
        cls = (self.data or {}).get("classes")
        return [str(c) for c in cls] if isinstance(cls, list) else []

    @property
    def num_classes(self) -> int | None:
        if self.classes:
            return len(self.classes)
        for it in self.iterations:
            if it.labels and it.labels.get("num_classes"):
                return int(it.labels["num_classes"])
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_json(run: RunData, path: Path, kind: type | tuple = dict) -> Any:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        run.problems.append(f"`{run.rel(path)}` is unreadable ({_first_line(e)}); left out")
        return None
    if not isinstance(obj, kind):
        run.problems.append(f"`{run.rel(path)}` has an unexpected layout; left out")
        return None
    return obj


def _read_jsonl(run: RunData, path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out, bad = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        run.problems.append(f"`{run.rel(path)}` is unreadable ({_first_line(e)}); left out")
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
    if bad:
        run.problems.append(f"`{run.rel(path)}`: {bad} unreadable line(s) skipped")
    return out


def _scan_pseudo_labels(run: RunData, path: Path, threshold: float | None) -> dict | None:
    """Stream the confidence and predicted columns: histogram, per-class counts, metadata."""
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        meta = {}
        raw = (pf.schema_arrow.metadata or {}).get(b"noisystudent")
        if raw:
            meta = json.loads(raw)
        if {"confidence", "predicted"} <= names:
            cols = ["confidence", "predicted"]
        elif {"topk_class", "topk_prob"} <= names:
            cols = ["topk_class", "topk_prob"]
        else:
            raise ValueError("no confidence/predicted or topk columns")
        edges = np.linspace(0, 1, HIST_BINS + 1)
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        per_class = np.zeros(int(meta.get("num_classes") or run.num_classes or 1), dtype=np.int64)
        n = below = 0
        conf_sum = 0.0
        for batch in pf.iter_batches(columns=cols, batch_size=1 << 18):
            if cols[0] == "confidence":
                conf = batch.column(0).to_numpy(zero_copy_only=False).astype(np.float64)
                pred = batch.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
            else:
                k = batch.schema.field(0).type.list_size
                pred = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, k)[:, 0]
                conf = batch.column(1).flatten().to_numpy(zero_copy_only=False).reshape(-1, k)[:, 0]
                conf, pred = conf.astype(np.float64), pred.astype(np.int64)
            hist += np.histogram(np.clip(conf, 0, 1), bins=edges)[0]
            counts = np.bincount(pred[pred >= 0], minlength=len(per_class))
            if len(counts) > len(per_class):
                per_class = np.pad(per_class, (0, len(counts) - len(per_class)))
            per_class += counts
            n += len(conf)
            conf_sum += float(conf.sum())
            if threshold is not None:
                below += int((conf < threshold).sum())
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
        run.problems.append(f"`{run.rel(path)}` is unreadable ({_first_line(e)}); left out")
        return None
    return {"n": n, "hist": hist, "edges": edges, "mean_confidence": conf_sum / n if n else math.nan,
            "below": below if threshold is not None else None, "predicted_per_class": per_class,
            "num_classes": meta.get("num_classes"), "teacher": meta.get("teacher"),
            "temperature": meta.get("temperature"), "hard": meta.get("hard")}


def _read_probe(run: RunData, path: Path) -> dict | None:
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path, columns=["confidence", "predicted", "target"])
        probe = {c: t.column(c).to_numpy(zero_copy_only=False) for c in ("confidence", "predicted", "target")}
    except Exception as e:  # noqa: BLE001
        run.problems.append(f"`{run.rel(path)}` is unreadable ({_first_line(e)}); left out")
        return None
    probe["correct"] = probe["predicted"].astype(np.int64) == probe["target"].astype(np.int64)
    return probe


def _stage_order(name: str) -> tuple[int, int]:
    if name == "teacher":
        return (0, 0)
    m = re.match(r"student-(\d+)$", name)
    return (1, int(m.group(1))) if m else (2, 0)


def collect_run(run_dir: str | Path) -> RunData:
    """Read every report input of a run directory; raises NoisyStudentError if it is not one."""
    root = Path(run_dir)
    if not root.exists():
        raise NoisyStudentError(f"report: run directory {root} does not exist")
    if not root.is_dir():
        raise NoisyStudentError(f"report: {root} is not a directory")
    markers = ("manifest.json", "config.yaml", "summary.json")
    if not any((root / m).is_file() for m in markers):
        raise NoisyStudentError(f"report: {root} is not a run directory (none of {', '.join(markers)})")
    run = RunData(root=root)

    cfg_path = root / "config.yaml"
    if cfg_path.is_file():
        import yaml

        try:
            run.config_text = cfg_path.read_text(encoding="utf-8")
            cfg = yaml.safe_load(run.config_text)
            run.config = cfg if isinstance(cfg, dict) else None
            if run.config is None:
                run.problems.append("`config.yaml` is not a mapping; settings left out")
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            run.problems.append(f"`config.yaml` is unreadable ({_first_line(e)}); settings left out")
    run.manifest = _read_json(run, root / "manifest.json")
    run.data = _read_json(run, root / "data.json")
    run.summary = _read_json(run, root / "summary.json")

    # stages: each finished stage folder's metrics.json, updated by its summary.json entry (the
    # summary may know a stage whose folder is gone, and a running chain has folders it lacks)
    stages: dict[str, dict] = {}
    for d in sorted(root.iterdir(), key=lambda p: _stage_order(p.name)):
        if d.is_dir() and _stage_order(d.name)[0] < 2:
            m = _read_json(run, d / "metrics.json")
            if m is not None:
                stages[d.name] = {**m, "name": d.name}
    for s in (run.summary or {}).get("stages") or []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            stages[s["name"]] = {**stages.get(s["name"], {}), **s}
    # the fix-res fine-tune is shown apart from the chain (a summary may list it as a stage)
    ft_stage = next((stages.pop(k) for k in list(stages) if k.startswith("finetune")), None)
    run.stages = sorted(stages.values(), key=lambda s: _stage_order(s["name"]))
    for s in run.stages:
        recs = _read_jsonl(run, root / s["name"] / "metrics.jsonl")
        if recs:
            run.curves[s["name"]] = recs

    threshold = run.cfg("pseudo.threshold")
    threshold = float(threshold) if isinstance(threshold, (int, float)) else None
    indices = {int(m.group(1)) for p in root.iterdir()
               if p.is_dir() and (m := re.match(r"(?:label|select|student)-(\d+)$", p.name))}
    for i in sorted(indices):
        it = Iteration(index=i, teacher="teacher" if i == 1 else f"student-{i - 1}")
        it.labels = _scan_pseudo_labels(run, root / f"label-{i}" / "pseudo_labels.parquet", threshold)
        if it.labels and it.labels.get("teacher"):
            it.teacher = str(it.labels["teacher"])
        it.selection = _read_json(run, root / f"select-{i}" / "selection.json")
        it.probe = _read_probe(run, root / f"label-{i}" / "probe.parquet")
        run.iterations.append(it)

    run.finetune = _read_json(run, root / "finetune" / "metrics.json") or ft_stage
    ft_curve = _read_jsonl(run, root / "finetune" / "metrics.jsonl")
    if ft_curve:
        run.curves["finetune"] = ft_curve
    run.robustness = _read_json(run, root / "evaluate" / "robustness.json")
    return run


# ============================================================================ formatting


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals, or an en dash when absent."""
    return f"{float(v):,.{digits}f}" if _is_num(v) else "–"


def fmt_value(v: Any) -> str:
    """An integer as such, any other number with two decimals."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}"
    return fmt(v)


def fmt_int(v: Any) -> str:
    return f"{int(v):,}" if _is_num(v) else "–"


def fmt_delta(v: Any, digits: int = 2, unit: str = "") -> Cell:
    if not _is_num(v):
        return Cell("–")
    tone = "good" if v > 0 else "bad" if v < 0 else ""
    return Cell(f"{float(v):+.{digits}f}{unit}", tone)


def fmt_seconds(s: Any) -> str:
    if not _is_num(s):
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_params(p: Any) -> str:
    if not _is_num(p):
        return "–"
    return f"{p / 1e6:.2f} M" if p >= 1e5 else f"{p / 1e3:.1f} k"


def _finetune(run: RunData) -> dict | None:
    """The fine-tune's numbers, its resolution taken from the last student's test_size if unrecorded."""
    ft = _ft_numbers(run.finetune)
    if ft and ft["image_size"] is None:
        students = run.cfg("students")
        if isinstance(students, list) and students and isinstance(students[-1], dict):
            ft["image_size"] = students[-1].get("test_size") if _is_num(students[-1].get("test_size")) else None
    return ft


def _ft_numbers(ft: dict | None) -> dict | None:
    """Accuracies before and after the fix-res fine-tune, from any of the layouts it may have:
    flat ``{"test_top1_after", "test_top1_before", "val_top1_after", ..}`` (FinetuneResult.metrics),
    nested ``{"before": {"top1" | "test_top1"..}, "after": {..}}``, or a stage-like ``{"test_top1"..}``.
    Returns ``{"top1", "top5", "val_top1", "before_top1", "seconds", "image_size", "model"}`` or None."""
    if not isinstance(ft, dict):
        return None

    def pick(d: Any, *keys: str) -> Any:
        if isinstance(d, dict):
            for k in keys:
                if _is_num(d.get(k)):
                    return d[k]
        return None

    def first(*values: Any) -> Any:
        return next((v for v in values if v is not None), None)

    after, before = ft.get("after"), ft.get("before")
    out = {"top1": first(pick(after, "test_top1", "top1"), pick(ft, "test_top1_after", "test_top1", "top1_after")),
           "top5": first(pick(after, "test_top5", "top5"), pick(ft, "test_top5_after", "test_top5", "top5_after")),
           "val_top1": first(pick(after, "val_top1"), pick(ft, "val_top1_after", "val_top1")),
           "before_top1": first(pick(before, "test_top1", "top1"), pick(ft, "test_top1_before", "top1_before")),
           "seconds": pick(ft, "seconds"), "image_size": pick(ft, "test_size", "image_size"),
           "model": ft.get("model") if isinstance(ft.get("model"), str) else None}
    return out if out["top1"] is not None else None


# ============================================================================ building the document


class _Numbering:
    def __init__(self) -> None:
        self.fig = 0
        self.tab = 0


def build_document(run: RunData) -> Document:
    """Assemble the report's content (no I/O)."""
    name = run.root.resolve().name
    teacher = next((s for s in run.stages if s["name"] == "teacher"), None)
    students = [s for s in run.stages if s["name"].startswith("student-")]
    sections = [_results_section(run, teacher, students), _data_section(run), _pseudo_section(run)]
    if run.robustness is not None:
        sections.append(_robustness_section(run))
    sections.append(_config_section(run))
    sections.append(_run_section(run))
    sections = [s for s in sections if s is not None]
    nums = _Numbering()
    for s in sections:
        for b in _walk(s.blocks):
            if isinstance(b, Table):
                nums.tab += 1
                b.number = nums.tab
            elif isinstance(b, Figures):
                for p in b.plots:
                    nums.fig += 1
                    p.number = nums.fig
    from .. import __version__

    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    source = run.cfg("data.source") or "?"
    if run.cfg("data.name"):
        source += f" ({run.cfg('data.name')})"
    return Document(
        title=f"Noisy Student report: {name}",
        subtitle=f"{source} · {len(students)} iteration{'s' if len(students) != 1 else ''} · {run.root}",
        headline=_headline(run, teacher, students),
        sections=sections,
        footer=f"Generated by noisystudent {__version__} on {now} from `{run.root}`. "
               f"Rebuild at any time with `noisystudent report {run.root}`.")


def _expected_stages(run: RunData) -> list[str] | None:
    students = run.cfg("students")
    if not isinstance(students, list):
        return None
    names = ["teacher"]
    for i in range(1, len(students) + 1):
        names += [f"label-{i}", f"select-{i}", f"student-{i}"]
    return names


def _headline(run: RunData, teacher: dict | None, students: list[dict]) -> Headline:
    cards: list[Card] = []
    findings: list[str] = []
    final = students[-1] if students else None
    t1 = teacher.get("test_top1") if teacher else None
    f1 = final.get("test_top1") if final else None
    if teacher:
        cards.append(Card("Teacher test top-1", f"{fmt(t1)}%" if _is_num(t1) else "–",
                          f"{teacher.get('model', '?')}, {fmt_int(teacher.get('num_labeled'))} labeled images"))
    if final:
        cards.append(Card("Final student test top-1", f"{fmt(f1)}%" if _is_num(f1) else "–",
                          f"{final['name']} · {final.get('model', '?')}"))
    if _is_num(t1) and _is_num(f1):
        delta = f1 - t1
        cards.append(Card("Change", f"{delta:+.2f} pts", "final student − teacher, test top-1",
                          "good" if delta > 0 else "bad" if delta < 0 else ""))
        t_err, f_err = 100 - t1, 100 - f1
        if t_err > 0:
            closed = 100 * (t_err - f_err) / t_err
            cards.append(Card("Relative error reduction", f"{closed:.0f}%",
                              f"test error {t_err:.2f}% → {f_err:.2f}%",
                              "good" if closed > 0 else "bad" if closed < 0 else ""))
    ft = _finetune(run)
    if ft:
        note = f"at {ft['image_size']} px" if ft.get("image_size") else "fix-res"
        if _is_num(ft.get("before_top1")):
            note += f", from {fmt(ft['before_top1'])}%"
        cards.append(Card("After fix-res fine-tune", f"{fmt(ft['top1'])}%", note))

    # one sentence in words
    d = run.data or {}
    source = run.cfg("data.source") or "the data"
    if run.cfg("data.name"):
        source = str(run.cfg("data.name"))
    n_cls = run.num_classes
    total = (run.summary or {}).get("seconds")
    if not _is_num(total) and run.manifest:
        total = sum(v.get("seconds", 0) for v in (run.manifest.get("stages") or {}).values()
                    if isinstance(v, dict) and _is_num(v.get("seconds"))) or None
    parts = [f"{len(students)} iteration{'s' if len(students) != 1 else ''} of Noisy Student on **{source}**"]
    if d:
        parts.append(f"{fmt_int(d.get('num_labeled'))} labeled and {fmt_int(d.get('num_unlabeled'))} unlabeled "
                     f"images" + (f", {n_cls} classes" if n_cls else ""))
    if _is_num(total):
        parts.append(f"{fmt_seconds(total)} in all")
    sentence = ", ".join(parts[:1]) + (" (" + "; ".join(parts[1:]) + ")." if len(parts) > 1 else ".")
    if final and _is_num(final.get("val_top1")) and _is_num(f1):
        gap = final["val_top1"] - f1
        sentence += (f" The final student scores {fmt(final['val_top1'])}% on validation and {fmt(f1)}% on test: "
                     f"a val − test gap of {gap:+.2f} points.")
    if not run.stages:
        sentence = "No stage has finished yet."

    # findings worth a reader's attention
    expected = _expected_stages(run)
    done = list((run.manifest or {}).get("stages") or {})
    if expected and any(s not in done for s in expected):
        missing = [s for s in expected if s not in done]
        findings.append(f"The run is incomplete: {len(expected) - len(missing)} of {len(expected)} stages finished; "
                        f"next: `{missing[0]}`. The report shows what exists.")
    prev = teacher
    for s in students:
        if prev and _is_num(s.get("test_top1")) and _is_num(prev.get("test_top1")) \
                and s["test_top1"] < prev["test_top1"]:
            findings.append(f"`{s['name']}` ({fmt(s['test_top1'])}%) is below its teacher `{prev['name']}` "
                            f"({fmt(prev['test_top1'])}%) on test top-1.")
        if prev and _is_num(s.get("params")) and _is_num(prev.get("params")) and s["params"] < prev["params"]:
            findings.append(f"`{s['name']}` is smaller than its teacher; the paper uses equal-or-larger students.")
        prev = s
    for it in run.iterations:
        sel = it.selection or {}
        if _is_num(sel.get("num_selected")) and sel["num_selected"] == 0:
            findings.append(f"Iteration {it.index} selected no pseudo-labeled images (all below the threshold "
                            f"{run.cfg('pseudo.threshold')}): `student-{it.index}` trained on labeled images only.")
    if run.problems:
        findings.append(f"{len(run.problems)} file(s) could not be read; see [Run](#run).")
    return Headline(cards, sentence, findings)


def _results_section(run: RunData, teacher: dict | None, students: list[dict]) -> Section:
    blocks: list = []
    if not run.stages:
        return Section("results", "Results", [Text("No stage has finished yet: no results.", "note")])
    t1 = teacher.get("test_top1") if teacher else None
    rows, strong = [], ()
    for s in run.stages:
        best = s.get("best_epoch")
        rows.append([s["name"], str(s.get("model", "–")), fmt_params(s.get("params")), fmt_int(s.get("image_size")),
                     fmt_int(s.get("num_pseudo")), fmt(s.get("val_top1")),
                     fmt(s.get("val_top5")), fmt(s.get("test_top1")), fmt(s.get("test_top5")),
                     fmt_delta(s["test_top1"] - t1) if _is_num(s.get("test_top1")) and _is_num(t1) and s is not teacher
                     else Cell("–"),
                     f"{fmt_int(best)} / {fmt(s.get('epochs'), 0 if float(s.get('epochs') or 0).is_integer() else 1)}"
                     if _is_num(best) else "–",
                     fmt_seconds(s.get("seconds"))])
    if students:
        strong = (len(rows) - 1,)
    ft = _finetune(run)
    last = students[-1] if students else teacher
    if ft:
        rows.append([f"{last['name'] if last else ''} + fix-res",
                     str(ft.get("model") or (last or {}).get("model", "–")),
                     "–", fmt_int(ft.get("image_size")), "–", fmt(ft.get("val_top1")), "–", fmt(ft["top1"]),
                     fmt(ft.get("top5")), fmt_delta(ft["top1"] - t1) if _is_num(t1) else Cell("–"), "–",
                     fmt_seconds(ft.get("seconds"))])
    blocks.append(Table(
        ["stage", "model", "params", "px", "pseudo", "val top-1", "val top-5", "test top-1",
         "test top-5", "Δ test", "best epoch", "time"], rows,
        [False, False] + [True] * 10,
        "Each stage's model at its best validation epoch (the test split is never used to choose it). "
        f"Accuracies in %; Δ test: test top-1 minus the teacher's; px: training resolution; pseudo: "
        f"pseudo-labeled rows the student trained on (duplicates from balancing counted) besides the "
        f"{fmt_int((teacher or {}).get('num_labeled'))} labeled images every stage trains on.", strong))
    labels = [f"{s['name']}\n{s.get('model', '')}" for s in run.stages]
    val = [s.get("val_top1") for s in run.stages]
    test = [s.get("test_top1") for s in run.stages]
    if ft:
        labels.append("fix-res")
        val.append(ft.get("val_top1"))
        test.append(ft["top1"])
    figs = []
    png = plots.accuracy_by_iteration(labels, val, test)
    if png:
        figs.append(Plot("accuracy", png, "Accuracy by iteration: validation and test top-1 of the teacher and "
                                          "each student (each student is the next iteration's teacher).",
                         "accuracy by iteration"))
    png = plots.training_curves(run.curves)
    if png:
        figs.append(Plot("training-curves", png, "Training curves: validation top-1 (left) and smoothed training "
                                                 "loss (right) per epoch of each stage.", "training curves"))
    if figs:
        blocks.append(Figures(figs))
    return Section("results", "Results", blocks)


def _data_section(run: RunData) -> Section:
    blocks: list = []
    d = run.data
    if d is None:
        blocks.append(Text("No `data.json`: the data split was not recorded.", "note"))
    else:
        def span(counts: Any) -> str:
            if isinstance(counts, list) and counts and all(_is_num(c) for c in counts):
                lo, hi = min(counts), max(counts)
                return f"{lo:,}" if lo == hi else f"{lo:,} – {hi:,}"
            return "–"

        rows = [["labeled (train)", fmt_int(d.get("num_labeled")), span(d.get("labeled_per_class")),
                 "the teacher's training set; every student trains on it too"],
                ["unlabeled pool", fmt_int(d.get("num_unlabeled")), "–",
                 "labels hidden or absent; the teacher labels it"],
                ["validation", fmt_int(d.get("num_val")), span(d.get("val_per_class")),
                 "model selection (best epoch); the reliability probe"],
                ["test", fmt_int(d.get("num_test")), span(d.get("test_per_class")), "reported only"]]
        blocks.append(Table(["split", "images", "per class", "role"], rows, [False, True, True, False],
                            f"The splits of the data source `{run.cfg('data.source', '?')}`"
                            + (f", {len(run.classes)} classes." if run.classes else ".")))
    sel_rows = []
    for it in run.iterations:
        sel = it.selection or {}
        kept = sel.get("kept_per_class")
        kept_n = sum(kept) if isinstance(kept, list) and all(_is_num(k) for k in kept) else None
        pool = it.labels["n"] if it.labels else (d or {}).get("num_unlabeled")
        num_sel, uniq = sel.get("num_selected"), sel.get("num_unique")
        dup = (num_sel - uniq) if _is_num(num_sel) and _is_num(uniq) else None
        sel_rows.append([str(it.index), it.teacher, fmt_int(pool), fmt_int(sel.get("num_below_threshold")),
                         fmt_int(kept_n), f"{100 * kept_n / pool:.1f}%" if _is_num(kept_n) and _is_num(pool) and pool
                         else "–", fmt_int(sel.get("per_class")) if sel.get("per_class") is not None
                         else ("off" if sel else "–"), fmt_int(num_sel), fmt_int(uniq), fmt_int(dup)])
    if sel_rows:
        thr = run.cfg("pseudo.threshold")
        blocks.append(Table(["iteration", "labeled by", "pool", "below threshold", "kept", "kept %", "K per class",
                             "selected rows", "unique images", "duplicates"], sel_rows,
                            [True, False] + [True] * 8,
                            f"Pseudo-label selection per iteration: images whose confidence is below the threshold "
                            f"({thr if thr is not None else '?'}) are dropped; balancing keeps the K most confident "
                            f"images of each predicted class and duplicates under-full classes up to K."))
    table = _per_class_table(run)
    if table is not None:
        blocks.append(table)
    return Section("data", "Data", blocks)


def _per_class_table(run: RunData) -> Table | None:
    d = run.data or {}
    columns: list[tuple[str, str, list]] = []  # (group, name, values)
    for key, label in (("labeled_per_class", "labeled"), ("val_per_class", "val"), ("test_per_class", "test")):
        if isinstance(d.get(key), list):
            columns.append(("", label, d[key]))
    for it in run.iterations:
        group = f"iteration {it.index}"
        if it.labels is not None:
            columns.append((group, "predicted", it.labels["predicted_per_class"].tolist()))
        sel = it.selection or {}
        if isinstance(sel.get("kept_per_class"), list):
            columns.append((group, "kept", sel["kept_per_class"]))
        if isinstance(sel.get("selected_per_class"), list):
            columns.append((group, "selected", sel["selected_per_class"]))
        if it.probe is not None:
            columns.append((group, "probe acc.", _probe_class_accuracy(it.probe, len(run.classes) or None)))
    if not columns:
        return None
    n = max(len(c) for _, _, c in columns)
    names = run.classes + [str(i) for i in range(len(run.classes), n)]
    is_acc = [label == "probe acc." for _, label, _ in columns]

    def cell(values: list, i: int, acc: bool) -> str:
        v = values[i] if i < len(values) else None
        return fmt(v, 0) if acc else fmt_int(v)

    caption = ("Images per class: the labeled splits (true labels), then for each iteration the pool's "
               "images by predicted class (all, kept after the threshold, selected after balancing)"
               + (" and the teacher's accuracy on the probe's images of that class (%)." if any(is_acc) else "."))
    if n <= MAX_CLASS_ROWS:
        rows = [[names[i]] + [cell(v, i, a) for (_, _, v), a in zip(columns, is_acc)] for i in range(n)]
    else:
        rows = []
        for stat, fn in (("min", np.nanmin), ("median", np.nanmedian), ("max", np.nanmax), ("total", np.nansum)):
            row = [stat]
            for (_, _, v), a in zip(columns, is_acc):
                arr = np.asarray([x if _is_num(x) else np.nan for x in v], dtype=np.float64)
                row.append("–" if (a and stat == "total") or not np.isfinite(arr).any()
                           else (fmt(fn(arr), 0) if a else fmt_int(fn(arr))))
            rows.append(row)
        caption = f"{n} classes, summarised (min, median, max, total over classes). " + caption
    groups: list[tuple[str, int]] = [("", 1)]
    for group, _, _ in columns:
        if groups[-1][0] == group:
            groups[-1] = (group, groups[-1][1] + 1)
        else:
            groups.append((group, 1))
    return Table(["class"] + [label for _, label, _ in columns], rows, [False] + [True] * len(columns), caption,
                 groups=groups if any(g for g, _ in groups) else None)


def _probe_class_accuracy(probe: dict, num_classes: int | None) -> list:
    target = probe["target"].astype(np.int64)
    n = max(num_classes or 0, int(target.max()) + 1 if target.size else 0)
    count = np.bincount(target, minlength=n)
    hits = np.bincount(target, weights=probe["correct"].astype(np.float64), minlength=n)
    return [100 * h / c if c else None for h, c in zip(hits, count)]


def _pseudo_section(run: RunData) -> Section:
    if not run.iterations:
        return Section("pseudo-labels", "Pseudo labels",
                       [Text("No labeling stage has run yet.", "note")])
    blocks: list = []
    thr = run.cfg("pseudo.threshold")
    thr = float(thr) if _is_num(thr) else None
    rows = []
    stats_by_it = {}
    has_probe = any(it.probe is not None for it in run.iterations)
    for it in run.iterations:
        lab = it.labels or {}
        row = [str(it.index), it.teacher, fmt_int(lab.get("n")),
               fmt(100 * lab["mean_confidence"], 1) if _is_num(lab.get("mean_confidence")) else "–",
               f"{100 * lab['below'] / lab['n']:.1f}%" if _is_num(lab.get("below")) and lab.get("n") else "–"]
        if it.probe is not None and len(it.probe["confidence"]):
            st = plots.calibration(it.probe["confidence"], it.probe["correct"], RELIABILITY_BINS)
            stats_by_it[it.index] = st
            conf = it.probe["confidence"].astype(np.float64)
            kept = conf >= thr if thr is not None else np.ones_like(conf, dtype=bool)
            row += [fmt_int(st["n"]), fmt(100 * st["accuracy_all"], 1), fmt(100 * st["mean_confidence"], 1),
                    fmt(100 * st["ece"], 1), f"{100 * kept.mean():.1f}%",
                    fmt(100 * it.probe["correct"][kept].mean(), 1) if kept.any() else "–"]
        elif has_probe:
            row += ["–"] * 6
        rows.append(row)
    columns = ["iteration", "labeled by", "pool", "mean conf.", "below threshold"]
    caption = ("The teacher's pseudo labels. pool: unlabeled images labeled; mean conf.: mean top-1 "
               "confidence (%); below threshold: the share dropped.")
    if has_probe:
        columns += ["probe images", "probe acc.", "probe conf.", "ECE", "probe kept", "kept acc."]
        caption += (" The probe is the labeled validation split labeled the same way, so pseudo-label quality "
                    "can be measured: probe acc. is the pseudo labels' accuracy, probe conf. their mean "
                    "confidence, ECE the expected calibration error (%), probe kept the share above the "
                    "threshold and kept acc. the accuracy of those kept.")
    blocks.append(Table(columns, rows, [True, False] + [True] * (len(columns) - 2), caption))
    if not has_probe:
        blocks.append(Text("No probe files (`label-i/probe.parquet`): this run did not record the teacher's "
                           "predictions on labeled images, so the reliability diagram and pseudo-label accuracy "
                           "are not available.", "note"))
    nc = run.num_classes
    for it in run.iterations:
        blocks.append(Heading(f"Iteration {it.index}: {it.teacher} labels the pool", f"iteration-{it.index}"))
        figs = []
        lab = it.labels
        if lab is not None:
            png = plots.confidence_histogram(lab["hist"], lab["edges"], thr, nc)
            if png:
                mode = ("hard labels" if lab.get("hard") else
                        f"soft labels, T = {lab['temperature']:g}" if _is_num(lab.get("temperature")) else "")
                figs.append(Plot(f"confidence-{it.index}", png,
                                 f"Iteration {it.index}: the teacher's top-1 confidence on {fmt_int(lab['n'])} "
                                 f"unlabeled images{' (' + mode + ')' if mode else ''}; bins below the threshold "
                                 f"(dashed) are dropped" + (", the dotted line is chance (1/classes)." if nc else "."),
                                 f"confidence histogram, iteration {it.index}"))
        sel = it.selection or {}
        png = plots.class_counts(run.classes, lab["predicted_per_class"] if lab else None, sel.get("kept_per_class"),
                                 sel.get("selected_per_class"), sel.get("per_class") if _is_num(sel.get("per_class"))
                                 else None)
        if png:
            figs.append(Plot(f"class-counts-{it.index}", png,
                             f"Iteration {it.index}: pseudo-labeled images per predicted class before the threshold, "
                             f"after it, and after balancing to K per class (duplicates counted).",
                             f"per-class counts, iteration {it.index}"))
        if it.probe is not None:
            png = plots.reliability_diagram(it.probe["confidence"], it.probe["correct"], RELIABILITY_BINS)
            if png:
                st = stats_by_it.get(it.index) or {}
                figs.append(Plot(f"reliability-{it.index}", png,
                                 f"Iteration {it.index}: reliability diagram on the probe ({fmt_int(st.get('n'))} "
                                 f"labeled validation images, labeled by the same teacher): pseudo-label accuracy "
                                 f"against confidence in {RELIABILITY_BINS} bins, images per bin on the bars; on the "
                                 f"diagonal the teacher is calibrated. ECE {fmt(100 * st.get('ece', math.nan), 1)}%. "
                                 "The validation split chose the teacher's best epoch, so this is slightly optimistic.",
                                 f"reliability diagram, iteration {it.index}"))
        if figs:
            blocks.append(Figures(figs))
        elif lab is None and it.selection is None:
            blocks.append(Text("Nothing recorded for this iteration yet.", "note"))
    return Section("pseudo-labels", "Pseudo labels", blocks)


# ------------------------------------------------------------------------------ robustness

_KNOWN_SUITES = {"clean", "corruptions", "perturbations", "fgsm", "pgd", "natural_adversarial"}
_META_KEYS = {"n_images", "seed"}


def _robustness_section(run: RunData) -> Section:
    rob = run.robustness or {}
    models = {k: v for k, v in rob.items() if isinstance(v, dict) and (_KNOWN_SUITES & set(v) or
                                                                     any(isinstance(x, dict) for x in v.values()))}
    blocks: list = []
    if not models:
        return Section("robustness", "Robustness", [Text("`evaluate/robustness.json` holds no model results.", "note")])
    model_label = {s["name"]: f"{s['name']} ({s.get('model', '?')})" for s in run.stages}
    n_img = {m.get("n_images") for m in models.values() if _is_num(m.get("n_images"))}
    blocks.append(Text("Evaluated on "
                       + (f"{fmt_int(next(iter(n_img)))} test images" if len(n_img) == 1 else "the test split")
                       + ": " + ", ".join(f"`{model_label.get(k, k)}`" for k in models)
                       + ". Accuracies and errors in %; lower error and flip probability are better.", "note"))

    def get(res: dict, *path: str) -> Any:
        node: Any = res
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node

    def last(res: dict, suite: str) -> Any:
        v = get(res, suite, "top1")
        return v[-1] if isinstance(v, list) and v else None

    def eps_max(suite: str) -> str:
        eps = [get(r, suite, "eps") for r in models.values()]
        eps = [e[-1] for e in eps if isinstance(e, list) and e and _is_num(e[-1])]
        return f" (eps {eps[0]:g})" if eps and len(set(eps)) == 1 else " (largest eps)"

    candidates = [
        ("clean top-1", lambda r: get(r, "clean", "top1")), ("clean top-5", lambda r: get(r, "clean", "top5")),
        ("corruption error", lambda r: get(r, "corruptions", "mean_error")),
        ("mCE", lambda r: get(r, "corruptions", "mce")),
        ("relative mCE", lambda r: get(r, "corruptions", "relative_mce")),
        ("flip prob.", lambda r: get(r, "perturbations", "mean_flip_prob")),
        ("mFR", lambda r: get(r, "perturbations", "mfr")), ("mT5D", lambda r: get(r, "perturbations", "mt5d")),
        ("FGSM top-1" + eps_max("fgsm"), lambda r: last(r, "fgsm")),
        ("PGD top-1" + eps_max("pgd"), lambda r: last(r, "pgd")),
        ("natural adv. top-1", lambda r: get(r, "natural_adversarial", "top1")),
    ]
    cols = [(label, fn) for label, fn in candidates if any(_is_num(fn(r)) for r in models.values())]
    if cols:
        blocks.append(Table(["model"] + [c for c, _ in cols],
                            [[model_label.get(m, m)] + [fmt(fn(r)) for _, fn in cols] for m, r in models.items()],
                            [False] + [True] * len(cols),
                            "Robustness summary. Corruption error: mean over the ImageNet-C corruptions and "
                            "severities; "
                            "mCE / relative mCE and mFR are normalised by AlexNet (ImageNet models only); flip prob.: "
                            "mean flip probability over the perturbation sequences; mT5D: mean top-5 distance."))
    # corruptions: a table per corruption, the plot below it (two panels, full width)
    errs = {m: get(r, "corruptions", "error") for m, r in models.items()}
    errs = {m: e for m, e in errs.items() if isinstance(e, dict) and e}
    if errs:
        blocks.append(Heading("Corruptions", "robustness-corruptions"))
        names = list(dict.fromkeys(n for e in errs.values() for n in e))
        ces = {m: get(models[m], "corruptions", "ce") for m in errs}
        has_ce = any(isinstance(c, dict) and c for c in ces.values())
        rows = []
        for n in names:
            row = [n.replace("_", " ")]
            for m, e in errs.items():
                v = e.get(n)
                ok = isinstance(v, list) and v and all(_is_num(x) for x in v)
                row.append(fmt(float(np.mean(v))) if ok else "–")
            if has_ce:
                row += [fmt((ces[m] or {}).get(n)) if isinstance(ces[m], dict) else "–" for m in errs]
            rows.append(row)
        groups = [("", 1), ("error (%)", len(errs))] + ([("CE (%)", len(errs))] if has_ce else [])
        table = Table(["corruption"] + list(errs) * (2 if has_ce else 1), rows,
                      [False] + [True] * (len(errs) * (2 if has_ce else 1)),
                      "Error per corruption, averaged over severities"
                      + ("; CE: the error relative to AlexNet's (100 = AlexNet)." if has_ce else "."), groups=groups)
        png = plots.corruption_plot(errs)
        fig = [Figures([Plot("robustness-corruptions", png, "Corruptions: error against severity, averaged over "
                             "corruptions (left), and error per corruption, averaged over severities (right).",
                             "corruption error plot")])] if png else []
        blocks += [table] + fig
    # perturbations: table and plot side by side
    key = "fr" if all(isinstance(get(r, "perturbations", "fr"), dict) for r in models.values()
                      if get(r, "perturbations")) else "flip_prob"
    pert = {m: get(r, "perturbations", key) for m, r in models.items()}
    pert = {m: p for m, p in pert.items() if isinstance(p, dict) and p}
    if pert:
        blocks.append(Heading("Perturbations", "robustness-perturbations"))
        names = list(dict.fromkeys(n for p in pert.values() for n in p))
        t5 = {m: get(models[m], "perturbations", "t5d") for m in pert}
        has_t5 = any(isinstance(t, dict) and t for t in t5.values())
        label = "flip rate (% of AlexNet)" if key == "fr" else "flip probability (%)"
        words = "flip rate, in % of AlexNet's" if key == "fr" else "flip probability, in %"
        rows = [[n.replace("_", " ")] + [fmt(p.get(n)) for p in pert.values()]
                + ([fmt((t5[m] or {}).get(n)) if isinstance(t5[m], dict) else "–" for m in pert] if has_t5 else [])
                for n in names]
        groups = [("", 1), ("FR" if key == "fr" else "flip prob.", len(pert))]
        groups += [("T5D", len(pert))] if has_t5 else []
        row: list = [Table(["perturbation"] + list(pert) * (2 if has_t5 else 1), rows,
                           [False] + [True] * (len(pert) * (2 if has_t5 else 1)),
                           f"Perturbation stability: how often the top-1 prediction flips between consecutive frames "
                           f"({words})" + (" and the top-5 distance (T5D, in ranks)." if has_t5 else "."),
                           groups=groups)]
        png = plots.perturbation_plot(pert, label)
        if png:
            row.append(Figures([Plot("robustness-perturbations", png, f"Perturbations: {words} per perturbation "
                                     "and model; lower is more stable.", "perturbation flip plot")]))
        blocks.append(Row(row))
    # adversarial attacks: table and plot side by side
    curves: dict[str, dict] = {}
    for m, r in models.items():
        for suite in ("fgsm", "pgd"):
            eps, top1 = get(r, suite, "eps"), get(r, suite, "top1")
            if isinstance(eps, list) and isinstance(top1, list) and len(eps) == len(top1) and eps \
                    and all(_is_num(e) for e in eps):
                steps = get(r, suite, "steps")
                kind = suite.upper() + (f"-{steps}" if suite == "pgd" and steps else "")
                curves.setdefault(m, {})[kind] = (eps, top1)
    if curves:
        blocks.append(Heading("Adversarial attacks", "robustness-attacks"))
        series = [(m, kind, dict(zip(map(float, e), t))) for m, d in curves.items() for kind, (e, t) in d.items()]
        all_eps = sorted({e for _, _, d in series for e in d})
        row = [Table(["eps"] + [kind for _, kind, _ in series],
                     [[f"{e:g}"] + [fmt(d.get(e)) for _, _, d in series] for e in all_eps],
                     [True] * (1 + len(series)),
                     "Top-1 accuracy (%) under white-box FGSM and PGD attacks of size eps (0-255 pixel units).",
                     groups=[("", 1)] + [(m, len(d)) for m, d in curves.items()])]
        png = plots.attack_plot(curves)
        if png:
            row.append(Figures([Plot("robustness-attacks", png, "Adversarial attacks: top-1 accuracy against eps; "
                                     "FGSM solid, PGD dashed.", "adversarial accuracy plot")]))
        blocks.append(Row(row))
    # anything else, shown as flat scalar values
    extra: dict[str, dict[str, Any]] = {}
    for m, r in models.items():
        for suite, val in r.items():
            if suite in _KNOWN_SUITES or suite in _META_KEYS:
                continue
            for k, v in (val.items() if isinstance(val, dict) else [("", val)]):
                if _is_num(v):
                    extra.setdefault(f"{suite}.{k}" if k else suite, {})[m] = v
    other_top = {k: v for k, v in rob.items() if k not in models and _is_num(v)}
    if extra or other_top:
        blocks.append(Heading("Other results", "robustness-other"))
        row = []
        if extra:
            ms = list(models)
            row.append(Table(["result"] + ms, [[k] + [fmt_value(v.get(m)) for m in ms] for k, v in extra.items()],
                             [False] + [True] * len(ms), "Other results in `evaluate/robustness.json`."))
        if other_top:
            row.append(Table(["key", "value"], [[k, fmt_value(v)] for k, v in other_top.items()], [False, True],
                             "Other values in `evaluate/robustness.json`."))
        blocks.append(Row(row))
    return Section("robustness", "Robustness", blocks)


# ------------------------------------------------------------------------------ config, run


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def _schema_defaults(raw: dict) -> dict[str, Any] | None:
    """Flattened schema defaults for the keys of ``raw`` (students compared to a default stage)."""
    try:
        from ..config.schema import Config, StageConfig

        defaults = Config().to_dict()
        n = len(raw.get("students") or []) if isinstance(raw.get("students"), list) else 0
        defaults["students"] = [dataclasses.asdict(StageConfig()) for _ in range(n)]
        return _flatten(defaults)
    except Exception:  # noqa: BLE001 - the schema may have moved on; the table is optional
        return None


def _short(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _config_section(run: RunData) -> Section:
    blocks: list = []
    if run.config is None:
        blocks.append(Text("No readable `config.yaml`.", "note"))
        return Section("config", "Configuration", blocks)
    def c(key: str, default: Any = None) -> Any:  # for display: 3.0 -> 3, 0.05 stays
        v = run.cfg(key, default)
        return _short(v) if isinstance(v, float) else v

    students = c("students") if isinstance(c("students"), list) else []
    chain = " → ".join([str(c("teacher.model", "?"))] + [str((s or {}).get("model", "?")) for s in students
                                                         if isinstance(s, dict)])
    t_ep = c("teacher.epochs") if c("teacher.epochs") is not None else c("train.epochs")
    s_ep = sorted({_short(s.get("epochs") if s.get("epochs") is not None else c("train.epochs"))
                   for s in students if isinstance(s, dict)})
    noise = (f"RandAugment {c('noise.randaugment_ops')} ops, magnitude {c('noise.randaugment_magnitude')}"
             if c("noise.augment") else "no input augmentation")
    rows = [
        ("data", f"{c('data.source', '?')}" + (f" ({c('data.name')})" if c("data.name") else "")
         + (f", {c('data.labels_per_class')} labels per class" if c("data.labels_per_class") else "")
         + (f", at most {c('data.max_unlabeled')} unlabeled" if c("data.max_unlabeled") else "")
         + (f", {c('data.image_size')} px" if c("data.image_size") else "")),
        ("chain", chain),
        ("epochs", f"teacher {_short(t_ep)}, students {', '.join(s_ep) or '–'}"),
        ("optimisation", f"{c('train.optimizer', '?')}, lr {c('train.lr', '?')}, batch {c('train.batch_size', '?')} "
                         f"labeled + {c('train.unlabeled_ratio', '?')}× pseudo-labeled, {c('train.scheduler', '?')} "
                         f"schedule, label smoothing {c('train.label_smoothing', '?')}"),
        ("noise", f"{noise}; dropout {c('noise.dropout', '?')}, stochastic depth {c('noise.drop_path', '?')}"),
        ("pseudo labels", ("hard" if c("pseudo.hard") else f"soft (T = {c('pseudo.temperature', 1)})")
         + f", threshold {c('pseudo.threshold', '?')}, "
         + ((f"balanced to K = {c('pseudo.per_class')}" if c("pseudo.per_class") else "balanced (K from the data)")
            if c("pseudo.balance", True) else "not balanced")),
        ("seed, device", f"{c('seed', '?')}, {c('device', '?')}"),
    ]
    blocks.append(Table(["setting", "value"], [list(r) for r in rows], [False, False],
                        "The settings that shape the experiment, from the resolved `config.yaml`."))
    defaults = _schema_defaults(run.config)
    if defaults is not None:
        flat = _flatten(run.config)
        diff = [[f"{k}", _short(v), _short(defaults[k]) if k in defaults else "(not in schema)"]
                for k, v in flat.items() if k not in defaults or defaults[k] != v]
        if diff:
            blocks.append(Table(["key", "value", "default"], diff, [False, False, False],
                                "Keys that differ from the schema defaults (`docs/configuration.md`); "
                                "students are compared with a default stage."))
        else:
            blocks.append(Text("Every key has its schema default.", "note"))
    if run.config_text:
        blocks.append(Code(run.config_text.rstrip("\n"), "yaml", "The resolved config (config.yaml)"))
    return Section("config", "Configuration", blocks)


def _run_section(run: RunData) -> Section:
    blocks: list = []
    stages = (run.manifest or {}).get("stages") or {}
    if isinstance(stages, dict) and stages:
        rows = []
        for name, info in stages.items():
            info = info if isinstance(info, dict) else {}
            when = info.get("finished")
            when = (_dt.datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M:%S")
                    if _is_num(when) else "–")
            files = info.get("files")
            rows.append([name, when, fmt_seconds(info.get("seconds")),
                         ", ".join(map(str, files)) if isinstance(files, list) else "–"])
        blocks.append(Table(["stage", "finished", "took", "files"], rows, [False, False, True, False],
                            "Finished stages, from `manifest.json` (`--resume` skips these)."))
    else:
        blocks.append(Text("No finished stage in `manifest.json`.", "note"))
    if run.problems:
        blocks.append(Text("Files that could not be read:", "warn"))
        blocks.append(Bullets(list(run.problems), "warn"))
    return Section("run", "Run", blocks)


# ============================================================================ rendering: HTML

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--accent:#0969da;--good:#1a7f37;--bad:#cf222e}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;color:var(--fg);background:#fff;
 font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:32px 28px 56px}
h1{font-size:27px;line-height:1.25;margin:0 0 4px}
h2{font-size:21px;margin:44px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:16px;margin:28px 0 8px}
a{color:var(--accent);text-decoration:none} a:hover{text-decoration:underline}
.subtitle{color:var(--muted);margin:0;word-break:break-all}
nav.toc{margin:18px 0 0;font-size:14px;color:var(--muted)}
nav.toc a{margin-right:14px;white-space:nowrap}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px;margin:22px 0 12px}
.card{border:1px solid var(--line);border-radius:10px;padding:14px 16px;background:var(--soft)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .value{font-size:27px;font-weight:650;line-height:1.3;font-variant-numeric:tabular-nums;white-space:nowrap}
.card .note{font-size:13px;color:var(--muted)}
.good{color:var(--good)} .bad{color:var(--bad)}
.lead{font-size:16px;margin:8px 0}
.findings{margin:10px 0 0;padding:10px 14px 10px 32px;background:#fff8c5;border:1px solid #e3c25e;border-radius:8px}
.findings li{margin:2px 0}
.table-wrap{overflow-x:auto;margin:14px 0 22px}
table{border-collapse:collapse;font-size:14px}
caption{caption-side:bottom;text-align:left;color:var(--muted);font-size:13px;padding-top:6px;max-width:1100px}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--soft);font-weight:600;border-bottom:2px solid var(--line);white-space:nowrap}
thead tr.groups th{border-bottom:1px solid var(--line);text-align:center;color:var(--muted);font-weight:600}
thead tr.groups th:empty{border-bottom:none}
th.gstart,td.gstart{border-left:1px solid var(--line)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
tbody tr:hover{background:#eef4ff}
tbody th{font-weight:600;background:none;white-space:nowrap}
.row{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}
.row>.table-wrap{margin:14px 0 8px}
.row>.figs{flex:1 1 380px;margin:14px 0 8px}
tr.strong td{font-weight:650}
td.good{color:var(--good)} td.bad{color:var(--bad)}
.figs{display:flex;flex-wrap:wrap;gap:20px;margin:14px 0 22px;align-items:flex-start}
figure{margin:0;flex:1 1 340px;max-width:100%}
figure img{display:block;max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
figcaption,.tag{font-size:13px;color:var(--muted);margin-top:6px}
.tag{font-weight:600;color:var(--fg)}
p.note{color:var(--muted)}
p.warn,ul.warn{background:#fff8c5;border:1px solid #e3c25e;border-radius:6px;padding:8px 12px}
ul.warn{padding-left:30px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.9em;
 background:var(--soft);padding:.1em .3em;border-radius:4px}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:12px 14px;overflow-x:auto;
 font-size:13px}
pre code{background:none;padding:0}
details summary{cursor:pointer;color:var(--accent);margin:8px 0}
footer{margin-top:48px;padding-top:12px;border-top:1px solid var(--line);color:var(--muted);font-size:13px}
@media print{main{max-width:none;padding:0}h2{break-after:avoid}figure,table{break-inside:avoid}
 details{display:block}.table-wrap{overflow:visible}}
"""


def _inline(text: str) -> str:
    """Escape, then render `code`, **bold** and [text](#anchor) links."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\[([^\]]+)\]\((#[\w-]+)\)", r'<a href="\2">\1</a>', out)
    return out


def _png_size(png: bytes) -> tuple[int, int]:
    if png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        return struct.unpack(">II", png[16:24])
    return (0, 0)


def _html_table(t: Table) -> str:
    starts, i = set(), 0  # first column of each non-empty group: a rule on its left
    for label, span in t.groups or []:
        if label and i:
            starts.add(i)
        i += span
    head = "".join(f'<th class="{"num" if n else ""}{" gstart" if j in starts else ""}" scope="col">'
                   f'{html.escape(c)}</th>' for j, (c, n) in enumerate(zip(t.columns, t.numeric)))
    head = head.replace(' class=""', "")
    body = []
    for i, row in enumerate(t.rows):
        cells = []
        for j, v in enumerate(row):
            classes = []
            if j < len(t.numeric) and t.numeric[j]:
                classes.append("num")
            if j in starts:
                classes.append("gstart")
            if isinstance(v, Cell) and v.tone:
                classes.append(v.tone)
            cls = f' class="{" ".join(classes)}"' if classes else ""
            tag = "th scope=row" if j == 0 and not t.numeric[0] else "td"
            cells.append(f"<{tag}{cls}>{html.escape(str(v))}</{tag.split()[0]}>")
        body.append(f'<tr{" class=strong" if i in t.strong_rows else ""}>' + "".join(cells) + "</tr>")
    cap = f'<caption><span class="tag">Table {t.number}.</span> {_inline(t.caption)}</caption>' if t.caption else ""
    if t.groups:
        spanned = sum(n for _, n in t.groups)
        cells = [f'<th colspan="{n}" scope="colgroup" class="group{" gstart" if label else ""}">'
                 f'{html.escape(label)}</th>' if n > 1 else
                 f'<th class="group{" gstart" if label else ""}">{html.escape(label)}</th>' for label, n in t.groups]
        cells += ['<th class="group"></th>'] * (len(t.columns) - spanned)
        head = f'<tr class="groups">{"".join(cells)}</tr><tr>{head}</tr>'
    else:
        head = f"<tr>{head}</tr>"
    return (f'<div class="table-wrap"><table>{cap}<thead>{head}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _html_block(b: Any) -> str:
    if isinstance(b, Text):
        return f'<p class="{b.kind}">{_inline(b.text)}</p>'
    if isinstance(b, Bullets):
        return f'<ul class="{b.kind}">' + "".join(f"<li>{_inline(x)}</li>" for x in b.items) + "</ul>"
    if isinstance(b, Heading):
        return f'<h3{f" id={b.id!r}" if b.id else ""}>{_inline(b.text)}</h3>'
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Row):
        return '<div class="row">' + "".join(_html_block(x) for x in b.blocks) + "</div>"
    if isinstance(b, Figures):
        figs = []
        for p in b.plots:
            w, h = _png_size(p.png)
            data = base64.b64encode(p.png).decode("ascii")
            size = f' width="{w}" height="{h}"' if w and h else ""
            # natural width at most; wide plots (several panels) start their own row
            style = f' style="flex-basis:{w if w > 700 else min(w, 340)}px;max-width:{w}px"' if w else ""
            figs.append(f'<figure id="fig-{html.escape(p.name)}"{style}><img src="data:image/png;base64,{data}" '
                        f'alt="{html.escape(p.alt)}"{size}><figcaption><span class="tag">Figure {p.number}.</span> '
                        f'{_inline(p.caption)}</figcaption></figure>')
        return '<div class="figs">' + "".join(figs) + "</div>"
    if isinstance(b, Code):
        pre = f'<pre><code class="language-{b.lang}">{html.escape(b.text)}</code></pre>'
        return f"<details><summary>{html.escape(b.summary)}</summary>{pre}</details>" if b.summary else pre
    raise TypeError(f"unknown block {type(b).__name__}")


def render_html(doc: Document) -> str:
    """The report as one self-contained HTML page (inline CSS, plots as data URIs, no scripts)."""
    h = doc.headline
    cards = "".join(f'<div class="card"><div class="label">{html.escape(c.label)}</div>'
                    f'<div class="value{" " + c.tone if c.tone else ""}">{html.escape(c.value)}</div>'
                    f'<div class="note">{html.escape(c.note)}</div></div>' for c in h.cards)
    findings = ("<ul class=findings>" + "".join(f"<li>{_inline(f)}</li>" for f in h.findings) + "</ul>"
                if h.findings else "")
    toc = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in doc.sections)
    sections = "".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>'
                       + "".join(_html_block(b) for b in s.blocks) + "</section>" for s in doc.sections)
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<meta name=\"generator\" content=\"noisystudent\">\n"
            f"<title>{html.escape(doc.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{html.escape(doc.title)}</h1><p class=\"subtitle\">{html.escape(doc.subtitle)}</p>"
            f"<nav class=\"toc\">{toc}</nav></header>\n"
            f"<section id=\"headline\" class=\"headline\"><div class=\"cards\">{cards}</div>"
            f"<p class=\"lead\">{_inline(h.sentence)}</p>{findings}</section>\n"
            f"{sections}\n<footer>{_inline(doc.footer)}</footer>\n</main>\n</body>\n</html>\n")


# ============================================================================ rendering: Markdown


def _md_cell(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_block(b: Any) -> str:
    if isinstance(b, Text):
        return f"> {b.text}" if b.kind == "warn" else (f"_{b.text}_" if b.kind == "note" and "_" not in b.text
                                                       else b.text)
    if isinstance(b, Bullets):
        return "\n".join(f"- {x}" for x in b.items)
    if isinstance(b, Heading):
        return f"### {b.text}"
    if isinstance(b, Row):
        return "\n\n".join(_md_block(x) for x in b.blocks)
    if isinstance(b, Table):
        lines = ["| " + " | ".join(_md_cell(c) for c in b.full_columns()) + " |",
                 "|" + "|".join("---:" if n else "---" for n in b.numeric) + "|"]
        for i, row in enumerate(b.rows):
            cells = [_md_cell(v) for v in row]
            if i in b.strong_rows:
                cells = [f"**{c}**" if c and c != "–" else c for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        if b.caption:
            lines += ["", f"Table {b.number}. {b.caption}"]
        return "\n".join(lines)
    if isinstance(b, Figures):
        return "\n\n".join(f"![{p.alt}]({p.name}.png)\n\nFigure {p.number}. {p.caption}" for p in b.plots)
    if isinstance(b, Code):
        fence = "```"
        while fence in b.text:
            fence += "`"
        body = f"{fence}{b.lang}\n{b.text}\n{fence}"
        return f"<details><summary>{html.escape(b.summary)}</summary>\n\n{body}\n\n</details>" if b.summary else body
    raise TypeError(f"unknown block {type(b).__name__}")


def render_markdown(doc: Document) -> str:
    """The report as Markdown (GitHub flavour); plots are referenced as ``<name>.png`` next to it."""
    h = doc.headline
    out = [f"# {doc.title}", "", f"{doc.subtitle}", ""]
    if h.cards:
        out += ["| " + " | ".join(_md_cell(c.label) for c in h.cards) + " |",
                "|" + "|".join("---:" for _ in h.cards) + "|",
                "| " + " | ".join(f"**{_md_cell(c.value)}**" for c in h.cards) + " |",
                "| " + " | ".join(_md_cell(c.note) for c in h.cards) + " |", ""]
    out += [h.sentence, ""]
    if h.findings:
        out += [f"> - {f}" for f in h.findings] + [""]
    out += ["Contents: " + " · ".join(f"[{s.title}](#{s.id})" for s in doc.sections), ""]
    for s in doc.sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", ""]
        for b in s.blocks:
            out += [_md_block(b), ""]
    out += ["---", "", doc.footer, ""]
    return "\n".join(out)


# ============================================================================ writing


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def build_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``RUN/report/report.html`` (self-contained) and ``RUN/report/report.md`` (with its PNG
    plots beside it) for a run directory, finished or not. Returns ``{"html": path, "md": path}``.

    Raises :class:`~noisystudent.runtime.errors.NoisyStudentError` if ``run_dir`` is not a run directory
    or the report cannot be written; unreadable optional files are listed in the report instead.
    """
    run = collect_run(run_dir)
    out = run.root / REPORT_DIR
    try:
        out.mkdir(exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise NoisyStudentError(f"report: cannot write {out}: {e.strerror or e}") from None
    doc = build_document(run)
    try:
        written = set()
        for p in doc.plots():
            _write_atomic(out / f"{p.name}.png", p.png)
            written.add(f"{p.name}.png")
        for stale in out.glob("*.png"):
            if stale.name not in written and stale.name.startswith(PLOT_PREFIXES):
                stale.unlink()
        _write_atomic(out / MD_NAME, render_markdown(doc).encode("utf-8"))
        _write_atomic(out / HTML_NAME, render_html(doc).encode("utf-8"))
    except OSError as e:
        raise NoisyStudentError(f"report: cannot write {out}: {e.strerror or e}") from None
    return {"html": out / HTML_NAME, "md": out / MD_NAME}


def iter_report_images(html_text: str) -> Iterable[bytes]:
    """The PNG bytes of every data-URI image in a rendered report (for checks and tests)."""
    for m in re.finditer(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text):
        yield base64.b64decode(m.group(1))
