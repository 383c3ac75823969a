"""The labeler's plan and its rank-local work, in one process: which shards each rank labels,
resume skipping finished shards, the store's checks, and the coordinator's one-process path.
(Several processes: tests/test_label_stream.py's torchrun test.)"""

from __future__ import annotations

import numpy as np
import pytest

from noisystudent.label.labeler import Labeler, LabelingCoordinator, plan_labeling
from noisystudent.label.store import LabelStore, StoreHeader, read_header, write_shard
from noisystudent.runtime.distributed import DistContext
from noisystudent.runtime.errors import DataError

NUM_SHARDS, TOP_K, NUM_CLASSES = 7, 2, 4


def wanted(teacher: str = "t") -> StoreHeader:
    return StoreHeader(num_classes=NUM_CLASSES, teacher=teacher, top_k=TOP_K, temperature=1.0,
                       precision="", source={"kind": "test", "num_shards": NUM_SHARDS})


def no_calibration():
    raise AssertionError("calibration must run only when a new store is made with precision='auto'")


def finish_shards(store, header, shards):
    """Real shard files, as the labeler writes them: one row per shard."""
    for s in shards:
        write_shard(store, header, s, f"s{s}", [f"k{s}"], np.array([[s % NUM_CLASSES, 0]], np.int32),
                    np.array([[0.75, 0.25]], np.float32))


def test_the_plan_splits_pending_shards_over_ranks_and_skips_finished_ones(tmp_path):
    header = plan_labeling(tmp_path, wanted(), "fp32", no_calibration).header
    finish_shards(tmp_path, header, [0, 2])
    plan = plan_labeling(tmp_path, wanted(), "fp32", no_calibration)  # a resume
    assert plan.pending == (1, 3, 4, 5, 6) and plan.skipped == 2

    two = [plan.shards_for(DistContext(rank=r, world_size=2)) for r in range(2)]
    assert two == [[1, 3, 4], [5, 6]]  # contiguous shares, sizes differing by at most one
    three = [plan.shards_for(DistContext(rank=r, world_size=3)) for r in range(3)]
    assert three == [[1, 3], [4, 5], [6]]
    eight = [plan.shards_for(DistContext(rank=r, world_size=8)) for r in range(8)]
    assert sorted(s for share in eight for s in share) == list(plan.pending)  # each once, none twice
    assert [len(share) for share in eight] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_a_new_store_calibrates_once_and_a_resume_keeps_its_precision(tmp_path):
    calls = []

    def calibrate():
        calls.append(1)
        return "bf16", {"reason": "test"}

    first = plan_labeling(tmp_path, wanted(), "auto", calibrate)
    assert first.header.precision == "bf16" and first.calibration == {"reason": "test"}
    assert read_header(tmp_path) == first.header and first.pending == tuple(range(NUM_SHARDS))
    again = plan_labeling(tmp_path, wanted(), "auto", calibrate)
    assert calls == [1] and again.header.precision == "bf16" and again.calibration == {}
    with pytest.raises(DataError, match="labeled with precision bf16, not fp32"):
        plan_labeling(tmp_path, wanted(), "fp32", calibrate)
    with pytest.raises(DataError, match="different labeling run .*teacher"):
        plan_labeling(tmp_path, wanted("another"), "auto", calibrate)


def test_a_resume_removes_half_written_files_and_labels_a_cut_shard_again(tmp_path):
    header = plan_labeling(tmp_path, wanted(), "fp32", no_calibration).header
    finish_shards(tmp_path, header, [0, 1])
    stale = tmp_path / "shards" / ".part-000002.parquet.tmp"
    stale.write_bytes(b"half")
    cut = LabelStore.open(tmp_path).shards[1]
    (tmp_path / cut.file).write_bytes((tmp_path / cut.file).read_bytes()[:10])
    plan = plan_labeling(tmp_path, wanted(), "fp32", no_calibration)
    assert not stale.exists() and plan.pending == (1, 2, 3, 4, 5, 6)


class Source:
    """Only what the labeler asks of a source besides its batches."""

    def shard_length(self, shard):
        return None

    def shard_name(self, shard):
        return f"s{shard}"


def batches(shards, per_shard=3, bad_in=(4,)):
    """Batches as ShardBatches yields them: one image per batch, a last (empty) batch per shard;
    every image of the shards in ``bad_in`` unreadable."""
    for s in shards:
        for i in range(per_shard):
            ok = s not in bad_in
            yield {"shard": s, "keys": [f"{s}/{i}"] if ok else [], "pos": [i] if ok else [],
                   "x": np.array([[float(s + i)]]) if ok else None, "bad": [] if ok else [(f"{s}/{i}", "broken")],
                   "last": False, "items": -1, "hashes": None}
        yield {"shard": s, "keys": [], "pos": [], "x": None, "bad": [], "last": True, "items": per_shard,
               "hashes": None}


def predict(x):
    """Top-2 of a made-up teacher: class (value mod 4), then the next class."""
    first = (x[:, 0].astype(np.int32) % NUM_CLASSES)
    return np.stack([first, (first + 1) % NUM_CLASSES], 1), np.tile(np.float32([0.75, 0.25]), (len(x), 1))


def test_the_labeler_writes_its_shards_and_one_process_finalises_the_store(tmp_path):
    plan = plan_labeling(tmp_path, wanted(), "fp32", no_calibration)
    labeler = Labeler(tmp_path, plan.header, Source(), batches, predict)
    coordinator = LabelingCoordinator(DistContext(), tmp_path)
    manifest = coordinator.run(labeler, plan, {"batch_size": 1})
    assert manifest.complete and manifest.num_rows == 3 * (NUM_SHARDS - 1) and manifest.num_bad == 3
    assert manifest.run["images_labeled"] == 18 and manifest.run["shards_labeled"] == NUM_SHARDS
    assert manifest.run["world_size"] == 1 and manifest.run["batch_size"] == 1
    labels = LabelStore.open(tmp_path, require_complete=True).to_pseudo_labels()
    assert labels.keys[:4] == ["0/0", "0/1", "0/2", "1/0"]
    np.testing.assert_array_equal(labels.predicted[:4], [0, 1, 2, 1])
    assert LabelStore.open(tmp_path).bad_images == [("4/0", "broken"), ("4/1", "broken"), ("4/2", "broken")]

    resumed = coordinator.run(labeler, plan_labeling(tmp_path, wanted(), "fp32", no_calibration), {})
    assert resumed.run["shards_skipped"] == NUM_SHARDS and resumed.run["shards_labeled"] == 0


def test_a_pool_without_a_readable_image_is_refused_on_every_rank(tmp_path):
    plan = plan_labeling(tmp_path, wanted(), "fp32", no_calibration)
    labeler = Labeler(tmp_path, plan.header, Source(), lambda shards: batches(shards, bad_in=shards), predict)
    with pytest.raises(DataError, match=r"no readable images in its 7 shard\(s\): 21 unreadable, first 0/0: broken"):
        LabelingCoordinator(DistContext(), tmp_path).run(labeler, plan, {})


def test_an_error_in_rank_zeros_decision_is_a_data_error(tmp_path):
    coordinator = LabelingCoordinator(DistContext(), tmp_path)
    assert coordinator.from_main(lambda: (True, {"a": 1})) == (True, {"a": 1})

    def fails():
        raise OSError(f"cannot write {tmp_path}")

    with pytest.raises(DataError, match="cannot write"):
        coordinator.from_main(fails)
