"""The fix-res stage: shallow blocks frozen (weights and BN statistics), the rest trained by the one
training loop (its optimizer, checkpoints and exact resume)."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from _tiny import DIGITS, Crash, CrashAt
import noisystudent.train.trainer as trainer_module
from noisystudent.config.schema import TrainConfig, load_config
from noisystudent.data.datasets import TransformedSet
from noisystudent.data.splits import build_splits
from noisystudent.runtime.distributed import DistContext
from noisystudent.runtime.errors import CheckpointError, ConfigError
from noisystudent.config.stages import fixres_enabled
from noisystudent.train.fixres import (block_layout, default_frozen_blocks, finetune_fixres, fixres_train_config,
                                       freeze_shallow_blocks, unfreeze)
from noisystudent.train.state import list_checkpoints
from noisystudent.models.factory import create_model
from noisystudent.train.loop import train_classifier
from noisystudent.data.transforms import eval_transform


CPU = DistContext(device=torch.device("cpu"))


def _toy(n=48, size=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.arange(n) % classes
    x[:, :, : size // 2] += y.view(-1, 1, 1, 1).float()  # a learnable signal
    return TensorDataset(x, y)


def _changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before
               if k.startswith(prefix) and before[k].is_floating_point())


def test_layout_of_timm_efficientnet_and_small_resnet():
    with torch.device("meta"):
        b0 = create_model("efficientnet_b0", 10, 3)
    layout = block_layout(b0)
    assert layout.stem == ["conv_stem", "bn1"]
    assert layout.num_blocks == 16 and layout.blocks[0] == "blocks.0.0" and layout.blocks[-1] == "blocks.6.0"
    assert default_frozen_blocks(b0) == 15  # all but the last stage (one block in B0)
    cnn = create_model("ns_cnn_l", 10, 1)
    layout = block_layout(cnn)
    assert layout.stem == ["stem"] and layout.blocks == [f"blocks.{i}" for i in range(6)]
    assert layout.stages == [0, 0, 1, 1, 2, 2] and default_frozen_blocks(cnn) == 4


def test_freeze_names_eval_mode_and_unfreeze():
    model = create_model("ns_cnn_l", 10, 1)
    names = freeze_shallow_blocks(model, 3)
    assert names == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    model.train()
    for name, m in model.named_modules():
        frozen = any(name == n or name.startswith(n + ".") for n in names)
        assert m.training != frozen, name
        assert all(p.requires_grad != frozen for p in m.parameters(recurse=False)), name
    copy.deepcopy(model)  # frozen models still copy (EMA, best-epoch snapshots)
    unfreeze(model, names)
    model.train()
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    assert freeze_shallow_blocks(model, 0) == []
    with pytest.raises(ConfigError, match="has 6 blocks"):
        freeze_shallow_blocks(model, 7)


def _finetune(model, data, *, cfg=None, **kwargs):
    kwargs = {"epochs": 2, "lr": 0.1, "batch_size": 16, **kwargs}
    return finetune_fixres(model, data, data, cfg or TrainConfig(), num_classes=3, ctx=CPU, **kwargs)


@pytest.mark.parametrize("name,n", [("ns_cnn_l", 3), ("efficientnet_b0", 10)])
def test_frozen_blocks_unchanged_and_the_rest_trained(name, n, monkeypatch):
    torch.manual_seed(0)
    size = 12 if name.startswith("ns") else 32
    model = create_model(name, 3, 1, dropout=0.0, drop_path=0.0)
    data = _toy(size=size)
    before = copy.deepcopy(model.state_dict())
    built = []
    real_build = trainer_module.build_optimizer
    monkeypatch.setattr(trainer_module, "build_optimizer", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    outcome = _finetune(model, data, frozen_blocks=n)
    after = model.state_dict()
    layout = block_layout(model)
    frozen, trained = layout.stem + layout.blocks[:n], layout.blocks[n:]
    assert outcome.frozen == frozen and outcome.frozen_blocks == n and outcome.steps == 6
    for prefix in frozen:  # weights and BN buffers (running stats, batch counters) identical, bit for bit
        keys = [k for k in before if k.startswith(prefix + ".")]
        assert keys and all(torch.equal(before[k], after[k]) for k in keys), prefix
    for prefix in trained + ["fc." if name.startswith("ns") else "classifier."]:
        assert _changed(before, after, prefix + ("." if not prefix.endswith(".") else "")), prefix
    assert set(outcome.before) == set(outcome.after) == {"val_top1", "val_top5"}
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    # the optimizer is build_optimizer's, holding exactly the parameters outside the frozen modules
    (opt,) = built
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    not_frozen = {id(p) for k, p in model.named_parameters() if not any(k.startswith(f + ".") for f in frozen)}
    assert in_opt == not_frozen


def test_optimizer_settings_come_from_the_train_config(monkeypatch):
    """rmsproptf gets the official epsilon from build_optimizer; the schedule is the fine-tune's own
    cosine from lr to 0 without warm-up, whatever the run's scheduler and warm-up."""
    built = []
    real_build = trainer_module.build_optimizer
    monkeypatch.setattr(trainer_module, "build_optimizer", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    model = create_model("ns_cnn_s", 3, 1)
    cfg = TrainConfig(optimizer="rmsproptf", weight_decay=1e-5, scheduler="step", warmup_epochs=5, ema=True)
    out = _finetune(model, _toy(), cfg=cfg, epochs=1, lr=0.01)
    (opt,) = built
    assert type(opt).__name__ == "RMSpropTF" and opt.defaults["eps"] == 1e-3
    assert opt.defaults["weight_decay"] == 0  # timm moves the decay into the parameter groups
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 1e-5}
    assert out.train is not None and out.train.steps == 3 and out.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    cfg2 = fixres_train_config(cfg, 8)
    assert (cfg2.batch_size, cfg2.scheduler, cfg2.warmup_epochs, cfg2.ema, cfg2.optimizer) == (
        8, "cosine", 0.0, False, "rmsproptf")


def _resumable(tmp_path, crash_at=None):
    torch.manual_seed(0)
    model = create_model("ns_cnn_s", 3, 1, dropout=0.3, drop_path=0.1)  # model noise: RNG states must resume
    data = _toy()
    # fp32, not `auto`: auto times bf16 against fp32, and on a loaded machine the reference and the
    # killed run can choose differently (then the weights differ for a reason that is not resuming)
    cfg = TrainConfig(checkpoint_every=2, keep_checkpoints=2, precision="fp32")
    out = finetune_fixres(model, CrashAt(data, crash_at), data, cfg, num_classes=3, ctx=CPU, frozen_blocks=1,
                          epochs=2, lr=0.1, batch_size=16, seed=4, checkpoint_dir=tmp_path / "ckpt")
    return model.state_dict(), out


def test_killed_finetune_resumes_to_the_same_weights(tmp_path):
    reference, ref_out = _resumable(tmp_path / "uninterrupted")
    assert ref_out.train.resumed_from_step == 0
    assert [p.name for p in list_checkpoints(tmp_path / "uninterrupted" / "ckpt")] == ["step-000000004.pt",
                                                                                      "step-000000006.pt"]
    with pytest.raises(Crash):  # the 69th image is loaded in step 5 (16 a step): after the checkpoint of step 4
        _resumable(tmp_path / "killed", crash_at=69)
    assert [p.name for p in list_checkpoints(tmp_path / "killed" / "ckpt")] == ["step-000000002.pt",
                                                                               "step-000000004.pt"]
    weights, out = _resumable(tmp_path / "killed")
    assert out.train.resumed_from_step == 4 and out.steps == 6
    assert all(torch.equal(weights[k], v) for k, v in reference.items())
    assert out.after == ref_out.after and out.before == ref_out.before
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]  # noqa: E731
    assert strip(out.history) == strip(ref_out.history)
    assert out.metrics()["resumed_from_step"] == 4


def test_a_checkpoint_of_another_freeze_is_refused(tmp_path):
    model = create_model("ns_cnn_s", 3, 1)
    data = _toy()
    cfg = TrainConfig(checkpoint_every=1)
    with pytest.raises(Crash):
        finetune_fixres(model, CrashAt(data, 40), data, cfg, num_classes=3, ctx=CPU, frozen_blocks=1, epochs=1,
                        lr=0.1, batch_size=16, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="another training setup .trainable"):
        finetune_fixres(create_model("ns_cnn_s", 3, 1), data, data, cfg, num_classes=3, ctx=CPU, frozen_blocks=2,
                        epochs=1, lr=0.1, batch_size=16, checkpoint_dir=tmp_path)


def test_zero_epochs_changes_nothing_and_everything_frozen_is_an_error():
    model = create_model("ns_cnn_s", 3, 1)
    data = _toy()
    state = copy.deepcopy(model.state_dict())
    out = _finetune(model, data, epochs=0)
    assert out.steps == 0 and out.before == out.after and out.train is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.fc.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        _finetune(model, data, frozen_blocks=3, epochs=1)


def test_enabled_rule():
    assert fixres_enabled(None, 20, 28) and not fixres_enabled(None, 20, 20)
    assert not fixres_enabled(None, 20, None) and not fixres_enabled(False, 20, 28)
    assert fixres_enabled(True, 20, 20)


def _accuracies(model, val, test) -> dict:
    from noisystudent.evaluate.classifier import evaluate_classifier

    r = {name: evaluate_classifier(model, images, CPU.device) for name, images in (("val", val), ("test", test))}
    return {f"{name}_top{k}": r[name][f"top{k}"] for name in r for k in (1, 5)}


def test_tiny_end_to_end_fixres_on_digits(tmp_path):
    """Train at 12 px on digits, then fine-tune and evaluate at 16 px (the test resolution)."""
    cfg = load_config(None, DIGITS)
    splits = build_splits(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model = create_model("ns_cnn_s", splits.num_classes, splits.channels)
    low = eval_transform(12, splits.channels, splits.mean, splits.std)
    train_classifier(model, TransformedSet(splits.labeled, low), TransformedSet(splits.val, low), cfg.train,
                     num_classes=splits.num_classes, epochs=3, lr=0.05, ctx=CPU, progress=False)
    high = eval_transform(16, splits.channels, splits.mean, splits.std)
    labeled, val, test = (TransformedSet(s, high) for s in (splits.labeled, splits.val, splits.test))
    assert labeled[0][0].shape[-1] == 16
    stem = copy.deepcopy(model.stem.state_dict())
    before = _accuracies(model, val, test)  # the model as fix-res receives it, at the test resolution
    out = finetune_fixres(model, labeled, val, cfg.train, num_classes=splits.num_classes, test=test, epochs=1.5,
                          lr=0.005, batch_size=16, ctx=CPU, checkpoint_dir=tmp_path)
    assert out.frozen_blocks == 2 and out.total_blocks == 3  # the paper's recipe: last stage trains
    assert out.steps == int(np.ceil(1.5 * np.ceil(len(labeled) / 16)))
    # before / after are the real accuracies of the model entering and (best epoch) leaving the stage
    assert out.before == pytest.approx(before)
    assert out.after == pytest.approx(_accuracies(model, val, test))
    m = out.metrics()
    assert {"test_top1_before", "test_top1_after", "frozen_blocks", "total_blocks", "finetune_steps"} <= set(m)
    assert m["finetune_epochs"] == pytest.approx(out.steps / np.ceil(len(labeled) / 16))
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-{out.steps:09d}.pt"]
    assert all(torch.equal(v, model.stem.state_dict()[k]) for k, v in stem.items())


def test_resnet_style_layout_and_default_freeze():
    with torch.device("meta"):
        r18 = create_model("resnet18", 10, 3)
    layout = block_layout(r18)
    assert layout.stem == ["conv1", "bn1"] and layout.blocks[0] == "layer1.0" and layout.num_blocks == 8
    names = freeze_shallow_blocks(r18, None)
    assert names == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
