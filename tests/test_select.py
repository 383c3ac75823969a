"""Selection from a store (one DuckDB query) equals the reference rule: threshold, top-K per class
with ties broken by store order, duplication of under-full classes with md5 draws."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _label_helpers import random_store
from _selection_reference import reference_selection
from noisystudent.label.select import Selection, select_from_store
from noisystudent.label.store import StoreHeader, write_header, write_shard
from noisystudent.runtime.errors import DataError

SHARDS = [60, 0, 85, 33, 120]  # an empty shard too
KEYS = [f"img/{i}/{j}" for i, n in enumerate(SHARDS) for j in range(n)]


def _rows_and_copies(sel: Selection) -> list[tuple[int, int]]:
    t = pq.read_table(sel.path)
    offsets = np.cumsum([0] + SHARDS)
    rows = offsets[t.column("shard").to_numpy()] + t.column("index").to_numpy()
    return list(zip(rows.tolist(), t.column("copies").to_pylist()))


@pytest.mark.parametrize("quantize", [None, 16, 2], ids=["distinct", "ties", "massive-ties"])
@pytest.mark.parametrize("case", [
    dict(threshold=0.3, balance=True, per_class=None),  # K from the data: some classes over, some under
    dict(threshold=0.0, balance=True, per_class=25),
    dict(threshold=0.5, balance=True, per_class=200),  # every class duplicated
    dict(threshold=0.3, balance=False, per_class=None),
], ids=["default-k", "k25", "all-under", "no-balance"])
def test_selection_equals_the_reference_rule(tmp_path, quantize, case):
    num_classes = 9
    conf, pred = random_store(tmp_path / "store", SHARDS, num_classes, seed=7, quantize=quantize)
    ref = reference_selection(KEYS, conf, pred, num_classes, seed=11, **case)
    sel = select_from_store(tmp_path / "store", tmp_path / "sel" / "selection.parquet", seed=11, **case)

    # The same rows with the same copies (the file is in store order; the reference in class order).
    assert sorted(_rows_and_copies(sel)) == sorted(ref["rows"])
    assert sel.kept_per_class == ref["kept_per_class"] and sel.per_class == ref["per_class"]
    assert sel.num_below_threshold == int((conf < np.float32(case["threshold"])).sum())
    if case["balance"]:  # every class that kept an image lands on exactly K stream items
        assert all(n in (0, ref["per_class"]) for n in sel.selected_per_class)
    assert Selection.open(sel.path).summary() == sel.summary()
    # The expanded file is the student's stream: one row per copy, labels carried along.
    expanded = pa.ipc.open_file(pa.memory_map(str(sel.expanded_path))).read_all()
    assert expanded.num_rows == sel.num_selected == sum(c for _, c in ref["rows"])
    t = pq.read_table(sel.path)
    row_of = dict(zip(zip(t.column("shard").to_pylist(), t.column("index").to_pylist()), range(t.num_rows)))
    counts = {}
    for s, i in zip(expanded.column("shard").to_pylist(), expanded.column("index").to_pylist()):
        counts[(s, i)] = counts.get((s, i), 0) + 1
    assert counts == {k: t.column("copies")[r].as_py() for k, r in row_of.items()}
    keys = t.column("key").to_pylist()
    offsets = np.cumsum([0] + SHARDS)
    rows = offsets[t.column("shard").to_numpy()] + t.column("index").to_numpy()
    assert keys == [KEYS[r] for r in rows]
    np.testing.assert_array_equal(t.column("confidence").to_numpy(), conf[rows])


def test_ties_at_the_cutoff_go_to_earlier_rows_and_draws_follow_md5(tmp_path):
    # Every image has the same confidence: a class's top K are its first K rows, across shards.
    rng = np.random.default_rng(1)
    header = StoreHeader(num_classes=3, teacher="t", top_k=1, temperature=1.0, precision="fp32",
                         source={"kind": "test", "num_shards": 3})
    write_header(tmp_path / "s", header)
    pred = rng.integers(0, 3, 120).astype(np.int32)
    pred[:5] = 2  # class 2 is the under-full one below
    pred[5:] = rng.integers(0, 2, 115)
    keys = [f"k{r}" for r in range(120)]
    for i in range(3):
        rows = slice(40 * i, 40 * (i + 1))
        write_shard(tmp_path / "s", header, i, str(i), keys[rows], pred[rows, None], np.full((40, 1), 0.75, np.float32))
    sel = select_from_store(tmp_path / "s", tmp_path / "out" / "selection.parquet", threshold=0.0, per_class=30, seed=4)
    t = pq.read_table(sel.path)
    rows = (40 * t.column("shard").to_numpy() + t.column("index").to_numpy())
    for c in (0, 1):
        np.testing.assert_array_equal(np.sort(rows[pred[rows] == c]), np.flatnonzero(pred == c)[:30])
    # Class 2 has 5 images for K = 30: 6 copies each, no remainder; K = 32 gives 2 extra by md5 order.
    sel32 = select_from_store(tmp_path / "s", tmp_path / "o32" / "selection.parquet", threshold=0.0, per_class=32, seed=4)
    t = pq.read_table(sel32.path).to_pylist()
    copies = {r["key"]: r["copies"] for r in t if r["predicted"] == 2}
    first_two = sorted(copies, key=lambda k: hashlib.md5(f"4:{k}".encode()).hexdigest())[:2]
    assert copies == {k: 7 if k in first_two else 6 for k in copies}


def test_the_draw_depends_on_the_seed_and_only_on_it(tmp_path):
    conf, pred = random_store(tmp_path / "store", SHARDS, 9, seed=3)
    a = select_from_store(tmp_path / "store", tmp_path / "a" / "selection.parquet", threshold=0.5, per_class=50, seed=1)
    b = select_from_store(tmp_path / "store", tmp_path / "b" / "selection.parquet", threshold=0.5, per_class=50, seed=1)
    c = select_from_store(tmp_path / "store", tmp_path / "c" / "selection.parquet", threshold=0.5, per_class=50, seed=2)
    assert _rows_and_copies(a) == _rows_and_copies(b) != _rows_and_copies(c)


def test_an_incomplete_store_is_refused(tmp_path):
    header = StoreHeader(num_classes=3, teacher="t", top_k=1, temperature=1.0, precision="fp32",
                         source={"kind": "test", "num_shards": 2})
    write_header(tmp_path / "s", header)
    write_shard(tmp_path / "s", header, 0, "0", ["a"], np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32))
    with pytest.raises(DataError, match="incomplete: 1 of 2 shards"):
        select_from_store(tmp_path / "s", tmp_path / "o" / "selection.parquet")
    with pytest.raises(DataError, match="not a selection file"):
        Selection.open(tmp_path / "s" / "shards" / "part-000000.parquet")


def test_expanded_batches_are_whole_so_row_i_is_in_batch_i_div_size(tmp_path, monkeypatch):
    """The student finds stream item i in record batch i // EXPANDED_BATCH_ROWS: every batch but the
    last must be full, however DuckDB cuts its own batches."""
    import noisystudent.label.select as select

    monkeypatch.setattr(select, "EXPANDED_BATCH_ROWS", 7)
    monkeypatch.setattr(select, "BATCH_ROWS", 5)
    random_store(tmp_path / "store", SHARDS, 9, seed=2)
    sel = select_from_store(tmp_path / "store", tmp_path / "sel" / "selection.parquet", threshold=0.0, per_class=40)
    reader = pa.ipc.open_file(pa.memory_map(str(sel.expanded_path)))
    sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    assert sizes[:-1] == [7] * (len(sizes) - 1) and 1 <= sizes[-1] <= 7 and sum(sizes) == sel.num_selected == 360


def test_hard_or_soft_is_the_selections_reading_of_one_store(tmp_path):
    # One store (it keeps the teacher's top-k probabilities) serves both: the same rows are kept
    # and balanced, the students read one-hot top-1 targets from the hard selection only.
    from noisystudent.label.pseudo_labeled import _targets

    random_store(tmp_path / "store", SHARDS, 5, seed=2, top_k=3)
    soft, hard = (select_from_store(tmp_path / "store", tmp_path / name / "selection.parquet", threshold=0.4,
                                    per_class=40, seed=1, hard=name == "hard") for name in ("soft", "hard"))
    assert _rows_and_copies(soft) == _rows_and_copies(hard)
    assert (Selection.open(soft.path).hard, Selection.open(hard.path).hard) == (False, True)
    assert (soft.summary()["hard"], hard.summary()["hard"]) == (False, True)
    t = pq.read_table(hard.path)
    cls = np.array(t.column("topk_class").to_pylist(), np.int32)
    prob = np.array(t.column("topk_prob").to_pylist(), np.float32)
    one_hot, probs = _targets(cls, prob, hard).numpy(), _targets(cls, prob, soft).numpy()
    np.testing.assert_array_equal(one_hot.argmax(1), cls[:, 0])
    assert (one_hot.max(1) == 1).all() and (one_hot.sum(1) == 1).all()
    np.testing.assert_allclose(np.take_along_axis(probs, cls.astype(np.int64), 1), prob, rtol=1e-6)
    assert (probs.max(1) < 1).all()


def test_a_header_written_with_a_hard_key_still_reads(tmp_path):
    # stores labeled before hard labels became the selection's choice recorded it in store.json
    import json

    from noisystudent.label.store import read_header

    random_store(tmp_path / "store", [10], 3, seed=0)
    path = next((tmp_path / "store").glob("store.json"))
    header = json.loads(path.read_text())
    path.write_text(json.dumps(header | {"hard": True}))
    assert read_header(tmp_path / "store").to_dict() == header
    sel = select_from_store(tmp_path / "store", tmp_path / "out" / "selection.parquet", threshold=0.0, seed=0)
    assert sel.num_selected > 0 and not sel.hard
