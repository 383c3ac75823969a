"""Teachers from pretrained weights: local timm-format, safetensors and our own checkpoints."""

import logging

import pytest
import torch
from safetensors.torch import save_file

import noisystudent.models.pretrained as pretrained
from noisystudent.models.checkpoint import save_model
from noisystudent.runtime.errors import CheckpointError
from noisystudent.models.factory import create_model
from noisystudent.models.pretrained import load_pretrained, read_state_dict


def _timm_b0(num_classes=1000, in_chans=3, seed=0):
    torch.manual_seed(seed)
    return create_model("efficientnet_b0", num_classes, in_chans)


@pytest.fixture(scope="module")
def b0_file(tmp_path_factory):
    """A timm-format state dict of EfficientNet-B0 (1000 classes), as timm's hub files are."""
    src = _timm_b0()
    path = tmp_path_factory.mktemp("w") / "b0.pth"
    torch.save(src.state_dict(), path)
    return path, src.state_dict()


def _same(a, b, skip=()):
    return all(torch.equal(a[k], b[k]) for k in a if not any(k.startswith(s) for s in skip))


def test_timm_checkpoint_same_classes_loads_everything(b0_file):
    path, ref = b0_file
    model = _timm_b0(seed=1)
    messages = load_pretrained(model, str(path), num_classes=1000)
    assert _same(model.state_dict(), ref)
    assert not any("replaced" in m for m in messages)


def test_timm_checkpoint_with_head_change_warns_with_both_counts(b0_file, caplog):
    path, ref = b0_file
    model = _timm_b0(num_classes=10, seed=1)
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        messages = load_pretrained(model, str(path), num_classes=10)
    assert model.classifier.out_features == 10
    assert _same(model.state_dict(), ref, skip=("classifier.",))  # the body is the checkpoint's
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and str(path) in warning[0] and "1000" in warning[0] and "10" in warning[0]
    assert warning[0] in messages and "classifier" in warning[0]


def test_safetensors_and_wrappers(tmp_path, b0_file):
    _, ref = b0_file
    st = tmp_path / "b0.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(st))
    ddp = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}, "epoch": 3}, ddp)
    nested = tmp_path / "nested.pt"
    torch.save({"model": dict(ref)}, nested)
    for path in (st, ddp, nested):
        model = _timm_b0(num_classes=5, seed=2)
        load_pretrained(model, str(path), num_classes=5)
        assert _same(model.state_dict(), ref, skip=("classifier.",)), path


def test_create_model_with_a_local_pretrained_source(b0_file):
    path, ref = b0_file
    model = create_model("efficientnet_b0", 10, 3, pretrained=str(path))
    assert model.classifier.out_features == 10
    assert torch.equal(model.conv_stem.weight, ref["conv_stem.weight"])


def test_our_checkpoint_format_round_trip(tmp_path):
    torch.manual_seed(0)
    src = create_model("ns_cnn_s", 10, 1)
    path = tmp_path / "model.pt"
    save_model(path, src, name="ns_cnn_s", num_classes=10, in_chans=1, classes=list("0123456789"),
               image_size=16, mean=(0.5,), std=(0.2,))
    state, arch = read_state_dict(path)
    assert arch == "ns_cnn_s" and set(state) == set(src.state_dict())
    dst = create_model("ns_cnn_s", 3, 1)
    messages = load_pretrained(dst, str(path), num_classes=3)
    assert any("10 classes" in m and "3" in m for m in messages)
    assert torch.equal(dst.blocks[0].conv1.weight, src.blocks[0].conv1.weight)


def test_another_architecture_is_a_one_line_error(tmp_path):
    src = create_model("ns_cnn_m", 10, 1)
    path = tmp_path / "m.pt"
    save_model(path, src, name="ns_cnn_m", num_classes=10, in_chans=1, classes=list("0123456789"),
               image_size=16, mean=(0.5,), std=(0.2,))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(create_model("ns_cnn_s", 10, 1), str(path), num_classes=10)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "ns_cnn_m" in msg and "ns_cnn_s" in msg
    assert "differ in shape" in msg


def test_timm_weights_into_another_timm_architecture_fail(tmp_path, b0_file):
    path, _ = b0_file
    with pytest.raises(CheckpointError, match="another architecture than efficientnet_b1"):
        load_pretrained(create_model("efficientnet_b1", 1000, 3), str(path), num_classes=1000)


def test_missing_unreadable_and_non_state_dict_files(tmp_path):
    model = create_model("ns_cnn_s", 10, 1)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(model, str(tmp_path / "nope.pt"), 10)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a weight file: .*bad\.pt \(not a file written by torch.save\)"):
        load_pretrained(model, str(bad), 10)
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "note": "no tensors"}, odd)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_pretrained(model, str(odd), 10)


def test_rgb_weights_adapt_to_grayscale(b0_file, caplog):
    path, ref = b0_file
    model = _timm_b0(num_classes=10, in_chans=1)
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        messages = load_pretrained(model, str(path), num_classes=10)
    assert any("3 to 1 input channels" in m for m in messages)
    assert torch.allclose(model.conv_stem.weight, ref["conv_stem.weight"].sum(1, keepdim=True))


def _tag_served_from(monkeypatch, path):
    """timm's real record of the tag, with its weights served from a local file instead of the
    Hub (no download in tests); timm.models.load_pretrained then reads and adapts them."""
    import dataclasses

    real = pretrained.timm_pretrained_cfg
    monkeypatch.setattr(pretrained, "timm_pretrained_cfg",
                        lambda tag: dataclasses.replace(real(tag), file=str(path)))


def test_timm_tag_goes_through_timm_load_pretrained(monkeypatch, b0_file, caplog):
    import timm.models

    path, ref = b0_file
    _tag_served_from(monkeypatch, path)
    calls = []
    real_loader = timm.models.load_pretrained
    monkeypatch.setattr(timm.models, "load_pretrained", lambda *a, **k: calls.append(k) or real_loader(*a, **k))
    model = _timm_b0(num_classes=7, in_chans=1, seed=1)
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        messages = load_pretrained(model, "tf_efficientnet_b0.ns_jft_in1k", num_classes=7)
    assert len(calls) == 1 and calls[0]["num_classes"] == 7 and calls[0]["in_chans"] == 1
    assert any("prefer model tf_efficientnet_b0" in m for m in messages)
    assert any("1000 classes" in m for m in messages)  # the head replaced, said once
    # timm adapted the RGB stem to one channel (summed) and loaded the rest; the new head is 7-way
    assert torch.allclose(model.conv_stem.weight, ref["conv_stem.weight"].sum(1, keepdim=True))
    assert _same(model.state_dict(), ref, skip=("classifier", "conv_stem"))
    assert model.classifier.out_features == 7


def test_timm_tag_with_weights_of_another_architecture_is_our_error(monkeypatch, tmp_path):
    path = tmp_path / "b1.safetensors"
    save_file(create_model("efficientnet_b1", 1000, 3).state_dict(), str(path))
    _tag_served_from(monkeypatch, path)
    with pytest.raises(CheckpointError, match="another architecture than efficientnet_b0"):
        load_pretrained(_timm_b0(), "efficientnet_b0.ra_in1k", num_classes=1000)


def test_timm_tag_that_cannot_be_fetched_is_one_line(monkeypatch, tmp_path):
    _tag_served_from(monkeypatch, tmp_path / "not-downloaded.pth")  # as if offline with no cache
    with pytest.raises(CheckpointError, match=r"could not fetch pretrained weights 'efficientnet_b0.ra_in1k'.*offline"):
        load_pretrained(_timm_b0(), "efficientnet_b0.ra_in1k", num_classes=1000)


def test_unknown_tag_is_an_error_without_network():
    model = create_model("ns_cnn_s", 10, 1)
    with pytest.raises(CheckpointError, match="not a timm model"):
        load_pretrained(model, "no_such_net.some_tag", 10)
    with pytest.raises(CheckpointError, match="Invalid pretrained tag|unknown pretrained tag"):
        load_pretrained(create_model("efficientnet_b0", 10, 3), "tf_efficientnet_b0.no_such_tag", 10)


def test_headless_model_ignores_the_file_classifier(b0_file):
    path, ref = b0_file
    model = create_model("efficientnet_b0", 0, 3)
    messages = load_pretrained(model, str(path))
    assert any("no classifier" in m for m in messages)
    assert torch.equal(model.conv_head.weight, ref["conv_head.weight"])


def test_our_checkpoint_is_read_once_and_its_class_names_checked(tmp_path, monkeypatch):
    from noisystudent.runtime.errors import DataError

    path = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    src = create_model("ns_cnn_s", 3, 1)
    save_model(path, src, name="ns_cnn_s", num_classes=3, in_chans=1, classes=["a", "b", "c"],
               image_size=16, mean=(0.5,), std=(0.2,))
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    model = create_model("ns_cnn_s", 3, 1, pretrained=str(path), classes=["a", "b", "c"], used_as_is=True)
    assert len(reads) == 1  # one read of the file, class check included
    assert torch.equal(model.fc.weight, src.fc.weight)
    with pytest.raises(DataError, match=r"trained on classes \['a', 'b', 'c'\]"):
        create_model("ns_cnn_s", 3, 1, pretrained=str(path), classes=["c", "b", "a"])
    with pytest.raises(DataError, match="needs the same classes"):
        create_model("ns_cnn_s", 4, 1, pretrained=str(path), classes=list("abcd"), used_as_is=True)
    # trained further: another class count only gets a new head
    model = create_model("ns_cnn_s", 4, 1, pretrained=str(path), classes=list("abcd"))
    assert model.fc.out_features == 4 and torch.equal(model.stem[0].weight, src.stem[0].weight)


# ------------------------------------------------------------------ the weights' own preprocessing

FOLDER_MEAN, FOLDER_STD = (0.6,), (0.15,)  # unlike the digits' own (about 0.31, 0.38)
DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """timm's ``save_for_hf`` output (config.json + model.safetensors) of a tiny timm model whose
    weights were trained with their own preprocessing (a custom pretrained_cfg)."""
    import timm.models

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": FOLDER_MEAN, "std": FOLDER_STD, "num_classes": 10,
                            "interpolation": "bicubic", "crop_pct": 0.9, "input_size": (1, 16, 16)}
    folder = tmp_path_factory.mktemp("hf") / "teacher"
    timm.models.save_for_hf(model, str(folder), model_config={"label_names": DIGITS}, safe_serialization=True)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_local_dir_source_loads_through_timm_with_its_data_config(hf_folder):
    folder, ref = hf_folder
    source = f"local-dir:{folder}"
    assert not pretrained.is_local_source(source)
    model = create_model("test_resnet", 10, 1, pretrained=source, classes=DIGITS)
    assert _same(model.state_dict(), ref)
    cfg = pretrained.pretrained_data_config(source, model)
    assert cfg["mean"] == FOLDER_MEAN and cfg["std"] == FOLDER_STD
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["source"]) == ("bicubic", 0.9, source)
    assert cfg["pretrained_input_size"] == [1, 16, 16]
    # the folder as the model name, as timm.create_model takes it: its architecture and its weights
    by_name = create_model(source, 10, 1, pretrained=None)
    assert type(by_name).__name__ == type(model).__name__ and _same(by_name.state_dict(), ref)
    assert not _same(create_model(source, 10, 1).state_dict(), ref)  # pretrained=False: the architecture only
    with pytest.raises(Exception, match="trained on classes"):  # the folder's label_names are checked
        create_model("test_resnet", 10, 1, pretrained=source, classes=list("abcdefghij"))


def test_local_files_with_and_without_a_data_config(hf_folder, tmp_path):
    folder, ref = hf_folder
    model = create_model("test_resnet", 10, 1)
    # a weight file inside a save_for_hf folder: the config.json beside it says how it was trained
    beside = pretrained.pretrained_data_config(str(folder / "model.safetensors"), model)
    assert beside["mean"] == FOLDER_MEAN and beside["interpolation"] == "bicubic"
    # our own checkpoint records its data config
    ours = tmp_path / "teacher.pt"
    save_model(ours, model, name="test_resnet", num_classes=10, in_chans=1, classes=DIGITS, image_size=96,
               mean=(0.4,), std=(0.3,), data_config={"interpolation": "bicubic", "crop_pct": 0.95})
    recorded = pretrained.pretrained_data_config(str(ours), model)
    assert (recorded["mean"], recorded["std"], recorded["crop_pct"]) == ((0.4,), (0.3,), 0.95)
    # a bare state dict says nothing: the stage keeps the data's statistics
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    assert pretrained.pretrained_data_config(str(bare), model) is None
    stage = pretrained.stage_data_config("test_resnet", str(bare), model, mean=(0.31,), std=(0.38,))
    assert stage["source"] == "data" and stage["mean"] == (0.31,) and stage["interpolation"] == "bilinear"
    assert pretrained.stage_data_config("test_resnet", None, model, mean=(0.31,), std=(0.38,))["source"] == "data"
    # RGB statistics for a grayscale model: averaged, as the first convolution is summed over RGB
    rgb = tmp_path / "rgb"
    rgb_model = create_model("test_resnet", 10, 3)
    rgb_model.pretrained_cfg = {**rgb_model.pretrained_cfg, "mean": (0.2, 0.4, 0.6), "std": (0.1, 0.2, 0.3),
                                "num_classes": 10}
    import timm.models

    timm.models.save_for_hf(rgb_model, str(rgb), safe_serialization=True)
    gray = pretrained.pretrained_data_config(f"local-dir:{rgb}", model)
    assert gray["mean"] == pytest.approx((0.4,)) and gray["std"] == pytest.approx((0.2,))


def test_eval_transform_with_a_data_config_is_timms(tmp_path):
    """The clean transform of a checkpoint with a pretrained data config equals timm's own eval
    transform for that config (resize by floor(size / crop_pct), bicubic, centre crop, normalise)."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from noisystudent.models.checkpoint import clean_transform, load_checkpoint

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (130, 110, 3), dtype=np.uint8), "RGB")
    for crop_mode in ("center", "squash"):
        data_cfg = dict(interpolation="bicubic", crop_pct=0.9, crop_mode=crop_mode)
        path = tmp_path / f"{crop_mode}.pt"
        save_model(path, create_model("ns_cnn_s", 3, 3), name="ns_cnn_s", num_classes=3, in_chans=3,
                   classes=["a", "b", "c"], image_size=96, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3),
                   data_config=data_cfg)
        ours = clean_transform(load_checkpoint(path))
        theirs = create_transform(input_size=(3, 96, 96), mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3), **data_cfg)
        assert torch.allclose(ours(img), theirs(img), atol=1e-6), crop_mode
        assert ours.geometry is None  # GPU JPEG decoding reproduces bilinear only: this one stays on the CPU


@pytest.mark.parametrize("kind", ["local-dir", "file", "model-name"])
def test_a_pretrained_teacher_is_recorded_and_labels_with_its_own_preprocessing(hf_folder, tmp_path, kind):
    """A teacher used as trained elsewhere (epochs 0): the run records the weights' data config in
    model.pt, and the labeler (clean_transform of the checkpoint) normalises with it."""
    import numpy as np
    from PIL import Image

    from noisystudent.cli import main
    from noisystudent.config.schema import load_config
    from noisystudent.label.store import LabelStore
    from noisystudent.models.checkpoint import clean_transform, load_checkpoint, load_model
    from noisystudent.pipeline import run_pipeline
    from noisystudent.runtime.rundir import LOG, MODEL, TEACHER, RunDir

    folder, _ = hf_folder
    source = str(folder / "model.safetensors") if kind == "file" else f"local-dir:{folder}"
    # model-name: the folder as the model, as timm.create_model("local-dir:...") takes it
    model_keys = [f"teacher.model={source}"] if kind == "model-name" else \
        ["teacher.model=test_resnet", f"teacher.pretrained={source}"]
    cfg = load_config(None, [*model_keys, "teacher.epochs=0", "students=[]", "data.val_per_class=2",
                             "data.test_per_class=2"])
    run_pipeline(cfg, tmp_path / "run", progress=False)
    ckpt = RunDir(tmp_path / "run").file(TEACHER, MODEL)
    # the log says the weights were used as given, not "best epoch 0/0 0.0s (none)"
    assert "[teacher] val top-1" in (log := (tmp_path / "run" / LOG).read_text())
    assert "not trained (epochs 0)" in log and "best epoch 0/0" not in log
    meta = load_checkpoint(ckpt)
    recorded = meta["data_config"]
    assert (tuple(meta["mean"]), tuple(meta["std"])) == (FOLDER_MEAN, FOLDER_STD)
    assert recorded["mean"] == list(FOLDER_MEAN) and recorded["interpolation"] == "bicubic"
    assert recorded["source"] == source and recorded["crop_pct"] == 0.9
    assert clean_transform(meta).normalize.mean == FOLDER_MEAN
    assert meta["model"] == "test_resnet"  # the architecture the folder names, rebuilt without it

    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L") for _ in range(3)]
    for i, img in enumerate(images):
        img.save(pool / f"{i}.png")
    store = tmp_path / "store"
    assert main(["label", str(ckpt), str(pool), "--out", str(store), "--top-k", "10", "--workers", "0",
                 "--quiet"]) == 0
    labels = LabelStore.open(store).to_pseudo_labels()
    model, _ = load_model(ckpt)
    model.eval()

    def probs(mean, std):  # by hand: bicubic resize to 16 px, then the given normalisation
        x = torch.stack([torch.from_numpy(np.asarray(img.resize((16, 16), Image.BICUBIC), dtype=np.float32))
                         for img in images])[:, None] / 255
        with torch.no_grad():
            return model((x - mean[0]) / std[0]).softmax(1).numpy()

    order = np.argsort([int(k.rsplit("/", 1)[-1].split(".")[0]) for k in labels.keys])
    stored = np.zeros((3, 10), np.float32)
    np.put_along_axis(stored, labels.topk_index[order].astype(np.int64), labels.topk_prob[order], axis=1)
    expected = probs(FOLDER_MEAN, FOLDER_STD)
    np.testing.assert_allclose(stored, expected, atol=2e-3)
    assert np.abs(probs((0.309,), (0.377,)) - expected).max() > 0.01  # the data's statistics would differ


def test_a_timm_tag_gives_its_registry_data_config(monkeypatch, tmp_path):
    """A timm tag's preprocessing comes from timm's registry record of the tag (no download):
    test_resnet.r160_in1k was trained with mean = std = 0.5 and crop 0.95; for grayscale data the
    RGB statistics are averaged. The stage's checkpoint records them and its clean transform uses them."""
    from noisystudent.models.checkpoint import clean_transform, load_checkpoint

    weights = tmp_path / "test_resnet.safetensors"
    save_file(create_model("test_resnet", 1000, 3).state_dict(), str(weights))
    _tag_served_from(monkeypatch, weights)
    model = create_model("test_resnet", 10, 1, pretrained="test_resnet.r160_in1k")
    stage = pretrained.stage_data_config("test_resnet", "test_resnet.r160_in1k", model, mean=(0.31,), std=(0.38,))
    assert (stage["mean"], stage["std"], stage["crop_pct"]) == ((0.5,), (0.5,), 0.95)
    assert stage["source"] == "test_resnet.r160_in1k" and stage["pretrained_input_size"] == [3, 160, 160]
    path = tmp_path / "teacher.pt"
    save_model(path, model, name="test_resnet", num_classes=10, in_chans=1, classes=DIGITS, image_size=96,
               mean=stage["mean"], std=stage["std"], data_config=stage)
    transform = clean_transform(load_checkpoint(path))
    assert transform.normalize.mean == (0.5,) and transform.normalize.std == (0.5,)
    assert transform.geometry == ("resize-crop", 101, 96)  # floor(96 / 0.95), then the centre 96 px
