"""Better pseudo labels (issue 23, item 5): a temperature calibrated on validation
(``pseudo.calibrate``), flip test-time augmentation (``pseudo.tta``) and per-class thresholds
(``pseudo.threshold_mode``), each on its own and all three in one tiny run."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from _label_helpers import random_store
from _tiny import TinyNet, tiny
from noisystudent import pipeline
from noisystudent.config.schema import load_config
from noisystudent.data.splits import build_splits
from noisystudent.label.calibration import (calibration_summary, expected_calibration_error, fit_temperature,
                                            temperature_nll)
from noisystudent.label.select import Selection, select_from_store
from noisystudent.label.store import LabelStore
from noisystudent.label.tta import FlipAverage, labeling_model
from noisystudent.models.checkpoint import clean_transform, load_model
from noisystudent.report.collect import collect_run
from noisystudent.report.document import Table, fmt
from noisystudent.report.pseudo import pseudo_section
from noisystudent.runtime import rundir as layout
from noisystudent.runtime.errors import ConfigError


def _calibrated_set(n: int = 4000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is calibrated by construction: targets drawn from softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 2.0
    targets = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, targets


# ------------------------------------------------------------------ calibration


def test_an_over_confident_set_gets_t_above_one_and_a_lower_ece():
    logits, targets = _calibrated_set()
    over = logits * 3.0  # the same ranking, three times as sure: the fitted T should undo it
    t = fit_temperature(over, targets)
    assert 2.5 < t < 3.5
    before, after = expected_calibration_error(over, targets), expected_calibration_error(over, targets, t)
    assert before > 0.1 and after < before / 3
    assert temperature_nll(over, targets, t) < temperature_nll(over, targets, 1.0)


def test_an_under_confident_set_gets_t_below_one():
    logits, targets = _calibrated_set(seed=1)
    assert 0.3 < fit_temperature(logits / 2.5, targets) < 0.55


def test_ece_of_a_hand_made_set():
    # four images at confidence 0.8 (3 right: gap 0.05) and two at 0.6 (1 right: gap 0.1), in two bins
    p_hi = np.log(np.array([0.8, 0.1, 0.1]))
    p_lo = np.log(np.array([0.6, 0.2, 0.2]))
    logits = np.stack([p_hi] * 4 + [p_lo] * 2)
    targets = np.array([0, 0, 0, 1, 0, 2])
    expected = 4 / 6 * abs(0.75 - 0.8) + 2 / 6 * abs(0.5 - 0.6)
    assert expected_calibration_error(logits, targets) == pytest.approx(expected, abs=1e-9)


def test_the_summary_multiplies_the_configured_temperature():
    logits, targets = _calibrated_set(seed=2)
    s = calibration_summary(logits * 2.0, targets, base_temperature=1.5)
    assert s["labeling_temperature"] == pytest.approx(s["temperature"] * 1.5)
    assert s["ece_after"] < s["ece_before"] and s["nll_after"] < s["nll_before"] and s["bins"] == 15


# ------------------------------------------------------------------ test-time augmentation


def test_flip_average_returns_the_log_of_the_mean_of_both_views_softmax():
    net = TinyNet(batch_norm=True).eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        out = FlipAverage(net)(x)
        mean = (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(-1)), 1)) / 2
    torch.testing.assert_close(torch.softmax(out, 1), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.exp(), mean, rtol=1e-5, atol=1e-6)  # already normalised
    assert not torch.allclose(mean, torch.softmax(net(x), 1))  # the flip changed something
    assert labeling_model(net, "none") is net


def test_flip_tta_is_refused_where_flips_do_not_keep_the_label():
    with pytest.raises(ConfigError, match="pseudo.tta"):
        load_config(None, ["pseudo.tta=flip", "data.flip=false"])
    assert load_config(None, ["pseudo.tta=flip", "data.flip=true"]).pseudo.tta == "flip"


# ------------------------------------------------------------------ per-class thresholds


def test_per_class_thresholds_scale_with_each_class_mean_confidence(tmp_path):
    conf, pred = random_store(tmp_path / "store", [70, 90, 40], num_classes=6, seed=3)
    sel = select_from_store(tmp_path / "store", tmp_path / "sel" / "selection.parquet", threshold=0.4,
                            balance=False, threshold_mode="per-class")
    c64 = conf.astype(np.float64)
    means = np.array([c64[pred == c].mean() for c in range(6)])
    expected = np.clip(0.4 * means / c64.mean(), 0, 1)
    np.testing.assert_allclose(sel.thresholds_per_class, expected, rtol=1e-5)
    assert np.ptp(expected) > 0.02  # the classes differ, so the thresholds do
    keep = conf >= np.asarray(sel.thresholds_per_class, np.float32)[pred]
    assert sel.kept_per_class == np.bincount(pred[keep], minlength=6).tolist()
    t = pq.read_table(sel.path)
    assert t.num_rows == keep.sum()
    again = Selection.open(sel.path)
    assert again.threshold_mode == "per-class" and again.thresholds_per_class == sel.thresholds_per_class
    glob = select_from_store(tmp_path / "store", tmp_path / "g" / "selection.parquet", threshold=0.4, balance=False)
    assert glob.thresholds_per_class is None and glob.kept_per_class == np.bincount(
        pred[conf >= np.float32(0.4)], minlength=6).tolist()


# ------------------------------------------------------------------ all three in one run


def test_a_tiny_run_with_all_three(tmp_path):
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}]", "data.flip=true", "pseudo.calibrate=true",
                                 "pseudo.tta=flip", "pseudo.threshold_mode=per-class", "pseudo.threshold=0.2",
                                 "teacher.epochs=25"))  # a teacher above chance, so T_cal is a finite fit
    run = tmp_path / "run"
    pipeline.run_pipeline(cfg, run, progress=False)
    label_dir, select_dir = run / layout.label_stage(1), run / layout.select_stage(1)

    # the teacher's flip-averaged logits on the validation split, recomputed here
    model, meta = load_model(run / "teacher" / layout.MODEL)
    splits = build_splits(cfg.data, cfg.seed)
    transform = clean_transform(meta)
    x = torch.stack([transform(splits.val.load(i)) for i in range(len(splits.val))])
    tta = FlipAverage(model).eval()
    with torch.no_grad():
        logits = tta(x)
        mean = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1)) / 2
    torch.testing.assert_close(torch.softmax(logits, 1), mean, rtol=1e-4, atol=1e-5)

    cal = json.loads((label_dir / layout.CALIBRATION).read_text())
    t = fit_temperature(logits, splits.val.targets)
    assert cal["temperature"] == pytest.approx(t, rel=1e-3)
    assert cal["n"] == len(splits.val) and cal["labeling_temperature"] == pytest.approx(cal["temperature"])
    assert cal["ece_before"] == pytest.approx(expected_calibration_error(logits, splits.val.targets), abs=1e-4)
    assert cal["ece_after"] == pytest.approx(expected_calibration_error(logits, splits.val.targets, t), abs=1e-4)
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9 and cal["accuracy"] > 0.3
    store = LabelStore.open(label_dir, require_complete=True)
    assert store.header.temperature == pytest.approx(cal["labeling_temperature"])
    probe = pq.read_table(label_dir / layout.PROBE).column("confidence").to_numpy()
    np.testing.assert_allclose(probe, torch.softmax(logits / cal["labeling_temperature"], 1).max(1).values.numpy(),
                               rtol=1e-3, atol=1e-4)

    summary = json.loads((select_dir / layout.SELECTION_SUMMARY).read_text())
    labels = store.to_pseudo_labels()
    conf, pred = labels.confidence.astype(np.float64), labels.predicted
    assert summary["threshold_mode"] == "per-class"
    for c, thr in enumerate(summary["thresholds_per_class"]):
        if (pred == c).any():
            assert thr == pytest.approx(min(1.0, 0.2 * conf[pred == c].mean() / conf.mean()), rel=1e-5)
    assert np.ptp(summary["thresholds_per_class"]) > 0 and sum(summary["kept_per_class"]) > 0
    kept = conf >= np.asarray(summary["thresholds_per_class"], np.float32)[pred]
    assert summary["kept_per_class"] == np.bincount(pred[kept], minlength=10).tolist()
    # the report's pseudo-label section shows both, read from the files the run wrote
    tables = {tuple(b.columns[:2]): b for b in pseudo_section(collect_run(run)).blocks if isinstance(b, Table)}
    cal_row = tables[("iteration", "T_cal")].rows[0]
    assert cal_row[1] == fmt(cal["temperature"], 3) and cal_row[4] == fmt(100 * cal["ece_before"], 2)
    thr_table = next(t for t in tables.values() if "pseudo.threshold_mode: per-class" in t.caption)
    assert thr_table.rows[0][1:] == [fmt(v, 3) for v in summary["thresholds_per_class"]]
