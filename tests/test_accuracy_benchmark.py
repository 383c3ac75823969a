"""benchmarks/accuracy.py: the variant plan, the scheduler and the gap arithmetic, on tiny digits runs."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# An importable module (not exec'd from a path), so the benchmark's spawned workers can unpickle
# its task function: spawn passes sys.path on to the children.
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402

DIGITS = str(ROOT / "configs" / "digits.yaml")


def test_every_student_variant_starts_from_the_seeds_teacher(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    tasks = accuracy.student_tasks(DIGITS, 3, ["train.epochs=2"], ckpt)
    assert [t.variant for t in tasks] == ["noisy-student", "no-noise", "no-iteration", "hard-labels", "no-balancing"]
    for t in tasks:
        assert f"teacher.pretrained={ckpt}" in t.overrides and "teacher.epochs=0" in t.overrides
        assert "seed=3" in t.overrides
    ablation = {t.variant: t.ablation for t in tasks}
    assert ablation == {"noisy-student": None, "no-noise": "no-noise", "no-iteration": None,
                        "hard-labels": "hard-labels", "no-balancing": "no-balancing"}
    # whole chains start first, the one-student runs after them, every student task after the teachers
    assert [t.variant for t in sorted(tasks)][:2] == ["noisy-student", "no-noise"]
    assert all(accuracy.teacher_task(DIGITS, 9, []) < t for t in tasks)


def test_single_student_variants_train_the_chain_student_they_stand_for(tmp_path):
    fashion = str(ROOT / "configs" / "fashion-mnist.yaml")
    chain = accuracy.load_config(fashion).students
    assert len(chain) >= 3  # equal, larger, equal
    tasks = {t.variant: t for t in accuracy.student_tasks(fashion, 0, [], tmp_path / "t.pt")}
    cfg = accuracy.load_config(fashion, tasks["no-iteration"].overrides)
    assert cfg.students == [chain[-1]]  # the final architecture with its own lr and epochs
    for variant in accuracy.FIRST_STUDENT:  # the first iteration, with the ablation applied
        cfg = accuracy.load_config(fashion, tasks[variant].overrides, tasks[variant].ablation)
        assert [s.model for s in cfg.students] == [chain[0].model]
    assert accuracy.load_config(fashion, tasks["hard-labels"].overrides, "hard-labels").pseudo.hard
    assert not accuracy.load_config(fashion, tasks["no-balancing"].overrides, "no-balancing").pseudo.balance
    assert accuracy.variant_order(3)[:4] == ["teacher", "noisy-student-iter1", "noisy-student-iter2",
                                             "noisy-student"]


def test_oracle_is_the_final_student_on_every_label_for_its_epochs():
    task = accuracy.oracle_task(DIGITS, 0, ["train.epochs=7"], [])
    cfg = accuracy.load_config(DIGITS, task.overrides)
    assert cfg.data.labels_per_class is None and cfg.students == []
    assert cfg.teacher.model == accuracy.load_config(DIGITS).students[-1].model
    assert cfg.teacher.epochs == 7


def test_gap_closed_uses_the_teacher_and_oracle_means():
    per_seed = [{"teacher": {"test_top1": 80.0, "val_top1": 0, "seconds": 1},
                 "noisy-student": {"test_top1": 86.0, "val_top1": 0, "seconds": 1},
                 "oracle": {"test_top1": 90.0, "val_top1": 0, "seconds": 1}},
                {"teacher": {"test_top1": 82.0, "val_top1": 0, "seconds": 1},
                 "noisy-student": {"test_top1": 86.0, "val_top1": 0, "seconds": 1},
                 "oracle": {"test_top1": 92.0, "val_top1": 0, "seconds": 1}}]
    table = accuracy.aggregate(per_seed)
    assert table["teacher"]["mean"] == 81.0 and table["teacher"]["std"] == pytest.approx(math.sqrt(2))
    assert accuracy.gap_closed(table, "noisy-student") == pytest.approx(5 / 10)
    assert accuracy.gap_closed_per_seed(per_seed, "noisy-student") == pytest.approx([0.6, 0.4])
    per_seed[1]["oracle"]["test_top1"] = 81.0  # an oracle below its teacher: no gap to close
    assert math.isnan(accuracy.gap_closed_per_seed(per_seed, "noisy-student")[1])


def test_benchmark_runs_every_variant_and_prints_json_last(tmp_path, tiny_overrides, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith("train.epochs")] + ["train.epochs=1"]
    argv = ["--dataset", "digits", "--seeds", "0", "--jobs", "2", "--out", str(tmp_path)]
    for o in overrides:
        argv += ["--set", o]
    assert accuracy.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(last["test_top1"]) == accuracy.variant_order(2)  # digits: two students
    assert last["seeds"] == [0] and "gap_closed" in last
    assert last["ablation_delta"]["hard-labels"]["vs"] == "noisy-student-iter1"
    assert last["ablation_delta"]["no-noise"]["points"] == pytest.approx(
        last["test_top1"]["no-noise"] - last["test_top1"]["noisy-student"], abs=0.011)
    run = next(tmp_path.iterdir())
    assert (run / "accuracy.png").stat().st_size > 0
    # one teacher per seed, reused (not retrained) by every student variant
    teacher = json.loads((run / "seed0" / "teacher" / "summary.json").read_text())["stages"][0]
    for variant in ("noisy-student", "no-noise", "hard-labels", "no-balancing", "no-iteration"):
        stages = json.loads((run / "seed0" / variant / "summary.json").read_text())["stages"]
        assert stages[0]["epochs"] == 0 and stages[0]["test_top1"] == teacher["test_top1"]
        assert len(stages) == (3 if variant in accuracy.CHAINS else 2)
    oracle = json.loads((run / "seed0" / "oracle" / "summary.json").read_text())["stages"]
    assert len(oracle) == 1 and oracle[0]["num_labeled"] > teacher["num_labeled"]
