"""Stage 2 through the one labeler (label_to_store): softmax with temperature, hard labels that
keep the teacher's confidence, the top-k rebuild rule, unreadable images skipped and listed."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from noisystudent.data.datasets import ArrayImageSet
from noisystudent.data.pool import FileListSource, ImageSetSource
from noisystudent.label.inference import label_to_store
from noisystudent.label.store import LabelStore, load_pseudo_labels


class FixedLogits(nn.Module):
    """Returns its input as logits, so the teacher's outputs are known exactly."""

    def forward(self, x):
        return x.flatten(1)


def _logits_image(logits) -> np.ndarray:
    return np.round(np.asarray(logits) * 10 + 128).astype(np.uint8)[None, :]  # a 1 x C grayscale image


def _to_logits(img: Image.Image) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(img, dtype=np.float32)) - 128) / 10


def _label(tmp_path, logits, hard=False, **kw):
    images = ArrayImageSet(np.stack([_logits_image(l) for l in logits]), None)
    label_to_store(FixedLogits(), ImageSetSource(images, shard_size=2), tmp_path / "store", transform=_to_logits,
                   num_classes=len(logits[0]), teacher="t", device="cpu", num_workers=0, precision="fp32",
                   progress=False, **kw)
    return load_pseudo_labels(tmp_path / "store", hard)


def test_soft_labels_are_softmax_with_temperature(tmp_path):
    logits = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.5, 0.0]]
    for temp in (1.0, 2.0):
        pl = _label(tmp_path / str(temp), logits, temperature=temp, top_k=3)
        expected = torch.softmax(torch.tensor(logits) / temp, 1).numpy()
        np.testing.assert_allclose(pl.soft_targets(), expected, rtol=1e-6)
    assert _label(tmp_path / "a", logits, temperature=2.0).confidence[0] < \
        _label(tmp_path / "b", logits, temperature=1.0).confidence[0]


def test_hard_labels_are_one_hot_but_keep_confidence(tmp_path):
    pl = _label(tmp_path, [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], hard=True)
    np.testing.assert_array_equal(pl.soft_targets(), [[1, 0, 0], [0, 0, 1]])
    assert 0.5 < pl.confidence[0] < 1.0  # the threshold still sees the teacher's confidence


def test_top_k_rebuild_spreads_remaining_mass_uniformly(tmp_path):
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    pl = _label(tmp_path, logits.tolist(), top_k=2)
    np.testing.assert_allclose(pl.soft_targets()[0], [0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3], rtol=2e-2)
    assert abs(pl.soft_targets().sum() - 1.0) < 1e-5


def test_unreadable_unlabeled_images_are_skipped_and_listed(tmp_path):
    for i in range(4):
        Image.new("L", (8, 8), color=i * 60).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"")  # zero bytes
    (tmp_path / "3.png").write_bytes((tmp_path / "2.png").read_bytes()[:20])  # truncated
    (tmp_path / "list.txt").write_text("".join(f"{i}.png\n" for i in range(4)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    to_tensor = lambda im: torch.from_numpy(np.asarray(im.convert("L"), np.float32) / 255)[None]  # noqa: E731
    m = label_to_store(model, FileListSource(tmp_path / "list.txt", shard_size=2), tmp_path / "store",
                       transform=to_tensor, num_classes=3, teacher="t", device="cpu", num_workers=0,
                       precision="fp32", progress=False)
    store = LabelStore.open(tmp_path / "store")
    assert [k for k, _ in store.bad_images] == ["1.png", "3.png"] and m.num_rows == 2
    labels = load_pseudo_labels(tmp_path / "store")
    assert labels.keys == ["0.png", "2.png"]
    np.testing.assert_array_equal(labels.indices, [0, 2])  # pool positions skip the unreadable images
    assert (tmp_path / "store" / "bad_images.tsv").read_text().splitlines()[1].startswith("1.png\t")


def test_bad_arguments_are_one_line_errors(tmp_path):
    from noisystudent.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="temperature"):
        _label(tmp_path, [[1.0, 0.0]], temperature=0.0)
