"""Pseudo labels from an ensemble of teachers (``pseudo.ensemble``) and a stage's own seed
(``teacher.seed``): models of one split that differ only in their initialisation, averaged."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from _tiny import TinyNet, tiny
from noisystudent import pipeline
from noisystudent.config.schema import load_config
from noisystudent.config.stages import resolve_stages
from noisystudent.data.splits import build_splits
from noisystudent.label.tta import FlipAverage, ModelAverage, labeling_model
from noisystudent.models.checkpoint import clean_transform, load_model
from noisystudent.report.collect import collect_run
from noisystudent.report.sections import results_section
from noisystudent.runtime import rundir as layout
from noisystudent.runtime.errors import ConfigError


def test_model_average_is_the_log_of_the_mean_probability():
    a, b = TinyNet(batch_norm=True, seed=1).eval(), TinyNet(batch_norm=True, seed=2).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out = labeling_model(a, "none", [b])(x)
        mean = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        torch.testing.assert_close(out.exp(), mean, rtol=1e-5, atol=1e-6)
        # with flip TTA each model's flip average counts once: the mean of four views, weighed alike
        flipped = labeling_model(a, "flip", [b])(x)
        four = sum(torch.softmax(m(v), 1) for m in (a, b) for v in (x, x.flip(-1))) / 4
        torch.testing.assert_close(flipped.exp(), four, rtol=1e-5, atol=1e-6)
    assert isinstance(labeling_model(a, "flip", [b]).models[0], FlipAverage)
    assert isinstance(labeling_model(a, "none", [b]), ModelAverage) and labeling_model(a, "none", []) is a


def test_a_stage_seed_changes_the_initialisation_not_the_split():
    default, own = (resolve_stages(load_config(None, extra))[0] for extra in ([], ["teacher.seed=7"]))
    assert own.seed == 7 != default.seed
    assert resolve_stages(load_config(None, ["teacher.seed=7", "seed=3"]))[0].seed == 7
    assert load_config(None, ["teacher.seed=7"]).seed == 0  # the run's seed, which the splits follow, stays


def test_a_run_labels_with_the_mean_of_its_teacher_and_another(tmp_path):
    other = tmp_path / "other"
    pipeline.run_pipeline(load_config(None, tiny("students=[]", "teacher.seed=11")), other, progress=False)
    member = other / layout.TEACHER / layout.MODEL
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}]", f"pseudo.ensemble=[{member}]"))
    assert resolve_stages(cfg)[1].labeling.ensemble == (str(member),)
    run = tmp_path / "run"
    pipeline.run_pipeline(cfg, run, progress=False)

    teacher, meta = load_model(run / layout.TEACHER / layout.MODEL)
    second, _ = load_model(member)
    splits = build_splits(cfg.data, cfg.seed)
    x = torch.stack([clean_transform(meta)(splits.val.load(i)) for i in range(len(splits.val))])
    with torch.no_grad():
        p_teacher, p_other = (torch.softmax(m.eval()(x), 1) for m in (teacher, second))
    assert not torch.allclose(p_teacher, p_other, atol=1e-3)  # two different models
    probe = pq.read_table(run / layout.label_stage(1) / layout.PROBE).column("confidence").to_numpy()
    np.testing.assert_allclose(probe, ((p_teacher + p_other) / 2).max(1).values.numpy(), rtol=1e-4, atol=1e-5)
    summary = json.loads((run / layout.SUMMARY).read_text())
    assert [s["name"] for s in summary["stages"]][:2] == [layout.TEACHER, layout.student_stage(1)]
    # the same teacher from teacher.pretrained (its checkpoint then records a crop 8-px images never
    # take) takes the same member and labels alike
    again = tmp_path / "again"
    pipeline.run_pipeline(load_config(None, tiny("students=[{model: ns_cnn_s}]", f"pseudo.ensemble=[{member}]",
                                                 f"teacher.pretrained={run / layout.TEACHER / layout.MODEL}",
                                                 "teacher.epochs=0")), again, progress=False)
    np.testing.assert_allclose(pq.read_table(again / layout.label_stage(1) / layout.PROBE).column("confidence")
                               .to_numpy(), probe, rtol=1e-5)


def test_a_missing_or_unlike_ensemble_member_is_one_clear_error(tmp_path):
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}]", f"pseudo.ensemble=[{tmp_path / 'nope.pt'}]"))
    with pytest.raises(ConfigError, match=r"pseudo.ensemble\[0\]: .*nope.pt"):
        pipeline.run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / layout.TEACHER).exists()  # refused before anything trained
    other = tmp_path / "other"
    pipeline.run_pipeline(load_config(None, tiny("students=[]", "data.image_size=12")), other, progress=False)
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}]",
                                 f"pseudo.ensemble=[{other / layout.TEACHER / layout.MODEL}]"))
    with pytest.raises(ConfigError, match=r"pseudo.ensemble\[0\]: .* an ensemble needs them alike"):
        pipeline.run_pipeline(cfg, tmp_path / "run2", progress=False)
    assert not (tmp_path / "run2" / layout.label_stage(1) / layout.PROBE).exists()


def test_ensemble_size_trains_more_teachers_in_the_run_and_labels_with_their_mean(tmp_path):
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}]", "pseudo.ensemble_size=2"))
    stages = resolve_stages(cfg)
    assert [(s.name, s.role) for s in stages] == [("teacher", "teacher"), ("teacher-2", "member"),
                                                 ("student-1", "student")]
    assert stages[1].seed != stages[0].seed and (stages[1].model, stages[1].epochs) == (stages[0].model, 3)
    assert stages[2].labeling.members == ("teacher-2",)
    seeded = resolve_stages(load_config(None, tiny("pseudo.ensemble_size=3", "teacher.seed=5")))
    assert len({s.seed for s in seeded[:3]}) == 3 and seeded[0].seed == 5
    run = tmp_path / "run"
    summary = pipeline.run_pipeline(cfg, run, progress=False)
    assert [s["name"] for s in summary["stages"]] == ["teacher", "teacher-2", "student-1"]
    assert summary["baseline"] == "teacher"  # the teacher alone stays the yardstick

    splits = build_splits(cfg.data, cfg.seed)
    (first, meta), (second, _) = (load_model(run / name / layout.MODEL) for name in ("teacher", "teacher-2"))
    x = torch.stack([clean_transform(meta)(splits.val.load(i)) for i in range(len(splits.val))])
    with torch.no_grad():
        p_first, p_second = (torch.softmax(m.eval()(x), 1) for m in (first, second))
    assert not torch.allclose(p_first, p_second, atol=1e-3)
    probe = pq.read_table(run / layout.label_stage(1) / layout.PROBE).column("confidence").to_numpy()
    np.testing.assert_allclose(probe, ((p_first + p_second) / 2).max(1).values.numpy(), rtol=1e-4, atol=1e-5)
    # the report names who labeled the first pool
    report = collect_run(run)
    assert report.iterations[0].teacher == "teacher + teacher-2 (mean probabilities)"
    # ... and lists the ensemble's teacher in its results table, after the teacher, not in the chain
    assert [s["name"] for s in report.stages] == ["teacher", "student-1"]
    assert [(m["name"], m["test_top1"]) for m in report.members] == [("teacher-2", summary["stages"][1]["test_top1"])]
    rows = results_section(report, report.stages[0], report.stages[1:]).blocks[0].rows
    assert [r[0] for r in rows] == ["teacher", "teacher-2", "student-1"]
    # finished stages are kept on resume: nothing trains again
    again = pipeline.run_pipeline(cfg, run, resume=True, progress=False)
    assert [s["seconds"] for s in again["stages"]] == [s["seconds"] for s in summary["stages"]]


def test_an_ensemble_of_untrained_copies_is_refused():
    with pytest.raises(ConfigError, match="pseudo.ensemble_size"):
        load_config(None, ["pseudo.ensemble_size=2", "teacher.epochs=0"])
    assert load_config(None, ["pseudo.ensemble_size=2"]).pseudo.ensemble_size == 2
