"""Labeling a pool into a store across ranks: the rank-local work apart from the coordination.

- :class:`Labeler` is the work of one process: label the shards it is given, writing each
  shard's file atomically as soon as its last batch is predicted. It knows nothing of ranks and
  makes no collective call.
- :class:`LabelingPlan` is what rank 0 decides before anyone labels (:func:`plan_labeling`): the
  store header (created, or checked against this run's settings), and the shards still pending
  (finished ones are skipped on resume, never recomputed), split over the ranks.
- :class:`LabelingCoordinator` makes every collective call of labeling: it runs rank 0's
  decisions and hands them to every rank (an error there stops every rank), then gathers the
  per-rank results and has rank 0 finalise the store's manifest.

:func:`noisystudent.label.inference.label_to_store` puts the three together with the teacher's
model-side batching (the one-call form the pipeline uses).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

import numpy as np

from ..data.pool import UnlabeledSource
from ..runtime.distributed import DistContext, all_gather_object, broadcast_object, shard_indices
from ..runtime.errors import DataError
from ..runtime.progress import progress_bar
from .hashing import unpack_hashes
from .store import (ShardRecord, StoreHeader, StoreManifest, consolidate, iter_bad_images, read_header,
                    read_manifest, remove_stale_temp_files, write_header, write_shard)

T = TypeVar("T")

# ---------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LabelingPlan:
    """Rank 0's decision before labeling: the store's header (its precision included) and the
    shards not finished yet, in order; ``calibration`` says how a new store's precision was chosen."""

    header: StoreHeader
    pending: tuple[int, ...]
    calibration: dict = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        """Shards finished by an earlier run (not labeled again)."""
        return self.header.source["num_shards"] - len(self.pending)

    def shards_for(self, ctx: DistContext) -> list[int]:
        """The pending shards rank ``ctx.rank`` labels: a contiguous share, the shares differing
        in size by at most one."""
        return [self.pending[i] for i in shard_indices(len(self.pending), ctx)]


def plan_labeling(store_dir: Path, wanted: StoreHeader, precision: str,
                  calibrate: Callable[[], tuple[str, dict]]) -> LabelingPlan:
    """Rank 0's store set-up: check the header of an existing store against ``wanted`` (whose
    ``precision`` is ignored) and remove a killed run's half-written files, or create the header
    of a new store (``precision="auto"``: ``calibrate()`` chooses); then list the pending shards."""
    store_dir = Path(store_dir)
    header = read_header(store_dir)
    calibration: dict = {}
    if header is not None:
        diff = header.differences(wanted, ignore=("precision",))
        if diff:
            raise DataError(f"pseudo-label store {store_dir} was made by a different labeling run "
                            f"({'; '.join(diff)}); use a new store directory")
        if precision != "auto" and precision != header.precision:
            raise DataError(f"pseudo-label store {store_dir} was labeled with precision "
                            f"{header.precision}, not {precision}; resume with precision='auto'")
        remove_stale_temp_files(store_dir)
    else:
        if precision == "auto":
            precision, calibration = calibrate()
        header = StoreHeader(**(wanted.to_dict() | {"precision": precision}))
        write_header(store_dir, header)
    return LabelingPlan(header, tuple(read_manifest(store_dir).pending()), calibration)


# ----------------------------------------------------------------------------- the work


class ShardWork(Protocol):
    """The rank-local work the coordinator runs: label these shards, return their records."""

    def label_shards(self, shards: Sequence[int]) -> list[ShardRecord]: ...


@dataclass
class _ShardBuffer:
    """Predictions of one shard while its batches come in."""

    keys: list[str] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    idx: list[np.ndarray] = field(default_factory=list)
    prob: list[np.ndarray] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)  # (n, 2) uint64 per batch, when hashing


class Labeler:
    """Labels shards of ``source`` into the store at ``store_dir`` (made with ``header``).

    ``batches(shards)`` yields the shards' batches on the device, whole shards at a time, as
    :class:`~noisystudent.label.inference.ShardBatches` makes them; ``predict(x)`` gives each
    image's top-k ``(classes, probabilities)``; ``decoder`` (GPU JPEG decoding) turns a batch of
    encoded images into ``(x, kept, failed)``. With ``hash_mode`` the batches carry image hashes,
    stored with the labels.
    """

    def __init__(self, store_dir: Path, header: StoreHeader, source: UnlabeledSource,
                 batches: Callable[[list[int]], Iterable[dict]], predict: Callable, decoder: Callable | None = None,
                 hash_mode: str | None = None, progress: bool = False):
        self.store_dir, self.header, self.source = Path(store_dir), header, source
        self.batches, self.predict, self.decoder = batches, predict, decoder
        self.hash_mode, self.progress = hash_mode, progress

    def label_shards(self, shards: Sequence[int]) -> list[ShardRecord]:
        """Label ``shards`` and write each one as soon as its last batch is predicted; returns
        their records, in the order they were written."""
        shards = list(shards)
        if not shards:
            return []
        lengths = [self.source.shard_length(s) for s in shards]
        total = sum(lengths) if all(n is not None for n in lengths) else None
        bar = progress_bar(None, desc="label", unit="img", total=total, enabled=self.progress)
        buffers: dict[int, _ShardBuffer] = {}
        written: list[ShardRecord] = []
        labeled = num_bad = 0
        try:
            for batch in self.batches(shards):
                buf = buffers.setdefault(batch["shard"], _ShardBuffer())
                self._add(buf, batch)
                bar.update(len(batch["keys"]) + len(batch["bad"]))
                if batch["last"]:
                    record = self._write(batch["shard"], buffers.pop(batch["shard"]), batch["items"])
                    written.append(record)
                    labeled, num_bad = labeled + record.rows, num_bad + record.num_bad
                    if total is None:  # unknown shard sizes: extrapolate from the shards seen so far
                        bar.total = int((labeled + num_bad) / len(written) * len(shards))
                    bar.set_postfix(shards=f"{len(written)}/{len(shards)}", bad=num_bad, refresh=False)
        finally:
            bar.close()
        return written

    def _add(self, buf: _ShardBuffer, batch: dict) -> None:
        """Predict one batch into its shard's buffer (decoding it on the device first with a decoder)."""
        x, keys, pos = batch["x"], batch["keys"], batch["pos"]
        hashes = unpack_hashes(batch["hashes"]) if batch["hashes"] is not None else None
        buf.bad.extend(batch["bad"])
        if self.decoder is not None and x is not None:
            x, kept, failed = self.decoder(x)
            buf.bad.extend((keys[i], reason) for i, reason in failed)
            keys, pos = [keys[i] for i in kept], [pos[i] for i in kept]
            hashes = hashes[kept] if hashes is not None else None
        if x is None:
            return
        idx, prob = self.predict(x)
        buf.keys.extend(keys)
        buf.pos.extend(pos)
        buf.idx.append(idx)
        buf.prob.append(prob)
        if hashes is not None:
            buf.hashes.append(hashes)

    def _write(self, shard: int, buf: _ShardBuffer, items: int) -> ShardRecord:
        """One finished shard's file and completion record, each written atomically."""
        k = self.header.top_k
        hashes = None
        if self.hash_mode is not None:
            hashes = np.concatenate(buf.hashes) if buf.hashes else np.empty((0, 2), np.uint64)
        return write_shard(self.store_dir, self.header, shard, self.source.shard_name(shard), buf.keys,
                           np.concatenate(buf.idx) if buf.idx else np.empty((0, k), np.int32),
                           np.concatenate(buf.prob) if buf.prob else np.empty((0, k), np.float32), buf.bad,
                           positions=np.asarray(buf.pos, dtype=np.int64), items=items, hashes=hashes)


# ------------------------------------------------------------------------ coordination


@dataclass(frozen=True)
class _RankZeroError:
    """What rank 0 sends instead of its answer when deciding failed."""

    message: str


class LabelingCoordinator:
    """Every collective call of labeling, made in the same order on every rank of ``ctx``.

    ``store_dir`` must be on a filesystem all ranks share: rank 0 writes the header and the
    manifest, every rank its own shards.
    """

    def __init__(self, ctx: DistContext, store_dir: Path):
        self.ctx, self.store_dir = ctx, Path(store_dir)

    def prepare(self, source: UnlabeledSource) -> None:
        """Rank 0 makes the store folder; the source builds its index in it (a listing made on
        rank 0 and sent to every rank: :meth:`~noisystudent.data.pool.UnlabeledSource.prepare`)."""
        if self.ctx.is_main:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        source.prepare(self.store_dir / "source", self.ctx)

    def from_main(self, decide: Callable[[], T]) -> T:
        """``decide()`` run on rank 0, its answer on every rank. A :class:`DataError` or OSError
        there stops every rank with the same one-line DataError, not only rank 0."""
        answer: T | _RankZeroError | None = None
        if self.ctx.is_main:
            try:
                answer = decide()
            except (DataError, OSError) as e:
                answer = _RankZeroError(str(e))
        answer = broadcast_object(answer, self.ctx)
        if isinstance(answer, _RankZeroError):
            raise DataError(answer.message)
        return answer

    def run(self, work: ShardWork, plan: LabelingPlan, settings: dict) -> StoreManifest:
        """This rank labels its share of ``plan``; then every rank's results are gathered and rank 0
        writes the store's manifest with the run's statistics (``settings`` added to them). Every
        rank returns that manifest, or raises the same DataError."""
        start = time.perf_counter()
        records = work.label_shards(plan.shards_for(self.ctx))
        seconds = time.perf_counter() - start
        # The gather is also the wait: a rank sends its results after its last shard is written.
        per_rank = all_gather_object((sum(r.rows for r in records), sum(r.num_bad for r in records),
                                      len(records), seconds), self.ctx)
        run = run_statistics(plan, per_rank) | {"world_size": self.ctx.world_size} | settings
        manifest: StoreManifest | _RankZeroError | None = None
        if self.ctx.is_main:
            try:
                manifest = finalise_store(self.store_dir, run)
            except DataError as e:
                manifest = _RankZeroError(str(e))
        manifest = broadcast_object(manifest, self.ctx)
        if isinstance(manifest, _RankZeroError):
            raise DataError(manifest.message)
        return manifest


def run_statistics(plan: LabelingPlan, per_rank: Sequence[tuple[int, int, int, float]]) -> dict:
    """A labeling run's statistics (``manifest.run``) from each rank's ``(images labeled, images
    unreadable, shards labeled, seconds)``; the run took as long as its slowest rank."""
    labeled, bad, shards = (sum(r[i] for r in per_rank) for i in range(3))
    seconds = max(r[3] for r in per_rank)
    return {"images_labeled": labeled, "images_bad": bad, "shards_labeled": shards,
            "shards_skipped": plan.skipped, "seconds": round(seconds, 3),
            "images_per_s": round(labeled / seconds, 1) if seconds > 0 else None,
            "precision": plan.header.precision, "calibration": plan.calibration}


def finalise_store(store_dir: Path, run: dict) -> StoreManifest:
    """Rank 0, after every rank's shards are written: write the manifest; refuse a store with a
    shard that has no record, or no readable image at all (nothing to select from)."""
    manifest = consolidate(store_dir, run)
    if not manifest.complete:  # on a shared filesystem every pending shard has a record now
        raise DataError(f"labeling finished but {manifest.num_shards - len(manifest.shards)} shard(s) of "
                        f"{store_dir} have no record: is the store on a filesystem all ranks share?")
    if manifest.num_rows == 0:  # refused as a folder without images is
        first = next(iter_bad_images(store_dir, manifest.shards), None)
        why = (f"{manifest.num_bad} unreadable, first {first[0]}: {first[1]} (all in {store_dir}/bad_images.tsv)"
               if first else "its shards hold no items")
        raise DataError(f"the unlabeled pool has no readable images in its {manifest.num_shards} shard(s): {why}")
    return manifest
