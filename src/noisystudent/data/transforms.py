"""Image transforms: clean (for the teacher's labeling and evaluation) and noisy (for training).

Each transform comes in two parts (:class:`ImageTransform`): a CPU part, run in DataLoader
workers, that decodes, crops, flips and applies RandAugment and ends in a **uint8** CHW tensor
(a quarter of the bytes of float32 through worker shared memory, pinned memory and the
host-to-device copy); and a device part, :class:`Normalize`, that converts to float and
normalises the whole batch where it will be used (:mod:`noisystudent.data.device_input`).
Calling an :class:`ImageTransform` runs both on the CPU and gives, bit for bit, what
torchvision's ``ToTensor`` + ``Normalize`` gave.

Input noise is timm's RandAugment; the paper's magnitude 27 is on the official scale where 10 is
the nominal maximum, so the timm string raises ``mmax`` to admit it (``rand-n2-m27-mmax27``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from ..config.schema import NoiseConfig
from ..runtime.errors import ConfigError
from .datasets import convert_image

# Below this size images are small (digits, MNIST-like): resize whole and pad-crop, since a
# random-resized crop of a 16-px image throws away most of the digit.
SMALL_IMAGE = 64
CENTER_CROP_FRACTION = 0.875


class ToMode:
    """Convert any PIL image to "L" or "RGB" (a picklable callable for DataLoader workers)."""

    def __init__(self, channels: int):
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return convert_image(img, self.mode)


class Normalize(nn.Module):
    """The device part of every transform: uint8 (or [0, 255]-valued) images, one (C, H, W) or a
    batch (N, C, H, W), to float32 ``(x / 255 - mean) / std``. The same float32 operations, in
    the same order, as torchvision's ``ToTensor`` (divides by 255) then ``Normalize``, so CPU
    results are unchanged to the bit; on a GPU it runs once per batch instead of once per image."""

    def __init__(self, mean: tuple, std: tuple):
        super().__init__()
        if len(mean) != len(std) or not mean or any(s <= 0 for s in std):
            raise ConfigError(f"normalisation needs one mean and one std > 0 per channel, got mean {mean}, std {std}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._stats: dict = {}  # (device) -> (mean, std) tensors, made once per device

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._stats:
            self._stats[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                                     for v in (self.mean, self.std))
        return self._stats[key]

    def __getstate__(self) -> dict:  # pickled into workers and checkpoints without device tensors
        return self.__dict__ | {"_stats": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != len(self.mean):
            raise ValueError(f"images with {x.shape[-3]} channels, normalisation for {len(self.mean)}")
        mean, std = self._on(x.device)
        return x.to(torch.float32).div(255).sub(mean).div(std)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


@dataclass
class ImageTransform:
    """A PIL image to a normalised tensor, in two parts: ``host`` (PIL image -> uint8 CHW tensor,
    in the loader's workers) and ``normalize`` (on the device, per batch). ``deterministic``:
    the same image always gives the same tensor (no augmentation), so its results may be cached.
    ``geometry``: ``("resize", size)`` (small images: resized whole) or ``("resize-crop", short
    side, size)`` for a deterministic transform (what GPU JPEG decoding must reproduce), else None.
    Calling it runs both parts on the CPU."""

    host: Callable
    normalize: Normalize
    deterministic: bool
    channels: int
    geometry: tuple | None = None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.host(img))


def randaugment_spec(ops: int, magnitude: float) -> str:
    """timm's RandAugment config string for N ops at magnitude M on the official scale."""
    mmax = max(10.0, float(magnitude))
    return f"rand-n{ops}-m{magnitude:g}-mmax{mmax:g}"


def interpolation_mode(name: str) -> T.InterpolationMode:
    """torchvision's interpolation for a timm/PIL name (``bilinear``, ``bicubic``...), through
    timm's own table; a one-line ConfigError for names it does not know."""
    from timm.data.transforms import str_to_interp_mode

    try:
        return str_to_interp_mode(name)
    except KeyError:
        raise ConfigError(f"unknown interpolation {name!r} (bilinear, bicubic, nearest, ...)") from None


def eval_crop(size: int, crop_pct: float | None = None, crop_mode: str | None = None) -> tuple[float, str]:
    """The ``(crop_pct, crop_mode)`` the eval transform applies at ``size``, in timm's terms.
    Small images are resized whole (``squash`` at 1.0) whatever the weights' crop: cropping a
    28-px digit loses it. Larger ones take the given crop (default 0.875, ``center``); timm's
    ``border`` mode is read as ``center``."""
    if size < SMALL_IMAGE:
        return 1.0, "squash"
    return float(crop_pct or CENTER_CROP_FRACTION), ("squash" if crop_mode == "squash" else "center")


def eval_geometry(size: int, crop_pct: float | None = None, crop_mode: str | None = None) -> tuple:
    """As timm's eval transform: the short side (``center``) or both sides (``squash``) resized
    to ``floor(size / crop_pct)``, then a centre crop; small images resized whole."""
    if size < SMALL_IMAGE:
        return ("resize", size)
    crop_pct, crop_mode = eval_crop(size, crop_pct, crop_mode)
    return ("squash-crop" if crop_mode == "squash" else "resize-crop", math.floor(size / crop_pct), size)


def _eval_steps(size: int, channels: int, interpolation: str = "bilinear", crop_pct: float | None = None,
                crop_mode: str | None = None) -> list:
    steps: list = [ToMode(channels)]
    mode = interpolation_mode(interpolation)
    geometry = eval_geometry(size, crop_pct, crop_mode)
    if geometry[0] == "resize":
        steps.append(T.Resize((size, size), interpolation=mode, antialias=True))
    elif geometry[0] == "squash-crop":
        steps += [T.Resize((geometry[1], geometry[1]), interpolation=mode, antialias=True), T.CenterCrop(size)]
    else:
        steps += [T.Resize(geometry[1], interpolation=mode, antialias=True), T.CenterCrop(size)]
    return steps


def pixel_transform(size: int, channels: int, interpolation: str = "bilinear", crop_pct: float | None = None,
                    crop_mode: str | None = None) -> Callable:
    """Un-augmented pixels in [0, 1]: resize (small images) or resize + centre crop (large images).
    Robustness suites corrupt and attack these before normalising (inside the model), so they
    stay float on the CPU."""
    return T.Compose([*_eval_steps(size, channels, interpolation, crop_pct, crop_mode), T.ToTensor()])


def eval_transform(size: int, channels: int, mean: tuple, std: tuple, interpolation: str = "bilinear",
                   crop_pct: float | None = None, crop_mode: str | None = None) -> ImageTransform:
    """Un-augmented and normalised: what the teacher labels and what evaluation sees.
    ``interpolation``, ``crop_pct`` and ``crop_mode`` are timm's data-config fields (a model from
    pretrained weights is fed images as its weights were trained on); the defaults are
    noisystudent's own (bilinear, crop 0.875 above :data:`SMALL_IMAGE` px)."""
    geometry = eval_geometry(size, crop_pct, crop_mode)
    if interpolation != "bilinear" or geometry[0] not in ("resize", "resize-crop"):
        geometry = None  # GPU JPEG decoding reproduces bilinear resize + centre crop only: keep the CPU path
    return ImageTransform(T.Compose([*_eval_steps(size, channels, interpolation, crop_pct, crop_mode),
                                     T.PILToTensor()]),
                          Normalize(mean, std), deterministic=True, channels=channels, geometry=geometry)


def train_transform(size: int, channels: int, mean: tuple, std: tuple, noise: NoiseConfig,
                    flip: bool, interpolation: str = "bilinear") -> ImageTransform:
    """Noisy when ``noise.augment``: crop (+flip) and RandAugment; otherwise the eval transform.
    ``mean``/``std``/``interpolation``: the stage's data config (the pretrained weights' own
    when it starts from them)."""
    if not noise.augment:
        return eval_transform(size, channels, mean, std, interpolation)
    steps: list = [ToMode(channels)]
    mode = interpolation_mode(interpolation)
    if size < SMALL_IMAGE:
        steps += [T.Resize((size, size), interpolation=mode, antialias=True),
                  T.RandomCrop(size, padding=max(1, size // 8))]
    else:
        steps.append(T.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=mode, antialias=True))
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if noise.randaugment_ops > 0 and noise.randaugment_magnitude > 0:
        fill = (128,) * channels
        steps.append(rand_augment_transform(
            randaugment_spec(noise.randaugment_ops, noise.randaugment_magnitude), {"img_mean": fill}))
    steps.append(T.PILToTensor())
    return ImageTransform(T.Compose(steps), Normalize(mean, std), deterministic=False, channels=channels)
