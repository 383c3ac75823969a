"""The report's one reader of a run directory.

:func:`collect_run` reads everything the report shows, through the names of the run-directory
contract (:mod:`noisystudent.runtime.rundir`): ``config.yaml``, ``manifest.json``, ``data.json``,
``summary.json``, each training stage's ``metrics.json`` and ``metrics.jsonl`` (teacher,
students, ``fixres``), each iteration's pseudo-label store ``label-i/`` and its
``probe.parquet``, ``select-i/selection.json`` and ``evaluate/robustness.json``.

Every file but the run directory itself is optional: a run that is still going, crashed, or was
made by an older version is read as far as it goes, and each unreadable file becomes a one-line
entry of :attr:`RunData.problems` instead of an error. Pseudo-label stores are streamed shard by
shard (per-class counts and the confidence histogram are accumulated; the pool is never loaded
whole), so the report of a 10^8-image run needs no more memory than that of a toy run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from ..runtime.errors import NoisyStudentError
from ..runtime.rundir import (CONFIG, DATA, EVALUATE, FIXRES, HISTORY, MANIFEST, METRICS, PROBE, ROBUSTNESS,
                              SELECTION_SUMMARY, SUMMARY, TEACHER, BASELINE, iteration_of, label_stage, select_stage,
                              student_stage, teacher_member, teacher_of)

HIST_BINS = 40  # confidence histogram bins on [0, 1]


class GalleryItem(NamedTuple):
    """One pool image picked for the gallery: its store key, the teacher's confidence, and where
    the source holds it (source shard, position in the shard: ``UnlabeledSource.open_item``)."""

    key: str
    confidence: float
    shard: int
    index: int


# ============================================================================ what is read


@dataclass
class LabelScan:
    """One pass over a pseudo-label store: its header and what the report plots of it."""

    n: int  # images labeled
    hist: np.ndarray  # counts of top-1 confidence in HIST_BINS bins over [0, 1]
    edges: np.ndarray
    mean_confidence: float
    below: int | None  # images below the threshold (None without a threshold)
    predicted_per_class: np.ndarray
    num_classes: int
    teacher: str
    temperature: float
    top_k: int
    precision: str
    num_bad: int  # unreadable images skipped (listed in the store's bad_images.tsv)
    shards_done: int
    num_shards: int

    @property
    def complete(self) -> bool:
        return self.shards_done == self.num_shards


@dataclass
class Iteration:
    """What the run holds about one labeling + selection step."""

    index: int
    teacher: str = ""  # the stage that labeled
    labels: LabelScan | None = None
    selection: dict | None = None  # select-i/selection.json
    probe: dict | None = None  # arrays from probe.parquet: confidence, predicted, target, correct
    # gallery candidates, only when asked for: kind ("most", "least", "dropped") -> class -> items
    gallery: dict[str, dict[int, list[GalleryItem]]] | None = None


@dataclass
class RunData:
    """Everything the report shows, read from a run directory (absent files are None)."""

    root: Path
    config: dict | None = None
    config_text: str | None = None
    manifest: dict | None = None
    data: dict | None = None
    summary: dict | None = None
    stages: list[dict] = field(default_factory=list)  # teacher, then students in order
    members: list[dict] = field(default_factory=list)  # the teacher's ensemble: teacher-2, ...
    curves: dict[str, list[dict]] = field(default_factory=dict)  # stage -> metrics.jsonl records
    iterations: list[Iteration] = field(default_factory=list)
    fixres: dict | None = None  # fixres/metrics.json
    robustness: dict | None = None
    problems: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``students.0.model``), or ``default``."""
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
    def threshold(self) -> float | None:
        thr = self.cfg("pseudo.threshold")
        return float(thr) if isinstance(thr, (int, float)) and not isinstance(thr, bool) else None

    @property
    def first_labelers(self) -> str:
        """Who labels the pool for student-1: the teacher, or the teacher and its ensemble
        (``pseudo.ensemble_size``'s stages, ``pseudo.ensemble``'s files)."""
        files = self.cfg("pseudo.ensemble")
        names = [TEACHER] + self.member_names
        if isinstance(files, list) and files:
            names.append(f"{len(files)} given model(s)")
        return " + ".join(names) + (" (mean probabilities)" if len(names) > 1 else "")

    @property
    def member_names(self) -> list[str]:
        """The stages of the teacher's ensemble trained in the run (``pseudo.ensemble_size``)."""
        size = self.cfg("pseudo.ensemble_size", 1)
        return [teacher_member(k) for k in range(2, (size if isinstance(size, int) else 1) + 1)]

    @property
    def classes(self) -> list[str]:
        cls = (self.data or {}).get("classes")
        return [str(c) for c in cls] if isinstance(cls, list) else []

    @property
    def num_classes(self) -> int | None:
        if self.classes:
            return len(self.classes)
        return next((it.labels.num_classes for it in self.iterations if it.labels), None)

    def class_name(self, c: int) -> str:
        return self.classes[c] if 0 <= c < len(self.classes) else str(c)


# ============================================================================ small readers


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``, for one-line problem reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_json(run: RunData, path: Path, kind: type | tuple = dict) -> Any:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        run.problems.append(f"`{run.rel(path)}` is unreadable ({first_line(e)}); left out")
        return None
    if not isinstance(obj, kind):
        run.problems.append(f"`{run.rel(path)}` has an unexpected layout; left out")
        return None
    return obj


def _read_jsonl(run: RunData, path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        run.problems.append(f"`{run.rel(path)}` is unreadable ({first_line(e)}); left out")
        return []
    out, bad = [], 0
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


def _read_probe(run: RunData, path: Path) -> dict | None:
    """The teacher on the labeled validation split: confidence, predicted, target (+ correct)."""
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path, columns=["confidence", "predicted", "target"])
        probe = {c: t.column(c).to_numpy() for c in ("confidence", "predicted", "target")}
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
        run.problems.append(f"`{run.rel(path)}` is unreadable ({first_line(e)}); left out")
        return None
    probe["predicted"] = probe["predicted"].astype(np.int64)
    probe["target"] = probe["target"].astype(np.int64)
    probe["correct"] = probe["predicted"] == probe["target"]
    return probe


# ============================================================================ the label store


class _Extremes:
    """The ``n`` most (``descending``) or least confident images per class, kept while streaming.

    Candidates are merged shard by shard, so memory is ``n`` entries per class; ties go to the
    earlier row, as in the selection.
    """

    def __init__(self, n: int, descending: bool):
        self.n, self.sign = n, -1.0 if descending else 1.0
        self.cls = np.empty(0, np.int64)
        self.conf = np.empty(0, np.float64)
        self.row = np.empty(0, np.int64)
        self.items: np.ndarray = np.empty(0, object)

    def _pick(self, cls: np.ndarray, conf: np.ndarray, row: np.ndarray) -> np.ndarray:
        order = np.lexsort((row, self.sign * conf, cls))
        sorted_cls = cls[order]
        starts = np.flatnonzero(np.r_[True, sorted_cls[1:] != sorted_cls[:-1]])
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        return order[rank < self.n]

    def add(self, cls: np.ndarray, conf: np.ndarray, row: np.ndarray,
            items: Callable[[np.ndarray], list[GalleryItem]]) -> None:
        """Offer a shard's images; ``items(local indices)`` builds the items of those picked."""
        if not len(cls):
            return
        local = self._pick(cls, conf, row)
        new = np.empty(len(local), object)
        new[:] = items(local)
        cls, conf = np.r_[self.cls, cls[local]], np.r_[self.conf, conf[local]]
        row, both = np.r_[self.row, row[local]], np.r_[self.items, new]
        keep = self._pick(cls, conf, row)
        self.cls, self.conf, self.row, self.items = cls[keep], conf[keep], row[keep], both[keep]

    def by_class(self) -> dict[int, list[GalleryItem]]:
        out: dict[int, list[GalleryItem]] = {}
        for i in np.lexsort((self.row, self.sign * self.conf, self.cls)):
            out.setdefault(int(self.cls[i]), []).append(self.items[i])
        return out


def _scan_store(run: RunData, path: Path, threshold: float | None, gallery_size: int,
                finished: bool) -> tuple[LabelScan | None, dict | None]:
    """Stream a pseudo-label store: confidence histogram, images per predicted class, header; with
    ``gallery_size`` also the most and least confident kept and the most confident dropped images
    of each class."""
    from ..label.store import HEADER_FILE, LabelStore  # the store reader (imports torch: only when needed)

    if not (path / HEADER_FILE).is_file():
        if finished:  # a finished stage without a store: another (older) layout
            run.problems.append(f"`{run.rel(path)}` is not a pseudo-label store (no `{HEADER_FILE}`); left out")
        return None, None  # otherwise: labeling has just started and wrote nothing yet
    edges = np.linspace(0, 1, HIST_BINS + 1)
    hist = np.zeros(HIST_BINS, np.int64)
    try:
        store = LabelStore.open(path)
        h = store.header
        per_class = np.zeros(h.num_classes, np.int64)
        # the gallery's three kinds: most and least confident of those kept, most confident of those dropped
        picks = ({"most": _Extremes(gallery_size, True), "least": _Extremes(gallery_size, False),
                  "dropped": _Extremes(gallery_size, True)} if gallery_size else None)
        columns = ["confidence", "predicted"] + (["key", "index"] if picks else [])
        n = below = 0
        total = 0.0
        for rec, first_row, table in store.iter_shards(columns=columns):
            conf = table.column("confidence").to_numpy().astype(np.float64)
            pred = table.column("predicted").to_numpy().astype(np.int64)
            hist += np.histogram(np.clip(conf, 0, 1), bins=edges)[0]
            per_class += np.bincount(pred, minlength=h.num_classes)[:h.num_classes]
            n += len(conf)
            total += float(conf.sum())
            kept = conf >= threshold if threshold is not None else np.ones(len(conf), bool)
            below += int((~kept).sum())
            if picks:
                rows = first_row + np.arange(len(conf))
                for kind, mask in (("most", kept), ("least", kept), ("dropped", ~kept)):
                    idx = np.flatnonzero(mask)
                    picks[kind].add(pred[idx], conf[idx], rows[idx], lambda local, idx=idx, t=table, shard=rec.index: [
                        GalleryItem(k, float(c), shard, int(p)) for k, c, p in
                        zip(t.column("key").take(idx[local]).to_pylist(), conf[idx[local]],
                            t.column("index").take(idx[local]).to_numpy())])
    except Exception as e:  # noqa: BLE001 - a corrupt store is reported, not fatal
        run.problems.append(f"`{run.rel(path)}` is unreadable ({first_line(e)}); left out")
        return None, None
    scan = LabelScan(n=n, hist=hist, edges=edges, mean_confidence=total / n if n else math.nan,
                     below=below if threshold is not None else None, predicted_per_class=per_class,
                     num_classes=h.num_classes, teacher=h.teacher, temperature=h.temperature,
                     top_k=h.top_k, precision=h.precision, num_bad=store.manifest.num_bad,
                     shards_done=len(store.shards), num_shards=store.manifest.num_shards)
    gallery = {kind: p.by_class() for kind, p in picks.items()} if picks else None
    return scan, gallery


# ============================================================================ the run


def _stage_order(name: str) -> tuple[int, int] | None:
    """Sort key of a training stage (teacher, baseline, student-1, ...); None for other names."""
    if name == TEACHER:
        return (0, 0)
    if name == BASELINE:
        return (0, 1)
    i = iteration_of(name)
    return (1, i) if i is not None and name == student_stage(i) else None


def collect_run(run_dir: str | Path, *, gallery_size: int = 0) -> RunData:
    """Read every report input of a run directory; raises NoisyStudentError if it is not one.

    ``gallery_size`` > 0 also picks that many images per class and kind for the pseudo-label
    gallery (it reads the stores' key column, which a plain report does not need).
    """
    root = Path(run_dir)
    if not root.exists():
        raise NoisyStudentError(f"report: run directory {root} does not exist")
    if not root.is_dir():
        raise NoisyStudentError(f"report: {root} is not a directory")
    markers = (MANIFEST, CONFIG, SUMMARY)
    if not any((root / m).is_file() for m in markers):
        raise NoisyStudentError(f"report: {root} is not a run directory (none of {', '.join(markers)})")
    run = RunData(root=root)
    _read_config(run)
    run.manifest = _read_json(run, root / MANIFEST)
    run.data = _read_json(run, root / DATA)
    run.summary = _read_json(run, root / SUMMARY)

    # training stages: each finished folder's metrics.json, updated by its summary.json entry (the
    # summary may know a stage whose folder is gone, and a running chain has folders it lacks)
    stages: dict[str, dict] = {}
    others = {FIXRES, *run.member_names}
    for d in root.iterdir():
        if d.is_dir() and (_stage_order(d.name) is not None or d.name in others):
            m = _read_json(run, d / METRICS)
            if m is not None:
                stages[d.name] = {**m, "name": d.name}
    for s in (run.summary or {}).get("stages") or []:
        if isinstance(s, dict) and isinstance(s.get("name"), str) and \
                (_stage_order(s["name"]) is not None or s["name"] in others):
            stages[s["name"]] = {**stages.get(s["name"], {}), **s}
    run.fixres = stages.pop(FIXRES, None)
    run.members = [stages.pop(name) for name in run.member_names if name in stages]
    run.stages = sorted(stages.values(), key=lambda s: _stage_order(s["name"]))
    for name in [s["name"] for s in run.stages] + ([FIXRES] if run.fixres else []):
        recs = _read_jsonl(run, root / name / HISTORY)
        if recs:
            run.curves[name] = recs

    threshold = run.threshold
    indices = sorted({i for p in root.iterdir() if p.is_dir() and (i := iteration_of(p.name)) is not None})
    for i in indices:
        it = Iteration(index=i, teacher=run.first_labelers if i == 1 else teacher_of(i))
        label_dir = root / label_stage(i)
        if label_dir.is_dir():
            finished = label_stage(i) in ((run.manifest or {}).get("stages") or {})
            it.labels, it.gallery = _scan_store(run, label_dir, threshold, gallery_size, finished)
            it.probe = _read_probe(run, label_dir / PROBE)
        it.selection = _read_json(run, root / select_stage(i) / SELECTION_SUMMARY)
        run.iterations.append(it)

    run.robustness = _read_json(run, root / EVALUATE / ROBUSTNESS)
    return run


def _read_config(run: RunData) -> None:
    path = run.root / CONFIG
    if not path.is_file():
        return
    import yaml

    try:
        run.config_text = path.read_text(encoding="utf-8")
        cfg = yaml.safe_load(run.config_text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        run.problems.append(f"`{CONFIG}` is unreadable ({first_line(e)}); settings left out")
        return
    run.config = cfg if isinstance(cfg, dict) else None
    if run.config is None:
        run.problems.append(f"`{CONFIG}` is not a mapping; settings left out")
