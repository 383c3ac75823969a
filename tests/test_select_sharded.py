"""Selection from a sharded store gives exactly the in-memory selection (rows, copies, draws)."""

import numpy as np
import pytest

from _label_helpers import random_store
from noisystudent.label.store import StoreHeader, write_header, write_shard
from noisystudent.label.select import select_pseudo_labels
from noisystudent.label.select_sharded import iter_selection, read_selection_metadata, select_from_store, selection_rows

SHARDS = [60, 0, 85, 33, 120]  # an empty shard too


@pytest.mark.parametrize("quantize", [None, 16, 2], ids=["distinct", "ties", "massive-ties"])
@pytest.mark.parametrize("case", [
    dict(threshold=0.3, balance=True, per_class=None),  # K from the data: some classes over, some under
    dict(threshold=0.0, balance=True, per_class=25, bins=3, group_rows=30),  # many passes, many groups
    dict(threshold=0.5, balance=True, per_class=200),  # every class duplicated
    dict(threshold=0.3, balance=False, per_class=None),
], ids=["default-k", "small-bins", "all-under", "no-balance"])
def test_sharded_selection_equals_in_memory(tmp_path, quantize, case):
    num_classes = 9
    conf, pred = random_store(tmp_path, SHARDS, num_classes, seed=7, quantize=quantize)
    extra = {k: case.pop(k) for k in ("bins", "group_rows") if k in case}
    ref = select_pseudo_labels(conf, pred, num_classes, seed=11, **case)
    out = tmp_path / "selection.parquet"
    summary = select_from_store(tmp_path, num_classes, seed=11, out_path=out, **case, **extra)

    assert summary == ref.summary()
    np.testing.assert_array_equal(selection_rows(out), ref.rows)  # same rows, order and duplicates
    assert read_selection_metadata(out)["summary"] == summary
    # The file carries what training needs: key and top-k labels of each selected image.
    batch = next(iter_selection(out))
    keys = batch.column("key").to_pylist()
    rows = batch.column("row").to_numpy()
    offsets = np.cumsum([0] + SHARDS)
    shard = np.searchsorted(offsets, rows, "right") - 1
    expected = [f"img/{s}/{r - offsets[s]}" for s, r in zip(shard, rows)]
    assert keys == expected
    np.testing.assert_array_equal(batch.column("confidence").to_numpy(), conf[rows])


def test_ties_straddling_the_cutoff_go_to_earlier_rows(tmp_path):
    # Every image has the same confidence: the top K of a class are its first K rows, across shards.
    rng = np.random.default_rng(1)
    header = StoreHeader(num_classes=3, teacher="t", top_k=1, temperature=1.0, hard=False, precision="fp32",
                         source={"kind": "test", "num_shards": 3})
    write_header(tmp_path, header)
    pred = rng.integers(0, 3, 120).astype(np.int32)
    for i in range(3):
        rows = slice(40 * i, 40 * (i + 1))
        write_shard(tmp_path, header, i, str(i), [str(r) for r in range(120)][rows], pred[rows, None],
                    np.full((40, 1), 0.75, np.float32))
    ref = select_pseudo_labels(np.full(120, 0.75, np.float32), pred, 3, threshold=0.0, per_class=30, seed=0)
    select_from_store(tmp_path, 3, threshold=0.0, per_class=30, seed=0, out_path=tmp_path / "s.parquet", bins=4)
    rows = selection_rows(tmp_path / "s.parquet")
    np.testing.assert_array_equal(rows, ref.rows)
    for c in range(3):
        np.testing.assert_array_equal(rows[pred[rows] == c], np.flatnonzero(pred == c)[:30])
