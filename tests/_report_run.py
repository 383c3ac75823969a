"""Run directories for the tests that read a run (the report's above all), written by the pipeline itself.

``make_run(root)`` is one ``run_pipeline(load_config(None, overrides), root)`` on the embedded
digits: a teacher, three students (the last one tested at 24 px, so a fix-res fine-tune runs
after it), and every robustness suite of ``evaluate`` on a few test images. The unlabeled pool is
the digits the labeled split leaves over (``data.labels_per_class``) followed by a folder of PNGs
(``data.unlabeled``) of which :data:`UNREADABLE` are corrupt. The run writes its own report as
it ends; the tests read what it wrote through the names of :mod:`noisystudent.runtime.rundir`,
and find the pool's images for thumbnails with :func:`noisystudent.pipeline.open_pool`, as
``noisystudent report`` does.

conftest.py's session fixture ``finished_run`` builds ``make_run`` once for the whole suite.

``make_stopped_run(root)`` is a run still going: the per-stage commands' ``run_pipeline(...,
only=kind)`` ran the teacher, ``label-1``, ``select-1`` and ``student-1`` of a two-student chain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from _tiny import DIGITS
from noisystudent.config.schema import load_config
from noisystudent.pipeline import run_pipeline
from noisystudent.runtime.rundir import MANIFEST

READABLE = 24  # PNGs in the pool folder that decode
UNREADABLE = {"bad-empty.png": b"", "bad-text.png": b"this is not an image"}  # + one truncated PNG below
NUM_UNREADABLE = len(UNREADABLE) + 1

RUN = DIGITS + [
    "teacher.epochs=30", "train.epochs=20", "pseudo.shard_size=512", "pseudo.per_class=16",
    "students=[{model: ns_cnn_s}, {model: ns_cnn_s}, {model: ns_cnn_m, test_size: 24}]",
    "finetune.enabled=true", "finetune.epochs=1",
    "evaluate.suites=[clean, corruptions, perturbations, fgsm, pgd]", "evaluate.max_images=8",
    "evaluate.severities=[1]", "evaluate.fgsm_eps=[0, 8]", "evaluate.pgd_steps=2", "evaluate.normalizer=alexnet"]
STOPPED = DIGITS + ["teacher.epochs=2", "train.epochs=1", "data.max_unlabeled=200", "pseudo.shard_size=64",
                   "students=[{model: ns_cnn_s}, {model: ns_cnn_s}]"]


def write_pool_folder(folder: Path) -> Path:
    """Grey and colour PNGs of noise (images from outside the labeled classes, as a real pool
    has), an empty file, a text file and a truncated PNG, all named ``*.png``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(READABLE):
        shape = (8, 8) if i % 2 else (12, 10, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"img-{i:03d}.png")
    for name, data in UNREADABLE.items():
        (folder / name).write_bytes(data)
    png = (folder / "img-000.png").read_bytes()
    (folder / "bad-truncated.png").write_bytes(png[:len(png) // 2])
    return folder


def make_run(root: Path) -> Path:
    """The finished run (its pool folder beside it, ``<root>-pool``); returns ``root``."""
    pool = write_pool_folder(root.with_name(root.name + "-pool"))
    run_pipeline(load_config(None, RUN + [f"data.unlabeled={pool}"]), root, progress=False)
    return root


def make_stopped_run(root: Path) -> Path:
    """A run whose per-stage commands finished ``student-1`` of two students; returns ``root``."""
    cfg = load_config(None, STOPPED)
    for kind in ("train", "label", "select", "train"):
        run_pipeline(cfg, root, resume=(root / MANIFEST).is_file(), progress=False, only=kind)
    return root
