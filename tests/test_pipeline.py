import json

import pytest

import noisystudent.pipeline as pipeline
from noisystudent.models.checkpoint import load_model
from noisystudent.cli import main
from noisystudent.config.schema import load_config
from noisystudent.runtime.errors import ConfigError
from noisystudent.label.store import LabelStore

SUMMARY_FIELDS = {"name", "model", "val_top1", "test_top1", "num_labeled", "num_pseudo", "seconds"}


def test_end_to_end_writes_every_artifact(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    assert main(["run", "--out", str(run_dir), "--quiet", *sum([["--set", o] for o in tiny_overrides], [])]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    names = [s["name"] for s in summary["stages"]]
    assert names == ["teacher", "student-1", "student-2"]
    assert summary["result"] == "student-2"
    for s in summary["stages"]:
        assert SUMMARY_FIELDS <= set(s)
        assert 0 <= s["test_top1"] <= 100 and 0 <= s["val_top1"] <= 100
    assert summary["stages"][0]["num_pseudo"] == 0
    assert summary["stages"][1]["num_pseudo"] > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"teacher", "label-1", "select-1", "student-1", "label-2", "select-2",
                                       "student-2", "evaluate"}
    robustness = json.loads((run_dir / "evaluate" / "robustness.json").read_text())
    assert set(robustness) == {"teacher", "student-2"}
    assert robustness["student-2"]["clean"]["top1"] == pytest.approx(summary["stages"][-1]["test_top1"])
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
    assert sel["num_selected"] == summary["stages"][1]["num_pseudo"]
    assert not list(run_dir.glob(".partial-*"))
    assert "student-2" in (run_dir / "report" / "report.html").read_text()
    # the reported test top-1 is reproducible from the saved checkpoint alone
    student, meta = load_model(run_dir / "student-2" / "model.pt")
    assert meta["image_size"] == 16


def test_resume_skips_finished_stages(tmp_path, tiny_overrides, monkeypatch, capsys):
    """The documented form: `noisystudent run --resume RUN_DIR`, config not passed again. The run's
    config.yaml must reload to the same fingerprint (a default int 0 of a float key once read back
    as 0.0 and refused every default run), and the finished stages are skipped."""
    run_dir = tmp_path / "run"
    real_train = pipeline.train_classifier
    calls = []

    def crash_on_second_student(*args, desc="", **kwargs):
        calls.append(desc)
        if desc == "student-2":
            raise RuntimeError("simulated crash")
        return real_train(*args, desc=desc, **kwargs)

    monkeypatch.setattr(pipeline, "train_classifier", crash_on_second_student)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["run", "--out", str(run_dir), "--quiet", *sum([["--set", o] for o in tiny_overrides], [])])
    assert calls == ["teacher", "student-1", "student-2"]
    assert not (run_dir / "student-2").exists() and not (run_dir / "summary.json").exists()
    teacher_bytes = (run_dir / "teacher" / "model.pt").read_bytes()

    calls.clear()
    monkeypatch.setattr(pipeline, "train_classifier", lambda *a, desc="", **k: (calls.append(desc), real_train(*a, desc=desc, **k))[1])
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0, capsys.readouterr().err
    assert calls == ["student-2"]
    assert (run_dir / "teacher" / "model.pt").read_bytes() == teacher_bytes
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["teacher", "student-1", "student-2"]


def test_resume_refuses_another_config(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    pipeline.run_pipeline(load_config(None, tiny_overrides + ["students=[{model: ns_cnn_s}]"]), run_dir,
                          progress=False)
    other = load_config(None, tiny_overrides + ["seed=7", "students=[{model: ns_cnn_s}]"])
    with pytest.raises(ConfigError, match="different config"):
        pipeline.run_pipeline(other, run_dir, resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        pipeline.run_pipeline(other, run_dir, resume=False, progress=False)


def test_tensorboard_logging(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["tensorboard=true", "students=[]"])
    pipeline.run_pipeline(cfg, tmp_path / "run", progress=False)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
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


def test_chain_with_fixres_stage_end_to_end(tmp_path, tiny_overrides):
    """A student trained at 12 px and tested at 16 px gets a fix-res stage; the summary shows
    top-1 before and after at the test resolution, and evaluation uses the fine-tuned model."""
    cfg = load_config(None, tiny_overrides + ["students=[{model: ns_cnn_s, image_size: 12, test_size: 16}]",
                                              "finetune.epochs=1"])
    summary = pipeline.run_pipeline(cfg, tmp_path / "run", progress=False)
    names = [s["name"] for s in summary["stages"]]
    assert names == ["teacher", "student-1", "fixres"]
    fixres = summary["stages"][-1]
    assert fixres["train_size"] == 12 and fixres["test_size"] == 16
    assert {"test_top1_before", "test_top1_after"} <= set(fixres)
    assert fixres["test_top1"] == fixres["test_top1_after"]
    assert summary["stages"][1]["test_size"] == 16  # the student itself is reported at 16 px too
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
