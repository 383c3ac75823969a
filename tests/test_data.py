import gzip
import logging
import struct

import numpy as np
import pytest
from PIL import Image

from noisystudent.config.schema import DataConfig
from noisystudent.data.datasets import (class_folder_samples, convert_image, is_image_file, load_fashion_mnist,
                                        read_idx, scan_class_folder)
from noisystudent.data.splits import build_splits
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


def _odd_class_folder(root):
    """Class folders with everything ImageFolder has a convention for: class names that sort by
    case, mixed-case extensions, non-image and hidden files, nested folders whose names sort
    differently as strings and as path parts, a hidden class, a symlinked file and folder."""
    png = lambda path: (path.parent.mkdir(parents=True, exist_ok=True),  # noqa: E731
                        Image.new("RGB", (4, 4), (9, 9, 9)).save(path, format="PNG"))
    for rel in ("B/1.PNG", "B/0.Jpg", "B/x.jpeg", "a/2.png", "a/.hidden.png", "a/x-y/0.png", "a/x/0.png",
                "a/x/deep/er/9.TIFF", "c/0.webp", ".extra/0.png", "outside/0.bmp", "outside/sub/1.png"):
        png(root / rel)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    (root / "B" / "png").write_bytes(b"\0")  # named like an extension, but has none
    (root / "c" / "link.png").symlink_to(root / "a" / "2.png")
    (root / "c" / "linked").symlink_to(root / "outside", target_is_directory=True)
    return root


def test_class_folders_are_read_exactly_as_torchvision_image_folder_reads_them(tmp_path, caplog):
    from torchvision.datasets import ImageFolder

    from noisystudent.data.pool import FolderSource

    root = _odd_class_folder(tmp_path / "train")
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        samples, classes = class_folder_samples(root, "train")
    # the files passed over are said, not dropped silently: B/png, a/.DS_Store, a/notes.txt
    assert f"train folder {root}: skipped 3 file(s) that are not images by extension (B/png, a/.DS_Store, " \
           "a/notes.txt)" in caplog.text
    ref = ImageFolder(str(root))
    assert classes == ref.classes == [".extra", "B", "a", "c", "outside"]
    assert [(str(p), i) for p, i in samples] == ref.samples
    assert "a/notes.txt" not in str(samples) and f"{root}/a/.hidden.png" in [str(p) for p, _ in samples]
    paths, targets, names = scan_class_folder(root, "train")
    assert [(str(p), int(t)) for p, t in zip(paths, targets)] == ref.samples and names == ref.classes
    # Our one addition, .gif (in any case), is the only difference from ImageFolder's list.
    Image.new("RGB", (4, 4)).save(root / "a" / "x" / "1.GIF", format="GIF")
    with_gif, _ = class_folder_samples(root, "train")
    assert [(str(p), i) for p, i in with_gif] == ImageFolder(str(root), is_valid_file=is_image_file).samples
    assert len(with_gif) == len(ref.samples) + 1 and len(ImageFolder(str(root)).samples) == len(ref.samples)
    # The unlabeled folder pool tells images by the same rule (it does not follow symlinked folders).
    pool = FolderSource(root)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        pool.prepare(tmp_path / "listing")
    assert f"unlabeled folder {root}: skipped 3 file(s) that are not images" in caplog.text
    assert f"unlabeled folder {root}: skipped 1 symlinked folder(s), not followed (they could loop) (c/linked)" \
        in caplog.text
    keys = {k for shard in range(pool.num_shards) for k, _ in pool.iter_shard(shard)}
    assert keys == {str(p.relative_to(root)) for p, _ in with_gif if "c/linked" not in str(p)}


def test_empty_or_missing_class_folders_fail_in_one_line_naming_the_folder(tmp_path):
    root = make_folder(tmp_path / "train", n=1)
    (root / "dog" / "0.png").rename(root / "dog" / "0.txt")  # only a non-image file: nothing is dropped silently
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are classes, as in ImageFolder
    with pytest.raises(DataError, match=r"^train class folder \S+/train/\.ipynb_checkpoints contains no images "
                                        r"\(and 1 more empty class folders\)$"):
        scan_class_folder(root, "train")
    samples, classes = class_folder_samples(root, "evaluation", allow_empty=True)
    assert classes == [".ipynb_checkpoints", "cat", "dog"] and samples == [(root / "cat" / "0.png", 1)]
    with pytest.raises(DataError, match=r"^test folder not found: \S+/nowhere$"):
        scan_class_folder(tmp_path / "nowhere", "test")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "0.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"^val folder \S+/flat has no class subfolders$"):
        scan_class_folder(tmp_path / "flat", "val")


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
        moved = build_splits(DataConfig(labels_per_class=5, val_per_class=10, test_per_class=40), seed=0,
                             log_splits=True)
    assert moved.describe()["num_labels_moved_to_pool"] == len(moved.unlabeled) == 1797 - 100 - 400 - 50
    assert "kept 50 labeled training images and moved 1247 to the unlabeled pool" in caplog.text


def test_each_file_is_decoded_once_and_the_mean_std_is_what_decoding_each_image_again_gives(tmp_path, monkeypatch):
    """The data scan (issue 28): the labeled check keeps the pixels the mean/std is taken from, and
    a test folder that is the val folder is checked once; the statistics are the old ones exactly."""
    import noisystudent.data.datasets as datasets
    import noisystudent.data.splits as splits

    make_folder(tmp_path / "train", n=30, mode="RGB")
    make_folder(tmp_path / "val", n=4)
    decoded = []
    real_read = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda path, mode: decoded.append(path) or real_read(path, mode))
    monkeypatch.setattr(splits, "STATS_LIMIT", 50)  # fewer than the 60 labeled images: a sample, as at scale
    cfg = folder_cfg(tmp_path, val_dir=str(tmp_path / "val"), test_dir=str(tmp_path / "val"), val_per_class=None)
    s = build_splits(cfg, seed=0)
    assert len(s.labeled) == 60 and len(s.val) == len(s.test) == 8
    assert len(decoded) == len(set(decoded)) == 68  # every file once: labeled (stats included), val = test
    # what the statistics were before: each of the first 50 labeled images decoded again, as float64
    arrs = [np.asarray(convert_image(s.labeled.load(i), "RGB"), dtype=np.float64) / 255.0 for i in range(50)]
    flat = np.concatenate([a.reshape(-1, 3) for a in arrs])
    assert s.mean == tuple(float(v) for v in flat.mean(0))
    assert s.std == tuple(float(v) for v in np.maximum(flat.std(0), 1e-3))
    assert splits.image_stats(s.labeled, 3, limit=50) == (s.mean, s.std)  # no pixels given: loaded


def test_a_bad_file_is_still_named_when_its_pixels_are_kept_for_the_statistics(tmp_path):
    make_folder(tmp_path / "train", n=3)
    make_folder(tmp_path / "test", n=2)
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"unreadable image .*cat/1\.png"):
        build_splits(folder_cfg(tmp_path, val_per_class=1, unlabeled_dir=None), seed=0, require_unlabeled=False)
