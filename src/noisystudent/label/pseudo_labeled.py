"""The student's pseudo-labeled images: a selection (noisystudent.label.select) read from its pool.

No per-image Python objects and no pool-sized index, whatever the pool's size:

- :class:`SelectedImages` (folders, file lists, in-dataset pools): random access. Item ``i`` is row
  ``i`` of the selection's expanded Arrow file (copies already repeated), memory-mapped; its image
  is read from the pool by position (:meth:`UnlabeledSource.open_item`). The training loop's
  stream sampler keeps its exact-resume guarantee.
- :class:`StreamedSelection` (WebDataset tar pools): a streamed read. Each pass visits the tar
  shards that hold selected images in an order shuffled by ``(seed, pass)``, split among ranks and
  DataLoader workers; each selected image is emitted ``copies`` times and mixed through a shuffle
  buffer. Resume: the stream is a pure function of ``(seed, world size, workers)``, so a resumed
  run skips (without decoding) the items the interrupted run consumed and continues with the same
  images, in the same order, as an uninterrupted run with the same settings. With a different
  number of ranks or workers it continues from the same step with a different image order.

Targets follow the store's rebuild rule (:func:`noisystudent.label.store.soft_targets`).
"""

from __future__ import annotations

import mmap
import random
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..data.pool import UnlabeledSource, decode_image
from ..runtime.distributed import DistContext, local_batch_size
from ..runtime.errors import DataError
from ..runtime.workers import ignore_sigterm_in_worker
from .select import Selection
from .store import soft_targets

RELEASE_EVERY = 4096  # items read between releases of the mapped pages (keeps RSS flat)


def pseudo_labeled_set(selection: Selection, pool: UnlabeledSource, transform: Callable):
    """The dataset a student trains on: random access where the pool allows it, else a stream."""
    if selection.store.get("source") != pool.fingerprint():
        raise DataError(f"selection {selection.path} was made from another pool "
                        f"({selection.store.get('source', {}).get('kind')}); select again for this pool")
    cls = SelectedImages if pool.random_access else StreamedSelection
    return cls(selection, pool, transform)


def _targets(topk_class: np.ndarray, topk_prob: np.ndarray, selection: Selection) -> torch.Tensor:
    return torch.from_numpy(soft_targets(topk_class, topk_prob, selection.num_classes, selection.hard))


class SelectedImages(Dataset):
    """Map-style: ``(noisy image, soft target)`` of item ``i`` of the selection's stream."""

    def __init__(self, selection: Selection, pool: UnlabeledSource, transform: Callable):
        self.selection, self.pool, self.transform = selection, pool, transform
        self.path = selection.expanded_path
        if not self.path.is_file():
            raise DataError(f"selection {selection.path} has no expanded file {self.path.name}; select again")
        self._mm: mmap.mmap | None = None
        self._reader = None
        self._stride = 0
        self._reads = 0

    def __getstate__(self) -> dict:  # DataLoader workers map the file themselves
        return self.__dict__ | {"_mm": None, "_reader": None}

    def __len__(self) -> int:
        return self.selection.num_selected

    def _rows(self) -> pa.ipc.RecordBatchFileReader:
        if self._reader is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._reader = pa.ipc.open_file(pa.py_buffer(self._mm))
        return self._reader

    def _row(self, i: int) -> dict:
        rows = self._rows()
        stride = self._stride or rows.get_batch(0).num_rows  # every batch but the last is this long
        self._stride = stride
        batch = rows.get_batch(i // stride)
        j = i % stride
        row = {name: batch.column(name)[j] for name in ("key", "shard", "index")}
        k = batch.schema.field("topk_class").type.list_size
        row["topk_class"] = batch.column("topk_class").values.to_numpy()[j * k:(j + 1) * k]
        row["topk_prob"] = batch.column("topk_prob").values.to_numpy()[j * k:(j + 1) * k]
        self._reads += 1
        if self._reads % RELEASE_EVERY == 0 and hasattr(mmap, "MADV_DONTNEED"):
            # File-backed pages would otherwise stay resident for the whole epoch: drop them from
            # this process (the page cache keeps them), so memory does not grow with the selection.
            self._mm.madvise(mmap.MADV_DONTNEED)
        return row

    def __getitem__(self, i: int):
        row = self._row(int(i))
        key = row["key"].as_py()
        payload = self.pool.open_item(row["shard"].as_py(), row["index"].as_py(), key)
        try:
            image = decode_image(payload)
        except (DataError, OSError, ValueError) as e:
            raise DataError(f"pseudo-labeled image {key} can no longer be read: {e}") from None
        target = _targets(row["topk_class"][None], row["topk_prob"][None], self.selection)[0]
        return self.transform(image), target


class StreamedSelection:
    """A selection over a pool that can only be streamed; the training loop calls :meth:`stream`."""

    def __init__(self, selection: Selection, pool: UnlabeledSource, transform: Callable,
                 shuffle_buffer: int = 1024):
        self.selection, self.pool, self.transform = selection, pool, transform
        self.shuffle_buffer = shuffle_buffer

    def __len__(self) -> int:
        return self.selection.num_selected

    def stream(self, global_batch: int, ctx: DistContext, seed: int, start_step: int,
               num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of this rank's share, from global step ``start_step`` on."""
        local = local_batch_size(global_batch, ctx)
        items = _ShardStream(self, ctx.rank, ctx.world_size, seed, start_step, local)
        loader = DataLoader(items, batch_size=local, num_workers=num_workers,
                            pin_memory=ctx.device.type == "cuda", persistent_workers=False,
                            worker_init_fn=ignore_sigterm_in_worker if num_workers else None)
        return iter(loader)


class _ShardStream(IterableDataset):
    """Selected items of this rank's shards, pass after pass; worker ``w`` of ``W`` reads every
    ``W``-th shard of the rank's share, and DataLoader interleaves workers in a fixed order."""

    def __init__(self, owner: StreamedSelection, rank: int, world: int, seed: int, start_step: int, batch: int):
        self.owner, self.rank, self.world, self.seed = owner, rank, world, seed
        self.start_step, self.batch = start_step, batch

    def _shard_rows(self, shard: int) -> pa.Table:
        """The selection's rows of one shard (the file is in store order: row groups are skipped
        by their statistics, so nothing pool-sized is read)."""
        return pq.read_table(self.owner.selection.path, filters=[("shard", "==", shard)],
                             columns=["index", "copies", "topk_class", "topk_prob"])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader takes batches from workers 0, 1, ... in turn from its first batch on, so on a
        # resumed stream its worker i plays the part of worker (i + start_step) mod W.
        worker = (worker + self.start_step) % workers
        shard_ids = list(range(self.owner.pool.num_shards))
        # DataLoader takes whole batches from its workers in turn: the steps before start_step
        # consumed this many of this worker's items.
        steps, extra = divmod(self.start_step, workers)
        skip = (steps + (1 if worker < extra else 0)) * self.batch
        pass_, emitted, everything = 0, 0, False
        sel = self.owner.selection
        while True:
            order = np.random.default_rng((self.seed, pass_)).permutation(len(shard_ids))
            mine = [shard_ids[i] for i in order[self.rank::self.world]][worker::workers]
            if everything or not mine:  # fewer selected shards than readers: every reader reads all
                mine = [shard_ids[i] for i in order]
            before = emitted
            rng = random.Random(f"{self.seed}:{pass_}:{self.rank}:{worker}")  # str seeds hash stably
            buffer: list = []
            for shard in mine:
                rows = self._shard_rows(shard)
                if rows.num_rows == 0:
                    continue
                wanted = dict(zip(rows.column("index").to_pylist(), range(rows.num_rows)))
                copies = rows.column("copies").to_numpy()
                k = rows.schema.field("topk_class").type.list_size
                cls = rows.column("topk_class").combine_chunks().values.to_numpy().reshape(-1, k)
                prob = rows.column("topk_prob").combine_chunks().values.to_numpy().reshape(-1, k)
                for index, (key, payload) in enumerate(self.owner.pool.iter_shard(shard)):
                    r = wanted.get(index)
                    if r is None:
                        continue
                    for _ in range(int(copies[r])):
                        buffer.append((payload, cls[r], prob[r]))
                        if len(buffer) >= self.owner.shuffle_buffer:
                            emitted += 1
                            item = buffer.pop(rng.randrange(len(buffer)))
                            if emitted > skip:  # a resumed run skips what was consumed, undecoded
                                yield self._load(item, sel, worker, emitted)
            rng.shuffle(buffer)
            for item in buffer:
                emitted += 1
                if emitted > skip:
                    yield self._load(item, sel, worker, emitted)
            everything = everything or emitted == before
            if emitted == before and everything and pass_ > 0:
                raise DataError(f"selection {sel.path} names no image of its pool")
            pass_ += 1

    def _load(self, item, sel: Selection, worker: int, n: int):
        payload, cls, prob = item
        # Augmentation drawn from (seed, reader, item number): the same noise on a resumed run. The
        # caller's generators are restored, so loading in the main process leaves dropout alone.
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(f"{self.seed}:{self.rank}:{worker}:{n}")
            np.random.seed(random.getrandbits(32))
            torch.manual_seed(random.getrandbits(63))
            image = decode_image(payload)
            return self.owner.transform(image), _targets(cls[None], prob[None], sel)[0]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
