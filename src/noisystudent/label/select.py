"""Stage 3: choose which pseudo-labeled images the student trains on, out of core.

The paper's rule, over a pseudo-label store (:mod:`noisystudent.label.store`) of any size:

1. drop images whose top-1 confidence is below ``threshold``;
2. balance (optional): keep the ``K`` most confident images of each predicted class (ties go to
   the earlier image in store order: shard, then position in the shard), and duplicate the images
   of a class with ``n < K`` images until it has exactly ``K``: every image gets ``K // n`` copies
   and the ``K % n`` images with the smallest draw key ``md5("<seed>:<key>")`` get one more.
   ``K`` defaults to the number of images kept after the threshold divided by the number of classes.

It runs as one DuckDB query over the store's Parquet shards (a window per class), which spills to
disk under ``memory_limit``; the hand-written radix refinement it replaces was no faster at 10^7
rows and three times as long to read (see docs/benchmarks.md). The draw key is md5 because DuckDB
and Python's hashlib compute the same digest, so the rule is checkable outside the database.

Outputs, both written to a temp file and renamed:

- ``selection.parquet``: one row per selected image (``key``, ``shard``, ``index``, ``copies``,
  ``predicted``, ``confidence``, ``topk_class``, ``topk_prob``) in store order (shard, then position),
  so a streamed student reads one shard's rows by row-group statistics; the summary and the store's
  identity are in the file's metadata;
- ``selection.arrow``: the same rows with the copies expanded (row ``i`` is item ``i`` of the
  student's pseudo-labeled stream), as an uncompressed Arrow IPC file that training memory-maps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runtime.errors import ConfigError, DataError
from ..runtime.files import atomic_write
from .store import LabelStore

SELECTION_METADATA_KEY = b"noisystudent_selection"
EXPANDED_SUFFIX = ".arrow"
BATCH_ROWS = 1 << 16  # rows per Arrow batch streamed out of DuckDB
EXPANDED_BATCH_ROWS = 1024  # rows per record batch of the expanded file (random reads touch one)
COLUMNS = ("key", "shard", "index", "copies", "predicted", "confidence", "topk_class", "topk_prob")


@dataclass(frozen=True)
class Selection:
    """A finished selection: where it is and what it holds (the counts of ``selection.json``)."""

    path: Path  # selection.parquet
    per_class: int | None  # K, or None without balancing
    kept_per_class: list[int]  # images per class after the threshold (before balancing)
    selected_per_class: list[int]  # stream items per class after balancing (copies counted)
    num_below_threshold: int
    num_unique: int
    num_classes: int
    top_k: int
    hard: bool
    store: dict  # identity of the store it was selected from (teacher, source, num_rows)

    @property
    def num_selected(self) -> int:
        """Items in the student's pseudo-labeled stream (copies counted)."""
        return int(sum(self.selected_per_class))

    @property
    def expanded_path(self) -> Path:
        return self.path.with_suffix(EXPANDED_SUFFIX)

    def summary(self) -> dict:
        return {"num_selected": self.num_selected, "num_unique": self.num_unique, "per_class": self.per_class,
                "num_below_threshold": self.num_below_threshold, "kept_per_class": list(self.kept_per_class),
                "selected_per_class": list(self.selected_per_class)}

    @classmethod
    def open(cls, path: Path | str) -> "Selection":
        """Read a selection's metadata (not its rows)."""
        path = Path(path)
        try:
            meta = json.loads((pq.ParquetFile(path).metadata.metadata or {})[SELECTION_METADATA_KEY])
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
            raise DataError(f"not a selection file: {path} ({type(e).__name__}: {e})") from None
        s = meta["summary"]
        return cls(path=path, per_class=s["per_class"], kept_per_class=s["kept_per_class"],
                   selected_per_class=s["selected_per_class"], num_below_threshold=s["num_below_threshold"],
                   num_unique=s["num_unique"], num_classes=meta["num_classes"], top_k=meta["top_k"],
                   hard=meta["hard"], store=meta["store"])


def store_identity(store: LabelStore) -> dict:
    """What a selection records of its store, so a student never trains on another store's rows."""
    h = store.header
    return {"teacher": h.teacher, "source": h.source, "num_rows": store.num_rows, "num_classes": h.num_classes}


def default_per_class(num_kept: int, num_classes: int) -> int:
    """K derived from the data: the mean number of images per class that pass the threshold."""
    return max(1, math.ceil(num_kept / num_classes))


def _connect(memory_limit: str, threads: int | None, temp_dir: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(temp_dir),
                                 "preserve_insertion_order": True})
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def select_from_store(store_dir: Path | str, out_path: Path | str, *, threshold: float = 0.3,
                      balance: bool = True, per_class: int | None = None, seed: int = 0,
                      memory_limit: str = "1GB", threads: int | None = None) -> Selection:
    """Select from a complete store into ``out_path`` (selection.parquet) and its expanded twin.

    Memory is bounded by ``memory_limit`` (DuckDB spills to a temp folder beside ``out_path``), not
    by the size of the store. Returns the :class:`Selection`.
    """
    if not (0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ConfigError(f"pseudo.threshold must be in [0, 1], got {threshold}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"pseudo.per_class must be >= 1, got {per_class}")
    store = LabelStore.open(store_dir, require_complete=True)
    h = store.header
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = [str(store.store_dir / rec.file) for rec in store.shards if rec.rows]
    temp_dir = out_path.parent / ".duckdb-tmp"
    con = _connect(memory_limit, threads, temp_dir)
    try:
        quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        if files:
            con.execute("CREATE TEMP VIEW labels AS SELECT key, predicted, confidence, topk_class, topk_prob, "
                        "\"index\", CAST(regexp_extract(filename, 'part-(\\d+)\\.parquet$', 1) AS INTEGER) AS shard "
                        f"FROM read_parquet([{quoted}], filename = true)")
        else:  # an empty store (every image unreadable): an empty selection, same schema
            con.execute("CREATE TEMP TABLE labels (key VARCHAR, predicted INTEGER, confidence FLOAT, "
                        f"topk_class INTEGER[{h.top_k}], topk_prob FLOAT[{h.top_k}], \"index\" BIGINT, shard INTEGER)")
        # float32 comparison, as the store holds float32 confidences; repr() round-trips the double
        con.execute(f"CREATE TEMP VIEW kept AS SELECT * FROM labels WHERE confidence >= CAST({float(threshold)!r} AS FLOAT)")
        counts = dict(con.execute("SELECT predicted, count(*) FROM kept GROUP BY predicted").fetchall())
        bad = [c for c in counts if not 0 <= c < h.num_classes]
        if bad:
            raise DataError(f"pseudo-label store {store_dir} predicts class {bad[0]}, outside its "
                            f"{h.num_classes} classes")
        kept = np.zeros(h.num_classes, np.int64)
        for c, n in counts.items():
            kept[c] = n
        num_rows = store.num_rows
        k = (per_class or default_per_class(int(kept.sum()), h.num_classes)) if balance else None
        query = _selection_query(balance)
        params = {"k": k, "seed": f"{seed}:"} if balance else {}
        meta = {"summary": None, "num_classes": h.num_classes, "top_k": h.top_k, "hard": h.hard,
                "threshold": threshold, "balance": balance, "seed": seed, "store": store_identity(store)}
        selected, unique = _write_outputs(con, query, params, out_path, h.num_classes, meta,
                                          kept, k, num_rows - int(kept.sum()))
    finally:
        con.close()
        _rmtree(temp_dir)
    return Selection(path=out_path, per_class=k, kept_per_class=kept.tolist(), selected_per_class=selected.tolist(),
                     num_below_threshold=num_rows - int(kept.sum()), num_unique=unique,
                     num_classes=h.num_classes, top_k=h.top_k, hard=h.hard, store=store_identity(store))


def _selection_query(balance: bool) -> str:
    cols = "key, shard, \"index\", predicted, confidence, topk_class, topk_prob"
    if not balance:
        return f"SELECT {cols}, 1 AS copies FROM kept ORDER BY shard, \"index\""
    # Per class: rank by confidence (ties: store order), keep the top K; a class with n < K rows
    # gives each K // n copies and one more to the K % n rows first in the draw order.
    return f"""
        WITH ranked AS (
            SELECT {cols},
                   row_number() OVER (PARTITION BY predicted ORDER BY confidence DESC, shard, "index") AS rank,
                   count(*) OVER (PARTITION BY predicted) AS n
            FROM kept),
        full_classes AS (SELECT *, 1 AS copies FROM ranked WHERE n >= $k AND rank <= $k),
        under AS (
            SELECT *, $k // n + CASE WHEN row_number() OVER (
                          PARTITION BY predicted ORDER BY md5($seed || key), shard, "index") <= $k % n
                          THEN 1 ELSE 0 END AS copies
            FROM ranked WHERE n < $k)
        SELECT {cols}, copies FROM (SELECT * FROM full_classes UNION ALL SELECT * FROM under)
        ORDER BY shard, "index"
        """


def _write_outputs(con, query: str, params: dict, out_path: Path, num_classes: int, meta: dict,
                   kept: np.ndarray, k: int | None, below: int) -> tuple[np.ndarray, int]:
    """Stream the query's rows into selection.parquet and the expanded selection.arrow (record
    batches of exactly EXPANDED_BATCH_ROWS rows but the last, so row i is in batch i // that).
    The expanded file is renamed into place first: selection.parquet's presence means both are."""
    reader = con.sql(query, params=params).to_arrow_reader(BATCH_ROWS)
    schema = selection_schema(meta["top_k"])
    selected = np.zeros(num_classes, np.int64)
    unique = 0

    def write_both(parquet_file) -> None:
        def write_expanded(arrow_file) -> None:
            nonlocal selected, unique
            pending: list[pa.RecordBatch] = []  # expanded rows not yet written as a whole batch
            with pq.ParquetWriter(parquet_file, schema, compression="zstd", write_statistics=True) as writer, \
                    pa.ipc.new_file(arrow_file, schema.remove_metadata()) as expanded:
                for batch in reader:
                    batch = pa.RecordBatch.from_arrays([batch.column(n).cast(schema.field(n).type) for n in COLUMNS],
                                                       schema=schema)
                    copies = batch.column("copies").to_numpy()
                    writer.write_batch(batch)
                    unique += batch.num_rows
                    selected += np.bincount(batch.column("predicted").to_numpy(), weights=copies,
                                            minlength=num_classes).astype(np.int64)
                    if batch.num_rows:
                        pending.append(batch.take(pa.array(np.repeat(np.arange(batch.num_rows), copies))))
                        pending = _flush_full_batches(pending, expanded)
                rest = pa.Table.from_batches(pending, schema=schema).combine_chunks()
                if rest.num_rows:
                    expanded.write_batch(rest.to_batches()[0])
                meta["summary"] = {"num_selected": int(selected.sum()), "num_unique": unique, "per_class": k,
                                   "num_below_threshold": int(below), "kept_per_class": kept.tolist(),
                                   "selected_per_class": selected.tolist()}
                writer.add_key_value_metadata({SELECTION_METADATA_KEY.decode(): json.dumps(meta)})

        atomic_write(out_path.with_suffix(EXPANDED_SUFFIX), write_expanded)

    atomic_write(out_path, write_both)
    return selected, unique


def _flush_full_batches(pending: list[pa.RecordBatch], writer) -> list[pa.RecordBatch]:
    """Write whole EXPANDED_BATCH_ROWS batches out of ``pending``; return what is left."""
    if sum(b.num_rows for b in pending) < EXPANDED_BATCH_ROWS:
        return pending
    table = pa.Table.from_batches(pending).combine_chunks()
    full = table.num_rows // EXPANDED_BATCH_ROWS * EXPANDED_BATCH_ROWS
    for start in range(0, full, EXPANDED_BATCH_ROWS):
        writer.write_batch(table.slice(start, EXPANDED_BATCH_ROWS).combine_chunks().to_batches()[0])
    return table.slice(full).combine_chunks().to_batches() if full < table.num_rows else []


def selection_schema(top_k: int) -> pa.Schema:
    """Columns of selection.parquet and selection.arrow."""
    return pa.schema([("key", pa.string()), ("shard", pa.int32()), ("index", pa.int64()), ("copies", pa.int32()),
                      ("predicted", pa.int32()), ("confidence", pa.float32()),
                      ("topk_class", pa.list_(pa.int32(), top_k)), ("topk_prob", pa.list_(pa.float32(), top_k))])


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
