"""The trainer's data: endless, globally defined, position-seeded streams of batches.

Many processes (``torchrun``): B labeled and ratio x B pseudo-labeled images are *global* batches;
each of the W processes takes 1/W of both. The streams are defined globally
(:class:`StreamSampler`): the images of step k do not depend on W (their random augmentation
does), and starting at step k (a resume) is arithmetic. Each batch's augmentation RNGs are seeded
from its position in the stream (:class:`SeededSamples`), in whichever process loads it, so a
resumed run draws the same input noise as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.device_input import DeviceInput, host_view
from ..runtime.distributed import DistContext, local_batch_size
from .shuffle import FeistelPermutation
from ..runtime.workers import ignore_sigterm_in_worker

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 64-bit seed from a few integers (splitmix64), the same on every platform."""
    z = 0
    for v in values:
        z = (z + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z


def steps_per_epoch(num_labeled: int, num_pseudo: int, batch_size: int, ratio: float) -> int:
    """An epoch is one pass over the larger of the labeled and the pseudo-labeled streams."""
    steps = math.ceil(num_labeled / batch_size)
    if num_pseudo and ratio > 0:
        steps = max(steps, math.ceil(num_pseudo / max(1, round(batch_size * ratio))))
    return max(1, steps)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing: 1 - s on the label, plus s / K everywhere."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


class StreamSampler(Sampler):
    """This rank's share of an endless shuffled stream over a dataset of ``size`` items.

    The stream is a concatenation of permutations of ``range(size)``, one per pass, each keyed
    by ``(seed, pass)`` (:class:`~noisystudent.train.shuffle.FeistelPermutation`: no pool-sized
    array). Global batch k is stream positions ``[k G, (k+1) G)``; rank r takes the slice
    ``[k G + r b, k G + (r+1) b)`` with ``b = G / world_size``. So the union of the ranks' batches
    of step k is the same set of images for any number of processes, and starting at step k (a
    resume) is arithmetic: no image is loaded to get there. Yields ``(position, index)`` pairs for
    :class:`SeededSamples`.
    """

    def __init__(self, size: int, global_batch: int, ctx: DistContext, seed: int, start_step: int = 0):
        self.size, self.global_batch, self.seed, self.start_step = size, global_batch, seed, start_step
        self.local_batch = local_batch_size(global_batch, ctx)
        self.rank = ctx.rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        current_pass, order = -1, None
        step = self.start_step
        while True:
            first = step * self.global_batch + self.rank * self.local_batch
            positions = np.arange(first, first + self.local_batch, dtype=np.int64)
            passes, offsets = np.divmod(positions, self.size)
            indices = np.empty_like(offsets)
            for pass_ in np.unique(passes):  # a batch spans at most a few passes
                if pass_ != current_pass:  # each pass's order is keyed once; O(1) memory at any size
                    current_pass, order = pass_, FeistelPermutation(self.size, mix_seed(self.seed, 0, int(pass_)))
                mask = passes == pass_
                indices[mask] = order[offsets[mask]]
            yield from zip(positions.tolist(), indices.tolist())
            step += 1


class SeededSamples(Dataset):
    """Loads a batch of ``(position, index)`` items with the global RNGs (Python, NumPy, torch
    CPU) seeded from ``(seed, position of the batch's first item)``: a batch's augmentation
    depends on where it sits in the stream, not on which DataLoader worker loads it nor on what
    ran before, so a resumed run draws the same noise. The caller's RNG states are restored
    afterwards, so loading in the main process (``num_workers=0``) does not disturb the model's
    dropout. (Seeding once per batch, not per image: re-seeding three Mersenne twisters costs
    ~40 us, as much as augmenting a small image.)"""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            s = mix_seed(self.seed, 1, items[0][0])
            random.seed(s)
            np.random.seed(s >> 32)  # NumPy's legacy seed takes 32 bits
            torch.default_generator.manual_seed(s)  # CPU only: never touch CUDA generators here
            return [self.dataset[index] for _, index in items]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def device_stream(dataset: Dataset, global_batch: int, ctx: DistContext, seed: int, start_step: int,
                  num_workers: int, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(model input, target)`` batches of this rank's share of ``dataset``, on the
    device, from global step ``start_step`` on. Workers return uint8 images (the dataset's
    :func:`~noisystudent.data.device_input.host_view`), pinned on CUDA; the device does the
    rest (:class:`~noisystudent.data.device_input.DeviceInput`). A dataset that can only be
    streamed (a WebDataset pool's selection) makes its own host batches."""
    view, transform = host_view(dataset)
    if hasattr(view, "stream"):
        host = view.stream(global_batch, ctx, seed, start_step, num_workers)
    else:
        sampler = StreamSampler(len(view), global_batch, ctx, seed, start_step)
        host = iter(DataLoader(SeededSamples(view, seed), batch_size=sampler.local_batch, sampler=sampler,
                               num_workers=num_workers, pin_memory=ctx.device.type == "cuda",
                               worker_init_fn=ignore_sigterm_in_worker if num_workers else None,
                               generator=torch.Generator()))  # its own: creating it must not draw from torch's RNG
    inp = DeviceInput(ctx.device, transform.normalize if transform else None, channels_last)
    return ((inp(x), y) for x, y in inp.batches(host))


class JointBatches:
    """The joint batches of one stage: B labeled images (one-hot targets with label smoothing) and,
    for a student, ratio x B pseudo-labeled ones (soft targets) concatenated, from ``start_step``.

    Each stream is copied to the device on its own (pinned, non-blocking) and joined there: a
    joint batch concatenated on the CPU would be an unpinned copy, synchronous to send.
    """

    def __init__(self, labeled: Dataset, pseudo: Dataset | None, streams: dict, ctx: DistContext, start_step: int,
                 num_workers: int, channels_last: bool, num_classes: int, label_smoothing: float):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        lab = streams["labeled"]
        self.labeled = device_stream(labeled, lab["global_batch"], ctx, lab["seed"], start_step, num_workers,
                                     channels_last)
        unl = streams.get("pseudo")
        self.pseudo = (device_stream(pseudo, unl["global_batch"], ctx, unl["seed"], start_step, num_workers,
                                     channels_last) if unl else None)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.labeled)
        targets = smoothed_one_hot(y, self.num_classes, self.label_smoothing)
        if self.pseudo is not None:
            xu, tu = next(self.pseudo)
            x, targets = torch.cat([x, xu]), torch.cat([targets, tu.float()])  # cat keeps channels_last
        return x, targets

    def close(self) -> None:
        """Stop DataLoader workers now rather than at garbage collection."""
        self.labeled = self.pseudo = None
