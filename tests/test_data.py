import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from noisystudent.config.schema import DataConfig
from noisystudent.data.datasets import build_splits, convert_image, load_fashion_mnist, read_idx
from noisystudent.runtime.errors import DataError


def make_folder(root, classes=("cat", "dog"), n=12, size=12, mode="RGB"):
    for c_idx, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            color = (c_idx * 100 + i * 5) % 256
            Image.new(mode, (size, size), color=color if mode == "L" else (color, 50, 200 - color)).save(
                root / c / f"{i}.png")
    return root


def folder_cfg(tmp_path, **kw):
    base = dict(source="image-folder", train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"),
                unlabeled_dir=str(tmp_path / "pool"), labels_per_class=None, val_per_class=2, image_size=12)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def folders(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", n=3)
    make_folder(tmp_path / "pool" / "deep" / "er", classes=("x",), n=5)
    return tmp_path


def test_digits_splits_are_disjoint_and_sized():
    s = build_splits(DataConfig(labels_per_class=5, val_per_class=10, test_per_class=40), seed=0)
    assert len(s.labeled) == 50 and len(s.val) == 100 and len(s.test) == 400
    assert len(s.labeled) + len(s.val) + len(s.test) + len(s.unlabeled) == 1797
    sets = [set(x.indices.tolist()) for x in (s.labeled, s.val, s.test)]
    pool = set(s.unlabeled.base.indices[s.unlabeled.indices].tolist())
    assert all(a.isdisjoint(b) for i, a in enumerate(sets + [pool]) for b in (sets + [pool])[i + 1:])
    assert s.labeled.targets.tolist().count(3) == 5
    assert s.unlabeled.targets is None


def test_image_folder_splits(folders):
    from noisystudent.data.pool import FolderSource, build_pool, pool_size

    cfg = folder_cfg(folders)
    s = build_splits(cfg, seed=0)
    assert s.classes == ["cat", "dog"] and s.channels == 3
    # The folder pool is never listed by build_splits: the pool streams it (recursively).
    assert len(s.labeled) == 20 and len(s.val) == 4 and len(s.test) == 6 and len(s.unlabeled) == 0
    pool = build_pool(cfg, s.unlabeled, shard_size=2)
    assert isinstance(pool, FolderSource)
    pool.prepare(folders / "listing")
    assert pool_size(pool) == 5 and pool.num_shards == 3
    keys = [k for shard in range(pool.num_shards) for k, _ in pool.iter_shard(shard)]
    assert keys == [f"deep/er/x/{i}.png" for i in range(5)]


def test_fashion_mnist_idx_reader(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 3, 4) + imgs.tobytes())
    assert np.array_equal(read_idx(path), imgs)
    (tmp_path / "bad-idx1-ubyte").write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match="bad-idx1-ubyte"):
        read_idx(tmp_path / "bad-idx1-ubyte")
    with pytest.raises(DataError, match="Fashion-MNIST IDX files not found in"):
        load_fashion_mnist(str(tmp_path / "nowhere"), download=False)


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "RGBA", "P", "L", "LA", "1"])
def test_any_image_mode_converts(mode):
    img = Image.new(mode, (5, 5))
    assert convert_image(img, "RGB").mode == "RGB"
    assert convert_image(img, "L").mode == "L"


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    arr = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    out = np.asarray(convert_image(Image.fromarray(arr), "L"))
    assert 120 <= out.mean() <= 135


def test_labels_per_class_keeps_every_label_by_default_and_says_what_it_moves(caplog):
    """The schema default keeps every label; a number moves the rest of the labeled images to the
    pool, and both the log and data.json (DataSplits.describe) say how many."""
    import logging

    assert DataConfig().labels_per_class is None
    with caplog.at_level(logging.INFO, logger="noisystudent"):
        kept = build_splits(DataConfig(val_per_class=10, test_per_class=40), seed=0, require_unlabeled=False)
    assert len(kept.labeled) == 1797 - 100 - 400 and len(kept.unlabeled) == 0
    assert kept.describe()["num_labels_moved_to_pool"] is None and "moved" not in caplog.text
    with caplog.at_level(logging.INFO, logger="noisystudent"):
        moved = build_splits(DataConfig(labels_per_class=5, val_per_class=10, test_per_class=40), seed=0)
    assert moved.describe()["num_labels_moved_to_pool"] == len(moved.unlabeled) == 1797 - 100 - 400 - 50
    assert "kept 50 labeled training images and moved 1247 to the unlabeled pool" in caplog.text
