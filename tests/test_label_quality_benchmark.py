"""benchmarks/label_quality.py: a real run's label store and selection scored against the true
labels of its pool, checked against the teacher run again by hand and the student's expanded stream."""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from _tiny import tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import label_quality  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from noisystudent.config.schema import load_config
    from noisystudent.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("label-quality") / "run"
    # pool: the digits left after 5 labels per class, cut to 200 (a subset of a subset: the truth
    # is found through both); a teacher that learned something and threshold 0.2, so the stream
    # is a real selection (some images dropped, some classes duplicated)
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}]", "teacher.epochs=15", "pseudo.threshold=0.2",
                                 "pseudo.hard=false"))  # the digits default is hard: soft here
    run_pipeline(cfg, out, progress=False)
    return out, cfg


def test_pool_accuracy_and_soft_targets_match_the_teacher_run_by_hand(tiny_run):
    from noisystudent.data.datasets import TransformedSet
    from noisystudent.data.splits import build_splits
    from noisystudent.models.checkpoint import clean_transform, load_model
    from noisystudent.runtime.rundir import MODEL, TEACHER, RunDir

    run, cfg = tiny_run
    q = label_quality.main([str(run)])[str(run)]["label-1"]
    pool = build_splits(cfg.data, cfg.seed).unlabeled
    truth = label_quality.pool_truth(run)
    assert q["images"] == len(pool) == len(truth) == 200
    model, meta = load_model(RunDir(run).file(TEACHER, MODEL))
    model.eval()
    images = TransformedSet(pool, clean_transform(meta))
    with torch.inference_mode():
        probs = torch.cat([model(torch.stack([images[i][0] for i in range(s, min(s + 50, len(pool)))])).softmax(1)
                           for s in range(0, len(pool), 50)]).numpy()
    y = np.array([truth[pool.key(i)] for i in range(len(pool))])
    assert abs(q["pool_acc"] - (probs.argmax(1) == y).mean()) <= 1 / len(pool)  # at most one near-tie
    assert q["p_true"] == pytest.approx(probs[np.arange(len(y)), y].mean(), abs=1e-4)  # soft: the teacher's p
    conf = probs.max(1)
    for t in label_quality.THRESHOLDS:
        assert q[f"kept@{t}"] == pytest.approx((conf >= t).mean(), abs=1 / len(pool))
    assert 0 <= q["pool_ece"] <= 1 and not q["hard"]


def test_stream_accuracy_counts_copies_as_the_students_expanded_stream_does(tiny_run):
    from noisystudent.runtime.rundir import SELECTION

    run, _ = tiny_run
    q = label_quality.run_quality(run)["label-1"]
    truth = label_quality.pool_truth(run)
    with pa.memory_map(str((run / "select-1" / SELECTION).with_suffix(".arrow"))) as f:
        stream = pa.ipc.open_file(f).read_all()  # one row per item the student reads
    keys = stream.column("key").to_pylist()
    top1 = np.array([c[0] for c in stream.column("topk_class").to_pylist()])
    right = top1 == np.array([truth[k] for k in keys])
    assert q["stream"] == len(keys) and q["stream_unique"] == len(set(keys)) < q["images"]
    assert q["stream_acc"] == pytest.approx(right.mean())
    per_class = q["stream_acc_per_class"]
    assert q["worst_class_acc"] == min(a for a in per_class if a is not None) == per_class[q["worst_class"]]


def test_hard_labels_teach_the_true_class_with_probability_one_where_right(tiny_run, tmp_path):
    """A hard-label store: p(true) of the targets is the top-1 accuracy."""
    from noisystudent.config.schema import load_config
    from noisystudent.pipeline import run_pipeline
    from noisystudent.runtime.rundir import MODEL, TEACHER, RunDir

    run, _ = tiny_run
    teacher = RunDir(run).file(TEACHER, MODEL)
    cfg = load_config(None, tiny("students=[{model: ns_cnn_s}]", "pseudo.hard=true", f"teacher.pretrained={teacher}",
                                 "teacher.epochs=0", "baseline.enabled=false"))
    run_pipeline(cfg, tmp_path / "hard", progress=False)
    soft, hard = (label_quality.run_quality(r)["label-1"] for r in (run, tmp_path / "hard"))
    assert hard["hard"] and hard["p_true"] == pytest.approx(hard["pool_acc"])
    assert hard["pool_acc"] == soft["pool_acc"]  # one teacher: the same top-1 labels
    # the run's selection reads its store as hard labels (what its student was taught)
    from noisystudent.label.select import Selection
    from noisystudent.runtime.rundir import SELECTION, select_stage
    assert Selection.open(tmp_path / "hard" / select_stage(1) / SELECTION).hard
    assert not Selection.open(run / select_stage(1) / SELECTION).hard


def test_a_pool_without_known_labels_is_refused_with_its_key(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data:\n  unlabeled: /some/pool\n")
    with pytest.raises(SystemExit, match="data.unlabeled"):
        label_quality.main([str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="not a run directory"):
        label_quality.main([str(tmp_path)])
