"""Released datasets read as they are: ImageNet-A mask, ImageNet-C folders, CIFAR-10-C arrays."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from noisystudent.runtime.errors import DataError
from noisystudent.robustness import (evaluate_cifar10_c, evaluate_image_folder, evaluate_imagenet_a,
                                     evaluate_imagenet_c, imagenet_a_mask)
from noisystudent.robustness.released import imagenet_wnid_to_index

TENCH, GOLDFISH, TISSUE = "n01440764", "n01443537", "n15075141"  # ImageNet-1k classes 0, 1, 999


class FixedLogits(nn.Module):
    """Returns the same logits for every image (ignores the input)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def _save(path, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (128, 128, 128) if mode == "RGB" else 128).save(path)


def test_wnid_table_and_mask():
    table = imagenet_wnid_to_index()
    assert len(table) == 1000 and table[TENCH] == 0 and table[GOLDFISH] == 1 and table[TISSUE] == 999
    mask = imagenet_a_mask([GOLDFISH, TISSUE, TENCH])
    assert mask.tolist() == [1, 999, 0]
    logits = torch.arange(1000.0).expand(2, 1000)
    assert torch.equal(logits[:, mask], torch.tensor([[1.0, 999.0, 0.0]] * 2))
    with pytest.raises(DataError):
        imagenet_a_mask(["n99999999"])


def test_imagenet_a_restricts_logits(tmp_path):
    for wnid in (TENCH, TISSUE):
        _save(tmp_path / wnid / "a.jpg", (40, 30))
    # the global argmax (class 500) is not among the folders; of the 2 classes present, tench
    # (class 0) beats toilet tissue (class 999): tench images are right, tissue ones wrong
    logits = torch.zeros(1000)
    logits[500], logits[0], logits[999] = 10.0, 5.0, 1.0
    res = evaluate_imagenet_a(FixedLogits(logits), tmp_path, image_size=16, resize=20, progress=False)
    assert res["top1"] == pytest.approx(50.0) and res["top5"] == pytest.approx(100.0)
    assert res["num_classes"] == 2 and res["n"] == 2 and res["kind"] == "imagenet-a"


def test_hard_image_folder_with_class_names(tmp_path):
    for name in ("cat", "dog"):
        _save(tmp_path / name / "x.png", mode="L")
    logits = torch.tensor([0.0, 3.0, 2.0, 9.0])  # classes: bird, cat, dog, fish (fish absent)
    res = evaluate_image_folder(FixedLogits(logits), tmp_path, class_names=["bird", "cat", "dog", "fish"],
                                channels=1, progress=False)
    assert res["top1"] == pytest.approx(50.0) and res["num_classes"] == 2
    with pytest.raises(DataError):
        evaluate_image_folder(FixedLogits(logits), tmp_path, class_names=["bird"], progress=False)


def test_imagenet_c_folders(tmp_path):
    for name in ("gaussian_noise", "fog"):
        for s in (1, 2):
            for wnid in (TENCH, GOLDFISH):
                _save(tmp_path / name / str(s) / wnid / "ILSVRC2012_val_0.JPEG", (224, 224))
    logits = torch.zeros(1000)
    logits[0] = 1.0  # always tench: half right
    res = evaluate_imagenet_c(FixedLogits(logits), tmp_path, severities=(1, 2), clean_error=0.25, progress=False)
    assert set(res["error"]) == {"gaussian_noise", "fog"}
    assert res["error"]["fog"] == pytest.approx([50.0, 50.0])
    assert res["mean_error"] == pytest.approx(50.0)
    assert res["ce"]["fog"] == pytest.approx(100 * 0.5 / 0.819324)
    assert res["mce"] == pytest.approx(100 * (0.5 / 0.886428 + 0.5 / 0.819324) / 2)
    assert res["relative_mce"] == pytest.approx(
        100 * ((0.25 / (0.886428 - 0.4345)) + 0.25 / (0.819324 - 0.4345)) / 2)


def test_cifar10_c_arrays(tmp_path):
    per = 4
    labels = np.tile(np.array([3, 3, 1, 2], dtype=np.uint8), 5)
    imgs = np.random.default_rng(0).integers(0, 255, size=(5 * per, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "contrast.npy", imgs)
    np.save(tmp_path / "saturate.npy", imgs)
    model = FixedLogits(torch.tensor([0, 0, 0, 1.0, 0, 0, 0, 0, 0, 0]))  # always class 3: half right
    res = evaluate_cifar10_c(model, tmp_path, progress=False)
    assert res["error"]["contrast"] == pytest.approx([50.0] * 5)
    assert res["mean_error"] == pytest.approx(50.0) and res["extra_mean_error"] == pytest.approx(50.0)
    assert "ce" not in res
    one = evaluate_cifar10_c(model, tmp_path, corruptions=["contrast"], severities=(2,), max_images=2, progress=False)
    assert one["error"]["contrast"] == pytest.approx([0.0])  # the first two are class 3
    with pytest.raises(DataError):
        evaluate_cifar10_c(model, tmp_path, corruptions=["fog"], progress=False)
