"""benchmarks/accuracy.py: the variant plan (with the out-of-domain variants and the converged
oracle), its cache, the out-of-domain folder, the scheduler and the gap arithmetic for both
oracles; one tiny digits run end to end."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from noisystudent.label.select import Selection

ROOT = Path(__file__).resolve().parents[1]
# An importable module (not exec'd from a path), so the benchmark's spawned workers can unpickle
# its task function: spawn passes sys.path on to the children.
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402
import accuracy_tables  # noqa: E402
import ood_digits  # noqa: E402
import oracle_cache  # noqa: E402

DIGITS = str(ROOT / "configs" / "digits.yaml")
FASHION = str(ROOT / "configs" / "fashion-mnist.yaml")


def test_every_student_variant_starts_from_the_seeds_teacher(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    tasks = accuracy.student_tasks(DIGITS, 3, ["train.epochs=2"], ckpt)
    # digits.yaml chooses hard labels, so its label ablation is soft labels
    assert [t.variant for t in tasks] == ["noisy-student", "no-noise", "no-iteration", "soft-labels", "no-balancing"]
    for t in tasks:
        assert f"teacher.pretrained={ckpt}" in t.overrides and "teacher.epochs=0" in t.overrides
        assert "seed=3" in t.overrides
    ablation = {t.variant: t.ablation for t in tasks}
    assert ablation == {"noisy-student": None, "no-noise": "no-noise", "no-iteration": None,
                        "soft-labels": "soft-labels", "no-balancing": "no-balancing"}
    # whole chains start first, the one-student runs after them, every student task after the teachers
    assert [t.variant for t in sorted(tasks)][:2] == ["noisy-student", "no-noise"]
    assert all(accuracy.teacher_task(DIGITS, 9, []) < t for t in tasks)


def test_tasks_share_a_store_key_exactly_when_they_label_the_pool_alike(tmp_path):
    ckpt = tmp_path / "seed0" / "teacher" / "teacher" / "model.pt"
    tasks = {t.variant: t for t in accuracy.student_tasks(FASHION, 0, [], ckpt)}
    key = {v: accuracy.first_labeling(FASHION, t) for v, t in tasks.items()}
    # hard or soft, balanced or not, noised or not: the selection's and the student's, one store
    assert len({key[v] for v in ("noisy-student", "no-noise", "soft-labels", "no-balancing")}) == 1
    chain = tasks["noisy-student"]
    for other in (["pseudo.tta=flip"], ["pseudo.calibrate=true"], ["pseudo.temperature=2"], ["pseudo.top_k=2"],
                  ["seed=1"]):  # what the label stage computes differs: another store
        task = dataclasses.replace(chain, overrides=chain.overrides + other)
        assert accuracy.first_labeling(FASHION, task) != key["noisy-student"], other
    assert accuracy.first_labeling(FASHION, accuracy.teacher_task(FASHION, 0, [])) is None


def test_with_an_ensemble_teacher_every_variant_shares_the_teacher_tasks_members(tmp_path):
    ckpt = tmp_path / "seed3" / "teacher" / "teacher" / "model.pt"
    tasks = accuracy.student_tasks(DIGITS, 3, ["pseudo.ensemble_size=3"], ckpt)
    members = [str(ckpt.parent.parent / f"teacher-{k}" / "model.pt") for k in (2, 3)]
    for t in tasks:  # no variant trains teachers again: each labels with the teacher task's three
        cfg = accuracy.load_config(DIGITS, t.overrides, t.ablation)
        assert cfg.pseudo.ensemble_size == 1 and cfg.pseudo.ensemble == members
    # the supervised references train one model each
    for task in (accuracy.oracle_task(DIGITS, 3, ["pseudo.ensemble_size=3"], []),
                 accuracy.supervised_final_task(DIGITS, 3, ["pseudo.ensemble_size=3"])):
        assert accuracy.load_config(DIGITS, task.overrides).pseudo.ensemble_size == 1
    assert accuracy.load_config(DIGITS, accuracy.teacher_task(DIGITS, 3, ["pseudo.ensemble_size=3"]).overrides
                                ).pseudo.ensemble_size == 3


def test_single_student_variants_train_the_chain_student_they_stand_for(tmp_path):
    chain = accuracy.load_config(DIGITS).students
    assert chain[0] != chain[-1]  # digits: a larger final student
    tasks = {t.variant: t for t in accuracy.student_tasks(DIGITS, 0, [], tmp_path / "t.pt")}
    cfg = accuracy.load_config(DIGITS, tasks["no-iteration"].overrides)
    assert cfg.students == [chain[-1]]  # the final architecture with its own lr and epochs
    for variant in accuracy.first_student_ablations(accuracy.load_config(DIGITS)):  # the first iteration, ablated
        cfg = accuracy.load_config(DIGITS, tasks[variant].overrides, tasks[variant].ablation)
        assert [s.model for s in cfg.students] == [chain[0].model]
    assert accuracy.load_config(DIGITS, []).pseudo.hard
    assert not accuracy.load_config(DIGITS, tasks["soft-labels"].overrides, "soft-labels").pseudo.hard
    soft = {t.variant: t for t in accuracy.student_tasks(DIGITS, 0, ["pseudo.hard=false"], tmp_path / "t.pt")}
    assert "soft-labels" not in soft and accuracy.load_config(DIGITS, soft["hard-labels"].overrides,
                                                              "hard-labels").pseudo.hard
    assert not accuracy.load_config(DIGITS, tasks["no-balancing"].overrides, "no-balancing").pseudo.balance
    # a one-student chain (Fashion-MNIST's) or an equal-size one: one student of the final
    # architecture is the chain's first student, so "no-iteration" is not trained again
    equal = accuracy.load_config(DIGITS, ["students=[{model: ns_cnn_m}, {model: ns_cnn_m}]"]).students
    for students in (accuracy.load_config(FASHION).students, equal):
        assert accuracy.no_iteration_is_first_student(students)
    assert "no-iteration" not in [t.variant for t in accuracy.student_tasks(FASHION, 0, [], tmp_path / "t.pt")]
    assert accuracy.variant_order(3)[:4] == ["teacher", "noisy-student-iter1", "noisy-student-iter2",
                                             "noisy-student"]


def test_supervised_final_is_the_final_architecture_trained_like_the_teacher():
    task = accuracy.supervised_final_task(DIGITS, 1, ["teacher.epochs=7"])
    cfg, base = accuracy.load_config(DIGITS, task.overrides), accuracy.load_config(DIGITS)
    assert cfg.students == [] and cfg.seed == 1
    assert cfg.teacher.model == base.students[-1].model != base.teacher.model
    # everything but the architecture is the teacher's: the labeled split, epochs, lr, noise
    assert cfg.teacher.epochs == 7 and cfg.teacher.lr == base.teacher.lr
    assert (cfg.data, cfg.noise, cfg.train) == (base.data, base.noise, base.train)
    # a chain that ends in the teacher's architecture has no such run: the teacher is it (the
    # Fashion-MNIST recipe is such a chain), and the gain is measured against the teacher
    assert accuracy.supervised_final_task(DIGITS, 0, ["teacher.model=ns_cnn_m"]) is None
    assert accuracy.supervised_final_task(FASHION, 0, []) is None
    assert accuracy.variant_order(3)[-3:] == [accuracy.SUPERVISED_FINAL, *accuracy.ORACLES]


def test_oracle_is_the_final_student_on_every_label_for_its_epochs():
    task = accuracy.oracle_task(DIGITS, 0, ["train.epochs=7"], [])
    cfg = accuracy.load_config(DIGITS, task.overrides)
    assert cfg.data.labels_per_class is None and cfg.students == []
    assert cfg.teacher.model == accuracy.load_config(DIGITS).students[-1].model
    assert cfg.teacher.epochs == 7


def test_gap_closed_uses_the_teacher_and_oracle_means():
    def row(acc):
        return {"test_top1": acc, "val_top1": 0, "seconds": 1}

    per_seed = [{"teacher": row(80.0), "noisy-student": row(86.0), "oracle": row(90.0), "oracle-converged": row(92.0)},
                {"teacher": row(82.0), "noisy-student": row(86.0), "oracle": row(92.0), "oracle-converged": row(94.0)}]
    table = accuracy_tables.aggregate(per_seed)
    assert table["teacher"]["mean"] == 81.0 and table["teacher"]["std"] == pytest.approx(math.sqrt(2))
    assert accuracy_tables.gap_closed(table, "noisy-student") == pytest.approx(5 / 10)
    assert accuracy_tables.gap_closed_per_seed(per_seed, "noisy-student") == pytest.approx([0.6, 0.4])
    # the converged oracle: the same arithmetic against its own means
    assert accuracy_tables.gap_closed(table, "noisy-student", "oracle-converged") == pytest.approx(5 / 12)
    assert accuracy_tables.gap_closed_per_seed(per_seed, "noisy-student", "oracle-converged") == pytest.approx([0.5, 1 / 3])
    # a run without oracles (--no-oracles, nothing cached), or with one seed's only: no gap, no row
    bare = [{k: v for k, v in r.items() if k not in accuracy_tables.ORACLES} for r in per_seed]
    assert math.isnan(accuracy_tables.gap_closed(accuracy_tables.aggregate(bare), "noisy-student"))
    assert all(map(math.isnan, accuracy_tables.gap_closed_per_seed(bare, "noisy-student")))
    assert "oracle" not in accuracy_tables.aggregate([per_seed[0], bare[1]])
    per_seed[1]["oracle"]["test_top1"] = 81.0  # an oracle below its teacher: no gap to close
    assert math.isnan(accuracy_tables.gap_closed_per_seed(per_seed, "noisy-student")[1])
    assert accuracy_tables.gap_closed_per_seed(per_seed, "noisy-student", "oracle-converged")[1] == pytest.approx(1 / 3)


def test_default_runs_both_settings_and_noise_pays_only_beyond_the_spread():
    assert accuracy.build_parser().parse_args([]).dataset == list(accuracy.SETTINGS) == ["fashion-mnist", "digits"]
    # the label ablations: on for digits, off for Fashion-MNIST unless asked for
    assert accuracy.ABLATIONS_DEFAULT == {"fashion-mnist": False, "digits": True}
    names = lambda **kw: [t.variant for t in accuracy.student_tasks(DIGITS, 0, [], Path("t.pt"), **kw)]  # noqa: E731
    label_ablations = set(accuracy.first_student_ablations(accuracy.load_config(DIGITS)))
    assert label_ablations <= set(names()) and not label_ablations & set(names(ablations=False))
    row = lambda mean, std: {"mean": mean, "std": std}  # noqa: E731
    assert accuracy_tables.noise_pays({"noisy-student": row(88.0, 0.3), "no-noise": row(86.0, 0.5)}) == {
        "points": 2.0, "beyond_spread": True}
    # 0.4 points apart with a spread of 0.5: not beyond it
    assert accuracy_tables.noise_pays({"noisy-student": row(88.0, 0.2), "no-noise": row(87.6, 0.5)})["beyond_spread"] is False
    assert accuracy_tables.noise_pays({"noisy-student": row(88.0, 0.2)}) is None


def test_ood_variants_train_the_first_student_on_the_mixed_pool_from_the_seeds_teacher(tmp_path):
    chain = accuracy.load_config(FASHION).students
    ood = accuracy.OodPool(tmp_path / "ood", images=58000, remainder=58000, epochs=0.5,
                           variants=tuple(accuracy.OOD_VARIANTS))
    tasks = accuracy.student_tasks(FASHION, 1, [], tmp_path / "t.pt", ood)
    names = [t.variant for t in tasks]
    # no-iteration: iteration 1; the config chooses hard labels, so the label ablation is soft-labels
    assert names[:4] == ["noisy-student", "no-noise", "soft-labels", "no-balancing"]
    assert names[4:] == list(accuracy.OOD_VARIANTS) == ["ood-soft-t0.3", "ood-hard-t0.3", "ood-soft-t0", "ood-hard-t0"]
    expected = {"ood-soft-t0.3": (False, 0.3), "ood-hard-t0.3": (True, 0.3), "ood-soft-t0": (False, 0.0),
                "ood-hard-t0": (True, 0.0)}
    for t in tasks[4:]:
        cfg = accuracy.load_config(FASHION, t.overrides, t.ablation)
        assert cfg.data.unlabeled == str(ood.folder) and cfg.data.labels_per_class == 100  # remainder + folder
        assert cfg.data.max_unlabeled is None  # a cap would be filled by the remainder first
        assert (cfg.pseudo.hard, cfg.pseudo.threshold) == expected[t.variant]
        assert cfg.teacher.pretrained == str(tmp_path / "t.pt") and cfg.teacher.epochs == 0
        assert [s.model for s in cfg.students] == [chain[0].model] and cfg.students[0].epochs == 0.5
        assert cfg.students[0].lr == chain[0].lr and cfg.seed == 1
        assert accuracy.teacher_task(FASHION, 9, []) < t
    assert accuracy_tables.COMPARE_WITH["ood-hard-t0.3"] == "ood-soft-t0.3"  # compared with each other
    assert accuracy.variant_order(3, ood.variants)[-7:] == [*accuracy.OOD_VARIANTS, "supervised-final", "oracle",
                                                            "oracle-converged"]
    # a subset (--ood-variants): only those are planned, in the order given
    two = dataclasses.replace(ood, variants=("ood-hard-t0", "ood-soft-t0.3"))
    names = [t.variant for t in accuracy.student_tasks(FASHION, 1, [], tmp_path / "t.pt", two)]
    assert names[4:] == ["ood-hard-t0", "ood-soft-t0.3"]
    assert accuracy.variant_order(1, two.variants)[-5:-3] == ["ood-hard-t0", "ood-soft-t0.3"]
    assert accuracy.build_parser().parse_args([]).ood_variants == ["ood-soft-t0.3", "ood-hard-t0.3"]


def test_oracles_are_planned_and_cached_by_config_fingerprint(tmp_path):
    converged = accuracy.CONVERGED["fashion-mnist"]
    plan = accuracy.plan_benchmark(FASHION, [0, 1], [], [], converged, tmp_path)
    tasks = {(t.variant, t.seed): t for t in plan.ready}
    # no supervised-final: the Fashion-MNIST chain ends in the teacher's architecture
    assert set(tasks) == {(v, s) for v in ("teacher", "oracle", "oracle-converged") for s in (0, 1)}
    assert plan.cached == {}
    cfg = accuracy.load_config(FASHION, tasks["oracle-converged", 0].overrides)
    assert cfg.teacher.model == accuracy.load_config(FASHION).students[-1].model == "ns_cnn_s_wide"
    assert cfg.data.labels_per_class is None and cfg.students == []
    assert (cfg.teacher.epochs, cfg.train.batch_size, cfg.teacher.lr, cfg.train.precision) == (10, 128, 0.1, "fp32")
    # an oracle validates every epoch: the teacher's cadence is for its short passes over the few labels
    assert accuracy.load_config(FASHION).teacher.eval_every == 4 and cfg.teacher.eval_every is None
    matched = accuracy.load_config(FASHION, tasks["oracle", 0].overrides)
    assert matched.teacher.eval_every is None and matched.teacher.epochs == 12 == accuracy.load_config(FASHION).students[-1].epochs
    # the longest task: right after the teachers, before the compute-matched oracle
    assert [t.variant for t in plan.ready[:3]] == ["teacher", "teacher", "oracle-converged"]
    assert len(set(plan.fingerprints.values())) == 4  # one entry per oracle and seed
    assert plan.cache_paths["oracle-converged", 0] == tmp_path / f"oracle-{plan.fingerprints['oracle-converged', 0]}.json"

    stage = {"test_top1": 92.16, "val_top1": 92.4, "seconds": 1000.0, "best_epoch": 9, "epochs": 10}
    key = ("oracle-converged", 0)
    oracle_cache.write_cached_oracle(plan.cache_paths[key], plan.fingerprints[key], tasks[key], stage)
    matched_key = ("oracle", 1)
    oracle_cache.write_cached_oracle(plan.cache_paths[matched_key], plan.fingerprints[matched_key], tasks[matched_key],
                                     stage | {"test_top1": 90.5})
    again = accuracy.plan_benchmark(FASHION, [0, 1], [], [], converged, tmp_path)
    assert sorted((t.variant, t.seed) for t in again.ready if t.variant in accuracy.ORACLES) == \
        [("oracle", 0), ("oracle-converged", 1)]
    assert again.cached[key]["test_top1"] == 92.16 and again.cached[key]["best_epoch"] == 9  # hit: not retrained
    assert again.cached[matched_key]["test_top1"] == 90.5
    # --no-oracles: the misses are not trained, the hits are still read
    cached_only = accuracy.plan_benchmark(FASHION, [0, 1], [], [], converged, tmp_path, train_oracles=False)
    assert sorted((t.variant, t.seed) for t in cached_only.ready) == [("teacher", 0), ("teacher", 1)]
    assert set(cached_only.cached) == {key, matched_key}

    changed = accuracy.plan_benchmark(FASHION, [0], [], [], converged + ["teacher.epochs=12"], tmp_path)
    assert ("oracle-converged", 0) not in changed.cached  # missed
    assert [t.variant for t in changed.ready].count("oracle-converged") == 1
    assert changed.fingerprints[key] != plan.fingerprints[key]
    shared = accuracy.plan_benchmark(FASHION, [0, 1], ["train.lr=0.2"], [], converged, tmp_path)
    assert shared.cached == {}  # an override for every variant reaches the oracles' configs too
    longer = accuracy.plan_benchmark(FASHION, [1], ["students.0.epochs=14"], [], converged, tmp_path)
    assert matched_key not in longer.cached  # the compute-matched oracle follows the student's epochs
    # an entry that does not match its name (edited, or another cache format) is a miss
    path, fp = plan.cache_paths[key], plan.fingerprints[key]
    entry = json.loads(path.read_text())
    path.write_text(json.dumps(entry | {"fingerprint": "0" * 16}))
    assert key not in accuracy.plan_benchmark(FASHION, [0], [], [], converged, tmp_path).cached
    path.write_text(json.dumps(entry | {"version": oracle_cache.CACHE_VERSION + 1}))
    assert oracle_cache.read_cached_oracle(path, fp) is None
    path.write_text("{not json")
    assert oracle_cache.read_cached_oracle(path, fp) is None


def test_ood_folder_holds_upscaled_digits_none_of_them_a_fashion_class(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    from noisystudent.data.datasets import FASHION_MNIST_CLASSES

    from noisystudent.data.splits import build_splits
    from noisystudent.data.pool import build_pool, pool_size

    count = 1797 + 13  # every digit once, then jittered copies
    folder = ood_digits.write_ood_pool(tmp_path, count)
    files = sorted(folder.rglob("*.png"))
    assert len(files) == count
    meta = json.loads((folder / "ood.json").read_text())
    assert meta["classes"] == [str(d) for d in range(10)] and not set(meta["classes"]) & set(FASHION_MNIST_CLASSES)
    assert {f.parent.name for f in files} == {f"digit-{d}" for d in range(10)}
    digits = load_digits()
    for f in files[:: max(1, count // 40)]:
        with Image.open(f) as img:
            assert img.size == (28, 28) and img.mode == "L"
            n = int(f.stem)
            assert f.parent.name == f"digit-{digits.target[n % 1797]}"
            if n < 1797:  # the plain upscale of load_digits image n
                plain = Image.fromarray((digits.images[n] * 255 / 16).round().astype("uint8")).resize((28, 28),
                                                                                                     Image.BILINEAR)
                assert np.array_equal(np.asarray(img), np.asarray(plain))
    stamp = (folder / "ood.json").stat().st_mtime_ns
    assert ood_digits.write_ood_pool(tmp_path, count) == folder and (folder / "ood.json").stat().st_mtime_ns == stamp
    assert ood_digits.write_ood_pool(tmp_path, 5) != folder  # another count: its own folder

    # as data.unlabeled next to labels_per_class, the pool is the remainder followed by every digit
    cfg = accuracy.load_config(DIGITS, [f"data.unlabeled={folder}"])
    splits = build_splits(cfg.data, cfg.seed)
    pool = build_pool(cfg.data, splits.unlabeled)
    pool.prepare(tmp_path / "pool")
    assert pool_size(pool) == len(splits.unlabeled) + count


@pytest.mark.slow
def test_benchmark_runs_every_variant_and_prints_json_last(tmp_path, tiny_overrides, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith("train.epochs")] + ["train.epochs=1"]
    cache = tmp_path / "cache"
    argv = ["--dataset", "digits", "--seeds", "0", "--jobs", "2", "--out", str(tmp_path / "out"),
            "--oracle-cache", str(cache), "--converged-set", "teacher.epochs=2", "--ood", "--ood-images", "40",
            "--ood-variants", *accuracy.OOD_VARIANTS,
            "--set", "pseudo.ensemble_size=2"]
    for o in overrides:
        argv += ["--set", o]
    assert accuracy.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(line["settings"]) == ["digits"] and line["minutes"] >= 0
    last = line["settings"]["digits"]
    assert line["ns_gain"] == {"digits": last["ns_gain"]}  # the headline per setting, first
    nn = last["noise_pays"]
    assert nn["points"] == pytest.approx(last["test_top1"]["noisy-student"] - last["test_top1"]["no-noise"], abs=0.011)
    # digits: two students; its chain has hard labels, so the label ablation is soft-labels, not hard-labels
    assert list(last["test_top1"]) == [v for v in accuracy.variant_order(2, tuple(accuracy.OOD_VARIANTS)) if v != "hard-labels"]
    assert last["seeds"] == [0] and "gap_closed" in last and "gap_closed_converged" in last
    assert set(last["gap_closed_converged_by_variant"]) == set(last["gap_closed_by_variant"])
    assert last["ablation_delta"]["soft-labels"]["vs"] == "noisy-student-iter1"  # digits: hard labels
    assert last["ablation_delta"]["ood-hard-t0"]["vs"] == "ood-soft-t0"
    assert last["ablation_delta"]["no-noise"]["points"] == pytest.approx(
        last["test_top1"]["no-noise"] - last["test_top1"]["noisy-student"], abs=0.011)
    run = next((tmp_path / "out").iterdir())
    assert (run / "accuracy.png").stat().st_size > 0
    # one teacher per seed, reused (not retrained) by every student variant; its row's time is the
    # ensemble's (pseudo.ensemble_size=2: the teacher and teacher-2)
    teachers = json.loads((run / "seed0" / "teacher" / "summary.json").read_text())["stages"]
    teacher = teachers[0]
    assert [t["name"] for t in teachers] == ["teacher", "teacher-2"]
    table = json.loads((run / "accuracy.json").read_text())["table"]
    assert table["teacher"]["seconds"] == pytest.approx(teacher["seconds"] + teachers[1]["seconds"])
    for variant in ("noisy-student", "no-noise", "soft-labels", "no-balancing", "no-iteration", *accuracy.OOD_VARIANTS):
        stages = json.loads((run / "seed0" / variant / "summary.json").read_text())["stages"]
        assert stages[0]["epochs"] == 0 and stages[0]["test_top1"] == teacher["test_top1"]
        assert len(stages) == (3 if variant in accuracy.CHAINS else 2)
    # the precision each reported stage trained in, counted from what the stages recorded
    precisions = [teacher["precision"]]
    for variant in last["test_top1"]:
        if variant != "teacher" and not variant.startswith("noisy-student-iter"):
            stages = json.loads((run / "seed0" / variant / "summary.json").read_text())["stages"]
            chosen = last["chosen_student"]["0"].get(variant, stages[-1]["name"])
            precisions.append(next(s for s in stages if s["name"] == chosen)["precision"])
    precisions += [s["precision"] for s in json.loads((run / "seed0" / "noisy-student" / "summary.json")
                                                      .read_text())["stages"][1:-1]]
    assert last["precision_by_stage"] == {p: precisions.count(p) for p in set(precisions)}
    assert last["cpu"]["cores"] >= 1 and last["cpu"]["model"]
    # runs that label the pool as an earlier run did reuse its store instead of labeling it again
    shared = dict(entry.split(" <- ") for entry in last["shared_label_stores"])
    assert shared["seed0/no-iteration"] in ("noisy-student", "no-noise")
    assert shared["seed0/no-balancing"] in ("noisy-student", "no-noise")
    # hard or soft is how a selection reads the store: the soft-labels ablation reuses the chain's
    assert shared["seed0/soft-labels"] in ("noisy-student", "no-noise")
    selections = {v: Selection.open(run / "seed0" / v / "select-1" / "selection.parquet")
                  for v in ("soft-labels", shared["seed0/soft-labels"])}
    assert [s.hard for s in selections.values()] == [False, True]  # digits.yaml chooses hard labels
    # the out-of-domain pool is labeled once for all four variants (threshold and hard are selection's)
    ood = [f"seed0/{v}" for v in accuracy.OOD_VARIANTS]
    assert sum(v in shared for v in ood) == len(ood) - 1 and all(shared[v] in accuracy.OOD_VARIANTS
                                                                 for v in ood if v in shared)
    for variant, donor in shared.items():
        mine, theirs = run / variant / "label-1" / "shards", run / "seed0" / donor / "label-1" / "shards"
        shards = sorted(p.name for p in theirs.iterdir())
        assert shards and sorted(p.name for p in mine.iterdir()) == shards
        assert all((mine / n).stat().st_ino == (theirs / n).stat().st_ino for n in shards)  # linked, not copied
        assert "shards were labeled earlier" in (run / variant / "run.log").read_text()
    # the same store and the same selection settings: the same selection as the run that labeled
    mine, theirs = (pq.read_table(run / "seed0" / v / "select-1" / "selection.parquet")
                    for v in ("no-iteration", shared["seed0/no-iteration"]))
    assert mine.num_rows > 0 and mine.equals(theirs)
    supervised = json.loads((run / "seed0" / accuracy.SUPERVISED_FINAL / "summary.json").read_text())["stages"]
    assert len(supervised) == 1 and supervised[0]["model"] == "ns_cnn_m" != teacher["model"]
    assert (supervised[0]["num_labeled"], supervised[0]["epochs"]) == (teacher["num_labeled"], teacher["epochs"])
    assert last["test_top1"][accuracy.SUPERVISED_FINAL] == supervised[0]["test_top1"]
    assert last["ablation_delta"][accuracy.SUPERVISED_FINAL]["vs"] == "noisy-student"
    # the headline: the chain's best student on validation minus the final architecture on the labels alone
    chain = json.loads((run / "seed0" / "noisy-student" / "summary.json").read_text())["stages"][1:]
    chosen = max(reversed(chain), key=lambda s: s["val_top1"])
    assert last["chosen_student"]["0"]["noisy-student"] == chosen["name"]
    assert last["ns_gain"]["vs"] == accuracy.SUPERVISED_FINAL == last["baseline"]
    assert last["ns_gain"]["per_seed"] == [round(chosen["test_top1"] - supervised[0]["test_top1"], 2)]
    assert last["ns_gain"]["mean"] == last["ns_gain"]["per_seed"][0] and last["ns_gain"]["std"] == 0.0
    assert set(last["ns_gain_by_variant"]) == {"noisy-student", "no-noise", "no-iteration"}
    assert last["baseline_plateau"][0]["epochs"] == supervised[0]["epochs"]
    assert last["baseline_plateau"][0]["best_epoch"] == supervised[0]["best_epoch"]
    for name in accuracy.ORACLES:
        oracle = json.loads((run / "seed0" / name / "summary.json").read_text())["stages"]
        assert len(oracle) == 1 and oracle[0]["num_labeled"] > teacher["num_labeled"]
    # the converged oracle was computed (a miss) and cached under its config's fingerprint
    note = last["oracle_converged"]["seeds"]["0"]
    assert note["cache"] == "miss" and note["epochs"] == 2
    entry = json.loads(Path(note["path"]).read_text())
    assert Path(note["path"]).parent == cache and Path(note["path"]).name == f"oracle-{entry['fingerprint']}.json"
    assert entry["test_top1"] == last["test_top1"]["oracle-converged"]
    # the mixed pool: the whole remainder plus the 40 digits; no threshold keeps every digit
    ood = last["ood"]
    assert ood["images"] == 40 and Path(ood["folder"]).parent == cache
    for variant, stats in ood["per_variant"].items():
        assert stats["ood_images_labeled"] == 40 and 0 <= stats["ood_share_of_stream"] <= 1
        if variant.endswith("-t0"):  # (the tiny teacher's confidence is often under 0.3)
            assert stats["ood_kept"] == stats["in_domain_kept"] == 1.0
    data = json.loads((run / "seed0" / "ood-soft-t0" / "data.json").read_text())
    assert data["num_unlabeled"] == ood["remainder"] + 40
