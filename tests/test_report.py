"""The run report: HTML + Markdown of a real tiny run (tests/_report_run.py: the pipeline, with a
fix-res stage, robustness suites and unreadable pool images), checked against what the run itself
wrote; every optional file optional; rendered for real in headless Chromium (which CI installs: a
missing browser fails, it does not skip)."""

import html
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import _report_run as R
from noisystudent.config.schema import load_config
from noisystudent.label.store import LabelStore
from noisystudent.pipeline import open_pool
from noisystudent.report import build_report
from noisystudent.report.collect import collect_run
from noisystudent.report.gallery import pseudo_label_gallery
from noisystudent.report.html import iter_report_images, png_size
from noisystudent.report.plots import calibration, confusion_counts, stage_fraction
from noisystudent.runtime.errors import NoisyStudentError
from noisystudent.runtime.rundir import (CONFIG, DATA, EVALUATE, FIXRES, HISTORY, MANIFEST, METRICS, PROBE, REPORT,
                                         REPORT_HTML, REPORT_MD, ROBUSTNESS, SELECTION_SUMMARY, SUMMARY, TEACHER, BASELINE,
                                         RunDir, label_stage, select_stage, student_stage, write_json_atomic)


@pytest.fixture(scope="module")
def base_run(finished_run):
    """The finished run (conftest's, shared by the suite), with the report it wrote itself; tests
    that change it work on a copy."""
    return finished_run


@pytest.fixture(scope="module")
def full_report(base_run, tmp_path_factory):
    """The report of the run rebuilt as `noisystudent report` builds it: thumbnails read from the
    run's own pool (open_pool)."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(base_run, run)
    return run, build_report(run, pool=open_pool(run))


@pytest.fixture
def run_copy(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run


def _json(path: Path):
    return json.loads(path.read_text())


def _written(run: Path) -> tuple:
    """What the run wrote: its config, summary.json, data.json and each training stage's
    metrics.json by stage name (teacher, students, fixres), in the summary's order."""
    summary = _json(run / SUMMARY)
    return (load_config(run / CONFIG), summary, _json(run / DATA),
            {s["name"]: _json(run / s["name"] / METRICS) for s in summary["stages"]})


def _plain(text: str) -> str:
    """The page's text: tags dropped, entities decoded, runs of white space as one space."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def _section(text: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


def _md_table(md: str, first_columns: str) -> tuple[list[str], list[list[str]]]:
    """The Markdown table whose header starts with ``first_columns``: (columns, rows)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_columns))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return [c.strip() for c in lines[start].strip("|").split(" | ")], rows


# ------------------------------------------------------------------------------ headless Chromium


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium not found: install Debian's `chromium` (CI does) or set CHROMIUM=/path")


CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  // the load event waits for every image: each must have decoded to a real size by now
  var imgs = Array.prototype.slice.call(document.images);
  var wraps = Array.prototype.slice.call(document.querySelectorAll(".table-wrap"));
  var out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({
    images: imgs.map(function (i) {
      return {alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
              shown: i.getBoundingClientRect().width, thumb: !!i.closest("figure.thumb")};
    }),
    tables: document.querySelectorAll("table").length,
    clipped: wraps.filter(function (w) { return w.scrollWidth > w.clientWidth + 1; }).map(function (w) {
      return [w.querySelector("caption") ? w.querySelector("caption").textContent.slice(0, 40) : "?",
              w.scrollWidth, w.clientWidth];
    }),
    overflow: document.documentElement.scrollWidth - window.innerWidth
  });
  document.body.appendChild(out);
});
</script>
"""


BROKEN_IMAGE = '<img alt="negative control" src="data:image/png;base64,iVBORw0KGgoAAAAN">'
WIDE_TABLE = ('<div class="table-wrap"><table><caption>negative control</caption><tr><td style="min-width:2000px">'
              'wide</td></tr></table></div>')


def render_in_chromium(report_html: Path, tmp_path: Path, extra: str = "") -> tuple[dict, str]:
    """Load the report in headless Chromium at 1280 px; return what the page itself measured, and the DOM."""
    page = tmp_path / "check.html"
    text = report_html.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    page.write_text(text.replace("</body>", extra + CHECK_SCRIPT + "</body>"), encoding="utf-8")
    proc = None
    for attempt in range(2):  # one retry, only if the page never reported (a browser start-up hiccup)
        profile = tmp_path / f"chromium-profile-{attempt}"
        profile.mkdir()
        cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", f"--user-data-dir={profile}", "--window-size=1280,1000",
               "--virtual-time-budget=15000", "--dump-dom", page.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
        m = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout, re.S)
        if m:
            return json.loads(html.unescape(m.group(1))), proc.stdout
    pytest.fail(f"the check script never reported; chromium stdout starts {proc.stdout[:300]!r}, "
                f"stderr ends {proc.stderr[-1500:]!r}")


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    _, paths = full_report
    text = paths["html"].read_text()
    expected_images = text.count("<img ")
    expected_tables = text.count("<table>")
    assert expected_images >= 30 and expected_tables >= 10
    result, dom = render_in_chromium(paths["html"], tmp_path, extra=BROKEN_IMAGE + WIDE_TABLE)
    *images, control = result["images"]
    # the check can fail: a truncated PNG (added to the page for this) measures as not loaded
    assert control["alt"] == "negative control" and control["w"] == 0
    assert len(images) == expected_images
    plots = [i for i in images if not i["thumb"]]
    thumbs = [i for i in images if i["thumb"]]
    assert len(plots) >= 15 and len(thumbs) >= 20
    for img in plots:
        assert img["complete"], img
        assert img["w"] > 100 and img["h"] > 100, img
        assert img["shown"] > 100, img  # laid out, not collapsed
    for img in thumbs:
        assert img["complete"] and img["w"] == img["h"] == 32 and img["shown"] == 32, img
    assert result["tables"] == expected_tables + 1
    assert result["overflow"] <= 0, "the page scrolls sideways at 1280 px"
    # three iterations: the per-class table wraps instead of running past the right edge; the
    # check can fail: a 2000 px table (added to the page for this) is the one clipped
    *clipped, control = result["clipped"]
    assert clipped == [] and control[0] == "negative control" and control[1] > control[2], result["clipped"]
    for section in ("results", FIXRES, "data", "pseudo-labels", "look", "robustness", "config", "run"):
        assert f'id="{section}"' in dom


# ------------------------------------------------------------------------------ content


def test_report_files_and_self_contained_html(full_report):
    run, paths = full_report
    assert paths == {"html": run / REPORT / "report.html", "md": run / REPORT / "report.md"}
    text = paths["html"].read_text()
    # self-contained: no external resources, no scripts
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    images = list(iter_report_images(text))
    assert len(images) == text.count("<img ")
    for png in images:
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
    # the Markdown twin points at PNG files that exist: every plot, and each gallery strip as one image
    md = paths["md"].read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    plots = [p for p in images if png_size(p)[0] > 32]
    strips = [r for r in refs if r.startswith("gallery-")]
    assert len(refs) == len(plots) + len(strips) and strips
    assert sorted((run / REPORT / r).read_bytes() for r in refs if not r.startswith("gallery-")) == sorted(plots)
    for r in strips:
        w, h = png_size((run / REPORT / r).read_bytes())
        assert h == 32 and 32 <= w <= 8 * 34
    assert not list((run / REPORT).glob(".*.tmp"))
    # well-formed: every element closed in order, ids unique (the table of contents links to them)
    checker = _TagChecker()
    checker.feed(text)
    assert checker.errors == [] and checker.stack == []
    assert len(checker.ids) == len(set(checker.ids))
    for target in re.findall(r'href="#([^"]+)"', text):
        assert target in checker.ids, target


class _TagChecker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id"]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        else:
            self.errors.append((tag, self.stack[-3:]))


def test_the_run_wrote_this_report_itself(base_run, full_report):
    """The pipeline's last step writes the report (thumbnails from the pool it labeled): the same
    files, byte for byte, as the rebuild; the pages differ only in the run's path and the time."""
    run, _ = full_report
    own, rebuilt = base_run / REPORT, run / REPORT
    names = sorted(p.name for p in own.iterdir())
    assert names == sorted(p.name for p in rebuilt.iterdir()) and any(n.startswith("gallery-") for n in names)
    for name in names:
        if name not in (REPORT_HTML, REPORT_MD):
            assert (own / name).read_bytes() == (rebuilt / name).read_bytes(), name

    def normalised(path: Path, *roots: Path) -> str:
        text = re.sub(r" on \d{4}-\d\d-\d\d \d\d:\d\d \S+ from", " on TIME from", path.read_text())
        for root in roots:
            text = text.replace(str(root), "RUN")
        return text

    for name in (REPORT_HTML, REPORT_MD):
        assert normalised(own / name, base_run) == normalised(rebuilt / name, run, base_run), name


def test_headline_and_stages(full_report):
    run, paths = full_report
    cfg, summary, data, metrics = _written(run)
    text = paths["html"].read_text()
    md = paths["md"].read_text()
    plain = _plain(text)
    chain = [m for name, m in metrics.items() if name not in (FIXRES, BASELINE)]
    teacher, final, fx = metrics[TEACHER], metrics[student_stage(len(cfg.students))], metrics[FIXRES]
    base = metrics[BASELINE]  # the last student's ns_cnn_m on the labels alone, trained like the teacher
    assert [m["name"] for m in chain] == [TEACHER] + [student_stage(i + 1) for i in range(len(cfg.students))]
    assert list(metrics)[1] == BASELINE and base["model"] == final["model"] and base["epochs"] == teacher["epochs"]
    # the final model: best on validation, later chain stages winning ties, the baseline only if strictly best
    order = [FIXRES] + [m["name"] for m in reversed(chain)] + [BASELINE]
    best = max(order, key=lambda n: (metrics[n]["val_top1"], -order.index(n)))
    assert summary["result"] == summary["final"]["stage"] == best
    students = [n for n in order if n not in (TEACHER, BASELINE)]
    ns = max(students, key=lambda n: (metrics[n]["val_top1"], -students.index(n)))
    gain = (metrics[ns]["test_top1"] - base["test_top1"], metrics[ns]["val_top1"] - base["val_top1"])
    # the cards: the Noisy Student gain and the final model first, then teacher -> final student, the
    # change, the share of the teacher's test errors removed
    t1, f1 = teacher["test_top1"], final["test_top1"]
    t_err, f_err = 100 - t1, 100 - f1
    cards = {"Noisy Student gain": (f"{gain[0]:+.2f} pts", f"test top-1, {ns} − {base['model']} on the labels alone "
                                                           f"(baseline); val {gain[1]:+.2f}"),
             "Final model": (best, f"{metrics[best]['model']}: {summary['final']['reason']}"),
             "Teacher test top-1": (f"{t1:.2f}%", f"{teacher['model']}, {teacher['num_labeled']:,} labeled images"),
             "Final student test top-1": (f"{f1:.2f}%", f"{final['name']} · {final['model']}"),
             "Change": (f"{f1 - t1:+.2f} pts", "final student − teacher, test top-1"),
             "Relative error reduction": (f"{100 * (t_err - f_err) / t_err:.0f}%",
                                          f"test error {t_err:.2f}% → {f_err:.2f}%"),
             "After fix-res fine-tune": (f"{fx['test_top1_after']:.2f}%",
                                         f"at {fx['test_size']} px, from {fx['test_top1_before']:.2f}%")}
    columns, (values, notes) = _md_table(md, "| Noisy Student gain |")
    assert dict(zip(columns, zip((v.strip("*") for v in values), notes))) == cards
    for value, note in cards.values():
        assert value in plain and note in plain, (value, note)
    sentence = (f"{len(cfg.students)} iterations of Noisy Student on {cfg.data.source} ({data['num_labeled']:,} "
                f"labeled and {data['num_unlabeled']:,} unlabeled images, {len(data['classes'])} classes; ")
    gap = f"The final student scores {final['val_top1']:.2f}% on validation and {f1:.2f}% on test: a val − test " \
          f"gap of {final['val_top1'] - f1:+.2f} points."
    assert sentence in plain and gap in plain and gap in md
    # a student below its teacher is a finding, and only then
    for prev, s in zip(chain, chain[1:]):
        finding = f"{s['name']} ({s['test_top1']:.2f}%) is below its teacher {prev['name']}"
        assert (finding in plain) == (s["test_top1"] < prev["test_top1"]), finding
    assert "could not be read" not in plain  # every file of the run reads (the pool's bad images are counted)
    # the stage table: every training stage as it wrote metrics.json, then the fix-res stage
    columns, rows = _md_table(md, "| stage | model |")
    table = {r[0].strip("*"): dict(zip(columns, r)) for r in rows}
    assert list(table) == [TEACHER, BASELINE] + [m["name"] for m in chain[1:]] + [f"{final['name']} + fix-res"]
    for m in chain + [base]:
        row = {k: v.strip("*") for k, v in table[m["name"]].items()}
        assert (row["model"], row["px"], row["pseudo"], row["val top-1"], row["val top-5"], row["test top-1"],
                row["test top-5"], row["best epoch"]) == (
            m["model"], str(m["image_size"]), f"{m['num_pseudo']:,}", f"{m['val_top1']:.2f}", f"{m['val_top5']:.2f}",
            f"{m['test_top1']:.2f}", f"{m['test_top5']:.2f}", f"{m['best_epoch']} / {m['epochs']:g}")
        assert row["Δ test"] == ("–" if m is teacher else f"{m['test_top1'] - t1:+.2f}")
    assert all(c.startswith("**") for c in table[final["name"]].values())  # the last student's row is strong
    fixres = table[f"{final['name']} + fix-res"]  # like every stage: after, at the test size
    assert (fixres["model"], fixres["px"], fixres["val top-1"], fixres["test top-1"], fixres["Δ test"]) == (
        fx["model"], str(fx["test_size"]), f"{fx['val_top1_after']:.2f}", f"{fx['test_top1_after']:.2f}",
        f"{fx['test_top1_after'] - t1:+.2f}")
    assert f'<td class="num">{f1:.2f}</td>' in text and '<th scope="row">teacher</th>' in text
    # the plots, and each stage's metrics.jsonl record by record in the training curves
    for name in ("accuracy", "training-curves"):
        assert f'id="fig-{name}"' in text and (run / REPORT / f"{name}.png").is_file(), name
    curves = collect_run(run).curves
    assert list(curves) == list(metrics)
    for name, recs in curves.items():
        assert recs == [json.loads(line) for line in (run / name / HISTORY).read_text().splitlines()], name


def test_fixres_section_reads_the_fixres_stage(full_report):
    run, paths = full_report
    cfg, _, _, metrics = _written(run)
    m, last = metrics[FIXRES], metrics[student_stage(len(cfg.students))]
    section = _plain(_section(paths["html"].read_text(), FIXRES))
    assert "After fix-res fine-tune" in paths["html"].read_text()
    assert m["finetune_epochs"] == cfg.finetune.epochs == 1
    assert (f"{last['name']} ({m['model']}) was trained at {m['train_size']} px and is evaluated at "
            f"{m['test_size']} px. The fix-res fine-tune trains it at {m['test_size']} px on the "
            f"{m['num_labeled']} labeled images without augmentation for 1 epoch, the first "
            f"{m['frozen_blocks']} of its {m['total_blocks']} blocks frozen, learning rate {m['finetune_lr']:g}"
            ) in section
    _, rows = _md_table(paths["md"].read_text(), "| accuracy | before | after | Δ |")
    table = {r[0].strip("*"): [c.strip("*") for c in r[1:]] for r in rows}
    assert list(table) == ["test top-1", "test top-5", "val top-1", "val top-5"]
    for label, cells in table.items():
        key = label.replace(" top-", "_top")
        before, after = m[f"{key}_before"], m[f"{key}_after"]
        assert cells == [f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}"], label


def test_pseudo_labels_are_read_from_the_store(full_report):
    run, paths = full_report
    cfg, summary, data, _ = _written(run)
    md = paths["md"].read_text()
    report = collect_run(run)
    thr = cfg.pseudo.threshold
    # the pool's corrupt files were skipped, in every iteration, and counted in data.json
    assert data["num_unlabeled_unreadable"] == R.NUM_UNREADABLE
    assert data["num_unlabeled"] == summary["pool"]["listed"] - R.NUM_UNREADABLE
    _, rows = _md_table(md, "| iteration | labeled by | pool | mean conf. | below threshold | unreadable |")
    assert len(rows) == len(report.iterations) == len(cfg.students)
    for it, row in zip(report.iterations, rows):
        # what the store's own reader gives, all in memory, against the report's shard-by-shard scan
        store = LabelStore.open(run / label_stage(it.index))
        labels = store.to_pseudo_labels()
        conf, pred = labels.confidence.astype(np.float64), labels.predicted
        assert it.labels.n == len(conf) == store.num_rows == data["num_unlabeled"]
        assert it.labels.num_bad == store.manifest.num_bad == R.NUM_UNREADABLE and it.labels.complete
        np.testing.assert_array_equal(it.labels.predicted_per_class, np.bincount(pred, minlength=10))
        np.testing.assert_array_equal(it.labels.hist, np.histogram(conf, bins=np.linspace(0, 1, 41))[0])
        below = int((conf < thr).sum())
        assert it.labels.below == below and 0 < below < len(conf)
        # the probe as the label stage wrote it: the teacher on the labeled validation split
        probe = pq.read_table(run / label_stage(it.index) / PROBE).to_pydict()
        target, predicted = np.array(probe["target"]), np.array(probe["predicted"])
        pconf = np.array(probe["confidence"], np.float64)
        correct = predicted == target
        assert len(target) == data["num_val"]
        kept = pconf >= thr
        assert row == [str(it.index), it.teacher, f"{len(conf):,}", f"{100 * conf.mean():.1f}",
                       f"{100 * below / len(conf):.1f}%", str(R.NUM_UNREADABLE), str(len(target)),
                       f"{100 * correct.mean():.1f}", f"{100 * pconf.mean():.1f}",
                       f"{100 * calibration(pconf, correct)['ece']:.1f}", f"{100 * kept.mean():.1f}%",
                       f"{100 * correct[kept].mean():.1f}" if kept.any() else "–"]
        # the confusion matrix counts (true, predicted) pairs
        counts = confusion_counts(it.probe["target"], it.probe["predicted"], 10)
        np.testing.assert_array_equal(counts, confusion_counts(target, predicted, 10))
        assert counts.sum() == len(target) and np.trace(counts) == int(correct.sum())
    # the per-class table, first part: iterations 1 and 2 by predicted class
    columns, rows = _md_table(md, "| class | labeled | val | test |")
    first = dict(zip(columns, zip(*rows)))
    for i in (1, 2):
        np.testing.assert_array_equal([int(v.replace(",", "")) for v in first[f"iteration {i} predicted"]],
                                      report.iterations[i - 1].labels.predicted_per_class)
    text = paths["html"].read_text()
    for i in range(1, len(cfg.students) + 1):
        for name in (f"confidence-{i}", f"class-counts-{i}", f"reliability-{i}", f"confusion-{i}"):
            assert f'id="fig-{name}"' in text and (run / REPORT / f"{name}.png").is_file(), name
    plain = _plain(text)
    assert "A look at the pseudo labels" in plain
    # the histogram's caption says how the students read the store: the selection's choice
    mode = "hard labels" if cfg.pseudo.hard else "soft labels"
    assert [it.selection["hard"] for it in report.iterations] == [cfg.pseudo.hard] * len(cfg.students)
    assert plain.count(f"unlabeled images ({mode},") == len(cfg.students)
    assert f"{R.NUM_UNREADABLE} unreadable images skipped" in plain


def test_pseudo_label_galleries_show_the_pool(full_report):
    """Per iteration and predicted class, thumbnails read from the pool: the most confident images,
    the least confident the threshold kept and the most confident it dropped, captioned with the
    confidences the label store holds."""
    run, paths = full_report
    cfg = load_config(run / CONFIG)
    thr = cfg.pseudo.threshold
    md = paths["md"].read_text()
    look = _section(paths["html"].read_text(), "look")
    per_iteration = re.split(r'<h3 id="look-\d+">', look)[1:]
    assert len(per_iteration) == len(cfg.students)
    for i, page in enumerate(per_iteration, start=1):
        labels = LabelStore.open(run / label_stage(i)).to_pseudo_labels()
        conf = labels.confidence.astype(np.float64)
        shown_here = 0
        for c in range(10):
            kept = np.sort(conf[(labels.predicted == c) & (conf >= thr)])[::-1]
            dropped = np.sort(conf[(labels.predicted == c) & (conf < thr)])[::-1]
            # the least confident kept, without those the most confident strip already shows
            for kind, title, shown in (("most", "most confident", kept[:8]),
                                       ("least", "least confident kept", kept[max(8, len(kept) - 8):][::-1]),
                                       ("dropped", "dropped by the threshold", dropped[:8])):
                strip = run / REPORT / f"gallery-{i}-{c}-{kind}.png"
                assert strip.is_file() == (len(shown) > 0), strip.name
                if len(shown):
                    captions = " · ".join(f"{np.floor(v * 100) / 100:.2f}" for v in shown)
                    assert f"{title}: ![class {c}, {title}](gallery-{i}-{c}-{kind}.png) {captions}\n" in md
                    assert png_size(strip.read_bytes()) == (len(shown) * 34 - 2, 32)
                    shown_here += len(shown)
        # in the page: one thumbnail per image, titled with the pool image's key as the store labeled it
        store = {k: (int(p), v) for k, p, v in zip(labels.keys, labels.predicted, conf)}
        thumbs = re.findall(r'<figure class="thumb"><img src="data:image/png;base64,[^"]+" alt="([^"]+)"', page)
        assert len(thumbs) == shown_here == page.count('<figure class="thumb">')
        for alt in thumbs:
            key, c, v = re.fullmatch(r"(.+): pseudo label (\d+), confidence ([\d.]+)", html.unescape(alt)).groups()
            assert (store[key][0], f"{store[key][1]:.3f}") == (int(c), v), alt
    assert "could not be read" not in _plain(look)


def test_most_frequent_confusions_table(full_report):
    run, paths = full_report
    probe = pq.read_table(run / label_stage(1) / PROBE).to_pydict()
    counts = confusion_counts(np.array(probe["target"]), np.array(probe["predicted"]), 10)
    wrong = int(counts.sum() - np.trace(counts))
    np.fill_diagonal(counts, 0)
    t, p = np.unravel_index(np.argmax(counts), counts.shape)
    look = _plain(_section(paths["html"].read_text(), "look"))
    first = re.search(r"true class\s+pseudo label\s+images\s+share of the class\s+(\S+)\s+(\S+)\s+(\d+)", look)
    assert first and (first.group(1), first.group(2), int(first.group(3))) == (str(t), str(p), counts[t, p])
    assert wrong > 0 and f"({wrong} of {len(probe['target'])} images wrong)" in look


def test_data_section(full_report):
    run, paths = full_report
    cfg, _, data, _ = _written(run)
    plain = _plain(_section(paths["html"].read_text(), "data"))
    md = paths["md"].read_text()
    moved = data["num_labels_moved_to_pool"]
    assert moved > 0 and (f"{moved:,} labeled images moved to the unlabeled pool "
                          f"(labels_per_class={cfg.data.labels_per_class})") in plain
    _, rows = _md_table(md, "| split | images | per class | role |")
    assert [r[:3] for r in rows] == [
        ["labeled (train)", f"{data['num_labeled']:,}", str(cfg.data.labels_per_class)],
        ["unlabeled pool", f"{data['num_unlabeled']:,}", "–"], ["validation", f"{data['num_val']:,}",
                                                                str(cfg.data.val_per_class)],
        ["test", f"{data['num_test']:,}", str(cfg.data.test_per_class)]]
    assert rows[1][3].endswith(f"({data['num_unlabeled_unreadable']} unreadable images skipped)")
    # each iteration's selection, as select-i/selection.json has it
    _, rows = _md_table(md, "| iteration | labeled by | pool |")
    assert len(rows) == len(cfg.students)
    for i, row in enumerate(rows, start=1):
        sel = _json(run / select_stage(i) / SELECTION_SUMMARY)
        n = LabelStore.open(run / label_stage(i)).num_rows
        kept = sum(sel["kept_per_class"])
        assert row == [str(i), TEACHER if i == 1 else student_stage(i - 1), f"{n:,}", f"{sel['num_below_threshold']:,}",
                       f"{kept:,}",
                       f"{100 * kept / n:.1f}%", str(sel["per_class"]), f"{sel['num_selected']:,}",
                       f"{sel['num_unique']:,}", f"{sel['num_selected'] - sel['num_unique']:,}"]
    # past two iterations the per-class table wraps into a second table with its own class column
    assert "| class | iteration 3 predicted | iteration 3 kept |" in md and "| iteration 2 probe acc. |" in md
    assert "Images per class, continued: iteration 3" in md
    columns, rows = _md_table(md, "| class | iteration 3 predicted |")
    third = dict(zip(columns, zip(*rows)))
    sel = _json(run / select_stage(3) / SELECTION_SUMMARY)
    assert [int(v.replace(",", "")) for v in third["iteration 3 kept"]] == sel["kept_per_class"]
    assert [int(v.replace(",", "")) for v in third["iteration 3 selected"]] == sel["selected_per_class"]


def test_robustness_section_reads_real_results(full_report):
    run, paths = full_report
    cfg, summary, _, metrics = _written(run)
    results = _json(run / EVALUATE / ROBUSTNESS)
    text = paths["html"].read_text()
    md = paths["md"].read_text()
    # side by side: the first teacher, the baseline (the same architecture on the labels alone), the
    # best student on validation and the final model, each once
    compared = [TEACHER, BASELINE, summary["ns_gain"]["student"], summary["result"]]
    assert list(results) == list(dict.fromkeys(compared))
    labels = {name: f"{name} ({metrics[name]['model']})" for name in results}
    n = {r["n_images"] for r in results.values()}
    assert n == {cfg.evaluate.max_images} and f"Evaluated on {cfg.evaluate.max_images} test images: " \
        + ", ".join(f"`{label}`" for label in labels.values()) + "." in md
    eps, steps = cfg.evaluate.fgsm_eps[-1], cfg.evaluate.pgd_steps
    columns, rows = _md_table(md, "| model | clean top-1 |")
    table = {r[0]: dict(zip(columns, r)) for r in rows}
    assert list(table) == list(labels.values())
    for name, r in results.items():
        row = table[labels[name]]
        expected = {"clean top-1": r["clean"]["top1"], "clean top-5": r["clean"]["top5"],
                    "corruption error": r["corruptions"]["mean_error"], "mCE": r["corruptions"]["mce"],
                    "relative mCE": r["corruptions"]["relative_mce"],
                    "flip prob.": r["perturbations"]["mean_flip_prob"], "mFR": r["perturbations"]["mfr"],
                    "mT5D": r["perturbations"]["mt5d"], f"FGSM top-1 (eps {eps:g})": r["fgsm"]["top1"][-1],
                    f"PGD top-1 (eps {eps:g})": r["pgd"]["top1"][-1]}
        assert {k: row[k] for k in expected} == {k: f"{v:,.2f}" for k, v in expected.items()}, name
    # per corruption (averaged over severities; CE where AlexNet has one) and per perturbation
    for first, prefix, values in (
            ("| corruption |", "error (%)", lambda r: {k: np.mean(v) for k, v in r["corruptions"]["error"].items()}),
            ("| corruption |", "CE (%)", lambda r: {k: r["corruptions"]["ce"].get(k)
                                                    for k in r["corruptions"]["error"]}),
            ("| perturbation |", "FR", lambda r: r["perturbations"]["fr"])):
        columns, rows = _md_table(md, first)
        for name, r in results.items():
            shown = {row[0]: row[columns.index(f"{prefix} {name}")] for row in rows}
            assert shown == {k.replace("_", " "): "–" if v is None else f"{v:,.2f}" for k, v in values(r).items()}, \
                (prefix, name)
    # the attacks: top-1 at each eps
    columns, rows = _md_table(md, "| eps |")
    assert columns == ["eps"] + [f"{name} {kind}" for name in results for kind in ("FGSM", f"PGD-{steps}")]
    assert [float(r[0]) for r in rows] == cfg.evaluate.fgsm_eps
    for j, row in enumerate(rows):
        assert row[1:] == [f"{results[name][suite]['top1'][j]:,.2f}" for name in results for suite in ("fgsm", "pgd")]
    for name in ("robustness-corruptions", "robustness-perturbations", "robustness-attacks"):
        assert f'id="fig-{name}"' in text and (run / REPORT / f"{name}.png").is_file()


def test_unknown_robustness_suite_is_shown_as_numbers(run_copy):
    path = run_copy / EVALUATE / ROBUSTNESS
    results = json.loads(path.read_text())
    results[TEACHER]["a_new_suite"] = {"score": 1.25, "detail": [1, 2]}
    write_json_atomic(path, results | {"version": 2})
    text = _plain(build_report(run_copy)["html"].read_text())
    assert "a_new_suite.score" in text and "1.25" in text and "version" in text


# ------------------------------------------------------------------------------ the gallery hook


def test_gallery_hook_with_a_fake_loader(base_run):
    run = collect_run(base_run, gallery_size=8)
    it = run.iterations[0]
    thr = load_config(base_run / CONFIG).pseudo.threshold
    labels = LabelStore.open(base_run / label_stage(1)).to_pseudo_labels()
    conf = dict(zip(labels.keys, labels.confidence.astype(np.float64)))
    pred = dict(zip(labels.keys, labels.predicted))
    bad_key = it.gallery["most"][min(it.gallery["most"])][0].key
    asked = []

    def load(key):
        asked.append(key)
        if key == bad_key:
            raise OSError("gone")
        return Image.new("L", (20, 10), 128)  # not square: fitted into 32 x 32

    gallery = pseudo_label_gallery(it.gallery, load, classes=run.classes, iteration=1, threshold=thr)
    assert set(asked) <= set(labels.keys) and bad_key in asked
    for label, strips in gallery.rows:
        c = int(label.removeprefix("class "))
        for strip in strips:
            assert 1 <= len(strip.thumbs) <= 8
            keys = [t.alt.split(":")[0] for t in strip.thumbs]
            assert all(pred[k] == c for k in keys)
            shown = [conf[k] for k in keys]
            of_class = sorted((v for k, v in conf.items() if pred[k] == c), reverse=True)
            if strip.title == "most confident":
                assert shown == of_class[:len(shown)]
            elif strip.title == "least confident kept":
                assert shown == sorted(v for v in of_class if v >= thr)[:len(shown)]
            else:
                assert strip.title == "dropped by the threshold"
                assert shown == [v for v in of_class if v < thr][:len(shown)]
            for t, k in zip(strip.thumbs, keys):
                if k == bad_key:
                    assert t.png is None and "unreadable" in t.caption
                else:
                    assert png_size(t.png) == (32, 32) and t.caption == f"{np.floor(conf[k] * 100) / 100:.2f}"
    assert "1 image(s) could not be read" in gallery.note
    titles = {s.title for _, strips in gallery.rows for s in strips}
    assert titles == {"most confident", "least confident kept", "dropped by the threshold"}


def test_no_thumbnails_without_the_pool(run_copy):
    text = build_report(run_copy)["html"].read_text()
    assert "figure class=\"thumb\"" not in text and "without access to the unlabeled pool" in _plain(text)
    assert not list((run_copy / REPORT).glob("gallery-*.png"))


# ------------------------------------------------------------------------------ partial and broken runs


@pytest.mark.slow
def test_incomplete_run_without_optional_files(tmp_path):
    run = R.make_stopped_run(tmp_path / "run")  # student-1 of two finished; no summary, fix-res or evaluation
    for probe in run.glob(f"label-*/{PROBE}"):
        probe.unlink()  # as a run made before the label stage recorded its probe
    # labeling of iteration 2 was killed before its last shard finished: no done record for it
    done = sorted((run / label_stage(1) / "done").glob("part-*.json"))
    assert len(done) > 1
    shutil.copytree(run / label_stage(1), run / label_stage(2))
    sorted((run / label_stage(2) / "done").glob("part-*.json"))[-1].unlink()
    student = _json(run / student_stage(1) / METRICS)
    finished = list(_json(run / MANIFEST)["stages"])
    assert finished == [TEACHER, label_stage(1), select_stage(1), student_stage(1)]
    text = _plain(build_report(run)["html"].read_text())
    stages = 1 + 3 * len(load_config(run / CONFIG).students)  # the teacher, then label, select, student each
    assert f"The run is incomplete: {len(finished)} of {stages} stages finished; next: label-2" in text
    assert f"Labeling in progress: {len(done) - 1} of {len(done)} shards of label-2" in text
    assert "No probe files" in text and "reliability-" not in text
    assert 'id="robustness"' not in text and "fix-res fine-tune" not in text
    # the last finished student, read from its folder
    assert f"Final student test top-1 {student['test_top1']:.2f}% {student['name']} · {student['model']}" in text


def test_minimal_and_broken_runs_still_report(run_copy, tmp_path):
    # a run that crashed in its first stage: only config.yaml and manifest.json, as RunDir.open writes them
    early = tmp_path / "early"
    RunDir.open(early, load_config(run_copy / CONFIG), resume=False)
    text = build_report(early)["html"].read_text()
    assert "No stage has finished yet" in text and "<img " not in text
    # corrupt optional files are named in the report, not fatal
    run = run_copy
    (run / EVALUATE / ROBUSTNESS).write_text("{not json")
    (run / label_stage(1) / PROBE).write_bytes(b"PAR1 garbage")
    next((run / label_stage(2) / "shards").glob("part-*.parquet")).write_bytes(b"PAR1 garbage")
    with (run / TEACHER / HISTORY).open("a") as f:
        f.write("{truncated\n")
    (run / DATA).write_text("[1, 2]")
    page = build_report(run)["html"].read_text()
    text = _plain(page)
    assert "5 file(s) could not be read" in text
    for problem in ("evaluate/robustness.json is unreadable", "label-1/probe.parquet is unreadable",
                    "label-2 is unreadable (DataError: unreadable pseudo-label shard",
                    "teacher/metrics.jsonl : 1 unreadable line(s) skipped", "data.json has an unexpected layout"):
        assert problem in text, problem
    assert 'id="fig-reliability-2"' in page and 'id="fig-confidence-1"' in page
    assert 'id="fig-reliability-1"' not in page and 'id="fig-confidence-2"' not in page


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_not_a_run_directory_is_a_one_line_error(tmp_path, kind):
    path = tmp_path / "nope"
    if kind == "file":
        path.write_text("x")
    elif kind == "empty":
        path.mkdir()
    with pytest.raises(NoisyStudentError) as e:
        build_report(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_rebuild_replaces_atomically_and_drops_stale_plots(run_copy):
    run = run_copy
    first = build_report(run)
    stale = run / REPORT / "reliability-9.png"
    stale.write_bytes(b"old")
    keep = run / REPORT / "my-notes.png"
    keep.write_bytes(b"mine")
    shutil.rmtree(run / EVALUATE)
    second = build_report(run)
    assert first == second
    assert not stale.exists() and keep.exists()
    assert not (run / REPORT / "robustness-attacks.png").exists()
    assert 'id="robustness"' not in second["html"].read_text()
    assert not [p for p in (run / REPORT).iterdir() if p.name.endswith(".tmp")]
    # and a folder where the report goes that cannot be written is one line
    shutil.rmtree(run / REPORT)
    (run / REPORT).write_text("a file where the report folder goes")
    with pytest.raises(NoisyStudentError, match="cannot write"):
        build_report(run)


def test_many_classes_are_summarised(run_copy):
    data = json.loads((run_copy / DATA).read_text())
    data["classes"] = [f"class<{i}>" for i in range(100)]
    data["labeled_per_class"] = [1] * 100
    write_json_atomic(run_copy / DATA, data)
    text = build_report(run_copy)["html"].read_text()
    assert "100 classes, summarised" in text
    assert "class<3>" not in text  # escaped wherever it appears
    assert re.search(r'<th scope="row">median</th>', text)


# ------------------------------------------------------------------------------ numbers and plots


def test_calibration_statistics():
    conf = np.array([0.05, 0.15, 0.15, 0.95, 0.95, 0.95, 0.95])
    correct = np.array([0, 0, 1, 1, 1, 1, 0])
    st = calibration(conf, correct, bins=10)
    assert st["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 4]
    assert st["accuracy"][1] == pytest.approx(0.5) and np.isnan(st["accuracy"][2])
    assert st["accuracy"][9] == pytest.approx(0.75)
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 4 * abs(0.75 - 0.95)) / 7
    assert st["ece"] == pytest.approx(expected)
    assert calibration(np.ones(5), np.ones(5))["ece"] == pytest.approx(0.0)
    assert calibration(np.ones(4) * 0.3, np.zeros(4))["count"][2] == 4  # 0.3 falls in (0.2, 0.3]


def test_training_curves_share_one_axis_by_fraction_of_the_stage():
    teacher = [{"epoch": e} for e in range(1, 101)]
    student = [{"epoch": e} for e in (1, 2, 3)]
    fixres = [{"epoch": e} for e in (0.5, 1.0, 1.5)]
    np.testing.assert_allclose(stage_fraction(teacher, 100)[[0, -1]], [0.01, 1.0])
    np.testing.assert_allclose(stage_fraction(student, 3), [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(stage_fraction(fixres, 1.5), [1 / 3, 2 / 3, 1.0])
    # a stage still running (3 of 10 epochs) is drawn to 0.3; an unknown length ends at 1
    np.testing.assert_allclose(stage_fraction(student, 10), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(stage_fraction(student, None), [1 / 3, 2 / 3, 1.0])
