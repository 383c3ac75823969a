"""Data sources as image sets: digits, Fashion-MNIST, torchvision datasets, class folders.

Every source becomes an :class:`ImageSet` (index -> PIL image, optional integer targets). Small
datasets stay in memory as uint8 arrays; image folders load lazily from disk. Transforms are
applied by :class:`TransformedSet`, so labeling sees clean images and training sees noisy ones.
:mod:`noisystudent.data.splits` carves the labeled, unlabeled, validation and test splits.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from ..config.schema import DataConfig
from ..runtime.errors import DataError, error_reason

# torchvision ImageFolder's list plus .gif, which PIL reads and earlier versions read: never drop a user's images
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
log = logging.getLogger("noisystudent")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


class ImageSet(Dataset):
    """A sequence of images with optional integer targets. Subclasses implement ``load``."""

    targets: np.ndarray | None
    mode: str  # PIL mode returned by load: "L" or "RGB"

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def key(self, index: int) -> str:
        """A stable identifier of the image (its path, or its index in the source)."""
        return str(index)

    def __getitem__(self, index: int):
        target = -1 if self.targets is None else int(self.targets[index])
        return self.load(index), target


class ArrayImageSet(ImageSet):
    """Images held in memory as a uint8 array of shape (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray | None, keys: Sequence[str] | None = None):
        if images.dtype != np.uint8:
            raise DataError(f"image array must be uint8, got {images.dtype}")
        self.images = images
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.mode = "L" if images.ndim == 3 else "RGB"
        self._keys = keys

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], self.mode)

    def key(self, index: int) -> str:
        return self._keys[index] if self._keys is not None else str(index)


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image (CMYK, 16-bit, RGBA, palette, grayscale) to ``mode`` ("L" or "RGB")."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: PIL's convert("L") clips instead of scaling, so scale by hand.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != mode:
        img = img.convert(mode)
    return img


def read_image(path: Path, mode: str) -> Image.Image:
    """Open and decode one image file, raising :class:`DataError` naming the file if it is bad."""
    try:
        with Image.open(path) as im:
            im.load()
            return convert_image(im, mode)
    except Image.DecompressionBombError as e:  # not an OSError: PIL refuses to decode it at all
        raise DataError(f"image {path} is too large to decode ({e}); remove it or shrink it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else error_reason(e)
        raise DataError(f"unreadable image {path}: {reason}") from None


class FileImageSet(ImageSet):
    """Images loaded lazily from files; a bad file raises :class:`DataError` naming it."""

    def __init__(self, paths: Sequence[Path], targets: np.ndarray | None, mode: str = "RGB"):
        self.paths = [Path(p) for p in paths]
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return read_image(self.paths[index], self.mode)

    def key(self, index: int) -> str:
        return str(self.paths[index])


class SubsetImageSet(ImageSet):
    """A view of some indices of another image set."""

    def __init__(self, base: ImageSet, indices: np.ndarray, drop_targets: bool = False):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mode = base.mode
        self.targets = None if (drop_targets or base.targets is None) else base.targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.base.load(int(self.indices[index]))

    def key(self, index: int) -> str:
        return self.base.key(int(self.indices[index]))


class TransformedSet(Dataset):
    """Applies an image transform; yields ``(tensor, target)``. ``targets`` may be soft (N, C)."""

    def __init__(self, images: ImageSet, transform: Callable, targets: np.ndarray | None = None,
                 index: np.ndarray | None = None):
        self.images = images
        self.transform = transform
        self.index = np.arange(len(images)) if index is None else np.asarray(index, dtype=np.int64)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = int(self.index[i])
        x = self.transform(self.images.load(j))
        if self.targets is not None:
            return x, torch.as_tensor(self.targets[i])
        t = self.images.targets
        return x, (-1 if t is None else int(t[j]))


# ------------------------------------------------------------------------------ sources


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's embedded 8x8 digits as uint8 images (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, d.target.astype(np.int64), [str(i) for i in range(10)]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"unreadable IDX file {path}: {e}") from None


def load_fashion_mnist(root: str | None, download: bool) -> tuple[ArrayImageSet, ArrayImageSet]:
    """Fashion-MNIST train (60k) and test (10k) from IDX files: ``root``, the Debian package
    ``dataset-fashion-mnist``, or torchvision's downloader when ``download`` is set."""
    candidates = [Path(root)] if root else [Path(FASHION_MNIST_DEBIAN)]
    if root and (Path(root) / "FashionMNIST" / "raw").is_dir():
        candidates.insert(0, Path(root) / "FashionMNIST" / "raw")  # torchvision's layout
    for folder in candidates:
        files = {}
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            for suffix in ("", ".gz"):
                if (folder / (stem + suffix)).is_file():
                    files[stem] = folder / (stem + suffix)
                    break
        if len(files) == 4:
            train = ArrayImageSet(read_idx(files["train-images-idx3-ubyte"]),
                                  read_idx(files["train-labels-idx1-ubyte"]))
            test = ArrayImageSet(read_idx(files["t10k-images-idx3-ubyte"]),
                                 read_idx(files["t10k-labels-idx1-ubyte"]))
            return train, test
    if download:
        from torchvision.datasets import FashionMNIST

        dl_root = root or str(Path.home() / ".cache" / "noisystudent")
        tr, te = FashionMNIST(dl_root, train=True, download=True), FashionMNIST(dl_root, train=False, download=True)
        return (ArrayImageSet(tr.data.numpy(), tr.targets.numpy()),
                ArrayImageSet(te.data.numpy(), te.targets.numpy()))
    where = root or FASHION_MNIST_DEBIAN
    raise DataError(f"Fashion-MNIST IDX files not found in {where} "
                    "(apt-get install dataset-fashion-mnist, set data.root, or set data.download=true)")


def is_image_file(name: str) -> bool:
    """torchvision's rule: the name ends in one of :data:`IMAGE_EXTENSIONS`, in any case."""
    return has_file_allowed_extension(name, IMAGE_EXTENSIONS)


NOT_IMAGES = "file(s) that are not images by extension"


class SkippedFiles:
    """What a folder scan passed over: counted, the first few named, and said once in
    :meth:`report` (a default never silently discards a user's data). ``kind`` says what they are;
    non-image files get the list of extensions that count as images."""

    def __init__(self, kind: str = NOT_IMAGES, keep: int = 3):
        self.kind, self.count, self.first, self.keep = kind, 0, [], keep
        self.control_count, self.control_first = 0, []  # names with a line break or control character

    def add(self, path: str) -> None:
        if self.kind == NOT_IMAGES and any(ch < " " or ch == "\x7f" for ch in path):  # "cat.png\n": not by extension
            self.control_count += 1
            if len(self.control_first) < self.keep:
                self.control_first.append(repr(path))  # quoted, so the warning stays one line
            return
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(path)

    def report(self, where: str) -> None:
        if self.count:
            hint = f"; images end in {', '.join(IMAGE_EXTENSIONS)}" if self.kind == NOT_IMAGES else ""
            log.warning(f"{where}: skipped {self.count} {self.kind} "
                        f"({', '.join(self.first)}{', ...' if self.count > len(self.first) else ''}){hint}")
        if self.control_count:
            more = ", ..." if self.control_count > len(self.control_first) else ""
            log.warning(f"{where}: skipped {self.control_count} file(s) whose name holds a line break or other "
                        f"control character ({', '.join(self.control_first)}{more}); rename them to use them")


def class_folder_samples(root: str | Path, what: str,
                         allow_empty: bool = False) -> tuple[list[tuple[Path, int]], list[str]]:
    """``root/<class>/**/<image>`` by torchvision's ``find_classes`` / ``make_dataset``, so classes,
    indices and samples are exactly ``ImageFolder(root).classes`` / ``.samples`` (hidden files and
    folders included, symlinks followed), plus ``.gif``. Errors are one line naming the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} folder not found: {root}")
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise DataError(f"{what} folder {root} has no class subfolders") from None
    except OSError as e:
        raise DataError(f"{what} folder {root} cannot be read: {e.strerror or e}") from None
    skipped = SkippedFiles()

    def take(path: str) -> bool:  # make_dataset's one walk both picks the images and counts the rest
        if is_image_file(path):
            return True
        skipped.add(os.path.relpath(path, root))
        return False

    # allow_empty=True: an empty class is refused below, naming its folder (torchvision's message names neither)
    samples = make_dataset(str(root), class_to_idx, is_valid_file=take, allow_empty=True)
    skipped.report(f"{what} folder {root}")
    if not allow_empty:
        found = {idx for _, idx in samples}
        empty = [c for c in classes if class_to_idx[c] not in found]
        if empty:
            more = f" (and {len(empty) - 1} more empty class folders)" if len(empty) > 1 else ""
            raise DataError(f"{what} class folder {root / empty[0]} contains no images{more}")
    return [(Path(p), idx) for p, idx in samples], classes


def scan_class_folder(root: str | Path, what: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """A labeled image folder: one subfolder per class, none empty. Errors name the folder at fault."""
    samples, classes = class_folder_samples(root, what)
    return [p for p, _ in samples], np.asarray([t for _, t in samples], dtype=np.int64), classes


def load_torchvision(name: str, root: str | None, download: bool):
    """Labeled train, official test and (where the dataset has one) unlabeled split, as image sets."""
    import torchvision.datasets as tvd

    root = root or str(Path.home() / ".cache" / "noisystudent")
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
            return (ArrayImageSet(tr.data, np.asarray(tr.targets)), ArrayImageSet(te.data, np.asarray(te.targets)),
                    None, list(tr.classes))
        if name == "svhn":
            tr = tvd.SVHN(root, split="train", download=download)
            te = tvd.SVHN(root, split="test", download=download)
            ex = tvd.SVHN(root, split="extra", download=download)
            hwc = lambda d: np.ascontiguousarray(d.data.transpose(0, 2, 3, 1))  # noqa: E731
            return (ArrayImageSet(hwc(tr), tr.labels), ArrayImageSet(hwc(te), te.labels),
                    ArrayImageSet(hwc(ex), None), [str(i) for i in range(10)])
        if name == "stl10":
            tr = tvd.STL10(root, split="train", download=download)
            te = tvd.STL10(root, split="test", download=download)
            un = tvd.STL10(root, split="unlabeled", download=download)
            hwc = lambda d: np.ascontiguousarray(d.data.transpose(0, 2, 3, 1))  # noqa: E731
            return (ArrayImageSet(hwc(tr), tr.labels), ArrayImageSet(hwc(te), te.labels),
                    ArrayImageSet(hwc(un), None), list(tr.classes))
    except RuntimeError as e:
        raise DataError(f"torchvision dataset {name} not available in {root}: {error_reason(e)} "
                        "(set data.download=true when online)") from None
    raise DataError(f"unknown torchvision dataset {name!r}")


@dataclass
class LoadedSource:
    """A data source as loaded, before any split is carved from its training images."""

    train: ImageSet  # the labeled training images (test, validation and pool are carved from them)
    classes: list[str]
    test: ImageSet | None = None  # the source's own test split (None: held out of train)
    val: ImageSet | None = None  # the source's own validation split (None: held out of train)
    extra_unlabeled: ImageSet | None = None  # a dataset's own unlabeled split (SVHN extra, STL-10)


def load_source(cfg: DataConfig) -> LoadedSource:
    """The configured source's images: training images and whatever splits it brings."""
    if cfg.source == "digits":
        images, targets, classes = load_digits_arrays()
        return LoadedSource(ArrayImageSet(images, targets), classes)
    if cfg.source == "fashion-mnist":
        train, test = load_fashion_mnist(cfg.root, cfg.download)
        return LoadedSource(train, list(FASHION_MNIST_CLASSES), test=test)
    if cfg.source == "torchvision":
        train, test, extra_unlabeled, classes = load_torchvision(cfg.name, cfg.root, cfg.download)
        return LoadedSource(train, classes, test=test, extra_unlabeled=extra_unlabeled)
    if cfg.source == "image-folder":
        return _load_image_folders(cfg)
    raise DataError(f"unknown data source {cfg.source!r}")  # guarded by config validation


def _load_image_folders(cfg: DataConfig) -> LoadedSource:
    """The train folder and the test / val folders where given, which must name the same classes."""
    mode = "L" if cfg.channels == 1 else "RGB"
    paths, targets, classes = scan_class_folder(cfg.train_dir, "train")
    if len(classes) < 2:
        raise DataError(f"train folder {cfg.train_dir} has only one class ({classes[0]}); "
                        "a classifier needs at least two")
    source = LoadedSource(FileImageSet(paths, targets, mode), classes)
    for split_dir, what in ((cfg.test_dir, "test"), (cfg.val_dir, "val")):
        if split_dir is None:
            continue
        p, t, c = scan_class_folder(split_dir, what)
        if c != classes:
            raise DataError(f"{what} folder {split_dir} has classes {c}, which differ from train "
                            f"folder {cfg.train_dir} ({classes})")
        setattr(source, what, FileImageSet(p, t, mode))
    return source


class ConcatImageSet(ImageSet):
    """Several image sets end to end, without targets (used for the unlabeled pool)."""

    def __init__(self, parts: list[ImageSet], mode: str):
        self.parts = parts
        self.mode = mode
        self.targets = None
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[ImageSet, int]:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.parts[part], index - int(self.offsets[part])

    def load(self, index: int) -> Image.Image:
        part, i = self._locate(index)
        return convert_image(part.load(i), self.mode)

    def key(self, index: int) -> str:
        part, i = self._locate(index)
        return part.key(i)


def concat_image_sets(parts: list[ImageSet], mode: str) -> ImageSet:
    """The parts as one image set without targets (one part: itself, its targets dropped)."""
    if len(parts) == 1:
        return SubsetImageSet(parts[0], np.arange(len(parts[0])), drop_targets=True)
    return ConcatImageSet(parts, mode)
