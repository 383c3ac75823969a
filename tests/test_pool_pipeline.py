"""`noisystudent run` over a pool named by data.unlabeled: a folder, a file list or WebDataset
shards, all through one labeler, one store, one selection and one pseudo-labeled dataset; the
per-stage commands; a kill -9 in the label stage; two processes under torchrun."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _tiny import tiny, torchrun
from noisystudent import cli, pipeline
from noisystudent.config.schema import load_config
from noisystudent.label.select import Selection
from noisystudent.label.store import LabelStore

CLASSES = ("a", "b", "c")
TINY = tiny("data.labels_per_class=null", "data.val_per_class=2", "data.image_size=8", "data.channels=3",
            "data.max_unlabeled=null", "teacher.epochs=2", "train.batch_size=6", "pseudo.shard_size=16",
            "students=[{model: ns_cnn_s}]", "evaluate.suites=[clean]")


def _image(rng, c: int) -> Image.Image:
    arr = rng.integers(0, 80, (8, 8, 3), dtype=np.uint8)
    arr[..., c] += 150  # each class is one dominant colour: learnable in two epochs
    return Image.fromarray(arr, "RGB")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(root: Path, pool_images: int = 40) -> list[bytes]:
    """Labeled train/test class folders and the pool's encoded images (the last one corrupt)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(rng, c).save(root / split / name / f"{i}.png")
    return [_png(_image(rng, i % 3)) for i in range(pool_images - 1)] + [b"not a png"]


def write_pool(root: Path, images: list[bytes], form: str) -> str:
    """The same pool as a folder, a file list or WebDataset shards; returns data.unlabeled."""
    if form == "webdataset":
        (root / "wds").mkdir()
        per = 16
        for s in range(0, len(images), per):
            with tarfile.open(root / "wds" / f"pool-{s // per:03d}.tar", "w") as tar:
                for i, data in enumerate(images[s:s + per], start=s):
                    info = tarfile.TarInfo(f"img{i:04d}.png")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return str(root / "wds" / f"pool-{{000..{(len(images) - 1) // per:03d}}}.tar")
    folder = root / "pool"
    for i, data in enumerate(images):
        sub = folder / f"d{i % 2}"  # nested: the folder is searched recursively
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:04d}.png").write_bytes(data)
    if form == "folder":
        return str(folder)
    listing = root / "pool.txt"
    listing.write_text("".join(f"pool/d{i % 2}/img{i:04d}.png\n" for i in range(len(images))))
    return str(listing)


def _overrides(root: Path, pool: str) -> list[str]:
    # the test folder is the test split: the digits preset's test_per_class would be unused (a warning)
    preset = [o for o in TINY if not o.startswith("data.test_per_class=")]
    return ["data.source=image-folder", f"data.train_dir={root / 'train'}", f"data.test_dir={root / 'test'}",
            f"data.unlabeled={pool}", *preset]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["folder", "file-list", "webdataset"])
def test_run_with_a_pool_folder_file_list_or_webdataset(tmp_path, form):
    images = make_dataset(tmp_path)
    pool = write_pool(tmp_path, images, form)
    run = tmp_path / "run"
    summary = pipeline.run_pipeline(load_config(None, _overrides(tmp_path, pool)), run, progress=False)

    store = LabelStore.open(run / "label-1", require_complete=True)
    assert store.num_rows == len(images) - 1 and [r for _, r in store.bad_images] and \
        store.bad_images[0][0].endswith("img0039" + ("" if form == "webdataset" else ".png"))
    data = json.loads((run / "data.json").read_text())
    assert data["num_unlabeled"] == len(images) - 1 and data["num_unlabeled_unreadable"] == 1
    selection = Selection.open(run / "select-1" / "selection.parquet")
    assert selection.num_selected == summary["stages"][1]["num_pseudo"] > 0
    assert (run / "label-1" / "probe.parquet").is_file()
    assert summary["pool"]["kind"] == {"folder": "folder", "file-list": "file-list", "webdataset": "webdataset"}[form]
    # The teacher saw the same images whatever form the pool took: the same confidences.
    conf = np.sort(pq.read_table(run / "label-1" / "shards", columns=["confidence"]).column(0).to_numpy())
    reference = tmp_path.parent / "pool-reference.npy"
    if form == "folder":
        np.save(reference, conf)
    elif reference.is_file():
        np.testing.assert_allclose(conf, np.load(reference), rtol=1e-6)


@pytest.mark.slow
def test_stage_commands_one_after_another_equal_run(tmp_path, capsys):
    images = make_dataset(tmp_path)
    pool = write_pool(tmp_path, images, "folder")
    sets = sum((["--set", o] for o in _overrides(tmp_path, pool)), [])
    assert cli.main(["run", "--out", str(tmp_path / "whole"), *sets, "--quiet"]) == 0
    staged = str(tmp_path / "staged")
    assert cli.main(["train", staged, *sets, "--quiet"]) == 0  # creates the run, trains the teacher
    assert cli.main(["select", staged, "--quiet"]) == 2  # out of order: the next stage is label-1
    assert "the next unfinished stage" in capsys.readouterr().err
    for command in ("label", "select", "train"):
        assert cli.main([command, staged, "--quiet"]) == 0
    assert cli.main(["run", "--resume", staged, "--quiet"]) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    parts = json.loads((tmp_path / "staged" / "summary.json").read_text())
    for a, b in zip(whole["stages"], parts["stages"], strict=True):
        assert (a["name"], a["test_top1"], a["val_top1"], a["num_pseudo"]) == \
               (b["name"], b["test_top1"], b["val_top1"], b["num_pseudo"])


def _label_done(run: Path) -> int:
    done = run / "label-1" / "done"
    return len(list(done.glob("part-*.json"))) if done.is_dir() else 0


@pytest.mark.slow
def test_kill_during_label_stage_resumes_at_first_unfinished_shard(tmp_path):
    """Digits with 8-image shards: kill -9 once some shards are labeled; the resumed run keeps
    them (not relabeled) and ends with the store and summary of an uninterrupted run."""
    sets = tiny("teacher.epochs=2", "pseudo.shard_size=8", "students=[{model: ns_cnn_s}]", "evaluate.suites=[clean]")
    args = sum((["--set", s] for s in sets), [])
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "noisystudent", "run", "--out", str(ref), *args, "--quiet"],
                   check=True, env=env, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent", "run", "--out", str(run), *args, "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _label_done(run) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = LabelStore.open(ref / "label-1").manifest.num_shards
    kept = sorted((run / "label-1" / "done").glob("part-*.json"))
    assert 3 <= len(kept) < total, "the kill did not land inside the label stage"
    stamps = {p.name: p.stat().st_mtime_ns for p in kept}
    subprocess.run([sys.executable, "-m", "noisystudent", "run", "--resume", str(run), "--quiet"],
                   check=True, env=env, capture_output=True)
    assert all((run / "label-1" / "done" / n).stat().st_mtime_ns == t for n, t in stamps.items())
    a = pq.read_table(ref / "label-1" / "shards").sort_by("key")
    b = pq.read_table(run / "label-1" / "shards").sort_by("key")
    assert a.column("key").equals(b.column("key")) and a.column("topk_prob").equals(b.column("topk_prob"))
    ra, rb = (json.loads((d / "summary.json").read_text())["stages"] for d in (ref, run))
    assert [(s["name"], s["test_top1"]) for s in ra] == [(s["name"], s["test_top1"]) for s in rb]


@pytest.mark.slow
def test_two_processes_label_every_shard_once_and_match_one(tmp_path):
    """Under torchrun (gloo), both ranks label their own shards; the store equals a one-process
    run's and the student trains from it."""
    sets = tiny("teacher.epochs=1", "data.max_unlabeled=300", "pseudo.shard_size=32", "students=[{model: ns_cnn_s}]",
                "evaluate.suites=[clean]", "device=cpu")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    # One teacher for both runs (DDP's gradient sums round differently from one process's), so
    # their stores must match.
    teacher = tmp_path / "teacher"
    subprocess.run([sys.executable, "-m", "noisystudent", "run", "--out", str(teacher), "--quiet",
                    *sum((["--set", s] for s in sets + ["students=[]"]), [])], check=True, env=env, capture_output=True)
    sets += [f"teacher.pretrained={teacher / 'teacher' / 'model.pt'}", "teacher.epochs=0"]
    args = sum((["--set", s] for s in sets), [])
    subprocess.run([sys.executable, "-m", "noisystudent", "run", "--out", str(tmp_path / "one"), *args, "--quiet"],
                   check=True, env=env, capture_output=True)
    torchrun("-m", "noisystudent", "run", "--out", str(tmp_path / "two"), *args, "--quiet")
    one, two = LabelStore.open(tmp_path / "one" / "label-1"), LabelStore.open(tmp_path / "two" / "label-1")
    stats = json.loads((tmp_path / "two" / "label-1" / "manifest.json").read_text())["run"]  # the labeling run's
    assert stats["world_size"] == 2 and stats["shards_labeled"] == two.manifest.num_shards > 2
    assert [s.name for s in one.shards] == [s.name for s in two.shards]
    for a, b in zip(one.iter_shards(), two.iter_shards()):
        assert a[2].select(["key", "topk_class"]).equals(b[2].select(["key", "topk_class"]))
        np.testing.assert_allclose(a[2].column("confidence").to_numpy(), b[2].column("confidence").to_numpy(),
                                   rtol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    student = next(s for s in summary["stages"] if s["name"] == "student-1")  # after the baseline
    assert student["num_pseudo"] == Selection.open(tmp_path / "two" / "select-1" /
                                                                "selection.parquet").num_selected > 0


def _wds_selection(tmp_path):
    from noisystudent.data.pool import WebDatasetSource
    from noisystudent.data.transforms import eval_transform
    from noisystudent.label.inference import label_to_store
    from noisystudent.label.select import select_from_store
    import torch
    import torch.nn as nn

    images = make_dataset(tmp_path, pool_images=60)
    pattern = write_pool(tmp_path, images, "webdataset")
    pool = WebDatasetSource(pattern)
    transform = eval_transform(8, 3, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    label_to_store(model, pool, tmp_path / "store", transform=transform, num_classes=3, teacher="t", device="cpu",
                   num_workers=0, precision="fp32", progress=False)
    selection = select_from_store(tmp_path / "store", tmp_path / "sel" / "selection.parquet", threshold=0.0,
                                  per_class=30, seed=0)
    return selection, pool


def test_a_streamed_selection_resumes_where_it_stopped(tmp_path):
    """WebDataset pools stream: every selected copy once per pass, and a stream started at step k
    yields exactly what an uninterrupted one yields from step k on (same ranks and workers)."""
    import torch

    from noisystudent.label.pseudo_labeled import StreamedSelection, pseudo_labeled_set
    from noisystudent.data.transforms import train_transform
    from noisystudent.config.schema import NoiseConfig
    from noisystudent.runtime.distributed import DistContext

    selection, pool = _wds_selection(tmp_path)
    noisy = train_transform(8, 3, (0.5,) * 3, (0.25,) * 3, NoiseConfig(), False)
    data = pseudo_labeled_set(selection, pool, noisy)
    classes = sum(1 for n in selection.kept_per_class if n)
    assert isinstance(data, StreamedSelection) and len(data) == selection.num_selected == 30 * classes
    ctx = DistContext()
    for workers in (0, 2):
        full = data.stream(6, ctx, seed=5, start_step=0, num_workers=workers)
        batches = [next(full) for _ in range(20)]  # 120 items: more than one pass
        resumed = data.stream(6, ctx, seed=5, start_step=7, num_workers=workers)
        for k in range(7, 20):
            x, t = next(resumed)
            assert torch.equal(x, batches[k][0]) and torch.equal(t, batches[k][1])
    # One pass emits every copy: the targets of the first pass are the selection's, with copies.
    full = data.stream(6, ctx, seed=5, start_step=0, num_workers=0)
    first_pass = torch.cat([next(full)[1] for _ in range(5 * classes)])
    assert first_pass.shape == (len(data), 3) and torch.allclose(first_pass.sum(1), torch.ones(len(data)))
    per_class = torch.bincount(first_pass.argmax(1), minlength=3).tolist()
    assert per_class == [n for n in selection.selected_per_class]


def test_pool_mistakes_are_one_line_errors_naming_the_path(tmp_path, capsys):
    images = make_dataset(tmp_path)
    listing = Path(write_pool(tmp_path, images, "file-list"))
    listing.write_text(listing.read_text() + "pool/d0/missing.png\n")
    wds = str(tmp_path / "nowhere" / "pool-{000..002}.tar")
    for pool, message in ((str(listing), "names 1 file(s) that do not exist"),
                          (wds, "WebDataset shard(s) not found"), (str(tmp_path / "nope"), "unlabeled pool not found")):
        sets = sum((["--set", o] for o in _overrides(tmp_path, pool)), [])
        assert cli.main(["run", "--out", str(tmp_path / f"run-{len(pool)}"), *sets, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
