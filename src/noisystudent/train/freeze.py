"""Which blocks of a network fix-res freezes, and freezing them (weights and BatchNorm statistics).

What "frozen" means here follows the official code (google-research/noisystudent, flag
``fix_layer_num``): the first ``n`` blocks, counted one by one in network order (MBConv blocks
for EfficientNet, residual blocks for ``ns_cnn_*``, bottlenecks for ResNets), and the stem in
front of them keep their weights *and* their BatchNorm statistics (their BN runs in inference
mode, ``training and trainable`` in the official code); the later blocks, the head convolution
and BN, and the classifier train, their BN statistics adapting to the new resolution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.nn as nn

from ..models.pretrained import model_architecture
from ..runtime.errors import ConfigError


# ------------------------------------------------------------------------------ blocks


@dataclass
class BlockLayout:
    """A network cut into stem, blocks (shallow to deep) and the stage of each block."""

    stem: list[str]
    blocks: list[str]
    stages: list[int]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def default_frozen(self) -> int:
        """Every block but those of the last stage."""
        last = self.stages[-1] if self.stages else 0
        return sum(1 for s in self.stages if s != last)


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _stem_before(model: nn.Module, first: str) -> list[str]:
    stem = []
    for name, child in model.named_children():
        if name == first:
            return stem
        if _has_state(child):
            stem.append(name)
    return stem


def block_layout(model: nn.Module) -> BlockLayout:
    """The blocks of timm EfficientNets/MobileNets (``model.blocks``: stages of blocks), of our
    ``ns_cnn_*`` (``model.blocks``: one flat sequence, stages from ``model.stage_depths``) and of
    ResNet-style models (``layer1``..``layerN``)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) > 0:
        if all(isinstance(s, nn.Sequential) for s in blocks):
            names = [f"blocks.{i}.{j}" for i, s in enumerate(blocks) for j in range(len(s))]
            stages = [i for i, s in enumerate(blocks) for _ in range(len(s))]
        else:
            names = [f"blocks.{i}" for i in range(len(blocks))]
            depths = list(getattr(model, "stage_depths", None) or [len(blocks)])
            if sum(depths) != len(blocks):
                depths = [len(blocks)]
            stages = [i for i, d in enumerate(depths) for _ in range(d)]
        return BlockLayout(stem=_stem_before(model, "blocks"), blocks=names, stages=stages)
    layers = []
    while isinstance(getattr(model, f"layer{len(layers) + 1}", None), nn.Sequential):
        layers.append(getattr(model, f"layer{len(layers) + 1}"))
    if layers:
        names = [f"layer{i + 1}.{j}" for i, s in enumerate(layers) for j in range(len(s))]
        stages = [i for i, s in enumerate(layers) for _ in range(len(s))]
        return BlockLayout(stem=_stem_before(model, "layer1"), blocks=names, stages=stages)
    raise ConfigError(f"fix-res: cannot find the blocks of {type(model).__name__} (supported: timm "
                      "EfficientNet/MobileNet-style `blocks`, ResNet-style `layer1..N`, ns_cnn_*); "
                      "set finetune.frozen_blocks=0 to fine-tune everything")


def default_frozen_blocks(model: nn.Module) -> int:
    """The default of ``frozen_blocks``: all blocks except the last stage's."""
    return block_layout(model).default_frozen


def frozen_module_names(model: nn.Module, n: int | None) -> list[str]:
    """The modules :func:`freeze_shallow_blocks` freezes for ``n`` (stem first, then blocks),
    without freezing them; checks ``n`` against the model's blocks."""
    layout = block_layout(model)
    if n is None:
        n = layout.default_frozen
    if not 0 <= n <= layout.num_blocks:
        raise ConfigError(f"finetune.frozen_blocks={n}, but {model_architecture(model)} has "
                          f"{layout.num_blocks} blocks (0..{layout.num_blocks})")
    return layout.stem + layout.blocks[:n] if n else []


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_shallow_blocks(model: nn.Module, n: int | None) -> list[str]:
    """Freeze the stem and the first ``n`` blocks (``None``: :func:`default_frozen_blocks`).

    Frozen modules stop requiring gradients and stay in eval mode even when ``model.train()`` is
    called, so their BatchNorm statistics do not change either. ``n == 0`` freezes nothing.
    Returns the names of the frozen modules (stem first, then blocks, shallow to deep); undo
    with :func:`unfreeze`.
    """
    names = frozen_module_names(model, n)
    for name in names:
        m = model.get_submodule(name)
        for p in m.parameters():
            p.requires_grad_(False)
        m.train = functools.partial(_stay_in_eval, m)  # an instance attribute shadows Module.train
        m.eval()
    return names


def unfreeze(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`freeze_shallow_blocks` (the caller's train/eval mode applies again)."""
    for name in names:
        m = model.get_submodule(name)
        if "train" in m.__dict__:
            del m.__dict__["train"]
        for p in m.parameters():
            p.requires_grad_(True)
    model.train(model.training)
