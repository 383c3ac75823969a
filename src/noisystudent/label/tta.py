"""Test-time augmentation of the teacher's pseudo labels (``pseudo.tta``).

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


def labeling_model(model: nn.Module, tta: str) -> nn.Module:
    """The module the labeler runs for ``pseudo.tta`` (``none``: the teacher itself)."""
    if tta == "none":
        return model
    if tta == "flip":
        return FlipAverage(model)
    raise ValueError(f"unknown pseudo.tta {tta!r}")
