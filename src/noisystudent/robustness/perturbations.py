"""ImageNet-P style perturbation sequences for any dataset, as batched torch operations.

Hendrycks' ImageNet-P scripts render each sequence frame by frame with PIL / Wand / OpenCV and
store it as an H.264 video; we generate the frames of a whole batch on the evaluation device
instead (no video compression). Parameters follow make_imagenet_p.py, make_tinyimagenet_p.py
and make_cifar_p.py, chosen by image size like the corruptions (``preset="auto"``); distances in
pixels (translation) scale with the image side. Geometric perturbations fill uncovered pixels
with black, as torchvision's ``affine`` / OpenCV's ``warpPerspective`` do in the reference.
"""

from __future__ import annotations

import math

import torch

from . import _ops as ops
from .corruptions import resolve_preset

PERTURBATIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow",
    "brightness", "translate", "rotate", "tilt", "scale",
)
"""The 10 ImageNet-P test perturbations, in the paper's order (the order of the AlexNet normalisers)."""

NOISE_PERTURBATIONS: frozenset[str] = frozenset({"gaussian_noise", "shot_noise"})
"""Sequences of independent noise draws: flips are counted against the first (clean) frame."""

_P = {
    "imagenet": dict(size=224, gauss=0.03, shot=300, motion=(10, 3, 31, 4.0, 30), snow=(0.05, 0.3, 3, 0.5, 14, 4),
                     bright=0.02, translate=(41, 20), tilt=1.0, scale=(2.5, 40)),
    "tinyimagenet": dict(size=64, gauss=0.025, shot=500, motion=(14, 3, 31, 5.0, 30),
                         snow=(0.05, 0.28, 2, 0.5, 10, 2.5), bright=0.02, translate=(31, 15), tilt=1.0,
                         scale=(2.5, 40)),
    "cifar": dict(size=32, gauss=0.02, shot=700, motion=(6, 1.8, 21, 9.0, 20), snow=(0.05, 0.3, 2, 0.5, 10, 2),
                  bright=0.015, translate=(16, 7), tilt=0.75, scale=(2.0, 70)),
}


def _noise_frames(x, sample, n_frames=31):
    return torch.stack([x] + [sample() for _ in range(n_frames - 1)], dim=1)


def _gaussian_noise(x, p, g):
    return _noise_frames(x, lambda: (x + p["gauss"] * ops.randn(x.shape, g, x.device)).clamp(0, 1))


def _shot_noise(x, p, g):
    c = p["shot"]
    return _noise_frames(x, lambda: (ops.poisson(x * c, g) / c).clamp(0, 1))


def _motion_blur(x, p, g):
    radius, sigma, n, step, centre = p["motion"]
    frames = [ops.motion_blur(x, radius, sigma, torch.full((x.shape[0],), (i - centre) * step)) for i in range(n)]
    return torch.stack(frames, dim=1)


def _zoom_blur(x, p, g):
    frames, acc = [x], x.clone()
    for i in range(1, 31):
        acc = acc + ops.affine_about_centre(x, scale=1 + 0.004 * i)
        frames.append(acc / (i + 1))
    return torch.stack(frames, dim=1)


def _snow(x, p, g):
    loc, scale, zoom, threshold, radius, sigma = p["snow"]
    N, C, H, W = x.shape
    layer = loc + scale * ops.randn((N, 1, H, W), g, x.device)
    layer = ops.clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    grey = ops.rgb_to_gray(x, (0.299, 0.587, 0.114)) if C == 3 else x
    base = 0.85 * x + 0.15 * torch.maximum(x, grey * 1.5 + 0.5)
    frames = []
    for i in range(31):  # the same flakes drift as the blur angle turns
        moving = ops.motion_blur(layer, radius, sigma, torch.full((N,), i * 4.0 - 150))
        moving = torch.round(moving.clamp(0, 1) * 255) / 255
        frames.append((base + moving + torch.flip(moving, dims=(-2, -1))).clamp(0, 1))
    return torch.stack(frames, dim=1)


def _brightness(x, p, g):
    return torch.stack([ops.shift_value(x, (i - 15) * p["bright"]) for i in range(31)], dim=1)


def _translate(x, p, g):
    n, centre = p["translate"]
    px = x.shape[-1] / p["size"]  # reference shifts are whole pixels at the preset's size
    return torch.stack([ops.affine_about_centre(x, translate=((i - centre) * px, 0.0)) for i in range(n)], dim=1)


def _rotate(x, p, g):
    return torch.stack([ops.affine_about_centre(x, angle_deg=float(i - 15)) for i in range(31)], dim=1)


def _tilt_matrix(h: int, w: int, deg: float) -> torch.Tensor:
    """The reference's 3-D tilt: rotate the image plane by ``deg`` about x and y, reproject."""
    phi = theta = math.radians(deg)
    f = math.sqrt(w ** 2 + h ** 2)
    P1 = torch.tensor([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]], dtype=torch.float64)
    RX = torch.tensor([[1, 0, 0, 0], [0, math.cos(theta), -math.sin(theta), 0],
                       [0, math.sin(theta), math.cos(theta), 0], [0, 0, 0, 1]], dtype=torch.float64)
    RY = torch.tensor([[math.cos(phi), 0, -math.sin(phi), 0], [0, 1, 0, 0],
                       [math.sin(phi), 0, math.cos(phi), 0], [0, 0, 0, 1]], dtype=torch.float64)
    T = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]], dtype=torch.float64)
    P2 = torch.tensor([[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]], dtype=torch.float64)
    return P2 @ T @ RX @ RY @ P1


def _tilt(x, p, g):
    N, _, H, W = x.shape
    frames = []
    for i in range(31):
        inv = torch.linalg.inv(_tilt_matrix(H, W, p["tilt"] * (i - 15))).float()
        frames.append(ops.warp_matrix(x, inv.expand(N, 3, 3)))  # cv2.warpPerspective
    return torch.stack(frames, dim=1)


def _scale(x, p, g):
    step, start = p["scale"]
    return torch.stack([ops.affine_about_centre(x, scale=(i * step + start) / 100) for i in range(31)], dim=1)


_FUNCS = {"gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "motion_blur": _motion_blur,
          "zoom_blur": _zoom_blur, "snow": _snow, "brightness": _brightness, "translate": _translate,
          "rotate": _rotate, "tilt": _tilt, "scale": _scale}


def sequence_length(name: str, height: int, width: int, preset: str = "auto") -> int:
    """Number of frames ``perturbation_sequence`` returns (31; translate 41 / 31 / 16; motion
    blur 21 for the CIFAR preset)."""
    p = _P[resolve_preset(preset, height, width)]
    if name == "translate":
        return p["translate"][0]
    if name == "motion_blur":
        return p["motion"][2]
    return 31


def perturbation_sequence(images: torch.Tensor, name: str, generator: torch.Generator | None = None,
                          preset: str = "auto") -> torch.Tensor:
    """Render the ImageNet-P sequence ``name`` for every image of a batch.

    Args:
        images: (N, C, H, W) float in [0, 1], C = 1 or 3, any device.
        name: one of ``PERTURBATIONS``.
        generator: randomness for the noise and snow sequences (same seed, same frames).
        preset: parameter set, as for :func:`noisystudent.robustness.corrupt`.

    Returns:
        (N, T, C, H, W) frames in [0, 1]. Noise sequences start with the clean image.
    """
    if name not in _FUNCS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {PERTURBATIONS}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    x = images.float()
    p = _P[resolve_preset(preset, *x.shape[-2:])]
    g = ops.ensure_generator(generator, x.device)
    return _FUNCS[name](x, p, g).clamp(0, 1).to(images.dtype)
