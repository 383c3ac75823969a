"""The run report: HTML + Markdown from a run directory written by the project's own writers
(tests/_report_run.py), every optional file optional, rendered for real in headless Chromium
(which CI installs: a missing browser fails, it does not skip)."""

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
import pytest
from PIL import Image

import _report_run as R
from noisystudent.config.schema import load_config
from noisystudent.label.store import LabelStore
from noisystudent.report import build_report
from noisystudent.report.collect import collect_run
from noisystudent.report.gallery import pseudo_label_gallery
from noisystudent.report.html import iter_report_images, png_size
from noisystudent.report.plots import calibration, confusion_counts, stage_fraction
from noisystudent.runtime.errors import NoisyStudentError
from noisystudent.runtime.rundir import (DATA, EVALUATE, FIXRES, HISTORY, METRICS, PROBE, REPORT, ROBUSTNESS,
                                         TEACHER, RunDir, label_stage, write_json_atomic)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished three-iteration run (no report yet); tests that change it work on a copy."""
    return R.make_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def full_report(base_run, tmp_path_factory):
    """The report of the full run, thumbnails read from the pool by random access."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(base_run, run)
    return run, build_report(run, pool=R.pool_source())


@pytest.fixture
def run_copy(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run


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


def test_headline_and_stages(full_report):
    run, paths = full_report
    text = paths["html"].read_text()
    md = paths["md"].read_text()
    plain = _plain(text)
    # teacher -> final student, delta, relative error reduction (68 -> 80.25 removes 38% of the errors)
    for needle in ("68.00%", "80.25%", "+12.25 pts", "38%", "val − test gap of +1.75", "81.50%", "at 24 px, from 80.25%"):
        assert needle in plain, needle
        assert needle in md, needle
    columns, rows = _md_table(md, "| stage | model |")
    stages = {r[0].strip("*"): dict(zip(columns, r)) for r in rows}
    assert list(stages) == ["teacher", "student-1", "student-2", "student-3", "student-3 + fix-res"]
    assert stages["student-3"]["test top-1"] == "**80.25**" and stages["teacher"]["best epoch"] == "59 / 60"
    fixres = stages["student-3 + fix-res"]  # the fix-res stage, like every stage: after, at the test size
    assert (fixres["px"], fixres["val top-1"], fixres["test top-1"], fixres["Δ test"]) == ("24", "83.00", "81.50",
                                                                                       "+13.50")
    assert re.search(r'<td class="num">80\.25</td>', text) and '<th scope="row">teacher</th>' in text
    assert "could not be read" not in plain  # nothing to warn about in a healthy run


def test_fixres_section_reads_the_fixres_stage(full_report):
    run, paths = full_report
    m = json.loads((run / FIXRES / METRICS).read_text())
    section = _plain(_section(paths["html"].read_text(), FIXRES))
    assert "After fix-res fine-tune" in paths["html"].read_text()
    assert f"trained at {m['train_size']} px and is evaluated at {m['test_size']} px" in section
    assert f"the first {m['frozen_blocks']} of its {m['total_blocks']} blocks frozen" in section
    _, rows = _md_table(paths["md"].read_text(), "| accuracy | before | after | Δ |")
    table = {r[0].strip("*"): [c.strip("*") for c in r[1:]] for r in rows}
    for key, label in (("test_top1", "test top-1"), ("val_top5", "val top-5")):
        before, after = m[f"{key}_before"], m[f"{key}_after"]
        assert table[label] == [f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}"]
    # its training history (fixres/metrics.jsonl) goes into the training-curve plot
    assert len(collect_run(run).curves[FIXRES]) == len((run / FIXRES / HISTORY).read_text().splitlines())


def test_pseudo_labels_are_read_from_the_store(full_report):
    run, paths = full_report
    md = paths["md"].read_text()
    data = collect_run(run)
    columns, rows = _md_table(md, "| class | labeled | val | test |")
    thr = load_config(run / "config.yaml").pseudo.threshold
    for it in data.iterations:
        # what the store's own reader gives, all in memory, against the report's shard-by-shard scan
        labels = LabelStore.open(run / label_stage(it.index)).to_pseudo_labels()
        conf, pred = labels.confidence.astype(np.float64), labels.predicted
        assert it.labels.n == len(conf) == R.POOL_IMAGES - it.labels.num_bad
        assert it.labels.num_bad == 10 and it.labels.complete
        np.testing.assert_array_equal(it.labels.predicted_per_class, np.bincount(pred, minlength=10))
        np.testing.assert_array_equal(it.labels.hist, np.histogram(conf, bins=np.linspace(0, 1, 41))[0])
        assert it.labels.below == int((conf < thr).sum()) and 0 < it.labels.below < len(conf)
        # the probe's confusion matrix counts (true, predicted) pairs
        probe = it.probe
        counts = confusion_counts(probe["target"], probe["predicted"], 10)
        assert counts.sum() == len(probe["target"]) and np.trace(counts) == int(probe["correct"].sum())
        assert counts[probe["target"][0], probe["predicted"][0]] >= 1
    # the per-class table, first part: iterations 1 and 2 by predicted class
    first = dict(zip(columns, zip(*rows)))
    for i in (1, 2):
        np.testing.assert_array_equal([int(v) for v in first[f"iteration {i} predicted"]],
                                      data.iterations[i - 1].labels.predicted_per_class)
    text = paths["html"].read_text()
    for i in (1, 2, 3):
        for name in (f"confidence-{i}", f"class-counts-{i}", f"reliability-{i}", f"confusion-{i}"):
            assert f'id="fig-{name}"' in text and (run / REPORT / f"{name}.png").is_file(), name
    plain = _plain(text)
    assert "A look at the pseudo labels" in plain
    assert "10 unreadable images skipped" in plain


def test_most_frequent_confusions_table(full_report):
    run, paths = full_report
    it = collect_run(run).iterations[0]
    counts = confusion_counts(it.probe["target"], it.probe["predicted"], 10)
    np.fill_diagonal(counts, 0)
    t, p = np.unravel_index(np.argmax(counts), counts.shape)
    look = _plain(_section(paths["html"].read_text(), "look"))
    first = re.search(r"true class\s+pseudo label\s+images\s+share of the class\s+(\S+)\s+(\S+)\s+(\d+)", look)
    assert first and (first.group(1), first.group(2), int(first.group(3))) == (str(t), str(p), counts[t, p])
    assert f"({counts.sum()} of {len(it.probe['target'])} images wrong)" in look


def test_data_section(full_report):
    run, paths = full_report
    data = json.loads((run / DATA).read_text())
    plain = _plain(_section(paths["html"].read_text(), "data"))
    moved = data["num_labels_moved_to_pool"]
    assert moved > 0 and f"{moved:,} labeled images moved to the unlabeled pool (labels_per_class=5)" in plain
    _, rows = _md_table(paths["md"].read_text(), "| iteration | labeled by | pool |")
    for it, row in zip(collect_run(run).iterations, rows):
        sel = it.selection
        assert row[:3] == [str(it.index), it.teacher, str(it.labels.n)]
        assert row[7:] == [str(sel["num_selected"]), str(sel["num_unique"]), str(sel["num_selected"] - sel["num_unique"])]
    # past two iterations the per-class table wraps into a second table with its own class column
    md = paths["md"].read_text()
    assert "| class | iteration 3 predicted | iteration 3 kept |" in md and "| iteration 2 probe acc. |" in md
    assert "Images per class, continued: iteration 3" in md


def test_robustness_section_reads_real_results(full_report):
    _, paths = full_report
    text = _plain(paths["html"].read_text())
    md = paths["md"].read_text()
    for needle in ("mCE", "mFR", "FGSM top-1 (eps 8)", "PGD-2", "corruption error", "flip prob."):
        assert needle in text, needle
    for needle in ("| CE (%) teacher |", "| FR student-3 |"):
        assert needle in md, needle
    for name in ("robustness-corruptions", "robustness-perturbations", "robustness-attacks"):
        assert f'id="fig-{name}"' in paths["html"].read_text()


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

    gallery = pseudo_label_gallery(it.gallery, load, classes=run.classes, iteration=1, threshold=0.3)
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
                assert shown == sorted(v for v in of_class if v >= 0.3)[:len(shown)]
            else:
                assert strip.title == "dropped by the threshold"
                assert shown == [v for v in of_class if v < 0.3][:len(shown)]
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


def test_incomplete_run_without_optional_files(tmp_path):
    run = R.make_run(tmp_path / "run", probe=False, robustness=False, fixres=False, complete=False)
    # labeling of iteration 2 was killed after four of its five shards: no done record for the last
    done = sorted((run / label_stage(1) / "done").glob("part-*.json"))
    shutil.copytree(run / label_stage(1), run / label_stage(2))
    done_2 = sorted((run / label_stage(2) / "done").glob("part-*.json"))
    done_2[-1].unlink()
    text = _plain(build_report(run)["html"].read_text())
    assert "The run is incomplete" in text and "next: label-2" in text
    assert f"Labeling in progress: {len(done) - 1} of {len(done)} shards of label-2" in text
    assert "No probe files" in text and "reliability-" not in text
    assert 'id="robustness"' not in text and "fix-res fine-tune" not in text
    assert "student-1" in text and "75.50%" in text  # the last finished student, read from its folder


def test_minimal_and_broken_runs_still_report(run_copy, tmp_path):
    # a run that crashed in its first stage: only config.yaml and manifest.json, as RunDir.open writes them
    early = tmp_path / "early"
    RunDir.open(early, load_config(None, R.TINY), resume=False)
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


def test_report_of_a_real_tiny_run(tmp_path):
    """End to end on what the pipeline really writes (one student, one epoch each, few images)."""
    from noisystudent.pipeline import run_pipeline

    cfg = load_config(None, ["teacher.epochs=1", "train.epochs=1", "train.batch_size=16", "data.val_per_class=2",
                             "data.test_per_class=3", "data.max_unlabeled=40", "pseudo.threshold=0.0",
                             "students=[{model: ns_cnn_s}]", "finetune.enabled=true", "finetune.epochs=0.5"])
    run_pipeline(cfg, tmp_path / "run", progress=False)
    paths = build_report(tmp_path / "run")
    text = paths["html"].read_text()
    plain = _plain(text)
    assert "Final student test top-1" in plain and "could not be read" not in plain
    for name in ("accuracy", "training-curves", "confidence-1", "class-counts-1", "reliability-1", "confusion-1"):
        assert f'id="fig-{name}"' in text, name
    fx = json.loads((tmp_path / "run" / FIXRES / METRICS).read_text())
    assert "After fix-res fine-tune" in plain and f"{fx['test_top1_after']:.2f}" in _plain(_section(text, FIXRES))
