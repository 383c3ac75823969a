"""Evaluation on the released datasets, read as they are: ImageNet-C (JPEG folders), CIFAR-10-C
(``.npy`` arrays), ImageNet-A and any labelled folder of hard images.

Layouts:
    ImageNet-C   <root>/<corruption>/<severity>/<wnid>/*.JPEG  (224 x 224, evaluated as is)
    CIFAR-10-C   <root>/<corruption>.npy  (5 x 10000 images, severity 1 first) and labels.npy
    ImageNet-A   <root>/<wnid>/*.jpg  (200 of the 1000 ImageNet classes)
    hard images  <root>/<class>/*  (class = a name from ``class_names`` or an integer index)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..data.datasets import class_folder_samples
from ..runtime.errors import DataError
from ..runtime.progress import progress_bar
from .attacks import NormalizedModel
from .corruptions import ALL_CORRUPTIONS, CORRUPTIONS
from .metrics import (ALEXNET_CORRUPTION_ERRORS, corruption_errors_to_ce, mce, mean_corruption_error,
                      relative_ce, topk_hits)

_WNID = re.compile(r"^n\d{8}$")


def imagenet_wnid_to_index() -> dict[str, int]:
    """ImageNet-1k WordNet id -> class index, from timm's bundled class list (no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {info.index_to_label_name(i): i for i in range(info.num_classes())}


def imagenet_a_mask(wnids: Sequence[str]) -> torch.Tensor:
    """ImageNet-1k indices of ``wnids`` (e.g. the 200 ImageNet-A folders), in the given order.

    ``logits[:, mask]`` restricts a 1000-class model to those classes; the argmax over the
    restricted logits is a position in ``wnids``.
    """
    table = imagenet_wnid_to_index()
    missing = [w for w in wnids if w not in table]
    if missing:
        raise DataError(f"not ImageNet-1k WordNet ids: {missing[:5]}")
    return torch.tensor([table[w] for w in wnids], dtype=torch.long)


class ImageFiles(Dataset):
    """(path, label) pairs decoded to float [0, 1] tensors (C, H, W), optionally resized (shorter
    side) and centre-cropped; greyscale or RGB by ``channels``."""

    def __init__(self, items: Sequence[tuple[Path, int]], resize: int | None = None, crop: int | None = None,
                 channels: int = 3):
        self.items = list(items)
        self.resize, self.crop = resize, crop
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(self.mode))
        except Exception as exc:  # corrupt or unsupported file
            raise DataError(f"cannot read image {path}: {exc}") from exc
        img = torch.from_numpy(arr.copy())
        img = img[None] if img.dim() == 2 else img.permute(2, 0, 1)
        if self.resize:
            img = TF.resize(img, [self.resize], antialias=True)
        if self.crop and (img.shape[-2] != self.crop or img.shape[-1] != self.crop):
            img = TF.center_crop(img, [self.crop, self.crop])
        return img.float() / 255, label


def _limit(items: list, max_images: int | None) -> list:
    if max_images is None or len(items) <= max_images:
        return items
    idx = np.linspace(0, len(items) - 1, max_images).round().astype(int)  # spread over classes
    return [items[i] for i in idx]


@torch.inference_mode()
def _accuracy(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int, num_workers: int,
              mask: torch.Tensor | None, progress: bool, desc: str) -> dict:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    top1 = top5 = n = 0
    for x, y in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
        logits = model(x.to(device)).float()
        if mask is not None:
            logits = logits[:, mask.to(device)]
        h1, h5 = topk_hits(logits, y.to(device))
        top1 += h1.sum().item()
        top5 += h5.sum().item()
        n += len(y)
    if n == 0:
        raise DataError(f"{desc}: no images")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "error": 100.0 - 100.0 * top1 / n, "n": n}


def _prepare(model: nn.Module, mean, std, device) -> tuple[nn.Module, bool]:
    wrapped = NormalizedModel(model, mean, std).to(device)
    was_training = model.training
    wrapped.eval()
    return wrapped, was_training


def evaluate_imagenet_a(model: nn.Module, root: str | Path, mean=None, std=None,
                        device: torch.device | str = "cpu", batch_size: int = 64, image_size: int = 224,
                        resize: int | None = 256, max_images: int | None = None, num_workers: int = 0,
                        progress: bool = True) -> dict:
    """Top-1 / top-5 (%) of a 1000-class ImageNet model on ImageNet-A (or any folder of ImageNet
    classes named by WordNet id), with the logits restricted to the classes present.

    Images are resized (shorter side ``resize``) and centre-cropped to ``image_size``.
    """
    items, wnids = class_folder_samples(root, "evaluation", allow_empty=True)
    mask = imagenet_a_mask(wnids)
    dataset = ImageFiles(_limit(items, max_images), resize=resize, crop=image_size)
    device = torch.device(device)
    wrapped, was_training = _prepare(model, mean, std, device)
    try:
        res = _accuracy(wrapped, dataset, device, batch_size, num_workers, mask, progress, "imagenet-a")
    finally:
        model.train(was_training)
    return {**res, "kind": "imagenet-a", "num_classes": len(wnids)}


def evaluate_image_folder(model: nn.Module, root: str | Path, mean=None, std=None,
                          class_names: Sequence[str] | None = None, device: torch.device | str = "cpu",
                          batch_size: int = 64, image_size: int | None = None, resize: int | None = None,
                          channels: int = 3, max_images: int | None = None, num_workers: int = 0,
                          progress: bool = True) -> dict:
    """Top-1 / top-5 (%) on a labelled folder of hard images, ``<root>/<class>/*``.

    Folder names are mapped to model outputs through ``class_names`` (the model's class list),
    else read as integer indices; folders named by WordNet id with a 1000-class model go through
    :func:`evaluate_imagenet_a`. When the folders cover fewer classes than the model predicts,
    the logits are restricted to those classes (the ImageNet-A protocol).
    """
    items, names = class_folder_samples(root, "evaluation", allow_empty=True)
    if class_names is None and all(_WNID.match(n) for n in names):
        return evaluate_imagenet_a(model, root, mean, std, device, batch_size, image_size or 224,
                                   resize if resize is not None else 256, max_images, num_workers, progress)
    if class_names is not None:
        lookup = {c: i for i, c in enumerate(class_names)}
        unknown = [n for n in names if n not in lookup]
        if unknown:
            raise DataError(f"folders not among the class names: {unknown[:5]}")
        indices = [lookup[n] for n in names]
    elif all(n.isdigit() for n in names):
        indices = [int(n) for n in names]
    else:
        raise DataError(f"cannot map folder names to classes (pass class_names): {names[:5]}")
    mask = torch.tensor(indices, dtype=torch.long)
    dataset = ImageFiles(_limit(items, max_images), resize=resize, crop=image_size, channels=channels)
    device = torch.device(device)
    wrapped, was_training = _prepare(model, mean, std, device)
    try:
        res = _accuracy(wrapped, dataset, device, batch_size, num_workers, mask, progress, "hard images")
    finally:
        model.train(was_training)
    return {**res, "kind": "folder", "num_classes": len(indices)}


def _corruption_summary(errors: dict[str, list[float]], severities: Sequence[int], normalizer: str | None,
                        clean_error: float | None) -> dict:
    """Shared result layout of the corruption suites; ``errors`` in fractions, output in %."""
    out: dict = {"severities": list(severities),
                 "error": {k: [100.0 * e for e in v] for k, v in errors.items()}}
    std = [n for n in CORRUPTIONS if n in errors]
    extra = [n for n in errors if n not in CORRUPTIONS]
    if std:
        out["mean_error"] = 100.0 * mean_corruption_error(errors, std)
    if extra:
        out["extra_mean_error"] = 100.0 * mean_corruption_error(errors, extra)
    if clean_error is not None:
        out["clean_error"] = 100.0 * clean_error
    if normalizer is not None:
        if normalizer != "alexnet":
            raise ValueError(f"unknown normalizer {normalizer!r} (only 'alexnet')")
        ce = corruption_errors_to_ce(errors, ALEXNET_CORRUPTION_ERRORS)
        out["normalizer"] = normalizer
        out["ce"] = {k: 100.0 * v for k, v in ce.items()}
        if ce:
            out["mce"] = 100.0 * mce(ce)
        if clean_error is not None and ce:
            rel = relative_ce(errors, clean_error)
            out["relative_ce"] = {k: 100.0 * v for k, v in rel.items()}
            out["relative_mce"] = 100.0 * mce(rel)
    return out


def evaluate_imagenet_c(model: nn.Module, root: str | Path, mean=None, std=None,
                        corruptions: Sequence[str] | None = None, severities: Sequence[int] = (1, 2, 3, 4, 5),
                        device: torch.device | str = "cpu", batch_size: int = 64, image_size: int = 224,
                        max_images: int | None = None, num_workers: int = 0, normalizer: str | None = "alexnet",
                        clean_error: float | None = None, progress: bool = True) -> dict:
    """Errors (%) of a 1000-class ImageNet model on the released ImageNet-C JPEGs, as they are
    (centre crop to ``image_size`` only if larger, no resize), with CE / mCE normalised by AlexNet
    and, given the model's clean error (a fraction), relative CE / mCE.

    ``corruptions`` defaults to every corruption folder present. Labels come from the WordNet id
    folders, so a subset of classes is evaluated correctly.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    names = list(corruptions) if corruptions is not None else [n for n in ALL_CORRUPTIONS if (root / n).is_dir()]
    if not names:
        raise DataError(f"no ImageNet-C corruption folders in {root}")
    table = imagenet_wnid_to_index()
    device = torch.device(device)
    wrapped, was_training = _prepare(model, mean, std, device)
    errors: dict[str, list[float]] = {}
    try:
        for name in names:
            errors[name] = []
            for s in severities:
                folder = root / name / str(s)
                samples, wnids = class_folder_samples(folder, "evaluation", allow_empty=True)
                for w in wnids:
                    if w not in table:
                        raise DataError(f"not an ImageNet-1k WordNet id: {folder / w}")
                items = [(p, table[wnids[i]]) for p, i in samples]
                dataset = ImageFiles(_limit(items, max_images), crop=image_size)
                res = _accuracy(wrapped, dataset, device, batch_size, num_workers, None, progress, f"{name} {s}")
                errors[name].append(res["error"] / 100.0)
    finally:
        model.train(was_training)
    return _corruption_summary(errors, severities, normalizer, clean_error)


class _ArrayImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, channels_last: bool = True):
        self.images, self.labels, self.channels_last = images, labels, channels_last

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.array(self.images[i]))
        if img.dim() == 2:
            img = img[None]
        elif self.channels_last:
            img = img.permute(2, 0, 1)
        return img.float() / 255, int(self.labels[i])


def evaluate_cifar10_c(model: nn.Module, root: str | Path, mean=None, std=None,
                       corruptions: Sequence[str] | None = None, severities: Sequence[int] = (1, 2, 3, 4, 5),
                       device: torch.device | str = "cpu", batch_size: int = 256, max_images: int | None = None,
                       num_workers: int = 0, normalizer: str | None = None, clean_error: float | None = None,
                       progress: bool = True) -> dict:
    """Errors (%) on CIFAR-10-C style arrays (also CIFAR-100-C): ``<corruption>.npy`` holds the 5
    severities one after the other (uint8, N x 32 x 32 x 3), ``labels.npy`` the labels.

    Reports the plain mean error over corruptions x severities (the CIFAR convention); set
    ``normalizer="alexnet"`` only for ImageNet-class models. ``max_images`` takes the first images
    of every severity.
    """
    root = Path(root)
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise DataError(f"missing {labels_path}")
    labels = np.load(labels_path, mmap_mode="r")
    names = (list(corruptions) if corruptions is not None
             else [n for n in ALL_CORRUPTIONS if (root / f"{n}.npy").is_file()])
    if not names:
        raise DataError(f"no corruption arrays in {root}")
    device = torch.device(device)
    wrapped, was_training = _prepare(model, mean, std, device)
    errors: dict[str, list[float]] = {}
    try:
        for name in names:
            path = root / f"{name}.npy"
            if not path.is_file():
                raise DataError(f"missing {path}")
            arr = np.load(path, mmap_mode="r")
            per = len(arr) // 5
            if per == 0 or len(arr) % 5 or len(labels) < len(arr):
                raise DataError(f"{path}: {len(arr)} images is not 5 severities x N (labels: {len(labels)})")
            errors[name] = []
            for s in severities:
                lo, hi = (s - 1) * per, s * per
                if max_images is not None:
                    hi = min(hi, lo + max_images)
                dataset = _ArrayImages(arr[lo:hi], labels[lo:hi])
                res = _accuracy(wrapped, dataset, device, batch_size, num_workers, None, progress, f"{name} {s}")
                errors[name].append(res["error"] / 100.0)
    finally:
        model.train(was_training)
    return _corruption_summary(errors, severities, normalizer, clean_error)


__all__: list[str] = ["evaluate_imagenet_c", "evaluate_cifar10_c", "evaluate_imagenet_a", "evaluate_image_folder",
                      "imagenet_a_mask", "imagenet_wnid_to_index", "ImageFiles"]
