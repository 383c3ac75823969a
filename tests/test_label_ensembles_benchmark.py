"""benchmarks/label_ensembles.py: the chain's models relabel a real run's pool; checked against the
label store the run's own labeler wrote and against the views and means computed by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import label_ensembles  # noqa: E402
import label_quality  # noqa: E402


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    from noisystudent.config.schema import load_config
    from noisystudent.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("label-ensembles") / "run"
    # two iterations, so the chain has three models; a teacher that learned something
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}, {model: ns_cnn_s}]", "teacher.epochs=15",
                                 "train.epochs=2", "data.max_unlabeled=150"))
    run_pipeline(cfg, out, progress=False)
    return out, cfg


def test_each_models_pool_accuracy_is_the_one_its_label_store_holds(tiny_chain):
    run, _ = tiny_chain
    assert label_ensembles.chain_stages(run) == ["teacher", "student-1", "student-2"]
    ours = label_ensembles.main([str(run)])[str(run)]
    stores = label_quality.run_quality(run)  # label-1: the teacher's store, label-2: student-1's
    n = stores["label-1"]["images"]
    assert n == 150
    for stage, store in (("teacher", "label-1"), ("student-1", "label-2")):
        assert abs(ours[stage]["pool_acc"] - stores[store]["pool_acc"]) <= 1 / n  # at most one near-tie
        for t in label_ensembles.THRESHOLDS:
            assert ours[stage][f"kept@{t}"] == pytest.approx(stores[store][f"kept@{t}"], abs=1 / n)
    assert {"teacher+flip", "teacher+student-1", "student-1+student-2", "all"} <= set(ours)
    assert all(0 <= q["val_acc"] <= 1 and 0 <= q["test_acc"] <= 1 for q in ours.values())


def test_flip_and_ensemble_probabilities_are_the_means_of_their_views(tiny_chain):
    from noisystudent.data.datasets import TransformedSet
    from noisystudent.data.splits import build_splits
    from noisystudent.models.checkpoint import clean_transform, load_model

    run, cfg = tiny_chain
    truth, probs = label_ensembles.run_probabilities(run)
    combos = label_ensembles.combinations(probs)
    model, meta = load_model(run / "teacher" / "model.pt")
    model.eval()
    val = TransformedSet(build_splits(cfg.data, cfg.seed).val, clean_transform(meta))
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.inference_mode():
        clean, mirrored = model(x).softmax(1).numpy(), model(x.flip(-1)).softmax(1).numpy()
    assert np.allclose(probs["teacher"]["val"], clean, atol=1e-5)
    assert np.allclose(probs["teacher+flip"]["val"], (clean + mirrored) / 2, atol=1e-5)
    pair = combos["teacher+student-2"]["pool"]
    assert np.allclose(pair, (probs["teacher"]["pool"] + probs["student-2"]["pool"]) / 2)
    views = [probs[n]["test"] for n in probs if not n.endswith("+flip")]  # clean views of the three models
    mirrored = [2 * probs[f"{n}+flip"]["test"] - probs[n]["test"] for n in probs if not n.endswith("+flip")]
    assert np.allclose(combos["all"]["test"], np.mean(views + mirrored, axis=0), atol=1e-6)  # six views, equal weight
    assert len(probs) == 6  # three models, each clean and flipped
    scored = label_ensembles.score(truth, combos["teacher+student-2"])
    assert scored["pool_acc"] == pytest.approx((pair.argmax(1) == truth["pool"]).mean())
