"""`noisystudent export`: a run's final model as safetensors + timm config.json + model card (+ ONNX),
loaded back through noisystudent, through timm alone and through onnxruntime, predicting as the
original; what would be pushed to the hub, with the hub library's calls replaced (no network)."""

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import timm
import torch

from _tiny import tiny
from noisystudent.cli import main
from noisystudent.config.schema import load_config
from noisystudent.data.datasets import TransformedSet
from noisystudent.data.splits import build_splits
from noisystudent.data.transforms import eval_transform
from noisystudent.models.checkpoint import load_model
from noisystudent.models.export import RECORD, export_model, final_stage, load_exported
from noisystudent.pipeline import run_pipeline
from noisystudent.runtime.errors import CheckpointError, NoisyStudentError
from noisystudent.runtime.rundir import FIXRES, MANIFEST, MODEL, SUMMARY, TEACHER, RunDir

# One epoch of a digits teacher and nothing else: a real run directory in seconds.
TINY = tiny("teacher.epochs=1", "students=[]")
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
    assert "onnx checked against PyTorch: max abs difference" in printed
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "README.md", "config.json", "model.onnx",
                                                     "model.safetensors"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())  # readable by others, as published

    original, meta = _original(run_dir, FIXRES)
    x = _batch(cfg, meta)
    with torch.no_grad():
        expected = original(x)
    model, config = load_exported(out)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
        # timm too, once noisystudent's factory (imported by the above) has registered ns_cnn_s, as the card says
        by_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.allclose(by_timm(x), expected, atol=1e-6)
    assert timm.data.resolve_model_data_config(by_timm)["mean"] == pytest.approx(meta["mean"])
    assert 'timm.create_model("local-dir:' in (out / "README.md").read_text()
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
    assert result["architecture"] == "resnet18" and set(result["files"]) == {"weights", "config", "card"}
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


# ------------------------------------------------------------------ model card, files, push


def _front_matter(card: str) -> tuple[dict, str]:
    import yaml

    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_card_renders_the_run(timm_run, tmp_path):
    run_dir, _ = timm_run
    summary = json.loads((run_dir / SUMMARY).read_text())
    out = tmp_path / "export"
    export_model(run_dir, out, license_id="cc-by-4.0")
    meta, body = _front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "timm" and meta["license"] == "cc-by-4.0" and meta["metrics"] == ["accuracy"]
    assert {"image-classification", "timm", "noisy-student", "resnet18"} <= set(meta["tags"])
    for stage in summary["stages"]:  # each stage's accuracy, as summary.json has it
        assert f"| {stage['name']}" in body and f"{stage['test_top1']:.2f}" in body
    assert "source | `digits`" in body and "0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in body
    splits = json.loads((run_dir / "data.json").read_text())  # the split sizes the run used
    for label, key in (("labeled", "labeled"), ("validation", "val"), ("test", "test")):
        assert f"| {label} images | {splits[f'num_{key}']} ({splits[f'{key}_per_class'][0]} per class) |" in body
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in body  # resnet18 is timm's own
    assert "teacher:\n  model: resnet18" in body  # the run's config.yaml
    assert ("Noisy Student gain" in body) == bool(summary.get("ns_gain"))  # a teacher-only run has none
    for model, figures in summary["robustness"].items():  # the final evaluation's headlines
        assert f"| {model} | " in body and all(k in body and f"{v:.2f}" in body for k, v in figures.items())

    from noisystudent.models.model_card import render_model_card

    measured = {**summary, "ns_gain": {"val": 2.5, "test": 1.25, "student": "student-1", "student_model": "resnet18",
                                       "baseline": "baseline", "baseline_model": "resnet18"},
                "robustness": {"teacher": {"corruptions.mean_error": 41.5, "fgsm.top1@eps16": 8.0,
                                           "fgsm.top1@eps2": 12.0},
                               "student-1": {"corruptions.mean_error": 30.25, "fgsm.top1@eps16": 9.0,
                                             "fgsm.top1@eps2": 21.0}}}
    # Fashion-MNIST has its own test split: the config's test_per_class (20) did not apply, data.json says so
    fashion = {"num_labeled": 200, "num_val": 100, "num_test": 10000, "labeled_per_class": [20] * 10,
               "val_per_class": [9, 11] * 5, "test_per_class": [1000] * 10}
    card = render_model_card(summary=measured, config={"data": {"source": "fashion-mnist", "test_per_class": 20}},
                             export_config=json.loads((out / "config.json").read_text()), stage="student-1",
                             repo_id="someone/digits-ns", splits=fashion)
    meta, body = _front_matter(card)
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert "| test images | 10000 (1000 per class) |" in body and "| validation images | 100 (9-11 per class) |" in body
    assert "test images per class" not in body
    # the figures in numeric order (eps 2 before eps 16)
    assert "| model | corruptions.mean_error | fgsm.top1@eps2 | fgsm.top1@eps16 |" in body
    assert "**Noisy Student gain**: +1.25 test top-1 (+2.50 val) for student-1" in body
    assert "| corruptions.mean_error |" in body and "| student-1 | 30.25 |" in body
    assert 'timm.create_model("hf-hub:someone/digits-ns", pretrained=True)' in body


def test_export_never_overwrites_what_it_did_not_write(cnn_run, tmp_path, capsys):
    run_dir, _ = cnn_run
    a_file = tmp_path / "model-out"
    a_file.write_text("mine")
    assert main(["export", str(run_dir), "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and a_file.read_text() == "mine"

    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("my own notes")
    with pytest.raises(NoisyStudentError, match="README.md exists and was not written by noisystudent export"):
        export_model(run_dir, out)
    assert (out / "README.md").read_text() == "my own notes" and not (out / "model.safetensors").exists()
    (out / "README.md").unlink()
    export_model(run_dir, out, onnx=True)
    export_model(run_dir, out)  # its own files: replaced; the stale ONNX file it wrote is removed
    assert not (out / "model.onnx").exists() and (out / "model.safetensors").is_file()
    (out / "config.json").write_text("{}")  # edited since: no longer what the export wrote
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "config.json exists and was not written" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"


def test_onnx_extra_missing_checked_and_out_of_tolerance(cnn_run, tmp_path, monkeypatch, capsys, caplog):
    import importlib.util
    import sys

    run_dir, _ = cnn_run
    with pytest.raises(NoisyStudentError, match="differs from the PyTorch model by"):
        export_model(run_dir, tmp_path / "strict", onnx=True, onnx_tolerance=-1.0)
    assert not (tmp_path / "strict").exists()  # nothing half-written moved in; the folder it made is gone
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # onnxruntime not installed: written, not checked
    with caplog.at_level("WARNING", logger="noisystudent"):
        result = export_model(run_dir, tmp_path / "unchecked", onnx=True)
    assert result["onnx_max_abs_diff"] is None and (tmp_path / "unchecked" / "model.onnx").is_file()
    assert "pip install 'noisystudent[onnx]'" in caplog.text
    broken = tmp_path / "site" / "onnxruntime"  # installed but failing at import, as 1.18 does under numpy 2
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise AttributeError('_ARRAY_API not found')\n")
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.syspath_prepend(str(broken.parent))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "broken-ort"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime is installed but cannot be imported (AttributeError: _ARRAY_API" in err
    assert not (tmp_path / "broken-ort").exists()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript"
                        else real_find_spec(name, *a))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "no-extra"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'noisystudent[onnx]'" in err
    assert not (tmp_path / "no-extra" / "model.safetensors").exists()


def _dynamo_fails(monkeypatch, torchscript_fails=False):
    """torch.onnx.export failing as torch 2.5/2.6's dynamo exporter does with current onnxscript
    (after writing a partial file), and the TorchScript exporter too if asked; the calls are counted."""
    real_export = torch.onnx.export
    calls = []

    def export(model, args, f, **kw):
        calls.append("dynamo" if kw.get("dynamo") else "torchscript")
        if kw.get("dynamo") or torchscript_fails:
            Path(f).write_bytes(b"half a graph")
            try:  # as torch wraps the cause: a generic first line, coloured for a terminal
                raise AttributeError("'tuple' object has no attribute 'dtype'\nmore lines")
            except AttributeError as cause:
                raise RuntimeError("Failed to convert. \x1b[96mThis is step 2/2\x1b[0m") from cause
        return real_export(model, args, f, **kw)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


def test_onnx_falls_back_to_the_torchscript_exporter_where_dynamo_fails(cnn_run, tmp_path, monkeypatch, caplog):
    import onnxruntime as ort

    run_dir, cfg = cnn_run
    calls = _dynamo_fails(monkeypatch)
    out = tmp_path / "export"
    with caplog.at_level("WARNING", logger="noisystudent"):
        result = export_model(run_dir, out, onnx=True)
    assert calls == ["dynamo", "torchscript"] and result["onnx_exporter"] == "torchscript"
    assert "dynamo ONNX exporter failed (AttributeError: 'tuple' object has no attribute 'dtype')" in caplog.text
    assert result["onnx_max_abs_diff"] is not None and result["onnx_max_abs_diff"] <= 1e-4  # checked by onnxruntime
    # no scratch folder left
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "README.md", "config.json", "model.onnx",
                                                     "model.safetensors"]
    original, meta = _original(run_dir, FIXRES)
    x = _batch(cfg, meta, n=5)
    with torch.no_grad():
        expected = original(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (5, 1):  # the batch axis is dynamic here too
        (logits,) = session.run(["logits"], {"image": x[:n].numpy()})
        np.testing.assert_allclose(logits, expected[:n], atol=1e-4, rtol=1e-4)

    import noisystudent.models.export as export

    monkeypatch.setattr(export, "_ONNX_SINGLE_FILE_BYTES", 0)  # a "large" model: its weights in one file beside
    big = tmp_path / "big"
    assert export_model(run_dir, big, onnx=True)["onnx_max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in big.iterdir()) == [RECORD, "README.md", "config.json", "model.onnx",
                                                     "model.onnx.data", "model.safetensors"]
    assert (big / "model.onnx.data").stat().st_size > (big / "model.onnx").stat().st_size
    session = ort.InferenceSession(str(big / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], {"image": x.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


def test_a_dynamo_file_that_fails_its_check_is_written_again_by_the_torchscript_exporter(cnn_run, tmp_path,
                                                                                        monkeypatch, caplog):
    """The dynamo exporter runs, but its file computes otherwise (here: it exports the model with one
    weight changed, as a mis-converted op would): the check catches it and the TorchScript exporter's
    file, checked in turn, is the one exported. If that one fails too, the export fails, naming both."""
    import copy

    run_dir, _ = cnn_run
    real_export, calls = torch.onnx.export, []

    def export(model, args, f, **kw):
        calls.append("dynamo" if kw.get("dynamo") else "torchscript")
        if kw.get("dynamo") or broken_torchscript:
            model = copy.deepcopy(model)
            with torch.no_grad():
                next(p for p in model.parameters() if p.dim() > 1).add_(1.0)
        return real_export(model, args, f, **kw)

    monkeypatch.setattr(torch.onnx, "export", export)
    broken_torchscript = False
    with caplog.at_level("WARNING", logger="noisystudent"):
        result = export_model(run_dir, tmp_path / "export", onnx=True)
    assert calls == ["dynamo", "torchscript"] and result["onnx_exporter"] == "torchscript"
    assert result["onnx_max_abs_diff"] <= 1e-4
    assert "dynamo ONNX exporter failed (its file failed the check: model.onnx differs from the PyTorch model by" \
        in caplog.text
    broken_torchscript = True
    with pytest.raises(NoisyStudentError, match="differs from the PyTorch model"):
        export_model(run_dir, tmp_path / "both-broken", onnx=True)
    assert not (tmp_path / "both-broken").exists()  # nothing that looks like an export


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_failed_export_leaves_nothing_that_looks_like_one(cnn_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = cnn_run
    _dynamo_fails(monkeypatch, torchscript_fails=True)
    new = tmp_path / "exports" / "new"  # neither folder exists: both are made, both are removed
    assert main(["export", str(run_dir), "--out", str(new), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ONNX export of ns_cnn_s failed" in err
    assert "dynamo exporter: AttributeError: 'tuple' object" in err and "\x1b" not in err
    assert "TorchScript exporter: AttributeError: 'tuple' object" in err
    assert not (tmp_path / "exports").exists()

    mine = tmp_path / "mine"  # the user's folder, with a file of theirs: both stay, and only they
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run_dir), "--out", str(mine), "--onnx"]) == 2
    assert _tree(mine) == {"notes.txt": b"keep me"}

    earlier = tmp_path / "earlier"  # an earlier export there: left as it was, still complete
    monkeypatch.undo()
    export_model(run_dir, earlier)
    before = _tree(earlier)
    _dynamo_fails(monkeypatch, torchscript_fails=True)
    with pytest.raises(NoisyStudentError, match="ONNX export of ns_cnn_s failed"):
        export_model(run_dir, earlier, onnx=True)
    assert _tree(earlier) == before
    monkeypatch.undo()
    export_model(run_dir, earlier)  # and the next export replaces it as its own

    import os

    real_replace, replaced = os.replace, []

    def replace_fails_second(src, dst):  # interrupted while moving the files in
        replaced.append(dst)
        if len(replaced) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_second)
    with pytest.raises(KeyboardInterrupt):
        export_model(run_dir, tmp_path / "moving")
    assert len(replaced) == 2 and not (tmp_path / "moving").exists()  # the file moved in went with its folder


def test_push_to_hub_uploads_the_exported_folder(timm_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    run_dir, _ = timm_run
    calls = []

    class Repo:
        repo_id = "someone/digits-ns"

    class Commit:
        commit_url = "https://huggingface.co/someone/digits-ns/commit/abc"

    def upload_folder(**kwargs):  # what would go over the network: the folder and the files in it
        folder = Path(kwargs["folder_path"])
        calls.append(("upload", kwargs, {p: (folder / p).read_bytes() for p in kwargs["allow_patterns"]}))
        return Commit()

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw))
                        or Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "someone/digits-ns", "--private"]) == 0
    assert "pushed to https://huggingface.co/someone/digits-ns" in capsys.readouterr().out
    (kind, repo_id, kw), (_, upload, files) = calls
    assert (kind, repo_id, kw["private"], kw["exist_ok"]) == ("create", "someone/digits-ns", True, True)
    assert upload["repo_id"] == "someone/digits-ns" and Path(upload["folder_path"]) == out
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]  # not the export record
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert b'timm.create_model("hf-hub:someone/digits-ns", pretrained=True)' in files["README.md"]

    def offline(**kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "someone/digits-ns"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # after export's log line
    assert len(errors) == 1 and "push to the hub repository someone/digits-ns failed" in errors[0]
    assert (out / "model.safetensors").is_file()  # the local export stays
