"""The fix-res stage: shallow blocks frozen (weights and BN statistics), the rest trained."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from noisystudent.config.schema import load_config
from noisystudent.data.datasets import TransformedSet, build_splits
from noisystudent.runtime.distributed import DistContext
from noisystudent.runtime.errors import ConfigError
from noisystudent.train.fixres import (block_layout, default_frozen_blocks, finetune_fixres, fixres_enabled,
                                   freeze_shallow_blocks, unfreeze)
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


@pytest.mark.parametrize("name,n", [("ns_cnn_l", 3), ("efficientnet_b0", 10)])
def test_frozen_blocks_unchanged_and_the_rest_trained(name, n):
    torch.manual_seed(0)
    size = 12 if name.startswith("ns") else 32
    model = create_model(name, 3, 1, dropout=0.0, drop_path=0.0)
    data = _toy(size=size)
    before = copy.deepcopy(model.state_dict())
    outcome = finetune_fixres(model, data, data, frozen_blocks=n, epochs=2, lr=0.1, batch_size=16, ctx=CPU)
    after = model.state_dict()
    layout = block_layout(model)
    frozen, trained = layout.stem + layout.blocks[:n], layout.blocks[n:]
    assert outcome.frozen == frozen and outcome.frozen_blocks == n and outcome.steps == 6
    for prefix in frozen:  # weights and BN buffers (running stats, batch counters) identical
        keys = [k for k in before if k.startswith(prefix + ".")]
        assert keys and all(torch.equal(before[k], after[k]) for k in keys), prefix
    for prefix in trained + ["fc." if name.startswith("ns") else "classifier."]:
        assert _changed(before, after, prefix + ("." if not prefix.endswith(".") else "")), prefix
    assert set(outcome.before) == set(outcome.after) == {"val_top1", "val_top5"}
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_zero_epochs_changes_nothing_and_everything_frozen_is_an_error():
    model = create_model("ns_cnn_s", 3, 1)
    data = _toy()
    state = copy.deepcopy(model.state_dict())
    out = finetune_fixres(model, data, data, epochs=0, lr=0.1, batch_size=16, ctx=CPU)
    assert out.steps == 0 and out.before == out.after
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.fc.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        finetune_fixres(model, data, data, frozen_blocks=3, epochs=1, lr=0.1, batch_size=16, ctx=CPU)


def test_enabled_rule():
    assert fixres_enabled(None, 20, 28) and not fixres_enabled(None, 20, 20)
    assert not fixres_enabled(None, 20, None) and not fixres_enabled(False, 20, 28)
    assert fixres_enabled(True, 20, 20)


def test_tiny_end_to_end_fixres_on_digits():
    """Train at 12 px on digits, then fine-tune and evaluate at 16 px (the test resolution)."""
    cfg = load_config(None, ["data.val_per_class=5", "data.test_per_class=10", "train.batch_size=16"])
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
    out = finetune_fixres(model, labeled, val, test=test, epochs=1.5, lr=0.005, batch_size=16, ctx=CPU)
    assert out.frozen_blocks == 2 and out.total_blocks == 3  # the paper's recipe: last stage trains
    assert out.steps == int(np.ceil(1.5 * np.ceil(len(labeled) / 16)))
    for k in ("val_top1", "test_top1", "val_top5", "test_top5"):
        assert 0 <= out.before[k] <= 100 and 0 <= out.after[k] <= 100
    m = out.metrics()
    assert {"test_top1_before", "test_top1_after", "frozen_blocks", "finetune_steps"} <= set(m)
    assert all(torch.equal(v, model.stem.state_dict()[k]) for k, v in stem.items())


def test_resnet_style_layout_and_default_freeze():
    with torch.device("meta"):
        r18 = create_model("resnet18", 10, 3)
    layout = block_layout(r18)
    assert layout.stem == ["conv1", "bn1"] and layout.blocks[0] == "layer1.0" and layout.num_blocks == 8
    names = freeze_shallow_blocks(r18, None)
    assert names == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
