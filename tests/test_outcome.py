"""The final model chosen on validation, the Noisy Student gain and the summary table (issue 23)."""

import math

from noisystudent.config.schema import load_config
from noisystudent.config.stages import baseline_of, resolve_stages
from noisystudent.outcome import (TrainedModel, choose_final, format_summary_table, noisy_student_gain,
                                  noisy_student_model)


def model(name, val, test, arch="ns_cnn_m"):
    return TrainedModel(name=name, model=arch, params=1, image_size=16, val_top1=val, test_top1=test,
                        metrics={"name": name, "model": arch, "val_top1": val, "test_top1": test, "num_labeled": 50,
                                 "num_pseudo": 0, "seconds": 1.0})


def test_best_student_on_validation_is_final_not_the_last():
    # issue 23's seed-1 case: student-2 val 91.0 / test 86.60, the last student-3 val 89.0 / test 85.80
    chain = [model("teacher", 84.0, 84.95, "ns_cnn_s"), model("student-1", 88.0, 85.0),
             model("student-2", 91.0, 86.60), model("student-3", 89.0, 85.80)]
    baseline = model("baseline", 90.0, 89.20)
    final, reason = choose_final(chain, baseline, "best-val")
    assert final.name == "student-2" and "student-3" in reason
    assert choose_final(chain, baseline, "last")[0].name == "student-3"
    gain = noisy_student_gain(chain, baseline)
    assert gain["student"] == "student-2"
    assert math.isclose(gain["val"], 1.0) and math.isclose(gain["test"], 86.60 - 89.20)


def test_baseline_is_final_when_the_pool_did_not_help_and_ties_go_to_the_chain():
    chain = [model("teacher", 80.0, 80.0, "ns_cnn_s"), model("student-1", 85.0, 84.0)]
    better = model("baseline", 86.0, 83.0)
    final, reason = choose_final(chain, better, "best-val")
    assert final.name == "baseline" and "did not help" in reason
    tied = model("baseline", 85.0, 90.0)
    assert choose_final(chain, tied, "best-val")[0].name == "student-1"
    # equal students: the later one (the paper hands over the last)
    chain.append(model("student-2", 85.0, 83.5))
    assert noisy_student_model(chain).name == "student-2"


def test_teacher_with_the_final_architecture_is_the_baseline():
    chain = [model("teacher", 80.0, 79.0), model("student-1", 83.0, 82.5)]
    gain = noisy_student_gain(chain, chain[0])
    assert gain["baseline"] == "teacher" and math.isclose(gain["test"], 3.5)
    # the teacher as baseline is a chain model, not an extra candidate: the student still wins
    assert choose_final(chain, chain[0], "best-val")[0].name == "student-1"


def test_no_gain_without_a_baseline_or_a_student():
    assert noisy_student_gain([model("teacher", 80, 80)], model("baseline", 81, 81)) is None
    assert noisy_student_gain([model("teacher", 80, 80), model("student-1", 82, 82)], None) is None


def test_summary_table_has_the_baseline_row_gain_and_final_mark():
    chain = [model("teacher", 80.0, 79.0, "ns_cnn_s"), model("student-1", 83.0, 82.5)]
    baseline = model("baseline", 81.0, 80.0)
    final, reason = choose_final(chain, baseline, "best-val")
    summary = {"stages": [chain[0].metrics, baseline.metrics, chain[1].metrics], "result": final.name,
               "ns_gain": noisy_student_gain(chain, baseline), "final": {"reason": reason}}
    table = format_summary_table(summary)
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert "baseline" in rows and rows["student-1"].endswith("*") and not rows["baseline"].endswith("*")
    assert "Noisy Student gain over ns_cnn_m on the labels alone (baseline): +2.50 test top-1, +2.00 val" in table


def test_resolved_baseline_stage_is_the_final_architecture_with_the_teachers_recipe():
    cfg = load_config(None, ["teacher.epochs=7", "teacher.lr=0.02", "students.1.lr=0.3"])
    stages = resolve_stages(cfg)
    assert [s.name for s in stages] == ["teacher", "baseline", "student-1", "student-2"]
    teacher, baseline, last = stages[0], stages[1], stages[-1]
    assert baseline.role == "baseline" and baseline.model == last.model == "ns_cnn_m"
    assert (baseline.epochs, baseline.lr, baseline.noise, baseline.dropout) == \
        (teacher.epochs, teacher.lr, teacher.noise, teacher.dropout)
    assert baseline.seed not in (teacher.seed, last.seed) and baseline_of(stages) is baseline
    assert resolve_stages(load_config(None, ["teacher.epochs=7", "baseline.epochs=11"]))[1].epochs == 11
    # off by key, and nothing extra when the final architecture is the teacher's
    assert "baseline" not in [s.name for s in resolve_stages(load_config(None, ["baseline.enabled=false"]))]
    same = resolve_stages(load_config(None, ["students.1.model=ns_cnn_s"]))
    assert "baseline" not in [s.name for s in same] and baseline_of(same) is same[0]
    assert baseline_of(resolve_stages(load_config(None, ["students=[]"]))) is None


def test_a_baseline_still_improving_at_its_last_epochs_is_flagged():
    chain = [model("teacher", 80.0, 79.0, "ns_cnn_s"), model("student-1", 83.0, 82.5)]
    late = model("baseline", 81.0, 80.0)
    late.metrics.update(best_epoch=148, epochs=150)
    assert noisy_student_gain(chain, late)["baseline_still_improving"]
    for best, epochs, stopped in ((100, 150, False), (150, 150, True)):  # a plateau, or stopped by patience
        done = model("baseline", 81.0, 80.0)
        done.metrics.update(best_epoch=best, epochs=epochs, stopped_early=stopped)
        assert not noisy_student_gain(chain, done)["baseline_still_improving"]
    summary = {"stages": [chain[0].metrics, late.metrics, chain[1].metrics], "result": "student-1",
               "ns_gain": noisy_student_gain(chain, late)}
    assert "note: the baseline (baseline) was still improving" in format_summary_table(summary)
