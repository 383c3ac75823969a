import json
import shutil

import pytest
import torch

import noisystudent.pipeline as pipeline
from noisystudent.models.checkpoint import load_model
from noisystudent.cli import main
from noisystudent.config.schema import load_config
from noisystudent.runtime.errors import ConfigError
from noisystudent.label.store import LabelStore
from noisystudent.train.trainer import Trainer

from _tiny import cli_sets, tiny

SUMMARY_FIELDS = {"name", "model", "val_top1", "test_top1", "num_labeled", "num_pseudo", "seconds"}


def test_end_to_end_writes_every_artifact(tiny_run):
    """What `noisystudent run` of the tiny preset wrote (conftest's shared tiny_run)."""
    run_dir = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    names = [s["name"] for s in summary["stages"]]
    assert names == ["teacher", "baseline", "student-1", "student-2"]
    stages = {s["name"]: s for s in summary["stages"]}
    # the baseline: the final architecture on the labeled images alone, with the teacher's recipe
    assert stages["baseline"]["model"] == stages["student-2"]["model"] == "ns_cnn_m"
    assert stages["baseline"]["num_pseudo"] == 0 and stages["baseline"]["epochs"] == stages["teacher"]["epochs"]
    # the final model: the best on validation (later chain stages win ties, the baseline only if strictly best)
    order = ["student-2", "student-1", "teacher", "baseline"]
    best = max(order, key=lambda n: (stages[n]["val_top1"], -order.index(n)))
    assert summary["result"] == summary["final"]["stage"] == best
    # the gain: the best student on validation minus the baseline
    student = max(["student-2", "student-1"], key=lambda n: (stages[n]["val_top1"], n))
    gain = summary["ns_gain"]
    assert (gain["student"], gain["baseline"]) == (student, "baseline")
    assert gain["test"] == pytest.approx(stages[student]["test_top1"] - stages["baseline"]["test_top1"])
    assert gain["val"] == pytest.approx(stages[student]["val_top1"] - stages["baseline"]["val_top1"])
    for s in summary["stages"]:
        assert SUMMARY_FIELDS <= set(s)
        assert 0 <= s["test_top1"] <= 100 and 0 <= s["val_top1"] <= 100
    assert summary["stages"][0]["num_pseudo"] == 0
    assert stages["student-1"]["num_pseudo"] > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"teacher", "baseline", "label-1", "select-1", "student-1", "label-2",
                                       "select-2", "student-2", "evaluate"}
    robustness = json.loads((run_dir / "evaluate" / "robustness.json").read_text())
    assert set(robustness) == {"teacher", "baseline", student, best}
    for name in robustness:
        assert robustness[name]["clean"]["top1"] == pytest.approx(stages[name]["test_top1"])
    assert (run_dir / "label-1" / "probe.parquet").is_file()
    assert (run_dir / "label-1" / "bad_images.tsv").read_text() == "key\treason\n"
    for f in ("config.yaml", "data.json", "run.log"):
        assert (run_dir / f).is_file()
    for stage in ("teacher", "student-1", "student-2"):
        model, meta = load_model(run_dir / stage / "model.pt")
        assert meta["num_classes"] == 10 and meta["in_chans"] == 1
        assert (run_dir / stage / "metrics.jsonl").read_text().strip()
    store = LabelStore.open(run_dir / "label-1", require_complete=True)
    assert store.num_rows == 200 and store.header.teacher.startswith("teacher:ns_cnn_s:")
    assert (run_dir / "select-1" / "selection.parquet").is_file()
    sel = json.loads((run_dir / "select-1" / "selection.json").read_text())
    assert sel["num_selected"] == stages["student-1"]["num_pseudo"]
    assert not list(run_dir.glob(".partial-*"))
    html = (run_dir / "report" / "report.html").read_text()
    assert "student-2" in html and "Noisy Student gain" in html and f"{gain['test']:+.2f} pts" in html
    # the reported test top-1 is reproducible from the saved checkpoint alone
    student, meta = load_model(run_dir / "student-2" / "model.pt")
    assert meta["image_size"] == 16


@pytest.mark.slow
def test_resume_skips_finished_stages(tmp_path, tiny_overrides, monkeypatch, capsys):
    """The documented form: `noisystudent run --resume RUN_DIR`, config not passed again. The run's
    config.yaml must reload to the same fingerprint (a default int 0 of a float key once read back
    as 0.0 and refused every default run), and the finished stages are skipped."""
    run_dir = tmp_path / "run"
    real_fit = Trainer.fit
    calls = []

    def crash_on_second_student(trainer, *args, **kwargs):
        calls.append(trainer.recipe.name)
        if trainer.recipe.name == "student-2":
            raise RuntimeError("simulated crash")
        return real_fit(trainer, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", crash_on_second_student)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["run", "--out", str(run_dir), "--quiet", *sum([["--set", o] for o in tiny_overrides], [])])
    assert calls == ["teacher", "baseline", "student-1", "student-2"]
    assert not (run_dir / "student-2").exists() and not (run_dir / "summary.json").exists()
    teacher_bytes = (run_dir / "teacher" / "model.pt").read_bytes()

    calls.clear()
    monkeypatch.setattr(Trainer, "fit", lambda t, *a, **k: (calls.append(t.recipe.name), real_fit(t, *a, **k))[1])
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0, capsys.readouterr().err
    assert calls == ["student-2"]
    assert (run_dir / "teacher" / "model.pt").read_bytes() == teacher_bytes
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["teacher", "baseline", "student-1", "student-2"]


def test_resume_refuses_another_config(tmp_path, tiny_run):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    other = load_config(run_dir / "config.yaml", ["seed=7"])
    with pytest.raises(ConfigError, match="different config"):
        pipeline.run_pipeline(other, run_dir, resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        pipeline.run_pipeline(other, run_dir, resume=False, progress=False)


def test_tensorboard_logging(tiny_run):
    events = list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_mixed_image_modes_in_a_folder_run_convert(tmp_path):
    """CMYK, 16-bit, RGBA, palette and grayscale images among RGB ones are converted, not errors."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = ["RGB", "CMYK", "I;16", "RGBA", "P", "L"]
    for split, n in (("train", 6), ("test", 3), ("pool/x", 6)):
        for c in ("a", "b") if split != "pool/x" else ("",):
            d = tmp_path / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rgb = Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8), "RGB")
                mode = modes[i % len(modes)]
                img = (Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
                       if mode == "I;16" else rgb.convert(mode))
                img.save(d / f"{i}.{'tif' if mode in ('CMYK', 'I;16') else 'png'}")
    overrides = ["data.source=image-folder", f"data.train_dir={tmp_path / 'train'}",
                 f"data.test_dir={tmp_path / 'test'}", f"data.unlabeled_dir={tmp_path / 'pool'}",
                 "data.labels_per_class=null", "data.val_per_class=1", "data.image_size=8", "data.channels=3",
                 "teacher.epochs=1", "train.epochs=1", "train.batch_size=4", "pseudo.threshold=0.0",
                 "students=[{model: ns_cnn_s}]"]
    summary = pipeline.run_pipeline(load_config(None, overrides), tmp_path / "run", progress=False)
    assert summary["stages"][1]["num_pseudo"] > 0
    assert (tmp_path / "run" / "label-1" / "bad_images.tsv").read_text() == "key\treason\n"


@pytest.mark.slow
def test_chain_with_fixres_stage_end_to_end(tmp_path, tiny_overrides):
    """A student trained at 12 px and tested at 16 px gets a fix-res stage; the summary shows
    top-1 before and after at the test resolution, and evaluation uses the fine-tuned model."""
    cfg = load_config(None, tiny_overrides + ["students=[{model: ns_cnn_s, image_size: 12, test_size: 16}]",
                                              "finetune.epochs=1"])
    summary = pipeline.run_pipeline(cfg, tmp_path / "run", progress=False)
    names = [s["name"] for s in summary["stages"]]
    assert names == ["teacher", "baseline", "student-1", "fixres"]  # the baseline: ns_cnn_s at 12 px
    fixres = summary["stages"][-1]
    assert fixres["train_size"] == 12 and fixres["test_size"] == 16
    assert {"test_top1_before", "test_top1_after"} <= set(fixres)
    assert fixres["test_top1"] == fixres["test_top1_after"]
    assert summary["stages"][2]["test_size"] == 16  # the student itself is reported at 16 px too
    robustness = json.loads((tmp_path / "run" / "evaluate" / "robustness.json").read_text())
    assert "fixres" in robustness
    assert "fix-res at 16px" in pipeline.format_summary_table(summary)


def test_teacher_with_other_class_names_is_refused(tmp_path, tiny_overrides, capsys):
    from noisystudent.models.checkpoint import save_model
    from noisystudent.models.factory import create_model

    ckpt = tmp_path / "teacher.pt"
    names = [f"class-{i}" for i in range(10)]
    save_model(ckpt, create_model("ns_cnn_s", 10, 1), name="ns_cnn_s", num_classes=10, in_chans=1,
               classes=names, image_size=16, mean=(0.5,), std=(0.25,))
    args = ["run", "--out", str(tmp_path / "run"), "--quiet", "--set", f"teacher.pretrained={ckpt}",
            "--set", "teacher.epochs=0"]
    for o in tiny_overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"teacher checkpoint {ckpt} was trained on classes ['class-0'" in err[0]
    assert not (tmp_path / "run" / "teacher").exists()


def test_stop_iterating_skips_the_rest_of_the_chain_when_a_student_does_not_gain(tmp_path, tiny_overrides):
    """A student that learns nothing (lr 0: its random initialisation) is not above its trained
    teacher on validation: with stop_iterating the chain stops there and says so; the run hands
    over the best model on validation, never that student."""
    cfg = load_config(None, tiny_overrides + ["teacher.epochs=25", "stop_iterating=true", "baseline.enabled=false",
                                              "students=[{model: ns_cnn_s, lr: 0}, {model: ns_cnn_s}]"])
    summary = pipeline.run_pipeline(cfg, tmp_path / "run", progress=False)
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["student-1"]["val_top1"] <= stages["teacher"]["val_top1"]
    assert list(stages) == ["teacher", "student-1"] and not (tmp_path / "run" / "label-2").exists()
    assert len(summary["skipped"]) == 1 and summary["skipped"][0].startswith("student-2 (ns_cnn_s): stop_iterating")
    assert summary["result"] == "teacher" and summary["baseline"] == "teacher"  # same architecture: the yardstick
    assert summary["ns_gain"]["test"] == pytest.approx(stages["student-1"]["test_top1"] - stages["teacher"]["test_top1"])
    table = pipeline.format_summary_table(summary)
    assert "skipped: student-2" in table and "final model (*): teacher" in table


def test_warm_start_starts_a_student_of_the_teachers_architecture_from_its_weights(tmp_path, tiny_overrides):
    """train.warm_start: student-1 (the teacher's architecture, lr 0: it keeps what it starts from)
    holds the teacher's weights; student-2, a larger model, starts from scratch and says why."""
    cfg = load_config(None, tiny_overrides + ["teacher.epochs=2", "train.warm_start=true", "baseline.enabled=false",
                                              "students=[{model: ns_cnn_s, lr: 0}, {model: ns_cnn_m, epochs: 0.1}]"])
    summary = pipeline.run_pipeline(cfg, tmp_path / "run", progress=False)
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["student-1"]["warm_start_from"] == "teacher" and stages["student-2"]["warm_start_from"] is None
    weights = {n: torch.load(tmp_path / "run" / n / "model.pt", weights_only=True)["state_dict"]
               for n in ("teacher", "student-1")}
    learned = [k for k, v in weights["teacher"].items() if k.endswith("weight")]
    assert learned and all(torch.equal(weights["teacher"][k], weights["student-1"][k]) for k in learned)
    log = (tmp_path / "run" / "run.log").read_text()
    assert "[student-1] starts from teacher's weights (train.warm_start)" in log
    assert "[student-2] ns_cnn_m at 16px starts from scratch: train.warm_start needs its teacher's architecture" in log
    # off (the default): every student starts from its own initialisation
    cold = load_config(None, tiny_overrides + ["teacher.epochs=2", "baseline.enabled=false",
                                               "students=[{model: ns_cnn_s, lr: 0}]"])
    summary = pipeline.run_pipeline(cold, tmp_path / "cold", progress=False)
    assert summary["stages"][1]["warm_start_from"] is None
    student = torch.load(tmp_path / "cold" / "student-1" / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(weights["teacher"][k], student[k]) for k in learned)


def test_final_model_last_hands_over_the_chains_last_stage(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["teacher.epochs=25", "final_model=last", "baseline.enabled=false",
                                              "students=[{model: ns_cnn_s, lr: 0}]"])
    summary = pipeline.run_pipeline(cfg, tmp_path / "run", progress=False)
    assert summary["result"] == "student-1" and summary["final"]["rule"] == "last"
    assert set(json.loads((tmp_path / "run" / "evaluate" / "robustness.json").read_text())) == {"teacher", "student-1"}


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])
def test_the_console_shows_the_gain_and_the_baselines_note_once(tmp_path, capfd, quiet):
    """The gain line and the still-improving note are part of the summary table; the console (log
    lines and the table, quiet or not) shows each once."""
    args = ["run", "--out", str(tmp_path / "run"), *cli_sets(tiny("teacher.epochs=2", "students=[{model: ns_cnn_m}]"))]
    assert main(args + (["--quiet"] if quiet else [])) == 0
    out = capfd.readouterr()
    console = out.out + out.err
    assert console.count("Noisy Student gain over ns_cnn_m on the labels alone (baseline)") == 1
    assert console.count("was still improving at its last epochs") == 1  # a 2-epoch baseline is still improving
