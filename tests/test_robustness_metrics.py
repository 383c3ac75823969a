"""CE / mCE / relative mCE, flip probability, top-5 distance and FR on hand-made inputs."""

import numpy as np
import pytest
import torch

from noisystudent.robustness import (ALEXNET_CLEAN_ERROR, ALEXNET_CORRUPTION_ERRORS, ALEXNET_FLIP_PROBS,
                                     CORRUPTIONS, PERTURBATIONS, corruption_errors_to_ce, flip_probability,
                                     flip_rates, mce, mean_corruption_error, mfr, relative_ce, relative_mce,
                                     top5_distance)


def test_ce_mce_relative_by_hand():
    errors = {"gaussian_noise": [0.5] * 5, "shot_noise": [0.2, 0.4, 0.6, 0.8, 1.0]}
    base = {"gaussian_noise": 0.8, "shot_noise": 0.5}
    ce = corruption_errors_to_ce(errors, base)
    assert ce == pytest.approx({"gaussian_noise": 0.625, "shot_noise": 1.2})  # 2.5/4.0 and 3.0/2.5
    assert mce(ce) == pytest.approx(0.9125)
    # relative: (sum_s E - 5 * 0.1) / (sum_s E_alex - 5 * 0.3)
    rel = relative_ce(errors, clean_error=0.1, baseline=base, baseline_clean=0.3)
    assert rel == pytest.approx({"gaussian_noise": 2.0 / 2.5, "shot_noise": 2.5 / 1.0})
    assert relative_mce(errors, 0.1, base, 0.3) == pytest.approx((0.8 + 2.5) / 2)
    assert mean_corruption_error(errors, ["gaussian_noise", "shot_noise"]) == pytest.approx(0.55)


def test_alexnet_normalisers():
    assert list(ALEXNET_CORRUPTION_ERRORS) == list(CORRUPTIONS)
    assert ALEXNET_CORRUPTION_ERRORS["gaussian_noise"] == 0.886428
    assert ALEXNET_CORRUPTION_ERRORS["jpeg_compression"] == 0.606500
    assert ALEXNET_CLEAN_ERROR == 0.4345
    # AlexNet against itself: every CE and the mCE are 1, relative mCE too
    errors = {k: [v] * 5 for k, v in ALEXNET_CORRUPTION_ERRORS.items()}
    assert mce(corruption_errors_to_ce(errors)) == pytest.approx(1.0)
    assert relative_mce(errors, ALEXNET_CLEAN_ERROR) == pytest.approx(1.0)
    # extra corruptions have no normaliser and are left out of CE
    assert "saturate" not in corruption_errors_to_ce({"saturate": [0.1] * 5, "fog": [0.4] * 5})


def test_flip_probability_reference_rule():
    preds = torch.tensor([[0, 1, 1, 1, 1],
                          [2, 2, 2, 2, 2]])
    # noise: every frame against the first -> 4/4 flips, then 0
    assert flip_probability(preds, noise=True) == pytest.approx(0.5)
    # others: consecutive frames -> 1/4 flips, then 0
    assert flip_probability(preds, noise=False) == pytest.approx(0.125)
    per = flip_probability(preds, noise=False, reduce=False)
    assert per.tolist() == pytest.approx([0.25, 0.0])
    # reference "difficulty" stride 2: subsequences [0,1,1] and [1,1] -> flips 1/2 and 0/1 -> mean 1/3
    assert flip_probability(torch.tensor([[0, 1, 1, 1, 1]]), noise=False, step=2) == pytest.approx(1 / 3)


def _reference_t5d(logits: np.ndarray, noise: bool) -> float:
    """Hendrycks' ImageNet-P ``ranking_dist(mode='top5')``, ported literally."""
    K = logits.shape[-1]
    cum_sum_top5 = np.cumsum(np.asarray([0] + [1] * 5 + [0] * (K - 1 - 5)))
    result = 0.0
    for vid in logits:
        ranks = [np.argsort(np.argsort(-frame, kind="stable"), kind="stable") + 1 for frame in vid]
        out = []
        perm1 = ranks[0]
        perm1_inv = np.argsort(perm1)
        for rank in ranks[1:]:
            sigma = rank[perm1_inv]
            out.append(np.sum(np.abs(cum_sum_top5[:5] - cum_sum_top5[sigma - 1][:5])))
            if not noise:
                perm1, perm1_inv = rank, np.argsort(rank)
        result += np.mean(out) / len(logits)
    return result


def test_top5_distance_by_hand_and_against_reference():
    # 7 classes; frame 0 ranks 0..6 in order; frame 1 swaps classes 0 and 1 (distance 2);
    # frame 2 pushes class 4 out of the top 5 (class 5 takes its place: distance 1)
    f0 = torch.tensor([7., 6, 5, 4, 3, 2, 1])
    f1 = torch.tensor([6., 7, 5, 4, 3, 2, 1])
    f2 = torch.tensor([7., 6, 5, 4, 1, 3, 2])
    seq = torch.stack([f0, f1, f2])[None]
    assert top5_distance(seq, noise=True) == pytest.approx((2 + 1) / 2)
    # consecutive: f0->f1 = 2; f1->f2: classes of f1's top 5 (1,0,2,3,4) ranked in f2 at 1,0,2,3,6
    assert top5_distance(seq, noise=False) == pytest.approx((2 + (1 + 1 + 0 + 0 + 1)) / 2)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6, 12)).astype(np.float32)
    for noise in (True, False):
        assert top5_distance(torch.from_numpy(logits), noise) == pytest.approx(_reference_t5d(logits, noise), abs=1e-6)


def test_flip_rate_by_hand():
    fp = {"gaussian_noise": 0.1183, "brightness": 0.0489}
    fr = flip_rates(fp)
    assert fr["gaussian_noise"] == pytest.approx(0.1183 / 0.2365)
    assert fr["brightness"] == pytest.approx(1.0)
    assert mfr(fr) == pytest.approx((0.1183 / 0.2365 + 1.0) / 2)
    assert list(ALEXNET_FLIP_PROBS) == list(PERTURBATIONS)
