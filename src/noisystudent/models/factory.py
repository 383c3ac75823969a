"""Model factory: any timm model by name, the paper's EfficientNet-L0/L1, and small residual CNNs
for tiny images on a CPU.

Our models are registered with timm (``efficientnet_l0``, ``efficientnet_l1``, ``ns_cnn_s``,
``ns_cnn_s_wide``, ``ns_cnn_m``, ``ns_cnn_l``), so every model is built by ``timm.create_model``
with the same noise arguments: ``drop_rate`` is dropout before the classifier and
``drop_path_rate`` is stochastic depth at the last block, decaying linearly to zero at the first
(the paper's survival schedule).

EfficientNet-L0 and L1 exist only in the Noisy Student paper (Table: width 2.8 / 3.9, depth 3.7);
they are built with timm's own EfficientNet generator (``_gen_efficientnet``) from those
multipliers, exactly as timm builds B0-B8 and L2, so their layers (and weight names) are timm's.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from timm.models.efficientnet import _gen_efficientnet

from ..config.family import MODEL_SOURCE_PREFIXES, is_known_model, resolve_model_name  # noqa: F401
from ..runtime.errors import ConfigError
from .pretrained import load_pretrained, model_architecture, tag_pretrained_cfg  # noqa: F401 - model_architecture is used from here too

# Pretrained-config entries for our registered models (no weights: ``url`` is empty). timm's
# ``register_model`` reads this module-level ``default_cfgs`` when the entrypoints below register.
# Resolutions are the paper's: train at ``input_size``, test at ``test_input_size``.
default_cfgs = generate_default_cfgs({
    "efficientnet_l0.untrained": dict(
        url="", num_classes=1000, input_size=(3, 380, 380), test_input_size=(3, 600, 600),
        pool_size=(12, 12), crop_pct=0.934, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, first_conv="conv_stem", classifier="classifier"),
    "efficientnet_l1.untrained": dict(
        url="", num_classes=1000, input_size=(3, 380, 380), test_input_size=(3, 600, 600),
        pool_size=(12, 12), crop_pct=0.934, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, first_conv="conv_stem", classifier="classifier"),
})


class ResidualBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(self.shortcut(x) + self.drop_path(out))


class SmallResNet(nn.Module):
    """A compact ResNet for 8-64 px images. ``blocks`` is the list of stages; each stage is a
    stride-2 block (except the first) followed by identity blocks."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10,
                 in_chans: int = 1, drop_rate: float = 0.0, drop_path_rate: float = 0.0, **_: object):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stage_depths = tuple(depths)  # blocks per stage, used by the fix-res freezing
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        total = sum(depths)
        blocks, idx, in_ch = [], 0, widths[0]
        for stage, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                # Linear decay of survival probability: 1.0 at the first block, 1-rate at the last.
                rate = drop_path_rate * idx / max(1, total - 1)
                blocks.append(ResidualBlock(in_ch, w, 2 if (j == 0 and stage > 0) else 1, rate))
                in_ch, idx = w, idx + 1
        self.blocks = nn.Sequential(*blocks)
        self.num_features = in_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(self.dropout(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


SMALL_NETS = {
    # Sized for a 2-core laptop CPU: each step up roughly doubles the cost per image.
    "ns_cnn_s": dict(widths=(16, 32, 64), depths=(1, 1, 1)),
    "ns_cnn_m": dict(widths=(24, 48, 96), depths=(1, 2, 2)),
    # Larger where the feature maps are small (14 and 7 px): 4x the parameters of ns_cnn_s for
    # about 1.7x its cost per image (ns_cnn_m: 3x), a larger student when the budget is tight.
    "ns_cnn_s_wide": dict(widths=(16, 48, 96), depths=(1, 1, 2)),
    "ns_cnn_l": dict(widths=(32, 64, 128), depths=(2, 2, 2)),
}


def _small(name: str, pretrained: bool, kwargs: dict) -> SmallResNet:
    cfg = kwargs.pop("pretrained_cfg", None)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    # pretrained=True only for weights timm found for us: an export read by
    # timm.create_model("local-dir:DIR" or "hf-hub:ORG/REPO", pretrained=True), whose config timm passes here
    if pretrained and not (cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("state_dict")):
        raise ConfigError(f"{name} has no pretrained weights (an export of one loads with "
                          "timm.create_model('local-dir:DIR', pretrained=True))")
    net = SmallResNet(**SMALL_NETS[name], **kwargs)
    # The keys timm models carry, so checkpoint tools treat both kinds alike.
    net.pretrained_cfg = {"architecture": name, "first_conv": "stem.0", "classifier": "fc",
                          "num_classes": net.num_classes}
    if pretrained:
        from timm.models import load_pretrained as timm_load_pretrained

        net.pretrained_cfg = {**cfg, **net.pretrained_cfg}  # the export's preprocessing, for resolve_data_config
        timm_load_pretrained(net, pretrained_cfg=cfg, num_classes=net.num_classes,
                             in_chans=net.stem[0].in_channels)
    return net


@register_model
def ns_cnn_s(pretrained: bool = False, **kwargs) -> SmallResNet:
    """Small residual CNN (~0.08M params) for 8-32 px images."""
    return _small("ns_cnn_s", pretrained, kwargs)


@register_model
def ns_cnn_m(pretrained: bool = False, **kwargs) -> SmallResNet:
    """Medium residual CNN (~0.38M params), a larger student for ns_cnn_s."""
    return _small("ns_cnn_m", pretrained, kwargs)


@register_model
def ns_cnn_s_wide(pretrained: bool = False, **kwargs) -> SmallResNet:
    """ns_cnn_s widened and deepened at 14 and 7 px (~0.33M params, ~1.7x the cost), a cheap
    larger student for ns_cnn_s."""
    return _small("ns_cnn_s_wide", pretrained, kwargs)


@register_model
def ns_cnn_l(pretrained: bool = False, **kwargs) -> SmallResNet:
    """Large residual CNN (~0.7M params), a larger student for ns_cnn_m."""
    return _small("ns_cnn_l", pretrained, kwargs)


@register_model
def efficientnet_l0(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-L0 (Noisy Student paper): width 2.8, depth 3.7 of B0; ~140M params."""
    return _gen_efficientnet("efficientnet_l0", channel_multiplier=2.8, depth_multiplier=3.7,
                             pretrained=pretrained, **kwargs)


@register_model
def efficientnet_l1(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-L1 (Noisy Student paper): width 3.9, depth 3.7 of B0; ~273M params."""
    return _gen_efficientnet("efficientnet_l1", channel_multiplier=3.9, depth_multiplier=3.7,
                             pretrained=pretrained, **kwargs)


def create_model(name: str, num_classes: int, in_chans: int, dropout: float = 0.0,
                 drop_path: float = 0.0, pretrained: bool | str | None = False, *,
                 classes: list[str] | None = None, used_as_is: bool = False) -> nn.Module:
    """Build a model by name with the paper's noise knobs (dropout, stochastic depth).

    ``pretrained``: ``True`` downloads timm's default weights for ``name``; a string is a weight
    source for :func:`noisystudent.models.pretrained.load_pretrained` (a timm tag such as
    ``tf_efficientnet_b0.ns_jft_in1k``, ``hf-hub:org/repo``, ``local-dir:PATH``, or a local
    .pt/.pth/.safetensors file): the head is replaced when the class count differs, and weights
    of another architecture are an error. ``classes``/``used_as_is``: checked against a weight
    file that names its classes.

    ``name`` may itself be ``hf-hub:org/repo`` or ``local-dir:PATH`` (as in ``timm.create_model``):
    the architecture is the one its ``config.json`` names and, unless ``pretrained`` is ``False``
    or names another source, the model starts from its weights.
    """
    if name.startswith(MODEL_SOURCE_PREFIXES):
        source, name = name, tag_pretrained_cfg(name)["architecture"]
        if pretrained is None or pretrained is True:
            pretrained = source
    name = resolve_model_name(name)
    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r} (see `noisystudent models` or timm.list_models())")
    model = timm.create_model(name, pretrained=pretrained is True, num_classes=num_classes,
                              in_chans=in_chans, drop_rate=dropout, drop_path_rate=drop_path)
    if isinstance(pretrained, str) and pretrained:
        load_pretrained(model, pretrained, num_classes, classes=classes, used_as_is=used_as_is)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
