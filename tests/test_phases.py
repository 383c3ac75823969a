"""Where a run's time goes: summary.json's ``phases`` and the report's Run section (issue 28)."""

from __future__ import annotations

import json
import time

import pytest

from noisystudent.report.document import fmt_seconds
from noisystudent.runtime.phases import PhaseClock, format_phases, process_start, training_breakdown


def test_a_finished_run_says_where_its_time_went(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    phases = summary["phases"]
    assert {"total", "startup", "data_scan", "report", "stages", "other"} <= set(phases)
    stages = {s["stage"]: s for s in phases["stages"]}
    assert [stages[n]["phase"] for n in ("teacher", "label-1", "select-1", "student-1", "evaluate")] == \
        ["training", "labeling", "selection", "training", "evaluate"]
    teacher = stages["teacher"]
    assert [e["epoch"] for e in teacher["epochs"]] == [1, 2, 3]  # teacher.epochs=3 in the tiny preset
    numbers = [phases[k] for k in ("total", "startup", "data_scan", "report", "other")]
    numbers += [s[k] for s in phases["stages"] for k in ("seconds", "train", "val", "final_measurement") if k in s]
    numbers += [e[k] for s in phases["stages"] for e in s.get("epochs", []) for k in ("train", "val")]
    assert all(v >= 0 for v in numbers)
    assert teacher["train"] == pytest.approx(sum(e["train"] for e in teacher["epochs"]))
    # a training stage's parts lie inside it, and the named phases add up to about the total
    assert teacher["train"] + teacher["val"] + teacher["final_measurement"] <= teacher["seconds"]
    named = phases["startup"] + phases["data_scan"] + phases["report"] + sum(s["seconds"] for s in phases["stages"])
    assert named + phases["other"] == pytest.approx(phases["total"], rel=1e-6)
    assert phases["other"] <= 0.1 * phases["total"] + 1.0
    # the history records carry the same split
    record = json.loads((tiny_run / "teacher" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_seconds"] > 0 and record["val_seconds"] > 0
    report = (tiny_run / "report" / "report.md").read_text()
    teacher_rows = f"training, 3 epochs ({fmt_seconds(teacher['train'] / 3)} each)"
    assert "Where this run's time went" in report and teacher_rows in report and "validation, 3 passes" in report
    assert "final measurement" in report


def test_phase_clock_and_breakdown():
    clock = PhaseClock(started=time.time())
    clock.add("startup", 1.5)
    with clock.stage("teacher", "train"):
        clock.stage_detail["teacher"] = training_breakdown(
            [{"epoch": 1, "step": 5, "train_seconds": 2.0, "val_seconds": 0.5},
             {"epoch": 2, "step": 10, "train_seconds": 3.0, "val_seconds": 0.25}], first_step=5)
    phases = clock.as_dict()
    assert phases["startup"] == 1.5
    (teacher,) = phases["stages"]
    assert teacher["phase"] == "training" and teacher["epochs"] == [{"epoch": 2, "train": 3.0, "val": 0.25}]
    assert (teacher["train"], teacher["val"]) == (3.0, 0.25)  # epoch 1 was trained before a resume
    assert "teacher" in format_phases(phases) and "start-up 1.5s" in format_phases(phases)
    started = process_start()
    assert started is None or time.time() - 7 * 86400 < started <= time.time()  # this process began before now


@pytest.mark.slow
def test_final_measurement_reuses_the_best_epochs_validation_with_the_same_numbers(tmp_path, monkeypatch):
    """At the training size the final validation numbers are the best epoch's record (a pass
    saved); measured again instead, they are the same, bit for bit."""
    import noisystudent.pipeline as pipeline
    import noisystudent.steps as steps
    from _tiny import tiny
    from noisystudent.config.schema import load_config

    cfg = load_config(None, tiny("students=[]", "baseline.enabled=false", "teacher.epochs=2"))
    passes = []
    evaluate = steps.evaluate_classifier
    monkeypatch.setattr(steps, "evaluate_classifier", lambda *a, **k: passes.append(1) or evaluate(*a, **k))
    reused = pipeline.run_pipeline(cfg, tmp_path / "reused", progress=False)
    assert len(passes) == 1  # after training: the test split only
    monkeypatch.setattr(steps, "_best_epoch_val", lambda outcome: None)  # the pass it saves, made
    measured = pipeline.run_pipeline(cfg, tmp_path / "measured", progress=False)
    assert len(passes) == 3  # val and test
    keys = ("val_top1", "val_top5", "test_top1", "test_top5")
    (a,), (b,) = reused["stages"], measured["stages"]
    assert [a[k] for k in keys] == [b[k] for k in keys]
    history = [json.loads(line) for line in (tmp_path / "reused" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in history if r.get("epoch") == a["best_epoch"] and "val_top1" in r)
    assert (a["val_top1"], a["val_top5"]) == (best["val_top1"], best["val_top5"])


def test_startup_imports_pause_the_collector_and_freeze_what_they_built_only_for_a_command():
    import gc

    from noisystudent.runtime.phases import startup_imports

    assert gc.isenabled()
    with startup_imports(freeze=False):
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0  # from Python code: nothing frozen
    try:
        with startup_imports(freeze=True):
            built = [[] for _ in range(100)]
        assert gc.isenabled() and gc.get_freeze_count() >= len(built)
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with startup_imports(freeze=False):
            pass
        assert not gc.isenabled()  # a collector the caller had turned off stays off
    finally:
        gc.enable()
