"""Robustness metrics: corruption error (CE, mCE, relative mCE), flip probability / flip rate and
top-5 distance (ImageNet-P), top-k accuracy.

The pure functions take and return fractions / ratios (an mCE of 0.457 is the paper's "45.7");
:func:`noisystudent.robustness.evaluate_robustness` reports percentages.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .corruptions import CORRUPTIONS
from .perturbations import PERTURBATIONS

ALEXNET_CORRUPTION_ERRORS: dict[str, float] = dict(zip(CORRUPTIONS, (
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
    0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500)))
"""AlexNet's ImageNet-C top-1 error, averaged over the 5 severities (Hendrycks & Dietterich)."""

ALEXNET_CLEAN_ERROR: float = 0.4345
"""AlexNet's clean ImageNet top-1 error, for relative mCE."""

ALEXNET_FLIP_PROBS: dict[str, float] = dict(zip(PERTURBATIONS, (
    0.2365, 0.3006, 0.0930, 0.0594, 0.1193, 0.0489, 0.1101, 0.1310, 0.0705, 0.2353)))
"""AlexNet's ImageNet-P flip probabilities. Taken from the 2018 draft of the paper; not yet
confirmed against the final version, so FR / mFR carry that caveat."""


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-1 and top-k correctness (bool); k is capped at the number of classes."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels.view(-1, 1)
    return hit[:, 0], hit.any(1)


def corruption_errors_to_ce(errors: Mapping[str, Sequence[float]],
                            baseline: Mapping[str, float] = ALEXNET_CORRUPTION_ERRORS) -> dict[str, float]:
    """Corruption error per corruption: CE_c = sum_s E(f, s, c) / sum_s E(AlexNet, s, c).

    ``errors`` maps a corruption to its errors over the severities (fractions). The baseline is
    AlexNet's *mean* error over severities, so this is mean_s E(f, s, c) / baseline[c], equal to
    the sum ratio when all 5 severities are given. Corruptions without a baseline are skipped.
    """
    return {name: (sum(errs) / len(errs)) / baseline[name] for name, errs in errors.items()
            if name in baseline and len(errs)}


def mce(ce: Mapping[str, float]) -> float:
    """Mean corruption error: the mean of the CE values of the 15 ImageNet-C corruptions present."""
    vals = [ce[name] for name in CORRUPTIONS if name in ce]
    if not vals:
        raise ValueError("no ImageNet-C corruption among the CE values")
    return sum(vals) / len(vals)


def relative_ce(errors: Mapping[str, Sequence[float]], clean_error: float,
                baseline: Mapping[str, float] = ALEXNET_CORRUPTION_ERRORS,
                baseline_clean: float = ALEXNET_CLEAN_ERROR) -> dict[str, float]:
    """Relative CE_c = sum_s (E(f,s,c) - E(f,clean)) / sum_s (E(AlexNet,s,c) - E(AlexNet,clean))."""
    return {name: (sum(errs) / len(errs) - clean_error) / (baseline[name] - baseline_clean)
            for name, errs in errors.items() if name in baseline and len(errs)}


def relative_mce(errors: Mapping[str, Sequence[float]], clean_error: float,
                 baseline: Mapping[str, float] = ALEXNET_CORRUPTION_ERRORS,
                 baseline_clean: float = ALEXNET_CLEAN_ERROR) -> float:
    """Mean of :func:`relative_ce` over the ImageNet-C corruptions present."""
    return mce(relative_ce(errors, clean_error, baseline, baseline_clean))


def mean_corruption_error(errors: Mapping[str, Sequence[float]], names: Sequence[str] = CORRUPTIONS) -> float:
    """Plain mean error over corruptions x severities (the CIFAR-10-C convention, no normaliser)."""
    vals = [e for name in names if name in errors for e in errors[name]]
    if not vals:
        raise ValueError("no errors for the requested corruptions")
    return sum(vals) / len(vals)


def _pairs(n_frames: int, noise: bool, step: int) -> tuple[list[int], list[int]]:
    """Frame index pairs (reference, compared) of Hendrycks' ImageNet-P ``flip_prob`` loop."""
    step = 1 if noise else step
    first, second = [], []
    for i in range(step):
        idx = list(range(i, n_frames, step))
        for j in range(1, len(idx)):
            first.append(idx[0] if noise else idx[j - 1])
            second.append(idx[j])
    return first, second


def flip_probability(preds_seq: torch.Tensor, noise: bool, step: int = 1, reduce: bool = True) -> torch.Tensor | float:
    """ImageNet-P flip probability of top-1 predictions.

    Args:
        preds_seq: (S, T) predicted class per sequence and frame.
        noise: compare every frame with the first (noise sequences) instead of consecutive frames.
        step: the reference's "difficulty" stride for non-noise sequences (1 for ImageNet-P).
        reduce: return the mean over sequences (float) or the per-sequence values (S,).
    """
    preds_seq = torch.as_tensor(preds_seq)
    a, b = _pairs(preds_seq.shape[1], noise, step)
    per_seq = (preds_seq[:, a] != preds_seq[:, b]).float().mean(1)
    return per_seq.mean().item() if reduce else per_seq


def top5_distance(logits_seq: torch.Tensor, noise: bool, step: int = 1, reduce: bool = True) -> torch.Tensor | float:
    """ImageNet-P top-5 distance (Hendrycks' ``ranking_dist`` with mode "top5").

    For a frame pair, take the first frame's 5 highest-ranked classes in order; with sigma_k the
    rank (1-based) of the k-th of them in the second frame, the distance is
    sum_{k=0..4} |k - min(sigma_k - 1, 5)|: 0 when the top-5 list is unchanged. Pairs are formed as
    in :func:`flip_probability`; ties are ranked in class order (scipy ``rankdata(ordinal)``).

    Args:
        logits_seq: (S, T, K) scores per sequence, frame and class.
    """
    logits_seq = torch.as_tensor(logits_seq).float()
    S, T, K = logits_seq.shape
    k = min(5, K)
    order = torch.argsort(-logits_seq, dim=-1, stable=True)  # classes by rank
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(K, device=order.device).expand_as(order))  # 0-based rank
    a, b = _pairs(T, noise, step)
    top_first = order[:, a, :k]  # (S, P, k) classes at ranks 0..k-1 in the first frame
    sigma0 = ranks[:, b].gather(-1, top_first)  # their 0-based ranks in the second frame
    pos = torch.arange(k, device=sigma0.device)
    per_pair = (pos - sigma0.clamp(max=k)).abs().sum(-1).float()
    per_seq = per_pair.mean(1)
    return per_seq.mean().item() if reduce else per_seq


def flip_rates(flip_probs: Mapping[str, float], baseline: Mapping[str, float] = ALEXNET_FLIP_PROBS) -> dict[str, float]:
    """FR_p = FP(f, p) / FP(AlexNet, p) for the perturbations with a baseline."""
    return {name: fp / baseline[name] for name, fp in flip_probs.items() if name in baseline}


def mfr(fr: Mapping[str, float]) -> float:
    """Mean flip rate over the ImageNet-P perturbations present."""
    vals = [fr[name] for name in PERTURBATIONS if name in fr]
    if not vals:
        raise ValueError("no ImageNet-P perturbation among the flip rates")
    return sum(vals) / len(vals)
