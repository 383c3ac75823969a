"""The one device-side input path: training, evaluation, labeling and fix-res all feed models here.

DataLoader workers run the CPU part of an :class:`~noisystudent.data.transforms.ImageTransform`
(decode, crop, flip, RandAugment) and return **uint8** tensors; the loader pins them (CUDA);
:meth:`DeviceInput.batches` copies each batch to the device with ``non_blocking`` copies, one
batch ahead on a side CUDA stream so the copy overlaps the model's work; :class:`DeviceInput`
then converts to float, normalises and sets channels_last *on the device*, a whole batch at a
time. On a CPU the same code runs with no stream and no copy, and gives the same numbers, bit
for bit, as normalising each image in the worker did.

Not timm's ``PrefetchLoader``: it takes ``(input, target)`` batches only (the labeler's are
dicts), and normalises as ``(x - 255 mean) / (255 std)``, which rounds differently from
``ToTensor`` + ``Normalize`` and so would change CPU results; its stream handling is copied.

Evaluation (:func:`eval_batches`) also caches, given an :class:`EvalCache` (the caller holds it:
a training stage for its per-epoch validation, the pipeline for the whole run): a deterministic
dataset (an un-augmented transform: validation, test, fix-res's clean sets) whose uint8 tensors
fit the budget (:func:`cache_budget`: 5% of the GPU's memory, or 512 MiB of RAM on a CPU, over all
sets in the cache together) is kept on the device after its first full pass, so the per-epoch
validation of later epochs reads no file and starts no worker. An entry lives as long as the
dataset object and the cache.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..runtime.distributed import DistContext, shard_indices
from ..runtime.workers import ignore_sigterm_in_worker  # the main process stops its workers, also on SIGTERM
from .transforms import ImageTransform, Normalize

__all__ = ["DeviceInput", "host_view", "eval_batches", "EvalCache", "cache_budget", "wants_channels_last",
           "eval_batch_size", "CACHE_CPU_BYTES", "CACHE_CUDA_FRACTION"]

CACHE_CPU_BYTES = 512 * 2**20  # evaluation cache on a CPU device (host RAM)
CACHE_CUDA_FRACTION = 0.05  # evaluation cache on a GPU: this share of its memory (7 GiB of an H200)
# Evaluation batches: a GPU wants large ones; on a CPU a batch's activations should stay in cache.
# efficientnet_b0 at 64 px, 1 thread, 256 images: 2.4 s at batch 256, 1.0-1.4 s at 64, 0.7 s at
# 32; resnet18 at 32 px: 0.42 / 0.30 / 0.31 s (issue 28). The logits are the same at any batch size.
EVAL_BATCH_CPU = 32
EVAL_BATCH_ACCELERATOR = 256


def eval_batch_size(device: torch.device | str) -> int:
    """The evaluation batch size for ``device`` when the caller sets none."""
    return EVAL_BATCH_CPU if torch.device(device).type == "cpu" else EVAL_BATCH_ACCELERATOR


def host_view(dataset: Dataset) -> tuple[Dataset, ImageTransform | None]:
    """``dataset`` as the loader's workers should run it: if its ``transform`` (an attribute, as
    on :class:`~noisystudent.data.datasets.TransformedSet` and the pseudo-labeled sets) is an
    :class:`ImageTransform`, a shallow copy whose transform is the CPU part only (uint8 out),
    and that transform, whose ``normalize`` the consumer applies on the device. Any other
    dataset (through ``Subset``\\ s) is returned as it is, with None: its items are used as given."""
    if isinstance(dataset, Subset):
        inner, transform = host_view(dataset.dataset)
        return (dataset if inner is dataset.dataset else Subset(inner, dataset.indices)), transform
    transform = getattr(dataset, "transform", None)
    if not isinstance(transform, ImageTransform):
        return dataset, None
    view = copy.copy(dataset)  # datasets that hold open files drop them in __getstate__, as for workers
    view.transform = transform.host
    return view, transform


def wants_channels_last(model: nn.Module) -> bool:
    """True if ``model``'s weights were converted to channels_last (a 4-D parameter laid out
    channels-last and not also plain contiguous), so its input should be too."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return True
    return False


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One copy stream per device for the whole process: the caching allocator pools blocks per
    stream, so a new stream per pass would leave each pass's blocks cached but unusable."""
    key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


class DeviceInput:
    """Host batches to model input on ``device``: copy (non-blocking from pinned memory), then
    ``normalize`` (None: the tensor is used as it is) and channels_last for 4-D images."""

    def __init__(self, device: torch.device | str, normalize: Normalize | None = None, channels_last: bool = False):
        self.device = torch.device(device)
        self.normalize, self.channels_last = normalize, channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.normalize is not None:
            x = self.normalize(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def transfer(self, batch):
        """Every tensor of a batch (a tensor, a tuple/list, or a dict's values) on the device,
        unconverted; other values are left alone."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.transfer(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.transfer(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def batches(self, batches: Iterable) -> Iterator:
        """``batches`` with their tensors on the device. On CUDA the copy of batch k + 1 is issued
        on a side stream before batch k is handed out (the loader's workers are already
        producing k + 2); each batch is ready on the stream that is current when it is taken."""
        if self.device.type != "cuda":
            for batch in batches:
                yield self.transfer(batch)
            return
        side = _side_stream(self.device)
        ready = None
        for batch in batches:
            # Blocks the consumer has freed may be handed to the copies below: do not let the side
            # stream write into them before the consumer's queued work has read them.
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                upcoming = self.transfer(batch)
            if ready is not None:
                yield ready
            torch.cuda.current_stream(self.device).wait_stream(side)
            ready = upcoming
        if ready is not None:
            yield ready


# ------------------------------------------------------------------------------ evaluation


@dataclass
class _Cached:
    key: tuple  # (rank, world size, batch size, dataset length): what the batches depend on
    batches: list  # [(uint8 images, targets)] on the device
    nbytes: int


class EvalCache:
    """Evaluation sets kept on the device after a full pass, by dataset object (weakly: an entry
    goes with its dataset). Whoever evaluates the same set repeatedly holds one and passes it to
    :func:`eval_batches`; dropping the cache gives the memory back."""

    def __init__(self) -> None:
        self._sets: "weakref.WeakKeyDictionary[Dataset, _Cached]" = weakref.WeakKeyDictionary()

    def get(self, dataset: Dataset, key: tuple) -> _Cached | None:
        """The entry of ``dataset`` made with the same ``key`` (rank, world size, batch size,
        length), else None; None also for a dataset that cannot be weakly referenced."""
        try:
            cached = self._sets.get(dataset)
        except TypeError:
            return None
        return cached if cached is not None and cached.key == key else None

    def put(self, dataset: Dataset, entry: _Cached) -> None:
        self._sets[dataset] = entry

    def nbytes(self) -> int:
        """Bytes held, over all sets."""
        return sum(c.nbytes for c in self._sets.values())

    def __len__(self) -> int:
        return len(self._sets)

    def clear(self) -> None:
        self._sets.clear()


def cache_budget(device: torch.device) -> int:
    """Bytes the evaluation cache may hold on ``device``, over all cached sets together."""
    if device.type == "cuda":
        return int(CACHE_CUDA_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        return CACHE_CPU_BYTES
    return 0  # other accelerators: not measured, so not cached


def _nbytes(batch: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))


class eval_batches:  # noqa: N801 - used like the function it is to its callers
    """``(model input, targets)`` on ``device`` for this rank's share of ``dataset``, in order:
    from the device cache when an earlier full pass left it there, else through a pinned loader
    (``num_workers`` workers) and :class:`DeviceInput`, caching the pass in ``cache`` (None: no
    caching) if the dataset is deterministic (an :class:`ImageTransform` without augmentation) and
    fits :func:`cache_budget`.

    An iterable like the DataLoader it stands for: each ``iter()`` draws the loader's seeds from
    torch's global RNG, cached or not, so a training run's dropout masks do not depend on whether
    its validation set was cached (CPU runs stay bit-identical to uncached ones)."""

    def __init__(self, dataset: Dataset, device: torch.device, *, batch_size: int = 256, num_workers: int = 0,
                 ctx: DistContext | None = None, channels_last: bool = False, cache: EvalCache | None = None):
        self.dataset, self.device, self.cache = dataset, torch.device(device), cache
        self.ctx = ctx or DistContext(device=self.device)
        view, self.transform = host_view(dataset)
        self.input = DeviceInput(self.device, self.transform.normalize if self.transform else None, channels_last)
        self.key = (self.ctx.rank, self.ctx.world_size, batch_size, len(dataset))
        part = Subset(view, list(shard_indices(len(view), self.ctx))) if self.ctx.distributed else view
        self.loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 pin_memory=self.device.type == "cuda",
                                 worker_init_fn=ignore_sigterm_in_worker if num_workers else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        cached = self.cache.get(self.dataset, self.key) if self.cache is not None else None
        if cached is not None:
            iter(DataLoader(range(0)))  # the seeds the loader's iterator would have drawn; loads nothing
            return ((self.input(x), y) for x, y in cached.batches)
        return self._load(iter(self.loader))  # the loader's iterator is made (and draws) now, as before

    def _load(self, host: Iterator) -> Iterator[tuple]:
        try:
            weakref.ref(self.dataset)
            hash(self.dataset)
            cacheable = self.cache is not None and self.transform is not None and self.transform.deterministic
        except TypeError:  # a dataset that cannot be weakly referenced (or hashed): never cached
            cacheable = False
        keep: list | None = [] if cacheable else None
        budget = cache_budget(self.device) - self.cache.nbytes() if cacheable else 0
        nbytes, size = 0, len(self.loader.dataset)
        for x, y in self.input.batches(host):
            if keep is not None:
                if not keep and _nbytes((x, y)) / max(1, len(x)) * size > budget:
                    keep = None  # the whole pass would not fit: stream it, every time
                else:
                    keep.append((x, y))
                    nbytes += _nbytes((x, y))
                    if self.device.type == "cuda":  # copied on the side stream, read on this one for good
                        for t in (x, y):
                            if isinstance(t, torch.Tensor):
                                t.record_stream(torch.cuda.current_stream(self.device))
            yield self.input(x), y
        if keep is not None and nbytes <= budget:  # a complete pass (a caller that stops early caches nothing)
            self.cache.put(self.dataset, _Cached(self.key, keep, nbytes))
