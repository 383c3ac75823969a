"""A run directory for the report tests, written by the project's own writers, not by hand.

``make_run(root)`` builds a three-iteration run the way the pipeline lays it out
(:mod:`noisystudent.runtime.rundir`): ``RunDir.open`` writes ``config.yaml`` and the manifest and
commits every stage; ``DataSplits.describe()`` of the configured digits split is ``data.json``;
training stages get a ``model.pt`` from ``save_model`` and ``metrics.json`` / ``metrics.jsonl``
from ``write_json_atomic`` with the pipeline's keys; each ``label-i/`` is a pseudo-label store
written by ``label_to_store`` (a tiny teacher labeling a synthetic pool with unreadable images)
plus the teacher's ``probe.parquet``; each ``select-i/`` comes from ``select_from_store``;
``fixres/metrics.json`` holds ``FinetuneOutcome.metrics()``; ``evaluate/robustness.json`` holds
real ``evaluate_robustness`` results. Only the accuracies of the training stages are chosen (so
the tests know the headline numbers).

When the pipeline writes all of this itself, ``make_run`` can become
``run_pipeline(load_config(None, TINY), root)``: the tests only use what it returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import _label_helpers as H
from noisystudent.config.schema import load_config
from noisystudent.data.datasets import build_splits
from noisystudent.data.pool import SyntheticSource, decode_image
from noisystudent.label.inference import label_to_store
from noisystudent.label.select import select_from_store
from noisystudent.models.checkpoint import save_model
from noisystudent.runtime.rundir import (DATA, EVALUATE, FIXRES, HISTORY, LOG, METRICS, MODEL, PROBE, ROBUSTNESS,
                                         SELECTION, SELECTION_SUMMARY, SUMMARY, TEACHER, RunDir, label_stage,
                                         select_stage, student_stage, teacher_of, write_json_atomic,
                                         write_text_atomic)
from noisystudent.train.fixres import FinetuneOutcome

TINY = ["teacher.epochs=60", "train.epochs=3", "train.batch_size=16", "data.val_per_class=5",
        "data.test_per_class=10", "data.max_unlabeled=300", "pseudo.threshold=0.3"]
MODELS = ["ns_cnn_s", "ns_cnn_s", "ns_cnn_m"]
# (val top-1, test top-1, params) of the teacher and each student: the numbers the tests check
ACCURACY = [(70.0, 68.0, 310_000), (78.0, 75.5, 310_000), (80.0, 78.0, 310_000), (82.0, 80.25, 1_520_000)]
FIXRES_BEFORE = {"val_top1": 82.0, "val_top5": 97.0, "test_top1": 80.25, "test_top5": 96.0}
FIXRES_AFTER = {"val_top1": 83.0, "val_top5": 97.5, "test_top1": 81.5, "test_top5": 96.5}
POOL_IMAGES, SHARD_SIZE, BAD_EVERY = 300, 64, 29


def pool_source() -> SyntheticSource:
    """The unlabeled pool every iteration labels (10 of its 300 images are unreadable)."""
    return SyntheticSource(POOL_IMAGES, shard_size=SHARD_SIZE, size=H.SIZE, bad_every=BAD_EVERY)


def pool_loader():
    """A stand-in for random access to the pool by store key: ``key -> PIL.Image``."""
    src = pool_source()
    images = {}
    for s in range(src.num_shards):
        for key, payload in src.iter_shard(s):
            try:
                images[key] = decode_image(payload)
            except Exception:  # noqa: BLE001 - the pool's unreadable images are not in the store
                pass
    return images.__getitem__


def _teacher_model(stage: int) -> torch.nn.Module:
    return H.TinyNet(10, seed=stage).eval()


@torch.inference_mode()
def _probe(model: torch.nn.Module, rng: np.random.Generator) -> pa.Table:
    """The teacher on 50 'labeled validation' images: confidence, predicted and a target that the
    prediction matches three times in four (so the confusion matrix has a diagonal and mistakes)."""
    src = SyntheticSource(50, shard_size=64, size=H.SIZE, seed=7)
    tf = H.transform()
    x = torch.stack([tf(decode_image(p)) for _, p in src.iter_shard(0)])
    probs = torch.softmax(model(x), 1)
    conf, pred = probs.max(1)
    pred = pred.numpy().astype(np.int32)
    target = np.where(rng.uniform(size=len(pred)) < 0.75, pred, (pred + 1 + rng.integers(0, 3, len(pred))) % 10)
    return pa.table({"confidence": pa.array(conf.numpy(), pa.float32()), "predicted": pa.array(pred, pa.int32()),
                     "target": pa.array(target.astype(np.int32), pa.int32())})


def _curve(epochs: int, start: float, end: float) -> str:
    """metrics.jsonl as the training loop writes it: one record per epoch."""
    return "".join(json.dumps({"epoch": e, "step": 4 * e, "loss": 2.3 - 1.5 * e / epochs,
                               "val_top1": start + (end - start) * e / epochs, "val_top5": 90.0, "lr": 0.05,
                               "seconds": 1.0 * e}) + "\n" for e in range(1, epochs + 1))


def _train_stage(run: RunDir, name: str, model_name: str, index: int, num_labeled: int, num_pseudo: int,
                 epochs: int, classes: list[str]) -> dict:
    val, test, params = ACCURACY[index]
    metrics = {"name": name, "model": model_name, "val_top1": val, "val_top5": min(100.0, val + 15),
               "test_top1": test, "test_top5": min(100.0, test + 16), "num_labeled": num_labeled,
               "num_pseudo": num_pseudo, "seconds": 12.5 + val / 10, "params": params, "best_epoch": epochs - 1,
               "epochs": epochs, "steps": 4 * epochs, "images_seen": 64 * epochs, "image_size": 16,
               "test_size": 16, "dropout": 0.3, "drop_path": 0.1}
    with run.stage(name) as out:
        save_model(out / MODEL, _teacher_model(index), name=model_name, num_classes=10, in_chans=3, classes=classes,
                   image_size=16, mean=H.MEAN, std=H.STD, test_size=16)
        write_json_atomic(out / METRICS, metrics)
        write_text_atomic(out / HISTORY, _curve(epochs, 10.0, val))
    return metrics


def _iteration(run: RunDir, i: int, threshold: float, probe: bool, rng: np.random.Generator):
    """label-i (a store and the probe) and select-i; returns the store's manifest."""
    model = _teacher_model(i - 1)
    with run.stage(label_stage(i)) as out:
        manifest = label_to_store(model, pool_source(), out, transform=H.transform(), num_classes=10, teacher=teacher_of(i),
                       top_k=3, batch_size=32, num_workers=0, precision="fp32",
                       progress=False)
        if probe:
            pq.write_table(_probe(model, rng), out / PROBE)
    with run.stage(select_stage(i)) as out:
        selection = select_from_store(run.path(label_stage(i)), out / SELECTION, threshold=threshold, seed=i,
                                      threads=1)
        write_json_atomic(out / SELECTION_SUMMARY, selection.summary())
    return manifest


def _fixres(run: RunDir, last: dict, num_labeled: int) -> dict:
    outcome = FinetuneOutcome(frozen=["stem", "blocks.0", "blocks.1"], frozen_blocks=2, total_blocks=4,
                              trainable_params=200_000, frozen_params=110_000, before=FIXRES_BEFORE,
                              after=FIXRES_AFTER, epochs=1.5, steps=6, images_seen=96, lr=0.005, seconds=4.2,
                              history=[{"epoch": e / 2, "step": 2 * e, "loss": 1.0 - 0.1 * e, "lr": 0.005,
                                        "seconds": 1.4 * e} for e in (1, 2, 3)])
    # the keys of pipeline.finetune_stage
    metrics = {"name": FIXRES, "model": last["model"], **outcome.metrics(),
               "val_top1": outcome.after["val_top1"], "val_top5": outcome.after["val_top5"],
               "test_top1": outcome.after["test_top1"], "test_top5": outcome.after["test_top5"],
               "num_labeled": num_labeled, "num_pseudo": 0, "params": last["params"], "best_epoch": None,
               "epochs": outcome.epochs, "steps": outcome.steps, "image_size": 24, "train_size": 16,
               "test_size": 24, "frozen": outcome.frozen}
    with run.stage(FIXRES) as out:
        write_json_atomic(out / METRICS, metrics)
        write_text_atomic(out / HISTORY, "".join(json.dumps(r) + "\n" for r in outcome.history))
    return metrics


def _robustness(run: RunDir, names: list[str]) -> dict:
    from torch.utils.data import TensorDataset

    from noisystudent.robustness import evaluate_robustness

    torch.manual_seed(0)
    data = TensorDataset(torch.rand(12, 3, H.SIZE, H.SIZE), torch.randint(0, 10, (12,)))
    results = {}
    for i, name in zip((0, len(ACCURACY) - 1), names):
        results[name] = evaluate_robustness(_teacher_model(i), data, suites=["clean", "corruptions", "perturbations",
                                                                             "fgsm", "pgd"],
                                            mean=H.MEAN, std=H.STD, corruptions=["gaussian_noise", "contrast"],
                                            perturbations=["translate"], fgsm_eps=(0, 8), pgd_steps=2,
                                            severities=(1, 2), progress=False, normalizer="alexnet")
    with run.stage(EVALUATE) as out:
        write_json_atomic(out / ROBUSTNESS, results)
    return results


def make_run(root: Path, *, iterations: int = 3, probe: bool = True, robustness: bool = True, fixres: bool = True,
             complete: bool = True, moved_to_pool: int | None = None, seed: int = 0) -> Path:
    """A finished run of ``iterations`` students (or, ``complete=False``, one stopped after
    ``student-1``); ``moved_to_pool`` adds data.json's ``num_labels_moved_to_pool``."""
    rng = np.random.default_rng(seed)
    students = ", ".join(f"{{model: {m}}}" for m in MODELS[:iterations])
    cfg = load_config(None, TINY + [f"students=[{students}]"])
    run = RunDir.open(root, cfg, resume=False)
    splits = build_splits(cfg.data, cfg.seed)
    data = splits.describe()
    if moved_to_pool is not None:
        data["num_labels_moved_to_pool"] = moved_to_pool
    write_json_atomic(root / DATA, data)
    n_labeled = data["num_labeled"]
    stages = [_train_stage(run, TEACHER, cfg.teacher.model, 0, n_labeled, 0, int(cfg.teacher.epochs), splits.classes)]
    last = iterations if complete else 1
    for i in range(1, last + 1):
        store = _iteration(run, i, cfg.pseudo.threshold, probe, rng)
        if i == 1:  # as the pipeline does once the pool's readable and unreadable counts are known
            write_json_atomic(root / DATA, data | {"num_unlabeled": store.num_rows,
                                                   "num_unlabeled_unreadable": store.num_bad})
        pseudo = json.loads((run.path(select_stage(i)) / SELECTION_SUMMARY).read_text())["num_selected"]
        stages.append(_train_stage(run, student_stage(i), MODELS[i - 1], i if i < iterations else len(ACCURACY) - 1,
                                   n_labeled, pseudo, int(cfg.train.epochs), splits.classes))
    write_text_atomic(root / LOG, "log\n")
    if not complete:
        return root
    if fixres:
        stages.append(_fixres(run, stages[-1], n_labeled))
    results = _robustness(run, [TEACHER, stages[-1 - fixres]["name"]]) if robustness else {}
    write_json_atomic(root / SUMMARY, {"run_dir": str(root), "config_fingerprint": cfg.fingerprint(),
                                       "seconds": 95.0, "stages": stages, "result": stages[-1]["name"],
                                       "robustness": {m: {"clean.top1": r["clean"]["top1"]} for m, r in results.items()}})
    return root
