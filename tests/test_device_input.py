"""The one device-side input path: uint8 from the workers, normalised where the batch is used,
the same numbers as the all-CPU transforms, and the evaluation cache."""

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset, Subset

import noisystudent.data.device_input as D
from noisystudent.config.schema import NoiseConfig
from noisystudent.data.datasets import ArrayImageSet, TransformedSet
from noisystudent.data.device_input import DeviceInput, EvalCache, eval_batches, host_view, wants_channels_last
from noisystudent.data.transforms import ImageTransform, Normalize, eval_transform, train_transform
from noisystudent.evaluate.classifier import evaluate_classifier
from noisystudent.runtime.errors import ConfigError

CPU = torch.device("cpu")


def _images(n=10, shape=(20, 18, 3), seed=0):
    rng = np.random.default_rng(seed)
    return ArrayImageSet(rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 3)


def _old(transform: ImageTransform, mean, std) -> T.Compose:
    """The transform as it was: the same CPU steps, then ToTensor and Normalize per image."""
    return T.Compose([*transform.host.transforms[:-1], T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("size,shape", [(8, (13, 11, 3)), (16, (20, 20)), (80, (100, 120, 3))])
def test_split_transforms_give_the_old_tensors_bit_for_bit(size, shape):
    channels = 1 if len(shape) == 2 else 3
    rng = np.random.default_rng(size)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    mean, std = tuple(rng.uniform(0.2, 0.6, channels)), tuple(rng.uniform(0.1, 0.3, channels))
    clean = eval_transform(size, channels, mean, std)
    noisy = train_transform(size, channels, mean, std, NoiseConfig(randaugment_magnitude=9), flip=True)
    for t in (clean, noisy):
        host = t.host(img)
        assert host.dtype == torch.uint8 and host.shape == (channels, size, size)
        results = []
        for f in (t, _old(t, mean, std), lambda im: t.normalize(t.host(im)[None])[0]):  # one image, a batch
            random.seed(1), np.random.seed(1), torch.manual_seed(1)  # RandAugment: random, NumPy; crop: torch
            results.append(f(img))
        assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert clean.deterministic and not noisy.deterministic


def test_normalize_rejects_bad_statistics_and_channel_counts():
    with pytest.raises(ConfigError, match="one mean and one std > 0 per channel"):
        Normalize((0.5, 0.5), (0.2,))
    with pytest.raises(ConfigError, match="std > 0"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="3 channels, normalisation for 1"):
        Normalize((0.5,), (0.2,))(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_host_view_swaps_in_the_cpu_part_and_leaves_the_caller_alone():
    images = _images()
    t = eval_transform(8, 3, (0.5,) * 3, (0.25,) * 3)
    ds = TransformedSet(images, t)
    view, found = host_view(Subset(ds, [1, 3]))
    assert found is t and isinstance(view, Subset) and list(view.indices) == [1, 3]
    x, y = view[1]  # item 3 of the dataset
    assert x.dtype == torch.uint8 and y == int(images.targets[3])
    assert ds.transform is t and ds[3][0].dtype == torch.float32  # the caller's dataset is unchanged
    assert torch.equal(t.normalize(x), ds[3][0])

    class Plain(Dataset):  # no ImageTransform: used as it is
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 8, 8), 0

    plain = Plain()
    assert host_view(plain) == (plain, None)


def test_device_input_normalises_a_batch_and_sets_the_layout():
    t = eval_transform(8, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = _images(4)
    host = torch.stack([t.host(images.load(i)) for i in range(4)])
    x = DeviceInput(CPU, t.normalize, channels_last=True)(host)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, torch.stack([t(images.load(i)) for i in range(4)]))
    batch = {"x": host, "keys": ["a"], "n": 3}
    moved = next(DeviceInput(CPU).batches([batch]))
    assert moved["keys"] == ["a"] and moved["n"] == 3 and torch.equal(moved["x"], host)
    assert list(DeviceInput(CPU).batches([(host, torch.arange(4))]))[0][1].tolist() == [0, 1, 2, 3]


class Counting(TransformedSet):
    """Counts the images it loads (the copy host_view makes shares the list)."""

    def __init__(self, images, transform, loads):
        super().__init__(images, transform)
        self.loads = loads

    def __getitem__(self, i):
        self.loads.append(i)
        return super().__getitem__(i)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_evaluation_is_cached_after_its_first_full_pass():
    """In the EvalCache the caller passes; without one nothing is kept."""
    loads, cache = [], EvalCache()
    val = Counting(_images(10), eval_transform(8, 3, (0.5,) * 3, (0.25,) * 3), loads)
    net = _net()
    first = evaluate_classifier(net, val, CPU, batch_size=4, cache=cache)
    assert len(loads) == 10 and len(cache) == 1 and cache.nbytes() == 10 * 3 * 8 * 8 + 10 * 8
    assert evaluate_classifier(net, val, CPU, batch_size=4) == first and len(loads) == 20  # no cache: read again
    del loads[10:]
    rng_after = []
    for _ in range(2):
        state = torch.get_rng_state()
        assert evaluate_classifier(net, val, CPU, batch_size=4, cache=cache) == first
        rng_after.append(torch.rand(1))
        torch.set_rng_state(state)
    assert len(loads) == 10  # nothing loaded again
    # An uncached pass draws the same from torch's RNG as a cached one (dropout masks stay the same).
    state = torch.get_rng_state()
    evaluate_classifier(net, Counting(_images(10), val.transform, []), CPU, batch_size=4, cache=EvalCache())
    assert torch.equal(torch.rand(1), rng_after[0])
    torch.set_rng_state(state)
    # Another batch size (or world size) is another pass; a pass stopped early caches nothing.
    evaluate_classifier(net, val, CPU, batch_size=5, cache=cache)
    assert len(loads) == 20
    other = Counting(_images(10), val.transform, [])
    next(iter(eval_batches(other, CPU, batch_size=4, cache=cache)))
    next(iter(eval_batches(other, CPU, batch_size=4, cache=cache)))
    assert len(other.loads) == 8


def test_augmented_and_oversized_sets_are_never_cached(monkeypatch):
    noisy = train_transform(8, 3, (0.5,) * 3, (0.25,) * 3, NoiseConfig(), flip=True)
    loads = []
    train = Counting(_images(6), noisy, loads)
    cache = EvalCache()
    for _ in range(2):
        evaluate_classifier(_net(), train, CPU, batch_size=4, cache=cache)
    assert len(loads) == 12 and len(cache) == 0
    monkeypatch.setattr(D, "CACHE_CPU_BYTES", 6 * 3 * 8 * 8 - 1)  # one byte short of the whole set
    loads = []
    val = Counting(_images(6), eval_transform(8, 3, (0.5,) * 3, (0.25,) * 3), loads)
    for _ in range(2):
        evaluate_classifier(_net(), val, CPU, batch_size=4, cache=cache)
    assert len(loads) == 12 and D.cache_budget(CPU) == 6 * 3 * 8 * 8 - 1


def test_channels_last_follows_the_weights():
    net = _net()
    assert not wants_channels_last(net)
    assert wants_channels_last(net.to(memory_format=torch.channels_last))
    val = TransformedSet(_images(6), eval_transform(8, 3, (0.5,) * 3, (0.25,) * 3))
    x, _ = next(iter(eval_batches(val, CPU, batch_size=6, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert evaluate_classifier(net, val, CPU) == evaluate_classifier(_net(), val, CPU, channels_last=False)


def test_a_training_stage_reads_its_validation_set_once_and_shares_the_cache_it_is_given():
    """The trainer evaluates through the EvalCache of its RunContext: its own by default (the
    per-epoch validation reads the files once), or the caller's, which then holds the set."""
    from _tiny import TinyNet
    from _train_scenarios import NUM_CLASSES, digits_data, student_config
    from noisystudent.train.trainer import Recipe, RunContext, Trainer

    labeled, _, val = digits_data(augment=False)
    recipe = Recipe(name="teacher", num_classes=NUM_CLASSES, epochs=3, lr=0.1, seed=0, train=student_config())
    loads = []
    counted = Counting(val.images, val.transform, loads)
    outcome = Trainer(recipe, RunContext(progress=False)).fit(TinyNet(), labeled, counted)
    assert len(outcome.history) == 3 and len(loads) == len(counted)  # 3 evaluations, one read
    shared, loads[:] = EvalCache(), []
    for _ in range(2):  # two stages given the same cache: the second reads nothing
        Trainer(recipe, RunContext(progress=False, eval_cache=shared)).fit(TinyNet(), labeled, counted)
    assert len(loads) == len(counted) and len(shared) == 1


def test_evaluation_batches_are_small_on_a_cpu_and_give_the_same_numbers(monkeypatch):
    """On a CPU the default evaluation batch is small (a large one overflows the caches: issue 28);
    the numbers are those of any other batch size."""
    assert D.eval_batch_size(CPU) == D.EVAL_BATCH_CPU < D.eval_batch_size(torch.device("cuda")) == 256
    sizes = []
    real = D.eval_batches.__init__
    monkeypatch.setattr(D.eval_batches, "__init__",
                        lambda self, *a, batch_size, **kw: sizes.append(batch_size) or real(self, *a, batch_size=batch_size, **kw))
    val = TransformedSet(_images(70), eval_transform(8, 3, (0.5,) * 3, (0.25,) * 3))
    net = _net()
    default = evaluate_classifier(net, val, CPU)
    assert sizes == [D.EVAL_BATCH_CPU] and evaluate_classifier(net, val, CPU, batch_size=256) == default
