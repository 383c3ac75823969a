"""`noisystudent export`: a run's final model as safetensors + timm config.json (+ ONNX), loaded
back through noisystudent, through timm alone and through onnxruntime, predicting as the original."""

import json
import shutil

import numpy as np
import pytest
import timm
import torch

from noisystudent.cli import main
from noisystudent.config.schema import load_config
from noisystudent.data.datasets import TransformedSet, build_splits
from noisystudent.data.transforms import eval_transform
from noisystudent.models.checkpoint import load_model
from noisystudent.models.export import export_model, final_stage, load_exported
from noisystudent.pipeline import run_pipeline
from noisystudent.runtime.errors import CheckpointError
from noisystudent.runtime.rundir import FIXRES, MANIFEST, MODEL, SUMMARY, TEACHER, RunDir

# One epoch of a digits teacher and nothing else: a real run directory in seconds.
TINY = ["teacher.epochs=1", "train.batch_size=16", "data.val_per_class=5", "data.test_per_class=10", "students=[]"]
# ... trained at 12 px and tested at 16 px: a fix-res stage follows, the run's final model.
FIXRES_RUN = ["teacher.image_size=12", "teacher.test_size=16", "finetune.epochs=0.5"]


def _run(root, arch, extra=()):
    cfg = load_config(None, TINY + [f"teacher.model={arch}", *extra])
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test one-thread fixture
    try:
        run_pipeline(cfg, root, progress=False)
    finally:
        torch.set_num_threads(before)
    return root, cfg


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("cnn") / "run", "ns_cnn_s", FIXRES_RUN)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("timm") / "run", "resnet18")


def _batch(cfg, meta, n=12):
    """Real test images, prepared as the run evaluates them."""
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=False)
    t = eval_transform(meta.get("test_size") or meta["image_size"], meta["in_chans"], meta["mean"], meta["std"])
    test = TransformedSet(splits.test, t)
    return torch.stack([test[i][0] for i in range(n)])


def _original(run_dir, stage=TEACHER):
    model, meta = load_model(RunDir(run_dir).file(stage, MODEL))
    return model.eval(), meta


def test_cli_export_of_a_cpu_net_loads_back_and_predicts_the_same(cnn_run, tmp_path, capsys):
    run_dir, cfg = cnn_run
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert [s["name"] for s in summary["stages"]] == [TEACHER, FIXRES] and final_stage(run_dir) == FIXRES
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "exported fixres" in printed and str(out / "model.safetensors") in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.safetensors"]

    original, meta = _original(run_dir, FIXRES)
    x = _batch(cfg, meta)
    with torch.no_grad():
        expected = original(x)
    model, config = load_exported(out)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert config["architecture"] == "ns_cnn_s" and config["num_classes"] == 10
    assert config["label_names"] == meta["classes"]
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16]  # fix-res: the test resolution
    assert config["pretrained_cfg"]["mean"] == pytest.approx(meta["mean"])
    assert config["pretrained_cfg"]["std"] == pytest.approx(meta["std"])
    ns = config["noisystudent"]
    assert ns["stage"] == FIXRES and ns["create_model"] == "noisystudent.models.factory.create_model"
    assert (ns["train_size"], ns["test_size"]) == (12, 16) and not ns["timm_native"]
    assert ns["test_top1"] == summary["stages"][-1]["test_top1"]

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)
    (one,) = session.run(["logits"], {"image": x[:1].numpy()})  # the batch size is dynamic
    np.testing.assert_allclose(one, expected[:1].numpy(), atol=1e-4, rtol=1e-4)


def test_timm_architecture_loads_through_timm_alone(timm_run, tmp_path):
    run_dir, cfg = timm_run
    out = tmp_path / "export"
    result = export_model(run_dir, out)
    assert result["architecture"] == "resnet18" and set(result["files"]) == {"weights", "config"}
    original, meta = _original(run_dir)
    x = _batch(cfg, meta, n=8)
    with torch.no_grad():
        expected = original(x)
        # timm reads config.json (architecture, num_classes, in_chans) and the weights from the folder
        from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.allclose(from_dir(x), expected, atol=1e-5)
        # or: the architecture by name, the safetensors file as its pretrained weights
        overlay = dict(file=str(out / "model.safetensors"), num_classes=10, input_size=(1, 16, 16))
        by_name = timm.create_model("resnet18", pretrained=True, num_classes=10, in_chans=1,
                                    pretrained_cfg_overlay=overlay).eval()
        assert torch.allclose(by_name(x), expected, atol=1e-5)
    data = timm.data.resolve_model_data_config(from_dir)  # timm's preprocessing = the run's
    assert data["input_size"] == (1, 16, 16) and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx(meta["mean"]) and data["std"] == pytest.approx(meta["std"])
    assert from_dir.pretrained_cfg["label_names"] == meta["classes"]
    assert json.loads((out / "config.json").read_text())["noisystudent"]["timm_native"]
    assert "tag" not in from_dir.pretrained_cfg or from_dir.pretrained_cfg["tag"] != "a1_in1k"


def test_an_unfinished_run_exports_its_latest_finished_stage(cnn_run, tmp_path, caplog):
    """Killed during fix-res: no summary.json, fix-res still a .partial folder; the teacher is exported."""
    run_dir = tmp_path / "run"
    shutil.copytree(cnn_run[0], run_dir)
    (run_dir / SUMMARY).unlink()
    (run_dir / FIXRES).rename(run_dir / f".partial-{FIXRES}")
    with caplog.at_level("WARNING", logger="noisystudent"):
        assert export_model(run_dir, tmp_path / "export")["stage"] == TEACHER
    assert "no summary.json" in caplog.text
    pretrained_cfg = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [1, 12, 12] and pretrained_cfg["test_input_size"] == [1, 16, 16]


def test_bad_run_dirs_are_one_line_errors(cnn_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    started = tmp_path / "started"  # a run whose teacher never finished
    started.mkdir()
    (started / MANIFEST).write_text(json.dumps({"stages": {}}))
    broken = tmp_path / "broken"  # summary.json names a stage whose model.pt is gone
    shutil.copytree(cnn_run[0], broken)
    (broken / FIXRES / MODEL).unlink()
    for bad, message in ((tmp_path / "missing", "is not a run directory"), (empty, "has no finished model"),
                         (started, "has no finished model"), (broken, "is missing")):
        with pytest.raises(CheckpointError, match=message):
            export_model(bad, tmp_path / "out")
        assert main(["export", str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("noisystudent: error: export:") and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="not an exported model"):
        load_exported(empty)
