"""Perturbation sequences, the one-call suite (JSON results, determinism) and the plots."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import TensorDataset

from noisystudent.robustness import (NOISE_PERTURBATIONS, PERTURBATIONS, evaluate_robustness,
                                     perturbation_sequence, plot_robustness, save_results, sequence_length)


def tiny_data(n=10, c=1, size=16, classes=4):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, c, size, size, generator=g)
    y = torch.arange(n) % classes
    return TensorDataset(x, y)


def tiny_model(c=1, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, classes))


@pytest.mark.parametrize("name", PERTURBATIONS)
@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 3, 64, 64)])
def test_perturbation_sequences(name, shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    seq = perturbation_sequence(x, name, torch.Generator().manual_seed(2))
    T = sequence_length(name, *shape[-2:])
    assert seq.shape == (shape[0], T, *shape[1:]) and seq.dtype == x.dtype
    assert seq.min() >= 0 and seq.max() <= 1
    assert (seq[:, 1:] - seq[:, :-1]).abs().amax() > 0  # frames change along the sequence
    if name in NOISE_PERTURBATIONS:
        assert torch.equal(seq[:, 0], x)
    assert torch.equal(seq, perturbation_sequence(x, name, torch.Generator().manual_seed(2)))


def test_sequence_lengths():
    assert sequence_length("translate", 224, 224) == 41
    assert sequence_length("translate", 32, 32) == 16
    assert sequence_length("motion_blur", 32, 32) == 21
    assert sequence_length("rotate", 28, 28) == 31


@pytest.mark.slow
def test_evaluate_robustness_all_suites(tmp_path):
    data, model = tiny_data(), tiny_model()
    model.train()
    res = evaluate_robustness(model, data, suites="clean,corruptions,perturbations,fgsm,pgd", mean=(0.5,), std=(0.25,),
                              batch_size=4, fgsm_eps=(0, 8), pgd_steps=3, progress=False, normalizer="alexnet")
    assert model.training  # mode restored
    json.loads(json.dumps(res))
    assert set(res) >= {"clean", "corruptions", "perturbations", "fgsm", "pgd"}
    x, y = data.tensors
    with torch.no_grad():  # the clean accuracy by hand: the model on the normalised images
        top = model.eval()((x - 0.5) / 0.25).topk(4, dim=1).indices
    model.train()
    assert res["clean"]["n"] == 10
    assert res["clean"]["top1"] == pytest.approx(100 * (top[:, 0] == y).float().mean().item())
    assert res["clean"]["top5"] == pytest.approx(100 * (top == y[:, None]).any(1).float().mean().item())
    cor = res["corruptions"]
    assert len(cor["error"]) == 19 and all(len(v) == 5 for v in cor["error"].values())
    assert set(cor) >= {"mean_error", "extra_mean_error", "ce", "mce", "relative_mce", "clean_error"}
    assert cor["preset"] == "cifar"
    per = res["perturbations"]
    assert set(per["flip_prob"]) == set(PERTURBATIONS) and set(per["fr"]) == set(PERTURBATIONS)
    assert all(0 <= v <= 5 for v in per["t5d"].values())
    assert res["fgsm"]["eps"] == [0.0, 8.0] and res["fgsm"]["top1"][0] == pytest.approx(res["clean"]["top1"])
    assert res["fgsm"]["top1"][1] <= res["fgsm"]["top1"][0]
    assert res["pgd"]["steps"] == 3 and res["pgd"]["top1"][1] <= res["pgd"]["top1"][0]
    path = save_results(res, tmp_path / "run" / "robustness.json")
    assert json.loads(path.read_text())["clean"] == res["clean"]
    pngs = plot_robustness({"teacher": res, "student": res}, tmp_path / "plots")
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)


def test_evaluate_robustness_subsets_and_determinism(tmp_path):
    data, model = tiny_data(c=3, size=20), tiny_model(c=3)
    kw = dict(suites=["corruptions", "perturbations"], mean=(0.5,) * 3, std=(0.2,) * 3, batch_size=3,
              corruptions=["gaussian_noise", "snow"], perturbations=["shot_noise", "rotate"], severities=(1, 5),
              max_images=5, progress=False, seed=3)
    a = evaluate_robustness(model, data, **kw)
    b = evaluate_robustness(model, data, **kw)
    assert a == b
    assert a["n_images"] == 5 and "ce" not in a["corruptions"] and "fr" not in a["perturbations"]
    assert list(a["corruptions"]["error"]) == ["gaussian_noise", "snow"]
    assert a["corruptions"]["severities"] == [1, 5]


def test_natural_adversarial_folder(tmp_path):
    for cls in ("0", "2"):
        (tmp_path / cls).mkdir()
        Image.new("L", (16, 16), 100).save(tmp_path / cls / "a.png")
    res = evaluate_robustness(tiny_model(), tiny_data(), suites=["natural-adversarial"], progress=False,
                              natural_adversarial_root=tmp_path)
    nat = res["natural_adversarial"]
    assert nat["n"] == 2 and nat["num_classes"] == 2 and nat["top1"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        evaluate_robustness(tiny_model(), tiny_data(), suites=["natural-adversarial"], progress=False)
    with pytest.raises(ValueError):
        evaluate_robustness(tiny_model(), tiny_data(), suites=["nope"], progress=False)


def test_known_clean_accuracy_is_reused_not_recomputed(monkeypatch):
    import noisystudent.robustness.suite as suite

    data, model = tiny_data(), tiny_model()
    measured = evaluate_robustness(model, data, suites=["clean"], progress=False)["clean"]
    calls = []
    real = suite._clean
    monkeypatch.setattr(suite, "_clean", lambda *a, **k: calls.append(1) or real(*a, **k))
    given = {"top1": measured["top1"], "top5": measured["top5"]}
    res = evaluate_robustness(model, data, suites=["clean", "corruptions"], corruptions=["gaussian_noise"],
                              severities=[1], clean=given, progress=False)
    assert calls == []  # no second pass over the clean images
    assert res["clean"] == measured
    assert res["corruptions"]["clean_error"] == pytest.approx(measured["error"])
    evaluate_robustness(model, data, suites=["clean"], progress=False)
    assert calls == [1]


def test_a_saved_result_is_reused_only_under_the_settings_it_was_computed_with(tmp_path):
    """The key of a (suite, model) result is every setting of the suites that changes numbers,
    read back equal from JSON (tuples become lists); which suites run and batching are not in it."""
    import dataclasses
    from noisystudent.config.schema import EvaluateConfig
    from noisystudent.data.datasets import ArrayImageSet
    from noisystudent.evaluate.classifier import _read_result, _result_key, _write_result, robustness_settings

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    images = ArrayImageSet(np.zeros((4, 8, 8), np.uint8), np.arange(4))
    settings = robustness_settings(EvaluateConfig(suites=["fgsm"], max_images=4), seed=3)
    key = _result_key(checkpoint, images, settings)
    _write_result(tmp_path, "fgsm", "teacher", key, {"top1": 50.0})
    batched_else = dataclasses.replace(settings, suites=("clean", "fgsm"), batch_size=7)
    assert _read_result(tmp_path, "fgsm", "teacher", _result_key(checkpoint, images, batched_else)) == {"top1": 50.0}
    for change in ({"fgsm_eps": (0, 8)}, {"seed": 4}, {"max_images": 3}, {"preset": "imagenet"},
                   {"corruptions": ("fog",)}):
        other = _result_key(checkpoint, images, dataclasses.replace(settings, **change))
        assert _read_result(tmp_path, "fgsm", "teacher", other) is None, change
