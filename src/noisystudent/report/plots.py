"""The report's plots: each function draws one matplotlib figure and returns it as PNG bytes.

Figures are made with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never through
``pyplot``: no display is needed, no global backend is switched, nothing leaks between calls.
Functions return ``None`` when their data is empty, so callers can skip the figure.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..runtime.rundir import BASELINE, FIXRES, TEACHER, iteration_of, student_stage

DPI = 110
TEACHER_COLOUR = "#6e7781"
FIXRES_COLOUR = "#8250df"
GOOD, BAD = "#1a7f37", "#cf222e"
BLUE, ORANGE, GREY = "#0969da", "#d4a72c", "#afb8c1"
RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
      "xtick.labelsize": 8, "ytick.labelsize": 8}


def colour_for(name: str, i: int = 0) -> str:
    """One colour per stage in every plot: the teacher grey, student-N the N-th tab10 colour, the
    fix-res fine-tune purple; other names their ``i``-th."""
    if name in (TEACHER, BASELINE):
        return TEACHER_COLOUR
    if name == FIXRES:
        return FIXRES_COLOUR
    n = iteration_of(name)
    return f"C{(n - 1) % 10}" if n is not None and name == student_stage(n) else f"C{i % 10}"


def _styled(fn):
    """Draw under the report's rc settings (font sizes), restored afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(alpha=0.3, linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _finite(values: Sequence) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        out.append(f)
    return out


# ---------------------------------------------------------------------------------- results


@_styled
def accuracy_by_iteration(labels: Sequence[str], val_top1: Sequence, test_top1: Sequence,
                          baseline: tuple[str, float, float] | None = None) -> bytes | None:
    """Val and test top-1 (%) of the teacher and each student, in chain order; ``baseline``
    (label, val, test): the final architecture on the labels alone, drawn as two horizontal lines,
    so the Noisy Student gain is the distance from a student's point to its line."""
    if not labels:
        return None
    val, test = _finite(val_top1), _finite(test_top1)
    base = _finite(baseline[1:]) if baseline else []
    fig, (ax,) = _figure(max(4.5, 1.25 * len(labels) + 2), 3.2)
    x = np.arange(len(labels))
    ax.plot(x, val, marker="o", color=ORANGE, label="val top-1", linestyle="--")
    ax.plot(x, test, marker="o", color=BLUE, label="test top-1", linewidth=2)
    for xi, t in zip(x, test):
        if math.isfinite(t):
            ax.annotate(f"{t:.1f}", (xi, t), textcoords="offset points", xytext=(0, -14), ha="center",
                        fontsize=8, color=BLUE, bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    if baseline and all(math.isfinite(v) for v in base):
        ax.axhline(base[0], color=ORANGE, linestyle=":", linewidth=1)
        ax.axhline(base[1], color=GREY, linestyle="-", linewidth=1.5, zorder=0,
                   label=f"{baseline[0]}: test {base[1]:.1f}, val {base[0]:.1f} (dotted)")
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.4, len(labels) - 0.6)
    lo = np.nanmin(val + test + base) if any(math.isfinite(v) for v in val + test + base) else 0
    ax.set_ylim(max(0, lo - 8), 100 if lo > 50 else None)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(loc="best", frameon=False)
    return _png(fig)


def stage_fraction(records: Sequence[dict], epochs: float | None = None) -> np.ndarray:
    """Where each epoch record of a stage falls in the stage, in (0, 1]: its epoch divided by the
    stage's length (``epochs``, or the last record's epoch when that is missing or smaller)."""
    ep = np.asarray(_finite([r.get("epoch") for r in records]), dtype=np.float64)
    length = _finite([epochs])[0]
    last = float(np.nanmax(ep)) if ep.size and np.isfinite(ep).any() else math.nan
    if not (math.isfinite(length) and length > 0 and length >= last):
        length = last
    return ep / length


@_styled
def training_curves(curves: Mapping[str, Sequence[dict]], epochs: Mapping[str, float] | None = None) -> bytes | None:
    """Validation top-1 and training loss of each stage against the fraction of the stage done.

    Stages differ by orders of magnitude in length (a teacher's 100 epochs, a student's 3, a
    fix-res fine-tune's 1.5), so each curve runs over (0, 1] (:func:`stage_fraction`, with
    ``epochs[name]`` the stage's length); the legend gives each stage's length in epochs.
    """
    curves = {k: [r for r in v if isinstance(r, dict) and _finite([r.get("epoch")])[0] > 0]
              for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, (acc, loss) = _figure(9, 3.2, ncols=2)
    for i, (name, recs) in enumerate(curves.items()):
        colour = colour_for(name, i)
        x = stage_fraction(recs, (epochs or {}).get(name))
        length = float(np.nanmax(_finite([r.get("epoch") for r in recs])) / np.nanmax(x))
        label = f"{name} ({length:g} epoch{'s' if length != 1 else ''})"
        marker = "." if len(recs) < 40 else None
        val = _finite([r.get("val_top1") for r in recs])
        if any(math.isfinite(v) for v in val):
            acc.plot(x, val, color=colour, label=label, marker=marker)
        loss.plot(x, _finite([r.get("loss") for r in recs]), color=colour, label=label, marker=marker)
    for ax in (acc, loss):
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("fraction of the stage's epochs")
    acc.set_ylabel("val top-1 (%)")
    acc.set_title("validation top-1")
    loss.set_ylabel("training loss (smoothed)")
    loss.set_title("training loss")
    loss.legend(frameon=False, loc="upper right")  # every stage has a loss; fix-res has no val top-1
    return _png(fig)


# ------------------------------------------------------------------------------ pseudo labels


@_styled
def confidence_histogram(counts: Sequence[int], edges: Sequence[float], threshold: float | None,
                         num_classes: int | None = None, title: str = "") -> bytes | None:
    """Histogram (precomputed ``counts`` over ``edges`` on [0, 1]) of the teacher's top-1
    confidence on the unlabeled pool: bins below the threshold grey, the threshold marked."""
    counts, edges = np.asarray(counts, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    fig, (ax,) = _figure(4.4, 3.2)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    below = centres < (threshold if threshold is not None else -1)
    ax.bar(centres[below], counts[below], width=width[below], color=GREY, label="dropped")
    ax.bar(centres[~below], counts[~below], width=width[~below], color=BLUE, label="kept")
    if threshold is not None:
        ax.axvline(threshold, color=BAD, linewidth=1.2, linestyle="--")
        right = threshold > 0.55
        ax.annotate(f"threshold {threshold:g}", (threshold, 1), xycoords=("data", "axes fraction"),
                    xytext=(-4 if right else 4, -4), textcoords="offset points", va="top",
                    ha="right" if right else "left", fontsize=8, color=BAD)
    if num_classes:
        ax.axvline(1 / num_classes, color=TEACHER_COLOUR, linewidth=0.8, linestyle=":")
    ax.set_xlim(0, 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("teacher top-1 confidence")
    ax.set_ylabel("unlabeled images")
    ax.set_title(title or f"confidence on {int(total):,} unlabeled images")
    ax.legend(frameon=False, loc="upper right")
    return _png(fig)


@_styled
def class_counts(classes: Sequence[str], predicted: Sequence | None, kept: Sequence | None,
                 selected: Sequence | None, per_class: int | None, title: str = "") -> bytes | None:
    """Pseudo-labeled images per predicted class: all, kept by the threshold, selected after
    balancing (duplicates counted); K as a line. Many classes: sorted counts as lines."""
    series = [(lab, np.asarray(v, dtype=np.float64), c) for lab, v, c in
              (("predicted (all)", predicted, GREY), ("kept (≥ threshold)", kept, BLUE),
               ("selected (balanced)", selected, ORANGE)) if v is not None and len(v)]
    if not series:
        return None
    n = max(len(s[1]) for s in series)
    names = list(classes)[:n] + [str(i) for i in range(len(classes), n)]
    fig, (ax,) = _figure(max(4.4, min(9.0, 0.32 * n + 2)) if n <= 40 else 6.0, 3.2)
    if n <= 40:
        width = 0.8 / len(series)
        for j, (lab, v, colour) in enumerate(series):
            xs = np.arange(len(v)) + (j - (len(series) - 1) / 2) * width
            ax.bar(xs, v, width=width, color=colour, label=lab)
        ax.set_xticks(np.arange(n), [s if len(s) <= 8 else s[:7] + "…" for s in names],
                      rotation=0 if n <= 12 and max(len(s) for s in names) <= 3 else 60,
                      ha="center" if n <= 12 and max(len(s) for s in names) <= 3 else "right")
        ax.set_xlabel("predicted class")
    else:
        for lab, v, colour in series:
            ax.plot(np.arange(len(v)), np.sort(v)[::-1], color=colour, label=lab)
        ax.set_xlabel(f"classes, sorted by count ({n})")
    if per_class:
        ax.axhline(per_class, color=BAD, linestyle="--", linewidth=1, label=f"K = {per_class:,}")
    ax.set_ylabel("images")
    ax.set_title(title or "pseudo labels per class")
    ax.legend(frameon=False, fontsize=7)
    return _png(fig)


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """Reliability statistics over equal-width confidence bins on [0, 1].

    Returns ``edges`` (bins + 1), per bin ``count``, ``accuracy`` and ``confidence`` (NaN where
    empty), and overall ``accuracy``, ``mean_confidence``, ``ece`` (expected calibration error:
    the count-weighted mean |accuracy - confidence|) — accuracies and ECE as fractions.
    """
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0, 1)
    ok = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=ok, minlength=bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
    n = max(1, int(count.sum()))
    ece = float(np.nansum(count * np.abs(acc - mean_conf)) / n) if conf.size else math.nan
    return {"edges": edges, "count": count, "accuracy": acc, "confidence": mean_conf, "ece": ece,
            "accuracy_all": float(ok.mean()) if ok.size else math.nan,
            "mean_confidence": float(conf.mean()) if conf.size else math.nan, "n": int(conf.size)}


@_styled
def reliability_diagram(confidence: np.ndarray, correct: np.ndarray, bins: int = 10,
                        title: str = "") -> bytes | None:
    """Pseudo-label accuracy against teacher confidence (bars), the diagonal of perfect calibration,
    the gap shaded, and the image count per bin."""
    stats = calibration(confidence, correct, bins)
    if stats["n"] == 0:
        return None
    fig, (ax,) = _figure(4.4, 3.2)
    e = stats["edges"]
    centres, width = (e[:-1] + e[1:]) / 2, e[1] - e[0]
    has = stats["count"] > 0
    acc = np.where(has, stats["accuracy"], 0)
    ax.bar(centres[has], acc[has], width=width * 0.95, color=BLUE, label="accuracy")
    gap_lo = np.minimum(acc, stats["confidence"])
    gap_hi = np.maximum(acc, stats["confidence"])
    ax.bar(centres[has], (gap_hi - gap_lo)[has], bottom=gap_lo[has], width=width * 0.95, fill=False,
           hatch="///", edgecolor=BAD, linewidth=0.8, label="gap to confidence")
    ax.plot([0, 1], [0, 1], color=TEACHER_COLOUR, linestyle="--", linewidth=1, label="perfect calibration")
    for c, a, k in zip(centres[has], acc[has], stats["count"][has]):
        ax.annotate(f"{k}", (c, a), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6.5,
                    color=TEACHER_COLOUR)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("teacher top-1 confidence")
    ax.set_ylabel("pseudo-label accuracy")
    ax.set_title(title or f"reliability ({stats['n']:,} probe images, ECE {100 * stats['ece']:.1f}%)")
    ax.legend(frameon=False, loc="upper left", fontsize=7)
    return _png(fig)


def confusion_counts(target: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``counts[t, p]``: images of true class t the teacher labeled p."""
    t, p = np.asarray(target, np.int64), np.asarray(predicted, np.int64)
    ok = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    return np.bincount(t[ok] * num_classes + p[ok], minlength=num_classes ** 2).reshape(num_classes, num_classes)


@_styled
def confusion_matrix(counts: np.ndarray, classes: Sequence[str], title: str = "") -> bytes | None:
    """The teacher's confusion matrix on the probe, each row normalised to the true class's images
    (a perfect teacher is the diagonal); counts are written in the cells when there are few classes."""
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.shape[0]
    if n == 0 or counts.sum() == 0:
        return None
    rows = counts.sum(1, keepdims=True)
    share = np.where(rows > 0, counts / np.maximum(rows, 1), np.nan)
    side = min(6.0, max(3.2, 0.26 * n + 1.5))
    fig = Figure(figsize=(side + 0.8, side), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    names = [s if len(s) <= 8 else s[:7] + "…" for s in (list(classes)[:n] + [str(i) for i in range(len(classes), n)])]
    if n <= 40:
        ax.set_xticks(np.arange(n), names, rotation=90 if n > 12 or max(map(len, names)) > 3 else 0)
        ax.set_yticks(np.arange(n), names)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= 15:
        for t in range(n):
            for p in range(n):
                if counts[t, p]:
                    ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if share[t, p] > 0.6 else "#1f2328")
    ax.set_xlabel("pseudo label (teacher's prediction)")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion on {int(counts.sum()):,} probe images")
    return _png(fig)


# ---------------------------------------------------------------------------------- robustness


@_styled
def corruption_plot(errors_by_model: Mapping[str, Mapping[str, Sequence]]) -> bytes | None:
    """Left: mean error over corruptions against severity; right: mean error over severities per
    corruption. One colour per model."""
    data = {m: {k: _finite(v) for k, v in d.items() if isinstance(v, (list, tuple)) and v}
            for m, d in errors_by_model.items() if isinstance(d, Mapping)}
    data = {m: d for m, d in data.items() if d}
    if not data:
        return None
    names = list(dict.fromkeys(n for d in data.values() for n in d))
    fig, (sev_ax, bar_ax) = _figure(10, max(3.2, 0.22 * len(names) * max(1, len(data) / 2) + 1.2), ncols=2)
    height = 0.8 / len(data)
    for i, (model, d) in enumerate(data.items()):
        colour = colour_for(model, i)
        nsev = max(len(v) for v in d.values())
        by_sev = [np.nanmean([v[s] for v in d.values() if len(v) > s]) for s in range(nsev)]
        sev_ax.plot(range(1, nsev + 1), by_sev, marker="o", color=colour, label=model)
        ys = np.arange(len(names)) + (i - (len(data) - 1) / 2) * height
        bar_ax.barh(ys, [np.nanmean(d[n]) if n in d else np.nan for n in names], height=height,
                    color=colour, label=model)
    sev_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    sev_ax.set_xlabel("severity")
    sev_ax.set_ylabel("error (%), mean over corruptions")
    sev_ax.set_title("error against severity")
    sev_ax.legend(frameon=False)
    bar_ax.set_yticks(np.arange(len(names)), [n.replace("_", " ") for n in names])
    bar_ax.invert_yaxis()
    bar_ax.set_xlabel("error (%), mean over severities")
    bar_ax.set_title("error per corruption")
    return _png(fig)


@_styled
def attack_plot(curves: Mapping[str, Mapping[str, tuple[Sequence, Sequence]]]) -> bytes | None:
    """Top-1 accuracy against eps: ``{model: {"FGSM": (eps, top1), "PGD": (eps, top1)}}``."""
    curves = {m: {k: v for k, v in d.items() if v and len(v[0])} for m, d in curves.items()}
    curves = {m: d for m, d in curves.items() if d}
    if not curves:
        return None
    fig, (ax,) = _figure(5.2, 3.4)
    styles = ["-", "--", ":", "-."]
    for i, (model, d) in enumerate(curves.items()):
        colour = colour_for(model, i)
        for j, (kind, (eps, top1)) in enumerate(d.items()):
            ax.plot(_finite(eps), _finite(top1), marker="os^v"[j % 4], linestyle=styles[j % 4], color=colour,
                    label=f"{model} {kind}")
    ax.set_xlabel("eps (0-255 pixel units)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, None)
    ax.legend(frameon=False, fontsize=7)
    return _png(fig)


@_styled
def perturbation_plot(values_by_model: Mapping[str, Mapping[str, float]], ylabel: str) -> bytes | None:
    """Grouped bars: one group per perturbation, one colour per model."""
    data = {m: d for m, d in values_by_model.items() if isinstance(d, Mapping) and d}
    if not data:
        return None
    names = list(dict.fromkeys(n for d in data.values() for n in d))
    fig, (ax,) = _figure(max(5.0, 0.7 * len(names) + 2), 3.4)
    width = 0.8 / len(data)
    for i, (model, d) in enumerate(data.items()):
        colour = colour_for(model, i)
        xs = np.arange(len(names)) + (i - (len(data) - 1) / 2) * width
        ax.bar(xs, _finite([d.get(n) for n in names]), width=width, color=colour, label=model)
    ax.set_xticks(np.arange(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    return _png(fig)
