"""Pool hygiene: the image hashes (label.hashing) and the banded DuckDB query that drops pool images
copying a held-out image (label.dedup.find_duplicates) and the in-pool count (count_pool_duplicates),
against brute-force references."""

import io

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from noisystudent.data.datasets import ArrayImageSet
from noisystudent.label.dedup import band_layout, count_pool_duplicates
from noisystudent.label.hashing import (PHASH_BITS, content_hash, hamming, hash_images, hash_inputs,
                                        heldout_hash_table, pack_hashes, unpack_hashes, write_heldout_hashes)
from noisystudent.label.select import Selection, select_from_store
from noisystudent.label.store import LabelStore, StoreHeader, write_header, write_shard
from noisystudent.runtime.errors import ConfigError, DataError


def _digits(n: int = 200, side: int = 32) -> list[Image.Image]:
    """Real images: scikit-learn's 8x8 digits, upscaled (smoothly) to ``side`` pixels."""
    d = load_digits().images[:n]
    return [Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((side, side), Image.BICUBIC) for im in d]


def _jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)


def _smooth_rgb(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return [Image.fromarray((gaussian_filter(rng.normal(size=(side, side, 3)), (side / 40, side / 40, 0)) * 300
                             + 128).clip(0, 255).astype(np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------ the hashes


def test_phash_is_the_dct_hash_of_the_image():
    """The per-image basis products equal SciPy's 2-D DCT-II of the grayscale image, low 8x8 against
    their median; an image of 128 px and more is box-reduced by an integer factor first."""
    from scipy.fft import dct

    images = _digits(40) + _smooth_rgb(8, 100) + _smooth_rgb(4, 300, seed=2)
    _, ours = hash_images(images, "RGB")
    for img, h in zip(images, ours):
        gray = img.convert("L")
        if min(gray.size) >= 128:
            gray = gray.reduce(min(gray.size) // 64)
        low = dct(dct(np.asarray(gray, np.float64), axis=0), axis=1)[:8, :8].reshape(-1)
        bits = low > np.median(low)
        assert int(h) == int("".join("1" if b else "0" for b in bits), 2)


def test_hashes_do_not_depend_on_how_images_are_batched():
    """The DCT runs per batch, images of a size stacked together: an image's hashes are the same
    alone, in any batch, and through the worker's pack/unpack; ties at the median (a flat image)
    included."""
    images = (_digits(30) + _digits(20, side=20) + _smooth_rgb(6, 100) + _smooth_rgb(3, 300, seed=3)
              + [Image.new("L", (17, 9), 200), Image.new("L", (1, 1))])
    order = np.random.default_rng(0).permutation(len(images))
    for mode in ("L", "RGB"):
        exact, phash = hash_images(images, mode)
        alone = [hash_images([im], mode) for im in images]
        assert [int(e[0]) for e, _ in alone] == exact.tolist() and [int(p[0]) for _, p in alone] == phash.tolist()
        shuffled = hash_images([images[i] for i in order], mode)
        assert (shuffled[0] == exact[order]).all() and (shuffled[1] == phash[order]).all()
        packed = unpack_hashes(pack_hashes(*zip(*(hash_inputs(im, mode) for im in images))))
        assert (packed[:, 0] == exact).all() and (packed[:, 1] == phash).all()
    assert unpack_hashes(pack_hashes([], [])).shape == (0, 2)


def test_phash_is_close_to_imagehash():
    imagehash = pytest.importorskip("imagehash")  # the reference implementation, when installed
    images = _digits(150) + _smooth_rgb(20, 60) + _smooth_rgb(10, 256, seed=1)
    _, ours = hash_images(images, "RGB")
    ref = np.array([int(str(imagehash.phash(im)), 16) for im in images], np.uint64)
    d = hamming(ours, ref)
    assert np.median(d) <= 2 and (d <= 4).mean() >= 0.9


def test_hashes_identical_for_the_same_image_close_for_copies_far_for_others():
    images = _digits(100, side=64)
    exact, phash = hash_images(images, "L")
    again = hash_images([im.copy() for im in images], "L")
    assert (again[0] == exact).all() and (again[1] == phash).all()
    # the same pixels arriving as a PNG file, and as RGB converted to the run's mode: the same hashes
    png = []
    for im in images[:10]:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "PNG")
        png.append(Image.open(io.BytesIO(buf.getvalue())))
    e2, p2 = hash_images(png, "L")
    assert (e2 == exact[:10]).all() and (p2 == phash[:10]).all()
    # copies: resized, JPEG q75 re-encoded: a different content hash, a few bits of pHash
    resized = hash_images([im.resize((48, 48), Image.BILINEAR) for im in images], "L")
    jpeg = hash_images([_jpeg(im) for im in images], "L")
    for e, p in (resized, jpeg):
        assert (e != exact).all()
        assert np.percentile(hamming(p, phash), 95) <= 4
    # different images: far apart (digits of the same class are alike, so the bar is the typical gap)
    d = hamming(phash[:, None], phash[None, :])[np.triu_indices(len(phash), 1)]
    assert np.median(d) >= 20 and (d <= 4).mean() < 0.01
    # the content hash covers size and mode, not just the bytes
    flat = Image.new("L", (4, 8))
    assert content_hash(flat) != content_hash(Image.new("L", (8, 4))) != content_hash(Image.new("P", (4, 8)))


# ------------------------------------------------------------------------------ the query

SHARDS = [300, 0, 250, 180]
HEADER = StoreHeader(num_classes=3, teacher="t", top_k=2, temperature=1.0, precision="fp32",
                     source={"kind": "test", "num_shards": len(SHARDS)})


def _flip(h: int, bits: list[int]) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def _hashed_store(root, seed: int = 0, num_heldout: int = 120):
    """A store whose pool hashes are random, except planted copies of held-out images (exact
    content, and perceptual hashes 0..7 bits away); returns (heldout table, pool hashes (n, 2))."""
    rng = np.random.default_rng(seed)
    held_exact = rng.integers(0, 2**63, num_heldout, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    held_phash = rng.integers(0, 2**63, num_heldout, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    total = sum(SHARDS)
    pool = rng.integers(0, 2**63, (total, 2), dtype=np.int64).astype(np.uint64) * np.uint64(2)
    for row in rng.choice(total, 90, replace=False):
        h = rng.integers(num_heldout)
        k = int(rng.integers(0, 8))
        pool[row, 1] = _flip(int(held_phash[h]), rng.choice(64, k, replace=False).tolist())
        if k == 0 and rng.random() < 0.5:
            pool[row, 0] = held_exact[h]  # an exact copy
    for row in rng.choice(total, 5, replace=False):  # an exact content copy whose pHash is far (a degenerate case)
        pool[row, 0] = held_exact[rng.integers(num_heldout)]
    write_header(root, HEADER)
    start = 0
    for i, n in enumerate(SHARDS):
        probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
        order = np.argsort(-probs, 1)[:, :2]
        write_shard(root, HEADER, i, f"s{i}", [f"img/{i}/{j}" for j in range(n)], order,
                    np.take_along_axis(probs, order, 1), hashes=pool[start:start + n])
        start += n
    split = np.where(np.arange(num_heldout) % 3 == 0, "val", "test")
    index = np.array([(split[:i] == split[i]).sum() for i in range(num_heldout)])
    heldout = pa.table({"split": split, "index": index, "content_hash": pa.array(held_exact, pa.uint64()),
                        "phash": pa.array(held_phash, pa.uint64())})
    return heldout, pool


def _brute_force(heldout: pa.Table, pool: np.ndarray, distance: int) -> set[tuple[int, int, str, int]]:
    offsets = np.cumsum([0] + SHARDS)
    shard_of = np.searchsorted(offsets, np.arange(len(pool)), side="right") - 1
    d = hamming(pool[:, 1][:, None], heldout.column("phash").to_numpy()[None, :])
    same = pool[:, 0][:, None] == heldout.column("content_hash").to_numpy()[None, :]
    rows, cols = np.nonzero((d <= distance) | same)
    split, index = heldout.column("split").to_pylist(), heldout.column("index").to_pylist()
    return {(int(shard_of[r]), int(r - offsets[shard_of[r]]), split[c], index[c]) for r, c in zip(rows, cols)}


def _pairs(tmp_path, heldout, distance, bands, name):
    path = tmp_path / f"{name}.parquet"
    pq.write_table(heldout, path)
    sel = select_from_store(tmp_path / "store", tmp_path / name / "selection.parquet", threshold=0.0,
                            balance=False, heldout=path, dedup_distance=distance, bands=bands)
    return sel


@pytest.mark.parametrize("distance", [0, 3, 4, 6])
def test_banded_query_finds_exactly_the_brute_force_pairs(tmp_path, distance):
    heldout, pool = _hashed_store(tmp_path / "store")
    truth = _brute_force(heldout, pool, distance)
    dropped = {(s, i) for s, i, _, _ in truth}
    assert len(truth) > 10
    auto = band_layout(distance, len(pool), heldout.num_rows)
    for bands in sorted({1 if distance <= 3 else 3, 2, distance + 1, auto} - {d for d in (2, 3) if d > distance + 1}):
        sel = _pairs(tmp_path, heldout, distance, bands, f"b{bands}")
        assert sel.dedup["bands"] == bands
        assert sel.dedup["dropped"] == len(dropped) and sel.dedup["pairs"] == len(truth)
        for e in sel.dedup["examples"]:  # examples: real pairs, closest first, with the pool key
            assert (e["shard"], e["index"], e["split"], e["heldout_index"]) in truth
            assert e["key"] == f"img/{e['shard']}/{e['index']}"
        assert [e["distance"] for e in sel.dedup["examples"]] == sorted(e["distance"] for e in sel.dedup["examples"])
        t = pq.read_table(sel.path)
        chosen = set(zip(t.column("shard").to_pylist(), t.column("index").to_pylist()))
        assert not chosen & dropped  # the selection never contains a copy
        assert len(chosen) == len(pool) - len(dropped)  # threshold 0, no balancing: everything else
        assert Selection.open(sel.path).dedup == sel.dedup
        assert sel.dedup["by_split"] == {s: len({(a, b) for a, b, sp, _ in truth if sp == s})
                                         for s in sorted({sp for *_, sp, _ in truth})}


def _store_with_pool_copies(root, seed: int = 0) -> np.ndarray:
    """A store of random hashes with copies within the pool planted: groups of exact copies (the same
    content hash and pHash), images 1..8 bits from another pool image, and a cluster of hashes each
    a few bits from the last (a chain: near copies of near copies). Returns the pool hashes (n, 2)."""
    rng = np.random.default_rng(seed)
    total = sum(SHARDS)
    pool = rng.integers(0, 2**63, (total, 2), dtype=np.int64).astype(np.uint64) * np.uint64(2)
    rows = rng.permutation(total)
    for g in range(12):  # exact copies: 2-4 images with the same pixels
        group = rows[4 * g:4 * g + int(rng.integers(2, 5))]
        pool[group] = pool[group[0]]
    for j, row in enumerate(rows[48:108]):  # near copies of another image, 1..8 bits away
        other = rows[200 + j]
        pool[row, 1] = _flip(int(pool[other, 1]), rng.choice(64, 1 + j % 8, replace=False).tolist())
    chain = rows[120:135]
    for a, b in zip(chain[:-1], chain[1:]):
        pool[b, 1] = _flip(int(pool[a, 1]), rng.choice(64, 3, replace=False).tolist())
    write_header(root, HEADER)
    start = 0
    for i, n in enumerate(SHARDS):
        probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
        order = np.argsort(-probs, 1)[:, :2]
        write_shard(root, HEADER, i, f"s{i}", [f"img/{i}/{j}" for j in range(n)], order,
                    np.take_along_axis(probs, order, 1), hashes=pool[start:start + n])
        start += n
    return pool


@pytest.mark.parametrize("distance", [0, 3, 6])
def test_pool_copies_are_counted_as_brute_force_counts_them(tmp_path, distance):
    """The in-pool count (selection.json's dedup.pool) against all pairs of pool images: images with
    another image within the distance, those sharing their pixels, pairs of distinct hashes; the
    examples are real pairs, closest first; nothing is dropped for being copied within the pool."""
    pool = _store_with_pool_copies(tmp_path / "store")
    d = hamming(pool[:, 1][:, None], pool[None, :, 1])
    np.fill_diagonal(d, PHASH_BITS)
    near = (d <= distance).any(1)
    _, counts = np.unique(pool[:, 0], return_counts=True)
    distinct = np.unique(pool[:, 1])
    dd = hamming(distinct[:, None], distinct[None, :])
    heldout = pa.table({"split": ["test"], "index": [0], "content_hash": pa.array([1], pa.uint64()),
                        "phash": pa.array([1], pa.uint64())})  # far from every pool image: none dropped
    sel = _pairs(tmp_path, heldout, distance, None, "s")
    counted = sel.dedup["pool"]
    assert counted["counted"] and counted["distance"] == distance
    assert counted["images"] == int(near.sum()) > 30
    assert counted["exact"] == int(counts[counts > 1].sum()) and counted["exact_groups"] == 12
    assert counted["distinct_phash"] == len(distinct)
    assert counted["pairs"] == int(((dd <= distance) & (dd > 0)).sum()) // 2
    offsets = np.cumsum([0] + SHARDS)
    row = {f"img/{s}/{i}": offsets[s] + i for s in range(len(SHARDS)) for i in range(SHARDS[s])}
    examples = counted["examples"]
    assert len(examples) == 5 and [e["distance"] for e in examples] == sorted(e["distance"] for e in examples)
    for e in examples:
        a, b = row[e["key"]], row[e["other"]]
        assert a != b and d[a, b] == e["distance"] <= distance
        assert e["exact"] == (pool[a, 0] == pool[b, 0])
    assert sel.dedup["dropped"] == 0 and len(pq.read_table(sel.path)) == len(pool)  # counted, not dropped
    assert Selection.open(sel.path).dedup["pool"] == counted
    # every band layout counts the same (wide bands enumerate variants within distance // bands bits)
    store = LabelStore.open(tmp_path / "store")
    files = [str(store.store_dir / rec.file) for rec in store.shards]
    for bands in sorted({2, 3, distance + 1} - {counted["bands"]} - {b for b in (2, 3) if b > distance + 1}):
        again = count_pool_duplicates(duckdb.connect(), store, files, distance, bands=bands)
        assert again["bands"] == bands
        assert [again[k] for k in ("images", "exact", "pairs")] == [counted[k] for k in ("images", "exact", "pairs")]


def test_pool_count_over_its_budget_says_so(tmp_path):
    """A pool whose candidate pairs exceed the budget is not joined: exact copies are still counted,
    the near ones are reported as not counted."""
    pool = _store_with_pool_copies(tmp_path / "store", seed=1)
    store = LabelStore.open(tmp_path / "store")
    files = [str(store.store_dir / rec.file) for rec in store.shards if rec.rows]
    con = duckdb.connect()
    full = count_pool_duplicates(con, store, files, 6)
    small = count_pool_duplicates(con, store, files, 6, max_candidates=full["candidates"] - 1)
    _, counts = np.unique(pool[:, 0], return_counts=True)
    assert full["counted"] and not small["counted"] and small["images"] is None and small["examples"] == []
    assert small["exact"] == full["exact"] == int(counts[counts > 1].sum())
    _, same = np.unique(pool[:, 1], return_counts=True)
    assert small["identical_phash"] == full["identical_phash"] == int(same[same > 1].sum()) <= full["images"]
    assert small["candidates"] == full["candidates"] >= full["pairs"]
    empty = count_pool_duplicates(con, store, [], 6)
    assert empty["images"] == empty["exact"] == empty["pairs"] == 0 and empty["examples"] == []


def test_report_says_when_pool_copies_were_not_counted():
    from types import SimpleNamespace

    from noisystudent.report.pseudo import pool_copies_blocks

    over = {"counted": False, "images": None, "identical_phash": 1234, "exact": 1000, "distinct_phash": 98765,
            "distance": 6, "candidates": 10**9, "examples": []}
    (table,) = pool_copies_blocks([(SimpleNamespace(index=2), over)])
    assert table.rows == [["2", "not counted (>= 1,234)", "1,000", "98,765", "6"]]
    assert "1,000,000,000" in table.caption
    assert pool_copies_blocks([]) == []


def test_dedup_counts_before_threshold_and_balancing(tmp_path):
    heldout, pool = _hashed_store(tmp_path / "store", seed=3)
    path = tmp_path / "held.parquet"
    pq.write_table(heldout, path)
    plain = select_from_store(tmp_path / "store", tmp_path / "a" / "selection.parquet", threshold=0.5)
    clean = select_from_store(tmp_path / "store", tmp_path / "b" / "selection.parquet", threshold=0.5,
                              heldout=path, dedup_distance=4)
    n = sum(SHARDS)
    assert plain.dedup is None and clean.dedup["dropped"] > 0
    assert sum(clean.kept_per_class) + clean.num_below_threshold + clean.dedup["dropped"] == n
    assert sum(clean.kept_per_class) <= sum(plain.kept_per_class)
    expanded = pa.ipc.open_file(pa.memory_map(str(clean.expanded_path))).read_all()
    truth = {(s, i) for s, i, _, _ in _brute_force(heldout, pool, 4)}
    assert not truth & set(zip(expanded.column("shard").to_pylist(), expanded.column("index").to_pylist()))


def test_store_without_hashes_is_refused_clearly(tmp_path):
    write_header(tmp_path / "store", HEADER)
    for i, n in enumerate(SHARDS):
        write_shard(tmp_path / "store", HEADER, i, f"s{i}", [f"k{j}" for j in range(n)],
                    np.zeros((n, 2), np.int32), np.full((n, 2), 0.5, np.float32))
    assert LabelStore.open(tmp_path / "store").to_pseudo_labels().keys[:1] == ["k0"]  # still readable
    heldout = tmp_path / "held.parquet"
    pq.write_table(heldout_hash_table({"test": ArrayImageSet(np.zeros((2, 8, 8), np.uint8), None)}, "L"), heldout)
    with pytest.raises(DataError, match="no image hashes.*pseudo.dedup: none"):
        select_from_store(tmp_path / "store", tmp_path / "sel" / "selection.parquet", heldout=heldout)
    with pytest.raises(ConfigError, match="dedup_distance"):
        select_from_store(tmp_path / "store", tmp_path / "sel" / "selection.parquet", heldout=heldout,
                          dedup_distance=64)
    assert select_from_store(tmp_path / "store", tmp_path / "sel" / "selection.parquet").dedup is None


def test_heldout_file_holds_every_split_image(tmp_path):
    images = np.stack([np.asarray(im) for im in _digits(30, side=16)])
    sets = {"val": ArrayImageSet(images[:10], None), "test": ArrayImageSet(images[10:], None)}
    counts = write_heldout_hashes(tmp_path / "h.parquet", sets, "L")
    t = pq.read_table(tmp_path / "h.parquet")
    assert counts == {"val": 10, "test": 20} and t.num_rows == 30
    exact, phash = hash_images([Image.fromarray(a) for a in images], "L")
    assert t.column("content_hash").to_numpy().tolist() == exact.tolist()
    assert t.column("phash").to_numpy().tolist() == phash.tolist()
    assert t.column("index").to_pylist() == list(range(10)) + list(range(20))


# ------------------------------------------------------------------------------ a whole run


def test_labeler_stores_the_hashes_of_the_images_it_decodes(tmp_path):
    from _label_helpers import teacher_net, transform
    from noisystudent.data.pool import ImageSetSource
    from noisystudent.label.inference import label_to_store

    images = np.stack([np.asarray(im.convert("RGB")) for im in _smooth_rgb(23, 20)])
    source = ImageSetSource(ArrayImageSet(images, None), shard_size=8)
    m = label_to_store(teacher_net(), source, tmp_path / "store", transform=transform(), num_classes=10, teacher="t",
                       device="cpu", num_workers=1, batch_size=5, progress=False, precision="fp32")
    assert m.run["image_hashes"] and m.run["decode"]["reason"] == "image hashes need the image decoded on the CPU"
    t = pq.read_table(tmp_path / "store" / "shards")
    exact, phash = hash_images([Image.fromarray(a) for a in images], "RGB")  # at 20 px, not the 8 px input
    order = np.argsort([int(k) for k in t.column("key").to_pylist()])
    assert t.column("content_hash").to_numpy()[order].tolist() == exact.tolist()
    assert t.column("phash").to_numpy()[order].tolist() == phash.tolist()
    label_to_store(teacher_net(), source, tmp_path / "plain", transform=transform(), num_classes=10, teacher="t",
                   device="cpu", num_workers=0, progress=False, precision="fp32", hashes=False)
    assert "phash" not in pq.read_table(tmp_path / "plain" / "shards").column_names


def test_run_drops_planted_copies_of_test_images(tmp_path, tiny_overrides, caplog):
    """A digits run whose pool folder holds copies of test images (exact, resized, JPEG q75): the
    select stage drops exactly the pool images within the distance of a val/test image (checked
    against hashes computed here), the planted ones among them, and says so; it counts the pool
    images that have a copy elsewhere in the pool (planted too), and says so."""
    import json
    import logging

    from noisystudent import pipeline
    from noisystudent.config.schema import load_config
    from noisystudent.data.splits import build_splits
    from noisystudent.report.document import fmt_int

    overrides = [o for o in tiny_overrides if not o.startswith("data.max_unlabeled")] + ["students=[{model: ns_cnn_s}]"]
    cfg = load_config(None, overrides)
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=False, log_splits=False)
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(120):  # ordinary pool images: digits that are in no split
        splits.unlabeled.load(i).save(pool / f"u{i:03d}.png")
    for i in range(4):  # copies within the pool (resized; the u*.png are already exact copies of the
        # digits moved to the pool): counted, not dropped
        splits.unlabeled.load(i).resize((32, 32), Image.BICUBIC).save(pool / f"c{i}-resized.png")
    planted = {}
    for j, t in enumerate(range(0, len(splits.test), 7)):
        img, kind = splits.test.load(t), ("exact", "resized", "jpeg")[j % 3]
        if kind == "exact":
            img.save(pool / f"x{j:02d}-{kind}.png")
        elif kind == "resized":
            img.resize((32, 32), Image.BICUBIC).save(pool / f"x{j:02d}-{kind}.png")
        else:
            img.resize((32, 32), Image.BICUBIC).save(pool / f"x{j:02d}-{kind}.jpg", quality=75)
        planted[f"x{j:02d}-{kind}.{'jpg' if kind == 'jpeg' else 'png'}"] = t
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="noisystudent"):
        pipeline.run_pipeline(load_config(None, overrides + [f"data.unlabeled={pool}", "pseudo.shard_size=256",
                                                             "pseudo.balance=false"]), run, progress=False)

    summary = json.loads((run / "select-1" / "selection.json").read_text())["dedup"]
    # the reference, by brute force: every pool image (the folder, and the digits moved to the pool
    # by labels_per_class) against every val/test image
    names = sorted(p.name for p in pool.iterdir())
    in_dataset = [splits.unlabeled.load(i) for i in range(len(splits.unlabeled))]
    pool_exact, pool_phash = hash_images([Image.open(pool / n) for n in names] + in_dataset, "L")
    close = np.zeros(len(pool_exact), bool)
    for images in (splits.val, splits.test):
        e, p = hash_images([images.load(i) for i in range(len(images))], "L")
        close |= (hamming(pool_phash[:, None], p[None, :]) <= cfg.pseudo.dedup_distance).any(1)
        close |= np.isin(pool_exact, e)
    expected = {n for n, c in zip(names, close) if c}
    assert set(planted) <= expected  # every planted copy is within the distance
    assert summary["dropped"] == int(close.sum()) > len(planted)
    assert summary["heldout"] == {"test": len(splits.test), "val": len(splits.val)}
    assert summary["exact"] >= sum(k.endswith("exact.png") for k in planted)
    t = pq.read_table(run / "select-1" / "selection.parquet")
    keys = t.column("key").to_pylist()
    assert not {k.rsplit("/", 1)[-1] for k in keys} & expected  # the student never sees a copy
    assert len(t) == len(close) - int(close.sum())  # threshold 0, no balancing: all the rest is kept
    assert sum(k.rsplit("/", 1)[-1] in names for k in keys) == len(names) - len(expected)
    for e in summary["examples"]:
        name = e["key"].rsplit("/", 1)[-1]
        if name in planted:
            assert e["split"] == "test" and e["heldout_index"] == planted[name]
    assert f"dropped {int(close.sum())} of {len(close)} pool image(s)" in caplog.text
    assert (run / "select-1" / "heldout_hashes.parquet").is_file()
    # copies within the pool, by brute force over every pair of pool images
    pool_d = hamming(pool_phash[:, None], pool_phash[None, :])
    np.fill_diagonal(pool_d, 64)
    copied = (pool_d <= cfg.pseudo.dedup_distance).any(1)
    _, repeats = np.unique(pool_exact, return_counts=True)
    counted = summary["pool"]
    assert counted["counted"] and counted["images"] == int(copied.sum())
    assert counted["exact"] == int(repeats[repeats > 1].sum()) >= 2 * 120
    assert all(c for n, c in zip(names, copied) if n.startswith("c"))  # the planted resized copies
    assert f"{counted['images']} of {len(close)} pool image(s) have a copy elsewhere in the pool" in caplog.text
    report = (run / "report" / "report.md").read_text()  # the pseudo-label section's pool hygiene table
    section = report[report.index("Pool hygiene: copies of held-out images"):]
    assert f"| 1 | {summary['dropped']} | {summary['exact']} | {summary['near']} |" in section
    assert f"`{summary['examples'][0]['key']}`" in section
    assert (f"| 1 | {fmt_int(counted['images'])} | {fmt_int(counted['exact'])} | "
            f"{fmt_int(counted['distinct_phash'])} | {cfg.pseudo.dedup_distance} |") in section
    assert f"`{counted['examples'][0]['key']}` | `{counted['examples'][0]['other']}`" in section
