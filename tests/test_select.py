import numpy as np
import pytest

from noisystudent.label.select import balance_class, default_per_class, select_pseudo_labels


def test_threshold_drops_low_confidence_images():
    conf = np.array([0.9, 0.2, 0.31, 0.3, 0.1], dtype=np.float32)
    pred = np.array([0, 0, 1, 1, 1])
    sel = select_pseudo_labels(conf, pred, 2, threshold=0.3, balance=False)
    assert sorted(sel.rows.tolist()) == [0, 2, 3]
    assert sel.num_below_threshold == 2
    assert sel.kept_per_class.tolist() == [1, 2]


def test_top_k_keeps_most_confident_per_class():
    conf = np.array([0.5, 0.9, 0.7, 0.95, 0.6, 0.8], dtype=np.float32)
    pred = np.array([0, 0, 0, 1, 1, 1])
    sel = select_pseudo_labels(conf, pred, 2, threshold=0.0, balance=True, per_class=2)
    assert sorted(sel.rows.tolist()) == [1, 2, 3, 5]
    assert sel.selected_per_class.tolist() == [2, 2]


def test_underfull_class_is_duplicated_to_exactly_k():
    # class 0 has 3 images, K = 8: each gets 2 copies and 8 mod 3 = 2 distinct images get a third
    conf = np.array([0.9, 0.8, 0.7] + [0.99] * 10, dtype=np.float32)
    pred = np.array([0, 0, 0] + [1] * 10)
    sel = select_pseudo_labels(conf, pred, 2, threshold=0.0, per_class=8, seed=3)
    counts = np.bincount(sel.rows, minlength=13)
    assert counts[:3].sum() == 8
    assert sorted(counts[:3].tolist()) == [2, 3, 3]
    assert counts[3:].sum() == 8  # over-full class keeps its top 8
    assert sel.selected_per_class.tolist() == [8, 8]


def test_duplication_draw_depends_on_seed_but_not_totals():
    conf = np.linspace(0.5, 0.9, 7).astype(np.float32)
    pred = np.zeros(7, dtype=np.int64)
    a = select_pseudo_labels(conf, pred, 1, threshold=0.0, per_class=17, seed=0)
    b = select_pseudo_labels(conf, pred, 1, threshold=0.0, per_class=17, seed=0)
    assert np.array_equal(a.rows, b.rows)
    counts = [np.bincount(select_pseudo_labels(conf, pred, 1, threshold=0.0, per_class=17, seed=s).rows,
                          minlength=7) for s in range(10)]
    assert all(c.sum() == 17 and set(c.tolist()) <= {2, 3} for c in counts)
    assert len({tuple(c) for c in counts}) > 1


def test_default_k_is_mean_kept_per_class():
    conf = np.ones(10, dtype=np.float32)
    pred = np.array([0] * 7 + [1] * 3)
    sel = select_pseudo_labels(conf, pred, 2, threshold=0.5)
    assert sel.per_class == default_per_class(10, 2) == 5
    assert sel.selected_per_class.tolist() == [5, 5]


def test_empty_class_stays_empty():
    conf = np.array([0.9, 0.8], dtype=np.float32)
    pred = np.array([0, 0])
    sel = select_pseudo_labels(conf, pred, 3, threshold=0.0, per_class=4)
    assert sel.selected_per_class.tolist() == [4, 0, 0]


@pytest.mark.parametrize("n,k", [(1, 5), (4, 4), (5, 3)])
def test_balance_class_size(n, k):
    rows = np.arange(n)
    out = balance_class(rows, np.linspace(0.1, 0.9, n).astype(np.float32), k, np.random.default_rng(0))
    assert len(out) == k
