"""FGSM / PGD against the analytical perturbation of a linear model."""

import torch
import torch.nn as nn

from noisystudent.robustness import NormalizedModel, fgsm, pgd


def linear_model(d: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    return model.eval()


def test_fgsm_on_linear_model_is_analytical():
    # For 2 classes and label y, grad_x CE = p_{1-y} (W_{1-y} - W_y): its sign is sign(W_{1-y} - W_y)
    # whatever the probabilities, and a positive std does not change it.
    model = linear_model(3 * 4 * 4)
    W = model[1].weight.detach()
    x = 0.2 + 0.6 * torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    eps = 8 / 255
    direction = torch.where(y[:, None] == 0, W[1] - W[0], W[0] - W[1]).sign().view_as(x)
    expected = x + eps * direction
    assert torch.allclose(fgsm(model, x, y, eps), expected, atol=1e-7)
    wrapped = NormalizedModel(model, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert torch.allclose(fgsm(wrapped, x, y, eps), expected, atol=1e-7)


def test_fgsm_clips_and_eps_zero():
    model = linear_model(3 * 2 * 2)
    x = torch.rand(4, 3, 2, 2)
    y = torch.zeros(4, dtype=torch.long)
    adv = fgsm(model, x, y, 0.9)
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    with torch.inference_mode():  # callers may hold inference tensors
        xi, yi = x.clone(), y.clone()
    assert fgsm(model, xi, yi, 0.1).shape == x.shape


def test_pgd_stays_in_ball_and_matches_fgsm_on_linear_model():
    model = linear_model(3 * 4 * 4, seed=2)
    x = 0.2 + 0.6 * torch.rand(5, 3, 4, 4)
    y = torch.tensor([0, 1, 1, 0, 1])
    eps = 4 / 255
    adv = pgd(model, x, y, eps, steps=10, random_start=True, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # a linear binary model has a constant gradient sign, so PGD ends at FGSM's corner
    assert torch.allclose(pgd(model, x, y, eps, steps=10, random_start=False), fgsm(model, x, y, eps), atol=1e-6)
    # and it is at least as strong as FGSM on a non-linear model
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    yy = net(x).argmax(1)
    loss = nn.functional.cross_entropy
    l_fgsm = loss(net(fgsm(net, x, yy, eps)), yy)
    l_pgd = loss(net(pgd(net, x, yy, eps, steps=10, random_start=False)), yy)
    assert l_pgd >= l_fgsm - 1e-6


def test_normalized_model_normalises_inside():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.flatten(1)[:, :2]

    NormalizedModel(Probe(), (0.5,), (0.25,))(torch.full((1, 1, 2, 2), 0.75))
    assert torch.allclose(seen["x"], torch.ones(1, 1, 2, 2))
