import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from noisystudent.label.pseudo_labels import PseudoLabels, label_images


class FixedLogits(nn.Module):
    """Returns the input as logits, so the teacher's outputs are known exactly."""

    def forward(self, x):
        return x


def _label(logits, **kw):
    ds = TensorDataset(torch.tensor(logits, dtype=torch.float32), torch.zeros(len(logits)))
    labels, bad = label_images(FixedLogits(), ds, [f"img{i}" for i in range(len(logits))],
                               num_classes=len(logits[0]), teacher="t", device=torch.device("cpu"),
                               progress=False, **kw)
    assert bad == []
    return labels


def test_soft_labels_are_softmax_with_temperature():
    logits = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    for temp in (1.0, 2.0):
        pl = _label(logits, temperature=temp)
        expected = torch.softmax(torch.tensor(logits) / temp, 1).numpy()
        np.testing.assert_allclose(pl.soft_targets(), expected, rtol=1e-6)
    assert _label(logits, temperature=2.0).confidence[0] < _label(logits, temperature=1.0).confidence[0]


def test_hard_labels_are_one_hot_but_keep_confidence():
    pl = _label([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], hard=True)
    np.testing.assert_array_equal(pl.soft_targets(), [[1, 0, 0], [0, 0, 1]])
    assert 0.5 < pl.confidence[0] < 1.0  # threshold still sees the teacher's confidence


def test_top_k_rebuild_spreads_remaining_mass_uniformly():
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    pl = _label(logits.tolist(), top_k=2)
    np.testing.assert_allclose(pl.soft_targets()[0], [0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3], rtol=1e-5)
    assert abs(pl.soft_targets().sum() - 1.0) < 1e-5


def test_parquet_round_trip(tmp_path):
    pl = _label([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 1.0, 1.0]], top_k=2, temperature=1.5)
    pl.save(tmp_path / "p.parquet")
    back = PseudoLabels.load(tmp_path / "p.parquet")
    assert back.keys == pl.keys and back.num_classes == 3 and back.teacher == "t"
    assert back.temperature == 1.5 and back.hard is False
    np.testing.assert_array_equal(back.topk_index, pl.topk_index)
    np.testing.assert_allclose(back.topk_prob, pl.topk_prob)
    assert not list(tmp_path.glob("*.tmp"))


def test_unreadable_unlabeled_images_are_skipped_and_listed(tmp_path):
    from PIL import Image

    from noisystudent.data.datasets import FileImageSet, TransformedSet
    from noisystudent.data.transforms import eval_transform

    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.new("L", (8, 8), color=i * 60).save(p)
        paths.append(p)
    (tmp_path / "1.png").write_bytes(b"")  # zero bytes
    (tmp_path / "3.png").write_bytes((tmp_path / "2.png").read_bytes()[:20])  # truncated
    pool = FileImageSet(paths, None, mode="L")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    labels, bad = label_images(model, TransformedSet(pool, eval_transform(8, 1, (0.5,), (0.5,))),
                               [str(p) for p in paths], num_classes=3, teacher="t",
                               device=torch.device("cpu"), progress=False, batch_size=2)
    assert bad == [str(paths[1]), str(paths[3])]
    assert labels.keys == [str(paths[0]), str(paths[2])]
    assert labels.image_index(np.array([0, 1])).tolist() == [0, 2]
    labels.save(tmp_path / "p.parquet")
    assert PseudoLabels.load(tmp_path / "p.parquet").image_index(np.array([1])).tolist() == [2]
