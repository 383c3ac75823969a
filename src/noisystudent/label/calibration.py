"""Temperature calibration of the teacher (``pseudo.calibrate``) and its expected calibration error.

Pure functions of logits and targets (tensors or arrays; no model, no files), so the label stage
can fit on the teacher's validation logits and the tests can check them on made-up ones.

Temperature scaling (Guo et al., 2017): one scalar ``T`` minimising the negative log-likelihood of
``softmax(logits / T)`` on held-out labeled images. It leaves every argmax (so accuracy) unchanged
and only moves the confidences, so the pseudo-label threshold reads as a calibrated probability.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ECE_BINS = 15  # Guo et al.'s bin count


def _as_tensors(logits, targets) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).detach().to(torch.float64).cpu()
    y = torch.as_tensor(np.asarray(targets) if not torch.is_tensor(targets) else targets).detach().to(torch.int64).cpu()
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise ValueError(f"logits must be (N, C) and targets (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    return z, y


def temperature_nll(logits, targets, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` at the targets."""
    z, y = _as_tensors(logits, targets)
    return float(torch.nn.functional.cross_entropy(z / temperature, y))


def fit_temperature(logits, targets, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` at ``targets``.

    A 1-D smooth problem, solved by torch's L-BFGS with a strong-Wolfe line search on ``log T``
    (so ``T`` stays positive without a bound). The NLL is convex in ``1 / T`` (a log-sum-exp of
    linear functions minus a linear one), so the one minimum found is the global one; we write it
    by hand because no library we use ships temperature scaling, and it is a dozen lines.
    Returns 1.0 for an empty set.
    """
    z, y = _as_tensors(logits, targets)
    if not len(y):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:  # e.g. every image wrong with growing confidence: no finite optimum
        return 1.0
    return t


def expected_calibration_error(logits, targets, temperature: float = 1.0, bins: int = ECE_BINS) -> float:
    """Expected calibration error of ``softmax(logits / temperature)``: the top-1 confidence in
    ``bins`` equal-width bins ``(lo, hi]``, the mean |accuracy - confidence| per bin weighted by
    its share of the images (Guo et al., 2017). A fraction in [0, 1]; 0.0 for an empty set."""
    z, y = _as_tensors(logits, targets)
    if not len(y):
        return 0.0
    conf, pred = torch.softmax(z / temperature, dim=1).max(dim=1)
    correct = (pred == y).to(torch.float64)
    which = torch.clamp(torch.ceil(conf * bins).to(torch.int64) - 1, 0, bins - 1)  # (lo, hi]; 0 goes to bin 0
    n = torch.bincount(which, minlength=bins).to(torch.float64)
    gap = torch.bincount(which, weights=correct - conf, minlength=bins).abs()
    return float(gap.sum() / n.sum())


def calibration_summary(logits, targets, base_temperature: float = 1.0) -> dict:
    """Fit ``T_cal`` on ``(logits, targets)`` and say what it does: the record the label stage
    writes (``calibration.json``). ``base_temperature`` (``pseudo.temperature``) multiplies it:
    the pool is labeled at ``T_cal x base_temperature``. ECE and NLL are measured on the same
    images the temperature was fitted on (the validation split: the only labeled held-out data
    the label stage may look at), so "after" is an in-sample figure."""
    z, y = _as_tensors(logits, targets)
    t = fit_temperature(z, y)
    return {"temperature": t, "base_temperature": float(base_temperature),
            "labeling_temperature": t * float(base_temperature), "bins": ECE_BINS, "n": int(len(y)),
            "accuracy": float((z.argmax(1) == y).double().mean()) if len(y) else None,
            "ece_before": expected_calibration_error(z, y, 1.0), "ece_after": expected_calibration_error(z, y, t),
            "nll_before": temperature_nll(z, y, 1.0) if len(y) else None,
            "nll_after": temperature_nll(z, y, t) if len(y) else None}
