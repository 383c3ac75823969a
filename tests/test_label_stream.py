"""Streaming labeling: sources, bad images, resume after SIGKILL, torchrun equals one process."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _label_helpers as H
from _tiny import torchrun
from noisystudent.data.datasets import ArrayImageSet
from noisystudent.runtime.errors import DataError
from noisystudent.label.store import LabelStore, load_pseudo_labels
from noisystudent.data.pool import file_list_source, folder_source, imageset_source, webdataset_source
from noisystudent.label.inference import Predictor, calibrate_precision, label_to_store, prepare_model

HELPERS = Path(__file__).with_name("_label_helpers.py")


def _png(rng, size=10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _label(source, store, model=None, **kw):
    args = dict(transform=H.transform(), num_classes=H.NUM_CLASSES, teacher="tiny", top_k=3, batch_size=4,
                num_workers=1, precision="fp32", progress=False)
    return label_to_store(model or H.teacher_net(), source, store, **(args | kw))


def test_folder_and_file_list_sources_skip_bad_images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "pool"
    for rel in ["b/2.png", "a/x/1.png", "a/0.png", "c.png", "b/10.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(rng))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")

    m = _label(folder_source(root, shard_size=3), tmp_path / "store")
    assert m.complete and m.num_shards == 3 and m.num_rows == 5 and m.num_bad == 2
    labels = load_pseudo_labels(tmp_path / "store")
    # Stable order: names sorted at every level of the walk; keys relative to the root.
    assert labels.keys == ["a/0.png", "a/x/1.png", "b/10.png", "b/2.png", "c.png"]
    bad = (tmp_path / "store" / "bad_images.tsv").read_text().splitlines()
    assert bad[0] == "key\treason" and [line.split("\t")[0] for line in bad[1:]] == ["a/broken.png", "b/empty.jpg"]
    assert "empty file" in bad[2]

    # The same images through a file list: same labels for the same keys; a listed file that does
    # not exist is a mistake in the list, refused up front (an unreadable one is skipped).
    (tmp_path / "list.txt").write_text("\n".join(["a/0.png", "gone.png", "", "c.png"]) + "\n")
    with pytest.raises(DataError, match="names 1 file\\(s\\) that do not exist.*gone.png"):
        _label(file_list_source(tmp_path / "list.txt", shard_size=2, root=root), tmp_path / "store2")
    (tmp_path / "list.txt").write_text("\n".join(["a/0.png", "", "c.png"]) + "\n")
    m2 = _label(file_list_source(tmp_path / "list.txt", shard_size=2, root=root), tmp_path / "store3")
    listed = load_pseudo_labels(tmp_path / "store3")
    assert listed.keys == ["a/0.png", "c.png"] and m2.num_bad == 0
    np.testing.assert_array_equal(listed.topk_index, labels.topk_index[[0, 4]])

    # A resumed run must be the same labeling run: another teacher is refused.
    with pytest.raises(DataError, match="teacher"):
        _label(folder_source(root, shard_size=3), tmp_path / "store", teacher="other")


def test_webdataset_tar_shards(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for s in range(2):
        path = tmp_path / f"pool-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(3):
                members = {f"sample{i}.png": _png(rng), f"sample{i}.cls": b"7"}
                if s == 1 and i == 1:
                    members = {f"sample{i}.jpg": b"not a jpeg"}  # corrupt image
                for name, data in members.items():
                    info = tarfile.TarInfo(f"{s}/{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    trunc = tmp_path / "pool-002.tar"  # a truncated tar: what was read counts, the rest is listed
    trunc.write_bytes(paths[0].read_bytes()[:1024 + 100])

    m = _label(webdataset_source(str(tmp_path / "pool-{000..002}.tar")), tmp_path / "store")
    labels = load_pseudo_labels(tmp_path / "store")
    assert labels.keys[:5] == ["pool-000/0/sample0", "pool-000/0/sample1", "pool-000/0/sample2",
                               "pool-001/1/sample0", "pool-001/1/sample2"]
    bad = LabelStore.open(tmp_path / "store").bad_images
    assert bad[0][0] == "pool-001/1/sample1" and bad[-1][0] == "pool-002/<rest of shard>"
    assert m.complete and m.num_rows == len(labels)


def test_streamed_labels_equal_in_memory_labeling(tmp_path):
    rng = np.random.default_rng(2)
    images = ArrayImageSet(rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8), None)
    model = H.teacher_net()
    m = _label(imageset_source(images, shard_size=10), tmp_path / "store", model=model, batch_size=8)
    streamed = load_pseudo_labels(tmp_path / "store")

    # The reference: the plain model in eval mode, image by image (no folding, no batching).
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(H.transform()(images.load(i))[None]), 1) for i in range(len(images))])
    ref_prob, ref_idx = probs.topk(3, dim=1)
    assert streamed.keys == [images.key(i) for i in range(len(images))] and m.num_rows == 37
    np.testing.assert_array_equal(streamed.topk_index, ref_idx.numpy())
    # BatchNorm folding and channels-last change float rounding only.
    np.testing.assert_allclose(streamed.topk_prob, ref_prob.numpy(), rtol=1e-5, atol=1e-6)


def test_bf16_is_kept_only_when_it_agrees_with_fp32():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)

    class Flip(torch.nn.Module):  # bf16 rounding flips top-1 on every image: a model bf16 must not label
        def forward(self, x):
            base = x.flatten(1)[:, :2] * 0
            return base + torch.tensor([1.0, 1.0 + 1e-4]) * (1 if torch.is_autocast_enabled("cpu") else -1)

    cpu = torch.device("cpu")
    predictor = Predictor(prepare_model(Flip(), cpu, fold_bn=False), cpu, "fp32", 1.0, 2)
    precision, info = calibrate_precision(predictor, x.split(32))
    assert precision == "fp32" and info["reason"].startswith(("bf16 top-1 disagrees", "bf16 not faster"))


def test_bf16_is_chosen_when_it_agrees_and_is_fast_enough(monkeypatch):
    import noisystudent.label.inference as ls

    monkeypatch.setattr(ls, "BF16_MIN_SPEEDUP", 0.0)  # speed is the machine's business; test the rule
    cpu = torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3, 12) * 50)  # class = largest of the first 3 inputs: wide margins
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(300, 12)
    x[:, :3] = torch.stack([torch.randperm(3, generator=g) for _ in range(300)]).float()  # margins of 50
    x = x.view(300, 3, 2, 2)
    precision, info = calibrate_precision(Predictor(prepare_model(model, cpu), cpu, "fp32", 1.0, 2), x.split(100))
    assert precision == "bf16" and info["calibration_images"] == 300 and info["bf16_top1_agreement"] >= 0.999


@pytest.mark.slow
def test_resume_after_sigkill_mid_shard_matches_uninterrupted_run(tmp_path):
    ref = H.label(tmp_path / "ref", H.KillAfter(H.teacher_net(), None))
    killed = subprocess.run([sys.executable, str(HELPERS), "kill", str(tmp_path / "run"), "10"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed (SIGKILL), not an exception
    before = LabelStore.open(tmp_path / "run").manifest
    # 10 forward calls with 4 batches per shard on 2 workers: some shards done, one cut mid-shard.
    assert 0 < len(before.shards) < before.num_shards
    stamps = {s.file: os.stat(tmp_path / "run" / s.file).st_mtime_ns for s in before.shards}

    resumed = H.label(tmp_path / "run", H.KillAfter(H.teacher_net(), None))
    assert resumed.complete
    assert resumed.run["shards_skipped"] == len(before.shards)
    assert resumed.run["shards_labeled"] == before.num_shards - len(before.shards)
    assert {f: os.stat(tmp_path / "run" / f).st_mtime_ns for f in stamps} == stamps  # never recomputed
    a, b = load_pseudo_labels(tmp_path / "ref"), load_pseudo_labels(tmp_path / "run")
    assert a.keys == b.keys
    np.testing.assert_array_equal(a.topk_index, b.topk_index)
    np.testing.assert_array_equal(a.topk_prob, b.topk_prob)
    assert (tmp_path / "ref" / "bad_images.tsv").read_text() == (tmp_path / "run" / "bad_images.tsv").read_text()
    assert ref.num_bad == resumed.num_bad > 0


@pytest.mark.slow
def test_torchrun_two_processes_label_like_one(tmp_path):
    torchrun(str(HELPERS), "dist", str(tmp_path / "two"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as each torchrun process
    try:
        one = H.label(tmp_path / "one", H.teacher_net(), num_workers=1)
    finally:
        torch.set_num_threads(threads)
    two = LabelStore.open(tmp_path / "two").manifest
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["run"]["world_size"] == 2
    assert two.complete
    a, b = load_pseudo_labels(tmp_path / "one"), load_pseudo_labels(tmp_path / "two")
    assert a.keys == b.keys and one.num_bad == two.num_bad
    np.testing.assert_array_equal(a.topk_index, b.topk_index)
    np.testing.assert_array_equal(a.topk_prob, b.topk_prob)

