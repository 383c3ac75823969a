"""FGSM and PGD in pixel space, with the input normalisation inside the attacked model.

Written here rather than imported: ART, torchattacks and foolbox are heavy or stale dependencies
for what is a few lines of torch, and we need the exact conventions of the paper (eps in 0-255
pixel units, clipping to the valid pixel range, normalisation inside the model).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ops as ops


class NormalizedModel(nn.Module):
    """``model`` fed with (x - mean) / std: the wrapped model takes images in [0, 1], so attacks
    and corruptions work in pixel space while the model keeps its normalised input."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        self.model = model
        mean = (0.0,) if mean is None else tuple(float(m) for m in mean)
        std = (1.0,) if std is None else tuple(float(s) for s in std)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def _input_grad(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), labels.detach().clone())
        (grad,) = torch.autograd.grad(loss, x)  # input gradient only; parameters untouched
    return grad


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
         clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Fast gradient sign method: x + eps * sign(grad_x CE(model(x), y)), clipped to ``clip``.

    ``model`` takes images in [0, 1] (wrap a normalised model in :class:`NormalizedModel`);
    ``eps`` is on that scale (8 pixel units of 0-255 is ``8 / 255``). Put the model in eval mode
    first; batch-norm statistics are not updated either way since only the input is differentiated.
    """
    if eps == 0:
        return images.detach().clone()
    with torch.inference_mode(False):
        x = images.detach().clone()
        grad = _input_grad(model, x, labels)
        return (x + eps * grad.sign()).clamp(*clip).detach()


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, generator: torch.Generator | None = None,
        clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Projected gradient descent (L-inf): ``steps`` signed-gradient steps of ``step_size``
    (default 2.5 * eps / steps, Madry et al.), each projected onto the eps ball around the input
    and the valid pixel range; optionally from a uniform random start in the ball.
    Same conventions as :func:`fgsm`.
    """
    if eps == 0 or steps <= 0:
        return images.detach().clone()
    alpha = 2.5 * eps / steps if step_size is None else step_size
    with torch.inference_mode(False):
        x0 = images.detach().clone()
        x = x0.clone()
        if random_start:
            g = ops.ensure_generator(generator, x.device)
            x = (x + ops.uniform(x.shape, -eps, eps, g, x.device).to(x.dtype)).clamp(*clip)
        for _ in range(steps):
            x = x + alpha * _input_grad(model, x, labels).sign()
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(*clip)
        return x.detach()
