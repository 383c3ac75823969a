"""Stage 3 at scale: select pseudo labels from a sharded store without loading it.

Gives exactly the rows of :func:`noisystudent.label.select.select_pseudo_labels` on the same data (same
threshold rule, same per-class top-K with ties broken by row order, same duplication draws for a
given seed), while holding at most a histogram per class and one group of selected rows in memory.

How the per-class cut-off (the K-th most confident image of an over-full class) is found:
confidences are mapped to unsigned integers that sort the same way (their float32 bits, sign
adjusted), and each class's cut-off is narrowed by radix refinement: pass 1 counts kept images per
class and histograms their keys into ``bins`` equal ranges; the range holding the K-th image
becomes the next pass's interval, until it is one exact value ``v`` (three passes over two columns
at 2048 bins). Every image above ``v`` is selected, and of the images at exactly ``v`` the first
``K - above`` in row order are, which is the in-memory tie rule. Under torchrun each rank scans its
own contiguous range of shards and the histograms are summed, so a rank knows how many tied images
the ranks before it hold.

The emission pass writes the selected rows of each rank, bucketed into groups of classes, to spill
files; rank 0 then takes one group at a time, orders each class most-confident-first and applies
:func:`noisystudent.label.select.balance_class` (the very function the in-memory selection uses, with
the same random generator advanced class by class), and appends the result to the output.

The output is a Parquet file with one row per selected image and its copy count, in the order of
``Selection.rows`` (``np.repeat(row, copies)`` is ``Selection.rows``), plus the image's key and
top-k labels, so training can stream it without opening the store; the summary (same fields as
``Selection.summary()``) is in the file's metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..runtime.distributed import DistContext, all_reduce_sum, barrier, broadcast_object, shard_indices
from ..runtime.errors import ConfigError, DataError
from .store import LabelStore
from .select import balance_class, default_per_class

SELECTION_METADATA_KEY = b"noisystudent_selection"
DEFAULT_BINS = 2048
HIST_BUDGET = 1 << 22  # histogram cells per pass (classes x bins), ~32 MB of int64
GROUP_ROWS = 1 << 20  # selected rows per merge group held in memory on rank 0
SPILL_FLUSH_ROWS = 1 << 16  # buffered spill rows per rank before they are written
_SPILL_COLUMNS = ["key", "confidence", "predicted", "topk_class", "topk_prob"]


def order_keys(confidence: np.ndarray) -> np.ndarray:
    """uint64 keys that sort like the float32 values (``+ 0`` makes -0.0 and 0.0 equal)."""
    bits = (np.asarray(confidence, dtype=np.float32) + np.float32(0)).view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)


class _Cutoffs:
    """Per-class cut-off search state (all arrays indexed by class)."""

    def __init__(self, num_classes: int, lo: int, k: int, over: np.ndarray):
        self.k = k
        self.over = over  # classes with more than K kept images
        self.lo = np.full(num_classes, lo, dtype=np.uint64)  # cut-off lies in [lo, hi)
        self.hi = np.full(num_classes, 1 << 32, dtype=np.uint64)
        self.above = np.zeros(num_classes, dtype=np.int64)  # images with key >= hi
        self.active = over.copy()  # still being narrowed
        self.cut = np.full(num_classes, 1 << 32, dtype=np.uint64)  # select key >= cut ...
        self.tie = np.full(num_classes, 1 << 33, dtype=np.uint64)  # ... and the first of key == tie
        self.tie_budget = np.zeros(num_classes, dtype=np.int64)  # ... this many, on this rank

    def bin_width(self, classes: np.ndarray, bins: int) -> np.ndarray:
        width = self.hi[classes] - self.lo[classes]
        return (width + np.uint64(bins - 1)) // np.uint64(bins)

    def narrow(self, classes: np.ndarray, hist: np.ndarray, local: np.ndarray, bins: int,
               ctx: DistContext) -> None:
        """Move each class's interval to the bin holding its K-th key (hist: global counts)."""
        w = self.bin_width(classes, bins)
        tail = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # tail[j] = keys in bins >= j
        above = self.above[classes]
        j = (above[:, None] + tail >= self.k).sum(1) - 1  # the highest bin reaching K
        rows = np.arange(len(classes))
        beyond = np.where(j + 1 < bins, tail[rows, np.minimum(j + 1, bins - 1)], 0)
        new_lo = self.lo[classes] + j.astype(np.uint64) * w
        new_hi = np.minimum(new_lo + w, self.hi[classes])
        self.lo[classes], self.hi[classes] = new_lo, new_hi
        self.above[classes] = above + beyond
        exact = above + tail[rows, j] == self.k  # the whole bin is taken: no ties to break
        single = (new_hi - new_lo == 1) & ~exact  # one value, shared by more keys than needed
        done = exact | single
        self.cut[classes[exact]] = new_lo[exact]
        self.cut[classes[single]] = new_hi[single]
        self.tie[classes[single]] = new_lo[single]
        self.active[classes[done]] = False
        # Ties go to the first images in row order: this rank may take what the ranks before it
        # (which hold earlier rows) leave of the needed number.
        tied = classes[single]
        if len(tied) == 0:  # (every rank knows this from the global histogram)
            return
        need = self.k - self.above[tied]
        mine = local[rows[single], j[single]]
        table = torch.zeros((ctx.world_size, len(tied)), dtype=torch.int64)
        table[ctx.rank] = torch.from_numpy(np.ascontiguousarray(mine, dtype=np.int64))
        before = all_reduce_sum(table, ctx)[: ctx.rank].sum(0).numpy()
        self.tie_budget[tied] = np.clip(need - before, 0, mine)


def _read_keys(store: LabelStore, positions: Sequence[int], threshold: np.float32,
               num_classes: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, object]]:
    """Per shard: (kept mask, predicted class of kept, keys of kept, global offset, record)."""
    for rec, offset, table in store.iter_shards(["confidence", "predicted"], positions):
        conf = table.column("confidence").to_numpy().astype(np.float32, copy=False)
        pred = table.column("predicted").to_numpy().astype(np.int64, copy=False)
        keep = conf >= threshold
        cls = pred[keep]
        if len(cls) and (cls.min() < 0 or cls.max() >= num_classes):
            raise DataError(f"shard {store.store_dir / rec.file} has classes outside 0..{num_classes - 1}")
        yield keep, cls, order_keys(conf[keep]), offset, rec


def _histogram(classes: np.ndarray, keys: np.ndarray, slot: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               width: np.ndarray, bins: int, out: np.ndarray) -> None:
    """Add to ``out[slot, bin]`` the keys in [lo, hi) of the classes that have a slot (>= 0)."""
    s = slot[classes]
    m = s >= 0
    s, k = s[m], keys[m]
    inside = (k >= lo[s]) & (k < hi[s])
    s, k = s[inside], k[inside]
    b = ((k - lo[s]) // width[s]).astype(np.int64)
    out += np.bincount(s * bins + b, minlength=out.size).reshape(out.shape)


def _pick_bins(num_classes: int, bins: int | None) -> int:
    return int(bins) if bins else max(64, min(DEFAULT_BINS, HIST_BUDGET // max(1, num_classes)))


def _class_groups(unique_per_class: np.ndarray, group_rows: int) -> np.ndarray:
    """Group id of every class: consecutive classes with at most ``group_rows`` selected rows."""
    group = np.zeros(len(unique_per_class), dtype=np.int64)
    g, filled = 0, 0
    for c, n in enumerate(unique_per_class):
        if filled and filled + n > group_rows:
            g, filled = g + 1, 0
        group[c] = g
        filled += int(n)
    return group


class _Spill:
    """This rank's selected rows, appended per class group to Arrow IPC stream files."""

    def __init__(self, spill_dir: Path, rank: int):
        self.spill_dir, self.rank = spill_dir, rank
        self.buffers: dict[int, list[pa.Table]] = {}
        self.rows = 0
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, group: int, table: pa.Table) -> None:
        self.buffers.setdefault(group, []).append(table)
        self.rows += table.num_rows
        if self.rows >= SPILL_FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        for group, parts in self.buffers.items():
            table = pa.concat_tables(parts)
            if group not in self.writers:
                self.writers[group] = pa.ipc.new_stream(str(spill_path(self.spill_dir, group, self.rank)),
                                                        table.schema)
            self.writers[group].write_table(table)
        self.buffers, self.rows = {}, 0

    def close(self) -> None:
        self.flush()
        for w in self.writers.values():
            w.close()


def spill_path(spill_dir: Path, group: int, rank: int) -> Path:
    return spill_dir / f"group-{group:06d}.rank-{rank:05d}.arrow"


def _read_spills(spill_dir: Path, group: int, world_size: int) -> Iterator[pa.RecordBatch]:
    for rank in range(world_size):  # rank order is row order: ranks hold consecutive shards
        path = spill_path(spill_dir, group, rank)
        if path.is_file():
            with pa.ipc.open_stream(str(path)) as reader:
                yield from reader


def _output_schema(top_k: int) -> pa.Schema:
    return pa.schema([("row", pa.int64()), ("key", pa.string()), ("copies", pa.int32()),
                      ("predicted", pa.int32()), ("confidence", pa.float32()),
                      ("topk_class", pa.list_(pa.int32(), top_k)), ("topk_prob", pa.list_(pa.float32(), top_k))])


def _as_output(table: pa.Table, copies: np.ndarray, schema: pa.Schema) -> pa.Table:
    cols = {name: table.column(name) for name in ("row", "key")}
    cols["copies"] = pa.array(copies.astype(np.int32))
    for name in ("predicted", "confidence", "topk_class", "topk_prob"):
        cols[name] = table.column(name)
    return pa.table(cols).cast(schema)


def select_from_store(store_dir: Path | str, num_classes: int, threshold: float = 0.3, balance: bool = True,
                      per_class: int | None = None, seed: int = 0, out_path: Path | str | None = None,
                      ctx: DistContext | None = None, *, bins: int | None = None,
                      group_rows: int = GROUP_ROWS, work_dir: Path | str | None = None) -> dict:
    """Threshold, per-class top-K and duplication over a finished store, written to ``out_path``
    (default ``<store>/selection.parquet``); returns the same dict as ``Selection.summary()``.

    Under torchrun every rank calls it with the same arguments; the store (and ``work_dir``,
    default ``<out_path>.work``, used for spill files) must be on a filesystem all ranks share.
    ``bins`` (histogram bins per class and pass) and ``group_rows`` (rows per merge group) trade
    memory for passes; they never change the result.
    """
    ctx = ctx or DistContext()
    store = LabelStore.open(store_dir, require_complete=True)
    if store.header.num_classes != num_classes:
        raise ConfigError(f"num_classes={num_classes}, but store {store_dir} has {store.header.num_classes}")
    out_path = Path(out_path) if out_path is not None else store.store_dir / "selection.parquet"
    spill_dir = Path(work_dir) if work_dir is not None else out_path.with_name(out_path.name + ".work")
    thr = np.float32(threshold)
    positions = list(shard_indices(len(store.shards), ctx))

    # Pass 1: kept images per class and a histogram of their keys over [key(threshold), 2^32).
    lo0 = int(order_keys(np.array([thr]))[0]) if not np.isnan(thr) else 1 << 32
    b0 = _pick_bins(num_classes, bins)
    every = np.arange(num_classes)
    kept = np.zeros(num_classes, dtype=np.int64)
    total = 0
    hist0 = np.zeros((num_classes, b0), dtype=np.int64) if balance else None
    width0 = np.full(num_classes, ((1 << 32) - lo0 + b0 - 1) // b0 or 1, dtype=np.uint64)
    lo_all = np.full(num_classes, lo0, dtype=np.uint64)
    hi_all = np.full(num_classes, 1 << 32, dtype=np.uint64)
    for keep, cls, keys, _, _ in _read_keys(store, positions, thr, num_classes):
        total += len(keep)
        kept += np.bincount(cls, minlength=num_classes)
        if hist0 is not None:
            _histogram(cls, keys, every, lo_all, hi_all, width0, b0, hist0)
    counts = all_reduce_sum(torch.from_numpy(np.concatenate([kept, [total]])), ctx).numpy()
    kept, total = counts[:-1], int(counts[-1])
    num_kept = int(kept.sum())

    k = (per_class or default_per_class(num_kept, num_classes)) if balance else None
    over = kept > k if balance else np.zeros(num_classes, dtype=bool)
    cuts = _Cutoffs(num_classes, lo0, k or 0, over)
    if over.any():
        classes = np.flatnonzero(over)
        local = hist0[classes]
        cuts.narrow(classes, all_reduce_sum(torch.from_numpy(local.copy()), ctx).numpy(), local, b0, ctx)
    del hist0
    while cuts.active.any():  # refinement passes, over the still-unresolved classes only
        classes = np.flatnonzero(cuts.active)
        b = _pick_bins(len(classes), bins)
        slot = np.full(num_classes, -1, dtype=np.int64)
        slot[classes] = np.arange(len(classes))
        width = cuts.bin_width(classes, b)
        lo, hi = cuts.lo[classes], cuts.hi[classes]
        local = np.zeros((len(classes), b), dtype=np.int64)
        for _, cls, keys, _, _ in _read_keys(store, positions, thr, num_classes):
            _histogram(cls, keys, slot, lo, hi, width, b, local)
        cuts.narrow(classes, all_reduce_sum(torch.from_numpy(local.copy()), ctx).numpy(), local, b, ctx)

    # Emission pass: this rank's selected rows, in row order, spilled per class group.
    unique_per_class = np.minimum(kept, k) if balance else kept
    group_of = _class_groups(unique_per_class, group_rows) if balance else np.zeros(num_classes, np.int64)
    if ctx.is_main:
        shutil.rmtree(spill_dir, ignore_errors=True)
        spill_dir.mkdir(parents=True)
    barrier(ctx)
    spill = _Spill(spill_dir, ctx.rank)
    tie_seen = np.zeros(num_classes, dtype=np.int64)
    for rec, offset, table in store.iter_shards(_SPILL_COLUMNS, positions):
        conf = table.column("confidence").to_numpy().astype(np.float32, copy=False)
        keep_rows = np.flatnonzero(conf >= thr)
        cls = table.column("predicted").to_numpy().astype(np.int64, copy=False)[keep_rows]
        keys = order_keys(conf[keep_rows])
        take = ~cuts.over[cls] | (keys >= cuts.cut[cls])
        tied = np.flatnonzero(keys == cuts.tie[cls])
        if len(tied):
            tc = cls[tied]
            order = np.argsort(tc, kind="stable")  # rank of each tied image among its class's, in row order
            first = np.searchsorted(tc[order], tc[order], side="left")
            nth = np.empty(len(tied), dtype=np.int64)
            nth[order] = np.arange(len(tied)) - first
            take[tied] |= tie_seen[tc] + nth < cuts.tie_budget[tc]
            tie_seen += np.bincount(tc, minlength=num_classes)
        rows = keep_rows[take]
        chosen = table.take(pa.array(rows)).append_column("row", pa.array(offset + rows.astype(np.int64)))
        groups = group_of[cls[take]]
        for g in np.unique(groups):
            spill.add(int(g), chosen.filter(pa.array(groups == g)))
    spill.close()
    barrier(ctx)

    result: dict | str = ""
    if ctx.is_main:
        try:
            result = _merge(store, spill_dir, out_path, ctx.world_size, group_of, num_classes, k, balance,
                            seed, kept, total - num_kept, threshold)
        except (OSError, pa.ArrowException, DataError) as e:
            result = f"selection failed: {e}"
        shutil.rmtree(spill_dir, ignore_errors=True)
    result = broadcast_object(result, ctx)
    if isinstance(result, str):
        raise DataError(result)
    return result


def _merge(store: LabelStore, spill_dir: Path, out_path: Path, world_size: int, group_of: np.ndarray,
           num_classes: int, k: int | None, balance: bool, seed: int, kept: np.ndarray, below: int,
           threshold: float) -> dict:
    """Rank 0: order and duplicate each class group, append it to the output (atomically)."""
    schema = _output_schema(store.header.top_k)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    selected = np.zeros(num_classes, dtype=np.int64)
    num_unique = 0
    rng = np.random.default_rng(seed)  # advanced exactly as select_pseudo_labels advances its own
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        if not balance:  # every kept row once, in row order: copy the spills through
            for batch in _read_spills(spill_dir, 0, world_size):
                t = pa.Table.from_batches([batch])
                writer.write_table(_as_output(t, np.ones(t.num_rows, np.int64), schema))
                selected += np.bincount(t.column("predicted").to_numpy(), minlength=num_classes)
                num_unique += t.num_rows
        else:
            for g in range(int(group_of.max()) + 1 if len(group_of) else 0):
                batches = list(_read_spills(spill_dir, g, world_size))
                table = (pa.Table.from_batches(batches) if batches
                         else pa.table({"row": pa.array([], pa.int64())}))
                rows = table.column("row").to_numpy() if table.num_rows else np.empty(0, np.int64)
                cls = (table.column("predicted").to_numpy().astype(np.int64) if table.num_rows
                       else np.empty(0, np.int64))
                conf = (table.column("confidence").to_numpy() if table.num_rows else np.empty(0, np.float32))
                by_class = np.lexsort((rows, cls))  # within a class: row order
                starts = np.searchsorted(cls[by_class], np.arange(num_classes + 1))
                for c in np.flatnonzero(group_of == g):
                    members = by_class[starts[c]:starts[c + 1]]
                    # select.balance_class on this class alone: local index order = row order, so
                    # its tie rule (by row) and its rng use are those of the in-memory selection.
                    out = balance_class(np.arange(len(members)), conf[members], k, rng)
                    if len(out) == 0:
                        continue
                    run_starts = np.flatnonzero(np.r_[True, out[1:] != out[:-1]])
                    unique = out[run_starts]
                    copies = np.diff(np.r_[run_starts, len(out)])
                    writer.write_table(_as_output(table.take(pa.array(members[unique])), copies, schema))
                    selected[c] += int(copies.sum())
                    num_unique += len(unique)
        summary = {"num_selected": int(selected.sum()), "num_unique": num_unique, "per_class": k,
                   "num_below_threshold": int(below), "kept_per_class": kept.tolist(),
                   "selected_per_class": selected.tolist()}
        meta = {"summary": summary, "num_classes": num_classes, "teacher": store.header.teacher,
                "temperature": store.header.temperature, "hard": store.header.hard, "threshold": threshold,
                "balance": balance, "seed": seed, "store": str(store.store_dir)}
        writer.add_key_value_metadata({SELECTION_METADATA_KEY.decode(): json.dumps(meta)})
    os.replace(tmp, out_path)
    return summary


# ------------------------------------------------------------------------------ reading


def read_selection_metadata(path: Path | str) -> dict:
    """The selection's metadata: ``summary`` (as ``Selection.summary()``), teacher, threshold, ..."""
    meta = pq.ParquetFile(path).metadata.metadata or {}
    try:
        return json.loads(meta[SELECTION_METADATA_KEY])
    except (KeyError, ValueError) as e:
        raise DataError(f"not a selection file: {path} ({e})") from None


def iter_selection(path: Path | str, columns: Sequence[str] | None = None,
                   batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
    """Stream a selection file (``row``, ``key``, ``copies``, ``predicted``, ``confidence``,
    ``topk_class``, ``topk_prob``) in batches, in selection order."""
    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)


def selection_rows(path: Path | str) -> np.ndarray:
    """The selected global row ids with duplicates repeated: equal to ``Selection.rows``."""
    parts = [np.repeat(b.column("row").to_numpy(), b.column("copies").to_numpy())
             for b in iter_selection(path, ["row", "copies"])]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
