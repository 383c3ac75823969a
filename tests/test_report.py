"""The run report: HTML + Markdown from a run directory, every optional file optional, rendered
for real in headless Chromium (which CI installs: a missing browser fails, it does not skip)."""

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from noisystudent.config.schema import load_config
from noisystudent.runtime.errors import NoisyStudentError
from noisystudent.label.pseudo_labels import PseudoLabels
from noisystudent.report.build import build_report, iter_report_images
from noisystudent.report.plots import calibration
from noisystudent.label.select import select_pseudo_labels

CLASSES = [str(i) for i in range(10)]
TINY = ["teacher.epochs=3", "train.epochs=1", "train.batch_size=16", "data.val_per_class=5",
        "data.test_per_class=10", "data.max_unlabeled=200", "pseudo.threshold=0.3"]


# ------------------------------------------------------------------------------ a synthetic run


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _stage_metrics(name, model, val, test, params, pseudo, epochs):
    return {"name": name, "model": model, "val_top1": val, "val_top5": min(100.0, val + 15), "test_top1": test,
            "test_top5": min(100.0, test + 16), "num_labeled": 50, "num_pseudo": pseudo, "seconds": 12.5 + val / 10,
            "params": params, "best_epoch": epochs - 1, "epochs": epochs, "steps": 40, "images_seen": 2000,
            "image_size": 16, "dropout": 0.3, "drop_path": 0.1, "some_future_key": {"nested": [1, 2]}}


def _curve(epochs, start, end):
    return [{"epoch": e, "step": 4 * e, "loss": 2.3 - 1.5 * e / epochs, "val_top1": start + (end - start) * e / epochs,
             "val_top5": 90.0, "lr": 0.05, "seconds": 1.0 * e} for e in range(1, epochs + 1)]


ROBUSTNESS = {
    "n_images": 400, "seed": 0,
    "clean": {"top1": 70.0, "top5": 97.0, "error": 30.0, "n": 400},
    "corruptions": {"severities": [1, 2, 3, 4, 5],
                    "error": {"gaussian_noise": [35, 42, 50, 61, 70], "contrast": [33, 38, 45, 55, 66],
                              "speckle_noise": [34, 40, 47, 56, 63]},
                    "mean_error": 49.0, "extra_mean_error": 48.0, "clean_error": 30.0, "preset": "cifar"},
    "perturbations": {"flip_prob": {"gaussian_noise": 8.0, "translate": 21.0}, "mean_flip_prob": 14.5,
                      "t5d": {"gaussian_noise": 0.8, "translate": 2.1}, "mt5d": 1.45,
                      "frames": {"gaussian_noise": 31, "translate": 16}, "preset": "cifar"},
    "fgsm": {"eps": [0.0, 2.0, 4.0, 8.0], "top1": [70.0, 40.0, 21.0, 5.0]},
    "pgd": {"eps": [0.0, 2.0, 4.0, 8.0], "top1": [70.0, 30.0, 9.0, 0.5], "steps": 10,
            "step_size": [0, 0.5, 1, 2]},
}


def make_run(root: Path, *, probe=True, robustness=True, finetune=True, complete=True, seed=0) -> Path:
    """A run directory with every file the pipeline writes (two iterations), without training."""
    rng = np.random.default_rng(seed)
    cfg = load_config(None, TINY + ["students=[{model: ns_cnn_s}, {model: ns_cnn_m}]"])
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _write_json(root / "data.json", {
        "classes": CLASSES, "channels": 1, "num_labeled": 50, "num_unlabeled": 300, "num_val": 50, "num_test": 100,
        "labeled_per_class": [5] * 10, "val_per_class": [5] * 10, "test_per_class": [10] * 10})
    stages = [_stage_metrics("teacher", "ns_cnn_s", 70.0, 68.0, 310_000, 0, 3),
              _stage_metrics("student-1", "ns_cnn_s", 78.0, 75.5, 310_000, 300, 2),
              _stage_metrics("student-2", "ns_cnn_m", 82.0, 80.25, 1_520_000, 300, 2)]
    if not complete:
        stages = stages[:2]
    manifest = {"fingerprint": cfg.fingerprint(), "created": time.time() - 100, "stages": {}}
    for i, s in enumerate(stages):
        d = root / s["name"]
        _write_json(d / "metrics.json", s)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                 _curve(s["epochs"] + 2, 10.0, s["val_top1"])))
        (d / "model.pt").write_bytes(b"not a real checkpoint: the report never loads models")
        manifest["stages"][s["name"]] = {"finished": time.time() - 50 + i, "seconds": s["seconds"],
                                         "files": ["metrics.json", "metrics.jsonl", "model.pt"]}
        if i == len(stages) - 1:
            break
        it = i + 1
        n = 300
        logits = rng.normal(size=(n, 10)) * 2.5
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        order = np.argsort(-probs, axis=1)[:, :5]
        labels = PseudoLabels(keys=[f"img-{j}" for j in range(n)], topk_index=order.astype(np.int32),
                              topk_prob=np.take_along_axis(probs, order, 1).astype(np.float32), num_classes=10,
                              teacher=s["name"], temperature=1.0, hard=False)
        (root / f"label-{it}").mkdir()
        labels.save(root / f"label-{it}" / "pseudo_labels.parquet")
        if probe:
            conf = rng.uniform(0.1, 1.0, size=50).astype(np.float32)
            target = np.repeat(np.arange(10), 5).astype(np.int32)
            right = rng.uniform(size=50) < conf
            pred = np.where(right, target, (target + 1) % 10).astype(np.int32)
            pq.write_table(pa.table({"confidence": conf, "predicted": pred, "target": target}),
                           root / f"label-{it}" / "probe.parquet")
        sel = select_pseudo_labels(labels.confidence, labels.predicted, 10, threshold=0.3, seed=it)
        _write_json(root / f"select-{it}" / "selection.json", sel.summary())
        pq.write_table(pa.table({"row": pa.array(sel.rows, pa.int64())}), root / f"select-{it}" / "selection.parquet")
        for stage in (f"label-{it}", f"select-{it}"):
            manifest["stages"][stage] = {"finished": time.time(), "seconds": 1.0, "files": []}
    _write_json(root / "manifest.json", manifest)
    (root / "run.log").write_text("log\n")
    if complete:
        _write_json(root / "summary.json", {"run_dir": str(root), "config_fingerprint": cfg.fingerprint(),
                                            "seconds": 95.0, "stages": stages, "result": "student-2",
                                            "an_unknown_key": [1, 2, 3]})
    if finetune:
        # the flat layout of noisystudent.train.fixres.FinetuneResult.metrics()
        _write_json(root / "finetune" / "metrics.json", {
            "val_top1_before": 82.0, "val_top5_before": 97.0, "test_top1_before": 80.25, "test_top5_before": 96.0,
            "val_top1_after": 83.0, "val_top5_after": 97.0, "test_top1_after": 81.5, "test_top5_after": 96.5,
            "frozen_blocks": 4, "total_blocks": 6, "finetune_epochs": 1.5, "seconds": 4.2, "test_size": 24})
    if robustness:
        student = json.loads(json.dumps(ROBUSTNESS))
        student["clean"]["top1"] = 80.0
        student["fgsm"]["top1"] = [80.0, 52.0, 30.0, 9.0]
        student["a_new_suite"] = {"score": 1.25, "detail": [1, 2]}
        _write_json(root / "evaluate" / "robustness.json", {"teacher": ROBUSTNESS, "student-2": student,
                                                             "version": 2})
    return root


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    return run, build_report(run)


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
  var out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({
    images: imgs.map(function (i) {
      return {alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
              shown: i.getBoundingClientRect().width};
    }),
    tables: document.querySelectorAll("table").length,
    overflow: document.documentElement.scrollWidth - window.innerWidth
  });
  document.body.appendChild(out);
});
</script>
"""


BROKEN_IMAGE = '<img alt="negative control" src="data:image/png;base64,iVBORw0KGgoAAAAN">'


def render_in_chromium(report_html: Path, tmp_path: Path, extra: str = "") -> tuple[dict, str]:
    """Load the report in headless Chromium; return what the page itself measured, and the DOM."""
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
    assert expected_images >= 10 and expected_tables >= 8
    result, dom = render_in_chromium(paths["html"], tmp_path, extra=BROKEN_IMAGE)
    *images, control = result["images"]
    # the check can fail: a truncated PNG (added to the page for this) measures as not loaded
    assert control["alt"] == "negative control" and control["w"] == 0
    assert len(images) == expected_images
    for img in images:
        assert img["complete"], img
        assert img["w"] > 100 and img["h"] > 100, img
        assert img["shown"] > 100, img  # laid out, not collapsed
    assert result["tables"] == expected_tables
    assert result["overflow"] <= 0, "the page scrolls sideways at 1280 px"
    for section in ("results", "data", "pseudo-labels", "robustness", "config", "run"):
        assert f'id="{section}"' in dom


# ------------------------------------------------------------------------------ content


def test_report_files_and_self_contained_html(full_report):
    run, paths = full_report
    assert set(paths) == {"html", "md"}
    assert paths["html"] == run / "report" / "report.html" and paths["md"] == run / "report" / "report.md"
    text = paths["html"].read_text()
    # self-contained: no external resources, no scripts
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<script" not in text.lower() and "@import" not in text
    images = list(iter_report_images(text))
    assert len(images) == text.count("<img ")
    for png in images:
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
    # the Markdown twin points at PNG files that exist and match the embedded images
    md = paths["md"].read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(refs) == len(images)
    assert sorted((run / "report" / r).read_bytes() for r in refs) == sorted(images)
    assert not list((run / "report").glob(".*.tmp"))
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


def test_report_content(full_report):
    run, paths = full_report
    text = paths["html"].read_text()
    md = paths["md"].read_text()
    plain = html.unescape(re.sub(r"<[^>]+>", " ", text))
    # the headline: teacher -> final student, delta, relative error reduction, fine-tune
    for needle in ("68.00%", "80.25%", "+12.25 pts", "38%", "81.50%", "val − test gap of +1.75"):
        assert needle in plain, needle
        assert needle in md, needle
    # tables: per stage, data, selection, per class, pseudo labels, robustness, config
    for needle in ("student-2 + fix-res", "unlabeled pool", "selected rows", "iteration 1", "probe acc.",
                   "probe acc.", "ECE", "corruption error", "FGSM top-1 (eps 8)", "PGD-10", "flip prob.",
                   "a_new_suite.score", "version", "data.max_unlabeled", "The resolved config"):
        assert needle in plain, needle
    # numbers are right-aligned, names are not
    assert re.search(r'<td class="num">80\.25</td>', text)
    assert '<th scope=row>teacher</th>' in text
    # figures: one per kind, captions numbered
    for name in ("accuracy", "training-curves", "confidence-1", "class-counts-2", "reliability-2",
                 "robustness-corruptions", "robustness-perturbations", "robustness-attacks"):
        assert f'id="fig-{name}"' in text
        assert (run / "report" / f"{name}.png").is_file()
    assert "Figure 1." in text and "Table 1." in text
    # Markdown has no spanning headers: the group is part of the column name
    assert "| iteration 1 predicted |" in md and "| iteration 2 probe acc. |" in md
    # the Markdown tables align numbers right
    assert re.search(r"^\|---\|---\|---:\|", md, re.M)
    # nothing to warn about in a healthy run
    assert "could not be read" not in plain


def test_incomplete_run_without_optional_files(tmp_path):
    run = make_run(tmp_path / "run", probe=False, robustness=False, finetune=False, complete=False)
    paths = build_report(run)
    text = html.unescape(paths["html"].read_text())
    assert "The run is incomplete" in text and "next: <code>label-2</code>" in text
    assert "No probe files" in text and "reliability-" not in text
    assert 'id="robustness"' not in text and "fix-res" not in text
    assert "student-1" in text and "75.50%" in text  # the last finished student, read from its folder


def test_minimal_and_broken_runs_still_report(tmp_path):
    # a run that crashed in its first stage: only config.yaml and manifest.json
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_config(None, TINY).to_dict()))
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    text = build_report(run)["html"].read_text()
    assert "No stage has finished yet" in text and "<img " not in text
    # corrupt optional files are named in the report, not fatal
    run = make_run(tmp_path / "broken")
    (run / "evaluate" / "robustness.json").write_text("{not json")
    (run / "label-1" / "probe.parquet").write_bytes(b"PAR1 garbage")
    with (run / "teacher" / "metrics.jsonl").open("a") as f:
        f.write("{truncated\n")
    (run / "data.json").write_text("[1, 2]")
    paths = build_report(run)
    text = html.unescape(paths["html"].read_text())
    assert "could not be read" in text
    for name in ("evaluate/robustness.json", "label-1/probe.parquet", "teacher/metrics.jsonl", "data.json"):
        assert name in text, name
    assert "reliability-2" in text and "reliability-1" not in text


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


def test_rebuild_replaces_atomically_and_drops_stale_plots(tmp_path):
    run = make_run(tmp_path / "run")
    first = build_report(run)
    stale = run / "report" / "reliability-9.png"
    stale.write_bytes(b"old")
    keep = run / "report" / "my-notes.png"
    keep.write_bytes(b"mine")
    shutil.rmtree(run / "evaluate")
    second = build_report(run)
    assert first == second
    assert not stale.exists() and keep.exists()
    assert not (run / "report" / "robustness-attacks.png").exists()
    assert 'id="robustness"' not in second["html"].read_text()
    assert not [p for p in (run / "report").iterdir() if p.name.endswith(".tmp")]


def test_unwritable_report_dir_is_a_one_line_error(tmp_path):
    run = make_run(tmp_path / "run", robustness=False)
    (run / "report").write_text("a file where the report folder goes")
    with pytest.raises(NoisyStudentError, match="cannot write"):
        build_report(run)


def test_many_classes_are_summarised(tmp_path):
    run = make_run(tmp_path / "run", robustness=False, finetune=False, probe=False)
    data = json.loads((run / "data.json").read_text())
    data["classes"] = [f"class<{i}>" for i in range(100)]
    data["labeled_per_class"] = [1] * 100
    (run / "data.json").write_text(json.dumps(data))
    text = build_report(run)["html"].read_text()
    assert "100 classes, summarised" in text
    assert "class<3>" not in text  # escaped wherever it appears
    assert re.search(r"<th scope=row>median</th>", text)


@pytest.mark.parametrize("layout", [
    {"test_top1_after": 81.5, "test_top5_after": 96.5, "test_top1_before": 80.25, "val_top1_after": 83.0},
    {"before": {"top1": 80.25}, "after": {"top1": 81.5, "top5": 96.5, "val_top1": 83.0}},
    {"before": {"test_top1": 80.25}, "after": {"test_top1": 81.5, "test_top5": 96.5, "val_top1": 83.0}},
    {"name": "finetune", "test_top1": 81.5, "test_top5": 96.5, "val_top1": 83.0},
])
def test_finetune_layouts(layout):
    from noisystudent.report.build import _ft_numbers

    ft = _ft_numbers(layout)
    assert ft["top1"] == 81.5 and ft["top5"] == 96.5 and ft["val_top1"] == 83.0
    assert ft["before_top1"] in (80.25, None)
    assert _ft_numbers({"something": "else"}) is None and _ft_numbers([1]) is None


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


def test_report_reads_real_robustness_results(tmp_path):
    """The report understands what noisystudent.robustness actually returns (format drift guard)."""
    import torch
    from torch.utils.data import TensorDataset

    from noisystudent.robustness import evaluate_robustness

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 10))
    data = TensorDataset(torch.rand(12, 1, 16, 16), torch.randint(0, 10, (12,)))
    res = evaluate_robustness(model, data, suites=["clean", "corruptions", "perturbations", "fgsm", "pgd"],
                              corruptions=["gaussian_noise", "contrast"], perturbations=["translate"],
                              fgsm_eps=(0, 8), pgd_steps=2, severities=(1, 2), progress=False,
                              normalizer="alexnet")
    run = make_run(tmp_path / "run", finetune=False, robustness=False, probe=False)
    (run / "evaluate").mkdir()
    (run / "evaluate" / "robustness.json").write_text(json.dumps({"teacher": res, "student-2": res}))
    paths = build_report(run)
    text = html.unescape(paths["html"].read_text())
    md = paths["md"].read_text()
    for needle in ("mCE", "mFR", "FGSM top-1 (eps 8)", "PGD-2"):
        assert needle in text, needle
    for needle in ("| CE (%) teacher |", "| FR student-2 |"):
        assert needle in md, needle
    assert "could not be read" not in text


def test_report_of_a_real_tiny_run(tmp_path):
    """End to end on what the pipeline really writes (one student, one epoch each, few images)."""
    from noisystudent.pipeline import run_pipeline

    cfg = load_config(None, ["teacher.epochs=1", "train.epochs=1", "train.batch_size=16", "data.val_per_class=2",
                             "data.test_per_class=3", "data.max_unlabeled=40", "pseudo.threshold=0.0",
                             "students=[{model: ns_cnn_s}]"])
    run_pipeline(cfg, tmp_path / "run", progress=False)
    paths = build_report(tmp_path / "run")
    text = html.unescape(paths["html"].read_text())
    assert "Final student test top-1" in text and "could not be read" not in text
    for name in ("accuracy", "training-curves", "confidence-1", "class-counts-1"):
        assert f'id="fig-{name}"' in text, name
    data = base64.b64decode(re.search(r'base64,([^"]+)"', text).group(1))
    assert data.startswith(b"\x89PNG")
