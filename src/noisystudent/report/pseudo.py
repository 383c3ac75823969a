"""The report's pseudo-label sections.

* **Pseudo labels**: per iteration, what the teacher's store holds (images, mean confidence, the
  share below the threshold, unreadable images), the probe's pseudo-label accuracy and
  calibration, and three plots: the confidence histogram, per-class counts before and after the
  threshold and balancing, and the reliability diagram.
  Pool hygiene: the pool images dropped as copies of validation or test images, and those that
  have a copy elsewhere in the pool, counted, not dropped (:func:`hygiene_blocks`).
  Calibration: the temperature fitted on validation and the teacher's ECE before and after, and the
  per-class thresholds (:func:`calibration_blocks`; ``pseudo.calibrate``, ``pseudo.threshold_mode``).
* **A look at the pseudo labels**: per iteration, the teacher's confusion matrix on the probe
  (the labeled validation split labeled the same way), its most frequent confusions, and, when
  the report can read the pool's images, thumbnail strips by class (:mod:`.gallery`).
"""

from __future__ import annotations

import json
import math

import numpy as np

from . import plots
from .collect import Iteration, RunData
from .document import Figures, Heading, Plot, Row, Section, Table, Text, fmt, fmt_int, fmt_pct, is_num
from .gallery import ImageLoader, pseudo_label_gallery
from ..runtime.rundir import CALIBRATION, label_stage

RELIABILITY_BINS = 10
TOP_CONFUSIONS = 8


def pseudo_section(run: RunData) -> Section:
    """Confidence, class balance and calibration of each iteration's pseudo labels."""
    if not run.iterations:
        return Section("pseudo-labels", "Pseudo labels", [Text("No labeling stage has run yet.", "note")])
    table, probe_stats = _iterations_table(run)
    blocks: list = [table]
    blocks += hygiene_blocks(run)
    blocks += calibration_blocks(run)
    if not any(it.probe is not None for it in run.iterations):
        blocks.append(Text("No probe files (`label-i/probe.parquet`): this run did not record the teacher's "
                           "predictions on labeled images, so the reliability diagram and pseudo-label accuracy "
                           "are not available.", "note"))
    for it in run.iterations:
        blocks += _iteration_blocks(run, it, probe_stats.get(it.index) or {})
    return Section("pseudo-labels", "Pseudo labels", blocks)


def _iterations_table(run: RunData) -> tuple[Table, dict[int, dict]]:
    """One row per iteration: the pool labeled, its confidence and what the threshold drops, and
    where the probe was recorded, the pseudo labels' accuracy and calibration on it. Also returns
    the probe's calibration statistics by iteration (empty: no probe)."""
    thr = run.threshold
    has_probe = any(it.probe is not None for it in run.iterations)
    has_bad = any(it.labels is not None and it.labels.num_bad for it in run.iterations)
    rows, stats_by_it = [], {}
    for it in run.iterations:
        lab = it.labels
        row = [str(it.index), it.teacher, fmt_int(lab.n) if lab else "–",
               fmt(100 * lab.mean_confidence, 1) if lab and is_num(lab.mean_confidence) else "–",
               fmt_pct(lab.below, lab.n) if lab else "–"]
        if has_bad:
            row.append(fmt_int(lab.num_bad) if lab else "–")
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
    if has_bad:
        columns.append("unreadable")
        caption += " unreadable: pool images that could not be decoded, skipped (listed in `label-i/bad_images.tsv`)."
    if has_probe:
        columns += ["probe images", "probe acc.", "probe conf.", "ECE", "probe kept", "kept acc."]
        caption += (" The probe is the labeled validation split labeled the same way, so pseudo-label quality "
                    "can be measured: probe acc. is the pseudo labels' accuracy, probe conf. their mean "
                    "confidence, ECE the expected calibration error (%), probe kept the share above the "
                    "threshold and kept acc. the accuracy of those kept.")
    return Table(columns, rows, [True, False] + [True] * (len(columns) - 2), caption), stats_by_it


def _iteration_blocks(run: RunData, it: Iteration, probe_stats: dict) -> list:
    """An iteration's heading and plots: confidence histogram, per-class counts, reliability diagram."""
    nc, thr = run.num_classes, run.threshold
    blocks: list = [Heading(f"Iteration {it.index}: {it.teacher} labels the pool", f"iteration-{it.index}")]
    lab = it.labels
    if lab is not None and not lab.complete:
        blocks.append(Text(f"Labeling in progress: {lab.shards_done} of {lab.num_shards} shards of "
                           f"`label-{it.index}` are finished; the numbers below cover those.", "warn"))
    figs = []
    if lab is not None:
        png = plots.confidence_histogram(lab.hist, lab.edges, thr, nc)
        if png:
            hard = (it.selection or {}).get("hard", run.cfg("pseudo.hard"))  # the selection's reading
            mode = "hard labels" if hard else f"soft labels, T = {lab.temperature:g}"
            figs.append(Plot(f"confidence-{it.index}", png,
                             f"Iteration {it.index}: the teacher's top-1 confidence on {fmt_int(lab.n)} "
                             f"unlabeled images ({mode}, top-{lab.top_k} classes stored, {lab.precision}); "
                             f"bins below the threshold (dashed) are dropped"
                             + (", the dotted line is chance (1/classes)." if nc else "."),
                             f"confidence histogram, iteration {it.index}"))
    sel = it.selection or {}
    png = plots.class_counts(run.classes, lab.predicted_per_class if lab else None, sel.get("kept_per_class"),
                             sel.get("selected_per_class"),
                             sel.get("per_class") if is_num(sel.get("per_class")) else None)
    if png:
        figs.append(Plot(f"class-counts-{it.index}", png,
                         f"Iteration {it.index}: pseudo-labeled images per predicted class before the threshold, "
                         f"after it, and after balancing to K per class (duplicates counted).",
                         f"per-class counts, iteration {it.index}"))
    if it.probe is not None:
        png = plots.reliability_diagram(it.probe["confidence"], it.probe["correct"], RELIABILITY_BINS)
        if png:
            figs.append(Plot(f"reliability-{it.index}", png,
                             f"Iteration {it.index}: reliability diagram on the probe "
                             f"({fmt_int(probe_stats.get('n'))} labeled validation images, labeled by the same "
                             f"teacher): pseudo-label accuracy against confidence in {RELIABILITY_BINS} bins, "
                             "images per bin on the bars; on the diagonal the teacher is calibrated. "
                             f"ECE {fmt(100 * probe_stats.get('ece', math.nan), 1)}%. "
                             "The validation split chose the teacher's best epoch, so this is slightly optimistic.",
                             f"reliability diagram, iteration {it.index}"))
    if figs:
        blocks.append(Figures(figs))
    elif lab is None and it.selection is None:
        blocks.append(Text("Nothing recorded for this iteration yet.", "note"))
    return blocks


def _read_calibration(run: RunData, index: int) -> dict | None:
    """``label-i/calibration.json``, or None (absent, or damaged: noted in the report's problems)."""
    path = run.root / label_stage(index) / CALIBRATION
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        run.problems.append(f"{path}: unreadable ({type(e).__name__})")
        return None
    return record if isinstance(record, dict) else None


def calibration_blocks(run: RunData) -> list:
    """Per iteration: the temperature calibrated on the validation split and the teacher's expected
    calibration error before and after (``pseudo.calibrate``), and per-class thresholds
    (``pseudo.threshold_mode: per-class``). Empty when neither ran."""
    blocks: list = []
    cals = [(it, c) for it in run.iterations if (c := _read_calibration(run, it.index)) is not None]
    if cals:
        rows = [[str(it.index), fmt(c.get("temperature"), 3), fmt(c.get("labeling_temperature"), 3),
                 fmt_int(c.get("n")), fmt(100 * c["ece_before"], 2) if is_num(c.get("ece_before")) else "–",
                 fmt(100 * c["ece_after"], 2) if is_num(c.get("ece_after")) else "–",
                 fmt(c.get("nll_before"), 3), fmt(c.get("nll_after"), 3)] for it, c in cals]
        bins = cals[-1][1].get("bins", "–")
        blocks += [Heading("Calibrated temperature", "calibration"),
                   Table(["iteration", "T_cal", "labeling T", "val images", "ECE before", "ECE after",
                          "NLL before", "NLL after"], rows, [True] * 8,
                         "The teacher's temperature T_cal, fitted on the labeled validation split (the NLL of "
                         "softmax(logits / T_cal) at its minimum) before labeling, so the threshold reads as a "
                         f"calibrated probability; labeling T = T_cal x pseudo.temperature. ECE: expected "
                         f"calibration error (%, {bins} bins) on the same split, before and after; 'after' is "
                         "measured on the images the temperature was fitted on (`pseudo.calibrate`).")]
    per_class = [(it, it.selection["thresholds_per_class"]) for it in run.iterations
                 if isinstance(it.selection, dict) and isinstance(it.selection.get("thresholds_per_class"), list)]
    if per_class:
        n = max(len(t) for _, t in per_class)
        blocks += [Heading("Per-class thresholds", "per-class-thresholds"),
                   Table(["iteration"] + [run.class_name(c) for c in range(n)],
                         [[str(it.index)] + [fmt(v, 3) for v in t] for it, t in per_class], [True] * (n + 1),
                         "Each predicted class's confidence threshold: the threshold x (the class's mean top-1 "
                         "confidence / the pool's), so classes the teacher is less sure of keep images "
                         "(`pseudo.threshold_mode: per-class`).")]
    return blocks


def hygiene_blocks(run: RunData) -> list:
    """Pool hygiene: per iteration, the pool images dropped as copies of validation or test images
    (``selection.json``'s ``dedup``), and a few example pairs. Empty when no selection ran it."""
    its = [(it, (it.selection or {}).get("dedup")) for it in run.iterations]
    its = [(it, d) for it, d in its if isinstance(d, dict)]
    if not its:
        return []
    rows = []
    for it, d in its:
        held = ", ".join(f"{fmt_int(n)} {split}" for split, n in (d.get("heldout") or {}).items())
        by = ", ".join(f"{fmt_int(n)} {split}" for split, n in (d.get("by_split") or {}).items()) or "–"
        rows.append([str(it.index), fmt_int(d.get("dropped")), fmt_int(d.get("exact")), fmt_int(d.get("near")),
                     by, held, str(d.get("distance", "–"))])
    blocks: list = [Heading("Pool hygiene: copies of held-out images", "pool-hygiene"),
                    Table(["iteration", "dropped", "exact", "near", "copying", "held-out images", "max bits"], rows,
                          [True, True, True, True, False, False, True],
                          "Pool images dropped before the threshold because they copy a validation or test image: "
                          "exact: the same decoded pixels; near: a 64-bit perceptual hash (pHash) at most max bits "
                          "away (resized or re-encoded copies; crops are mostly not caught). copying: dropped images "
                          "per held-out split they copy. The student never trains on them (`pseudo.dedup`).")]
    examples = [(it, e) for it, d in its[-1:] for e in d.get("examples") or []]
    if examples:
        blocks.append(Table(["iteration", "pool image", "copies", "bits apart"],
                            [[str(it.index), f"`{e.get('key')}`", f"{e.get('split')} image {e.get('heldout_index')}",
                              str(e.get("distance"))] for it, e in examples], [True, False, False, True],
                            "Example pairs: a dropped pool image and the held-out image it copies (index in its "
                            "split), closest first."))
    return blocks + pool_copies_blocks([(it, d["pool"]) for it, d in its if isinstance(d.get("pool"), dict)])


def pool_copies_blocks(its: list) -> list:
    """Copies within the pool, per iteration ``(iteration, selection.json's dedup.pool)``: counted,
    not dropped; and a few example pairs of the last iteration."""
    if not its:
        return []
    rows = [[str(it.index), fmt_int(p.get("images")) if p.get("counted")
             else f"not counted (>= {fmt_int(p.get('identical_phash'))})",
             fmt_int(p.get("exact")), fmt_int(p.get("distinct_phash")), str(p.get("distance", "–"))] for it, p in its]
    blocks: list = [Table(["iteration", "with a copy in the pool", "same pixels", "distinct pHashes", "max bits"], rows,
                          [True, True, True, True, True],
                          "Copies within the pool, counted, not dropped: pool images that have another pool image "
                          "with the same decoded pixels (same pixels) or a perceptual hash at most max bits away "
                          "(the same rule as above); each copy is one more vote for its image's pseudo label in "
                          "the student's data. Not counted: more candidate pairs than the count's budget "
                          f"({fmt_int(its[-1][1].get('candidates'))} in the last iteration); >= the images "
                          "whose perceptual hash another has.")]
    examples = [(it, e) for it, p in its[-1:] for e in p.get("examples") or []]
    if examples:
        blocks.append(Table(["iteration", "pool image", "its copy", "bits apart"],
                            [[str(it.index), f"`{e.get('key')}`", f"`{e.get('other')}`", str(e.get("distance"))]
                             for it, e in examples], [True, False, False, True],
                            "Example pairs of pool images that copy each other, closest first."))
    return blocks


def look_section(run: RunData, load_image: ImageLoader | None = None) -> Section | None:
    """A look at the pseudo labels: where each teacher errs on the probe, and (with ``load_image``)
    thumbnails of the pool images it labeled. None when no iteration has a probe or a store."""
    its = [it for it in run.iterations if it.probe is not None or it.labels is not None]
    if not its:
        return None
    blocks: list = [Text("What the pseudo labels look like. The teacher also labels the labeled validation split "
                         "(the probe), so its mistakes can be counted: each confusion matrix row is one true "
                         "class, split by the pseudo label the teacher gave.", "note")]
    if load_image is None:
        blocks.append(Text("Thumbnails of pseudo-labeled images are not included: this report was built without "
                           "access to the unlabeled pool's images.", "note"))
    n = run.num_classes or 0
    for it in its:
        blocks.append(Heading(f"Iteration {it.index}: {it.teacher}'s pseudo labels", f"look-{it.index}"))
        if it.probe is not None and len(it.probe["target"]):
            k = max(n, int(it.probe["target"].max()) + 1, int(it.probe["predicted"].max()) + 1)
            counts = plots.confusion_counts(it.probe["target"], it.probe["predicted"], k)
            png = plots.confusion_matrix(counts, run.classes)
            table = _confusions_table(run, counts)
            figs = [Plot(f"confusion-{it.index}", png,
                         f"Iteration {it.index}: confusion matrix of `{it.teacher}` on the probe "
                         f"({fmt_int(counts.sum())} labeled validation images): each row is a true class, "
                         f"shaded by the share of its images given each pseudo label; counts in the cells.",
                         f"confusion matrix, iteration {it.index}")] if png else []
            blocks.append(Row(([Figures(figs)] if figs else []) + [table if table is not None else Text(
                f"`{it.teacher}` labels every probe image correctly.", "note")]))
        else:
            blocks.append(Text(f"No probe for iteration {it.index}: its confusion matrix is not available.", "note"))
        if load_image is not None and it.gallery:
            gallery = pseudo_label_gallery(it.gallery, load_image, classes=run.classes, iteration=it.index,
                                           threshold=run.threshold)
            if gallery is not None:
                blocks.append(gallery)
    return Section("look", "A look at the pseudo labels", blocks)


def _confusions_table(run: RunData, counts: np.ndarray) -> Table | None:
    """The most frequent mistakes on the probe: true class, pseudo label, images, share."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    if off.sum() == 0:
        return None
    flat = np.argsort(-off, axis=None, kind="stable")[:TOP_CONFUSIONS]
    per_true = counts.sum(1)
    rows = []
    for t, p in zip(*np.unravel_index(flat, off.shape)):
        if off[t, p] == 0:
            break
        rows.append([run.class_name(int(t)), run.class_name(int(p)), fmt_int(off[t, p]),
                     fmt_pct(off[t, p], per_true[t])])
    return Table(["true class", "pseudo label", "images", "share of the class"], rows, [False, False, True, True],
                 f"The teacher's most frequent mistakes on the probe ({fmt_int(off.sum())} of "
                 f"{fmt_int(counts.sum())} images wrong); share: of the true class's probe images.")
