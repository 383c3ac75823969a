"""Image transforms: clean (for the teacher's labeling and evaluation) and noisy (for training).

Input noise is timm's RandAugment; the paper's magnitude 27 is on the official scale where 10 is
the nominal maximum, so the timm string raises ``mmax`` to admit it (``rand-n2-m27-mmax27``).
"""

from __future__ import annotations

from typing import Callable

import torchvision.transforms as T
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from ..config.schema import NoiseConfig
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


def randaugment_spec(ops: int, magnitude: float) -> str:
    """timm's RandAugment config string for N ops at magnitude M on the official scale."""
    mmax = max(10.0, float(magnitude))
    return f"rand-n{ops}-m{magnitude:g}-mmax{mmax:g}"


def pixel_transform(size: int, channels: int) -> Callable:
    """Un-augmented pixels in [0, 1]: resize (small images) or resize + centre crop (large images).
    Robustness suites corrupt and attack these before normalising."""
    steps: list = [ToMode(channels)]
    if size < SMALL_IMAGE:
        steps.append(T.Resize((size, size), antialias=True))
    else:
        steps += [T.Resize(int(round(size / CENTER_CROP_FRACTION)), antialias=True), T.CenterCrop(size)]
    steps.append(T.ToTensor())
    return T.Compose(steps)


def eval_transform(size: int, channels: int, mean: tuple, std: tuple) -> Callable:
    """Un-augmented and normalised: what the teacher labels and what evaluation sees."""
    return T.Compose([pixel_transform(size, channels), T.Normalize(mean, std)])


def train_transform(size: int, channels: int, mean: tuple, std: tuple, noise: NoiseConfig,
                    flip: bool) -> Callable:
    """Noisy when ``noise.augment``: crop (+flip) and RandAugment; otherwise the eval transform."""
    if not noise.augment:
        return eval_transform(size, channels, mean, std)
    steps: list = [ToMode(channels)]
    if size < SMALL_IMAGE:
        steps += [T.Resize((size, size), antialias=True), T.RandomCrop(size, padding=max(1, size // 8))]
    else:
        steps.append(T.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True))
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if noise.randaugment_ops > 0 and noise.randaugment_magnitude > 0:
        fill = (128,) * channels
        steps.append(rand_augment_transform(
            randaugment_spec(noise.randaugment_ops, noise.randaugment_magnitude), {"img_mean": fill}))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)
