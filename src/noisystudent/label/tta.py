"""Test-time augmentation and ensembles of the teacher's pseudo labels (``pseudo.tta``,
``pseudo.ensemble``).

The teacher is wrapped, not changed: the labeler runs the wrapper as it would run the teacher.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FlipAverage(nn.Module):
    """The teacher's class probabilities averaged over an image and its horizontal flip, returned
    as ``log(mean probability)`` in place of logits.

    Why the log of the mean probability is the right "logit": the labeler computes
    ``softmax(out / T)``. ``softmax(log p) = p / sum(p) = p`` for a distribution ``p``, so at T = 1
    it stores exactly the averaged probabilities, and ``softmax(log p / T)`` is ``p ** (1/T)``
    renormalised: the temperature sharpens or softens the averaged distribution just as it does
    one view's (``softmax(z / T)`` with ``z = log p + const``). Top-k and the threshold then act on
    the averaged labels. Averaging logits instead would be a geometric mean, a different ensemble.
    Both views go through the teacher in one batch (eval-mode BatchNorm: the views do not mix).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.model(torch.cat([x, x.flip(-1)])).float()
        clean, flipped = torch.log_softmax(both, dim=1).chunk(2)
        # log((p + q) / 2), computed as a log-sum-exp so tiny probabilities do not underflow
        return torch.logaddexp(clean, flipped) - math.log(2.0)


class ModelAverage(nn.Module):
    """Several models' class probabilities averaged, returned as ``log(mean probability)`` in place
    of logits (why that is the right "logit": :class:`FlipAverage`). Each model may itself be a
    :class:`FlipAverage`, so an ensemble with flip TTA weighs every model alike."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x).float(), dim=1) for m in self.models])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.models))


def labeling_model(model: nn.Module, tta: str, ensemble: list[nn.Module] | tuple = ()) -> nn.Module:
    """The module the labeler runs for ``pseudo.tta`` and ``pseudo.ensemble`` (neither: the
    teacher itself)."""
    if tta not in ("none", "flip"):
        raise ValueError(f"unknown pseudo.tta {tta!r}")
    models = [FlipAverage(m) if tta == "flip" else m for m in (model, *ensemble)]
    return models[0] if len(models) == 1 else ModelAverage(models)
