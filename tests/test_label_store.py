"""The sharded Parquet pseudo-label store: schema, round trip, manifest, top-k rebuild, size."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _label_helpers import random_store
from noisystudent.runtime.errors import DataError
from noisystudent.label.store import (LabelStore, PseudoLabels, StoreHeader, consolidate, load_pseudo_labels, read_manifest,
                                      soft_targets, write_header, write_shard)


def _header(num_classes=1000, top_k=5, num_shards=2, teacher="ns_cnn_m:abc123"):
    return StoreHeader(num_classes=num_classes, teacher=teacher, top_k=top_k, temperature=1.0,
                       precision="fp32", source={"kind": "test", "num_shards": num_shards})


def _topk(rng, n, num_classes, k, peak=10.0):
    logits = rng.standard_normal((n, num_classes)) * 2
    logits[np.arange(n), rng.integers(0, num_classes, n)] += rng.uniform(0, peak, n)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-p, 1)[:, :k].astype(np.int32)
    return idx, np.take_along_axis(p, idx, 1).astype(np.float32)


def test_schema_round_trip_and_manifest(tmp_path):
    rng = np.random.default_rng(0)
    header = _header(num_classes=20, top_k=4, num_shards=3)
    write_header(tmp_path, header)
    idx0, prob0 = _topk(rng, 7, 20, 4)
    idx1, prob1 = _topk(rng, 5, 20, 4)
    write_shard(tmp_path, header, 0, "first", [f"a/{i}.jpg" for i in range(7)], idx0, prob0,
                bad=[("a/bad.jpg", "empty file")], positions=np.array([0, 1, 2, 4, 5, 6, 7]), items=8)
    write_shard(tmp_path, header, 1, "second", [f"b/{i}.jpg" for i in range(5)], idx1, prob1)

    table = pq.read_table(tmp_path / "shards" / "part-000000.parquet")
    schema = table.schema
    assert schema.names == ["key", "topk_class", "topk_prob", "confidence", "predicted", "teacher", "index"]
    assert schema.field("key").type == pa.string()
    assert schema.field("topk_class").type == pa.list_(pa.int32(), 4)
    assert schema.field("topk_prob").type == pa.list_(pa.float32(), 4)
    assert schema.field("confidence").type == pa.float32() and schema.field("predicted").type == pa.int32()
    assert table.column("index").to_pylist() == [0, 1, 2, 4, 5, 6, 7]  # item 3 was unreadable
    assert table.column("teacher").to_pylist() == ["ns_cnn_m:abc123"] * 7
    np.testing.assert_array_equal(table.column("confidence").to_numpy(), prob0[:, 0])
    np.testing.assert_array_equal(table.column("predicted").to_numpy(), idx0[:, 0])
    # Two of three shards finished: the manifest says so; loading whole refuses, streaming works.
    manifest = read_manifest(tmp_path)
    assert [s.index for s in manifest.shards] == [0, 1] and manifest.pending() == [2] and not manifest.complete
    assert manifest.num_rows == 12 and manifest.num_bad == 1
    with pytest.raises(DataError, match="incomplete"):
        load_pseudo_labels(tmp_path)
    store = LabelStore.open(tmp_path)
    assert store.bad_images == [("a/bad.jpg", "empty file")]
    batches = list(store.iter_batches(["key", "confidence"], batch_size=4))
    assert [b.num_rows for b in batches] == [4, 3, 4, 1]

    idx2, prob2 = _topk(rng, 3, 20, 4)
    write_shard(tmp_path, header, 2, "third", ["c/0", "c/1", "c/2"], idx2, prob2)
    done = consolidate(tmp_path, {"note": "test"})
    assert done.complete and json.loads((tmp_path / "manifest.json").read_text())["num_rows"] == 15
    assert (tmp_path / "bad_images.tsv").read_text() == "key\treason\na/bad.jpg\tempty file\n"
    labels = load_pseudo_labels(tmp_path)
    assert labels.keys[:7] == [f"a/{i}.jpg" for i in range(7)] and labels.keys[-1] == "c/2"
    np.testing.assert_array_equal(labels.topk_index, np.concatenate([idx0, idx1, idx2]))
    np.testing.assert_array_equal(labels.topk_prob, np.concatenate([prob0, prob1, prob2]))
    np.testing.assert_array_equal(done.row_offsets(), [0, 7, 12])
    # Pool positions of the rows skip the unreadable item, as PseudoLabels.indices does.
    np.testing.assert_array_equal(labels.indices, [0, 1, 2, 4, 5, 6, 7] + list(range(8, 16)))


def test_topk_rebuild_rule():
    rng = np.random.default_rng(1)
    idx, prob = _topk(rng, 50, 12, 3)
    soft = soft_targets(idx, prob, 12)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.take_along_axis(soft, idx.astype(np.int64), 1), prob)  # stored mass in place
    rest = (1.0 - prob.sum(1)) / 9  # the rest spread evenly over the 9 classes not stored
    mask = np.ones_like(soft, dtype=bool)
    np.put_along_axis(mask, idx.astype(np.int64), False, 1)
    np.testing.assert_allclose(soft[mask].reshape(50, 9), np.repeat(rest[:, None], 9, 1), rtol=1e-5, atol=1e-7)
    hard = soft_targets(idx, prob, 12, hard=True)
    np.testing.assert_array_equal(hard.argmax(1), idx[:, 0])
    assert (hard.sum(1) == 1).all() and (hard.max(1) == 1).all()
    # The same rule as PseudoLabels.soft_targets; with k = num_classes the rebuild is exact.
    labels = PseudoLabels(keys=[str(i) for i in range(50)], topk_index=idx, topk_prob=prob, num_classes=12,
                          teacher="t", temperature=1.0, hard=False)
    np.testing.assert_array_equal(soft, labels.soft_targets())
    full_idx, full_prob = _topk(rng, 5, 6, 6)
    exact = np.zeros((5, 6), np.float32)
    np.put_along_axis(exact, full_idx.astype(np.int64), full_prob, 1)
    np.testing.assert_array_equal(soft_targets(full_idx, full_prob, 6), exact)


def test_store_costs_at_most_64_bytes_per_image_at_1000_classes(tmp_path):
    rng = np.random.default_rng(2)
    header = _header(num_shards=1)
    write_header(tmp_path, header)
    n = 8192  # one default-size shard
    idx, prob = _topk(rng, n, 1000, 5)
    keys = sorted(f"n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in enumerate(rng.integers(0, 1000, n)))  # ImageNet-like
    rec = write_shard(tmp_path, header, 0, "s0", keys, idx, prob)
    assert rec.bytes / n <= 64, rec.bytes / n


def test_random_store_helper_matches_reader(tmp_path):
    conf, pred = random_store(tmp_path, [5, 0, 9], num_classes=4, seed=3)
    labels = load_pseudo_labels(tmp_path)
    assert len(labels) == 14
    np.testing.assert_array_equal(labels.confidence, conf)
    np.testing.assert_array_equal(labels.predicted, pred)
