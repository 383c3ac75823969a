"""Model factory: any timm model by name, plus small residual CNNs for tiny images on a CPU.

The small nets are registered with timm (``ns_cnn_s``, ``ns_cnn_m``, ``ns_cnn_l``), so every model
is built by ``timm.create_model`` with the same noise arguments: ``drop_rate`` is dropout before
the classifier and ``drop_path_rate`` is stochastic depth at the last block, decaying linearly
to zero at the first (the paper's survival schedule).
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import register_model

from .errors import ConfigError


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
    "ns_cnn_s": dict(widths=(32, 64, 128), depths=(1, 1, 1)),
    "ns_cnn_m": dict(widths=(48, 96, 192), depths=(1, 2, 2)),
    "ns_cnn_l": dict(widths=(64, 128, 256), depths=(2, 2, 2)),
}


def _small(name: str, pretrained: bool, kwargs: dict) -> SmallResNet:
    if pretrained:
        raise ConfigError(f"{name} has no pretrained weights")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return SmallResNet(**SMALL_NETS[name], **kwargs)


@register_model
def ns_cnn_s(pretrained: bool = False, **kwargs) -> SmallResNet:
    """Small residual CNN (~0.3M params) for 8-32 px images."""
    return _small("ns_cnn_s", pretrained, kwargs)


@register_model
def ns_cnn_m(pretrained: bool = False, **kwargs) -> SmallResNet:
    """Medium residual CNN (~1.2M params), a larger student for ns_cnn_s."""
    return _small("ns_cnn_m", pretrained, kwargs)


@register_model
def ns_cnn_l(pretrained: bool = False, **kwargs) -> SmallResNet:
    """Large residual CNN (~2.8M params), a larger student for ns_cnn_m."""
    return _small("ns_cnn_l", pretrained, kwargs)


def create_model(name: str, num_classes: int, in_chans: int, dropout: float = 0.0,
                 drop_path: float = 0.0, pretrained: bool = False) -> nn.Module:
    """Build a model by name with the paper's noise knobs (dropout, stochastic depth)."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r} (see `noisystudent models` or timm.list_models())")
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                             drop_rate=dropout, drop_path_rate=drop_path)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
