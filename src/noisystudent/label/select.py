"""Stage 3: choose which pseudo-labeled images the student trains on, out of core.

The paper's rule, over a pseudo-label store (:mod:`noisystudent.label.store`) of any size:

0. pool hygiene (optional, on in the pipeline): drop images that are exact or near copies of a
   held-out (validation or test) image: the same content hash, or perceptual hashes at most
   ``dedup_distance`` bits apart (:mod:`noisystudent.label.hashing`); and count, without dropping
   them, the images that have such a copy elsewhere in the pool (:mod:`noisystudent.label.dedup`);
1. drop images whose top-1 confidence is below ``threshold``; with ``threshold_mode="per-class"``
   the threshold of images predicted as class ``c`` is ``threshold * mean_c / mean`` (clipped to
   [0, 1]), ``mean_c`` the mean top-1 confidence of the images predicted as ``c`` and ``mean`` that
   of all images (:func:`per_class_thresholds`), so a class the teacher is less sure of keeps images;
2. balance (optional): keep the ``K`` most confident images of each predicted class (ties go to
   the earlier image in store order: shard, then position in the shard), and duplicate the images
   of a class with ``n < K`` images until it has exactly ``K``: every image gets ``K // n`` copies
   and the ``K % n`` images with the smallest draw key ``md5("<seed>:<key>")`` get one more.
   ``K`` defaults to the number of images kept after the threshold divided by the number of classes.

It runs as DuckDB queries over the store's Parquet shards: a count per class, one sort of narrow
columns that finds each class's cut-off row (it spills to disk under ``memory_limit``), and a
filtered scan in store order that gives every row its copies; the hand-written radix refinement
it replaces was slower at 10^7 rows (see docs/benchmarks.md). The draw key is md5 because DuckDB
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
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runtime.errors import ConfigError, DamagedOutputError, DataError, error_reason
from ..runtime.files import atomic_write
from ..config.schema import THRESHOLD_MODES, PseudoLabelConfig
from .dedup import count_pool_duplicates, dedup_wanted, find_duplicates  # noqa: F401 (dedup_wanted: steps imports it from here)
from .hashing import PHASH_BITS
from .store import LabelStore

log = logging.getLogger("noisystudent")

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
    dedup: dict | None = field(default=None)  # what pool hygiene dropped (None: not run)
    threshold_mode: str = "global"
    thresholds_per_class: list[float] | None = None  # per-class mode: each predicted class's threshold

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
                "selected_per_class": list(self.selected_per_class), "dedup": self.dedup,
                "threshold_mode": self.threshold_mode, "thresholds_per_class": self.thresholds_per_class,
                "hard": self.hard}

    @classmethod
    def open(cls, path: Path | str) -> "Selection":
        """Read a selection's metadata (not its rows)."""
        path = Path(path)
        try:
            meta = json.loads((pq.ParquetFile(path).metadata.metadata or {})[SELECTION_METADATA_KEY])
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:  # in a run: the select stage runs again
            raise DamagedOutputError(f"not a selection file: {path} ({type(e).__name__}: {e})") from None
        expanded = path.with_suffix(EXPANDED_SUFFIX)
        try:  # its twin the students read: its footer lists every batch, so a cut file fails here
            with pa.memory_map(str(expanded)) as f:
                pa.ipc.open_file(f)
        except (OSError, pa.ArrowException) as e:
            raise DamagedOutputError(f"selection file {expanded} is missing or damaged "
                                     f"({type(e).__name__}: {e}); select again") from None
        s = meta["summary"]
        return cls(path=path, per_class=s["per_class"], kept_per_class=s["kept_per_class"],
                   selected_per_class=s["selected_per_class"], num_below_threshold=s["num_below_threshold"],
                   num_unique=s["num_unique"], num_classes=meta["num_classes"], top_k=meta["top_k"],
                   hard=meta["hard"], store=meta["store"], dedup=s.get("dedup"),
                   threshold_mode=s.get("threshold_mode", "global"), thresholds_per_class=s.get("thresholds_per_class"))


def _store_read_error(store: LabelStore, error: Exception) -> DataError:
    """One line for a DuckDB error, which rarely names the file: the shard pyarrow cannot read
    either, and what to do (read only after the failure, so a healthy selection pays nothing)."""
    for rec in store.shards:
        path = store.store_dir / rec.file
        try:
            pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            return DataError(f"damaged pseudo-label shard {path} ({error_reason(e)}); delete it and run the "
                             "command again: its images are labeled again")
    return DataError(f"selecting from pseudo-label store {store.store_dir} failed: {error_reason(error)}")


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
                      balance: bool = True, per_class: int | None = None, seed: int = 0, hard: bool = False,
                      memory_limit: str = "1GB", threads: int | None = None, heldout: Path | str | None = None,
                      dedup_distance: int = PseudoLabelConfig.dedup_distance,
                      bands: int | None = None, threshold_mode: str = "global") -> Selection:
    """Select from a complete store into ``out_path`` (selection.parquet) and its expanded twin.

    ``hard``: the students read the selected images' labels as one-hot top-1 (the paper's hard
    labels) instead of the stored probabilities; threshold and balance read the same confidences.

    ``heldout``: a Parquet file of held-out image hashes (:func:`~noisystudent.label.hashing.
    write_heldout_hashes`); pool images that are copies of one of them (:func:`find_duplicates`,
    within ``dedup_distance`` bits; ``bands`` forces the band layout, for tests) are dropped
    before the threshold, and the summary's ``dedup`` says how many and shows examples; its
    ``pool`` counts the images that have a copy elsewhere in the pool (:func:`count_pool_duplicates`;
    counted, not dropped).
    ``threshold_mode``: ``global`` (one threshold) or ``per-class`` (:func:`per_class_thresholds`,
    recorded in the summary's ``thresholds_per_class``).
    Memory is bounded by ``memory_limit`` (DuckDB spills to a temp folder beside ``out_path``), not
    by the size of the store. Returns the :class:`Selection`.
    """
    _check_settings(threshold, per_class, threshold_mode, dedup_distance)
    store = LabelStore.open(store_dir, require_complete=True)
    h = store.header
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = [str(store.store_dir / rec.file) for rec in store.shards if rec.rows]
    temp_dir = out_path.parent / ".duckdb-tmp"
    con = _connect(memory_limit, threads, temp_dir)
    try:
        _create_labels_view(con, files, h.top_k)
        dedup, source, dropped = None, "labels", np.empty(0, np.int64)
        if heldout is not None:
            dedup = find_duplicates(con, store, files, Path(heldout), dedup_distance, bands)
            dedup["pool"] = count_pool_duplicates(con, store, files, dedup_distance)
            if dedup["dropped"]:
                source = ("(SELECT l.* FROM labels l ANTI JOIN dropped d "
                          "ON l.shard = d.shard AND l.\"index\" = d.\"index\")")
                dropped = con.execute(f"SELECT {_POS_SQL} AS pos FROM dropped ORDER BY pos").fetchnumpy()["pos"]
        above, thresholds = _above_threshold(con, source, threshold, threshold_mode, h.num_classes)
        # `kept` (copies dropped) feeds the counts and the cut-off sort; the final scan reads `scan`,
        # a plain filtered scan, because a join does not keep store order: _write_outputs drops the
        # copies from it by position.
        con.execute(f"CREATE TEMP VIEW kept AS SELECT * FROM {source} WHERE {above}")
        con.execute(f"CREATE TEMP VIEW scan AS SELECT * FROM labels WHERE {above}")
        counts = dict(con.execute("SELECT predicted, count(*) FROM kept GROUP BY predicted").fetchall())
        bad = [c for c in counts if not 0 <= c < h.num_classes]
        if bad:
            raise DataError(f"pseudo-label store {store_dir} predicts class {bad[0]}, outside its "
                            f"{h.num_classes} classes")
        kept = np.zeros(h.num_classes, np.int64)
        for c, n in counts.items():
            kept[c] = n
        num_rows = store.num_rows - (dedup["dropped"] if dedup else 0)
        k = (per_class or default_per_class(int(kept.sum()), h.num_classes)) if balance else None
        query, params = _selection_query(con, kept, k, f"{seed}:") if balance else (_UNBALANCED, {})
        meta = {"summary": None, "num_classes": h.num_classes, "top_k": h.top_k, "hard": bool(hard),
                "threshold": threshold, "balance": balance, "seed": seed, "store": store_identity(store)}
        thresholding = {"threshold_mode": threshold_mode, "thresholds_per_class": thresholds}
        selected, unique = _write_outputs(con, query, params, out_path, h.num_classes, meta,
                                          kept, k, num_rows - int(kept.sum()), dedup, dropped, thresholding)
    except duckdb.Error as e:
        raise _store_read_error(store, e) from None
    finally:
        con.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return Selection(path=out_path, per_class=k, kept_per_class=kept.tolist(), selected_per_class=selected.tolist(),
                     num_below_threshold=num_rows - int(kept.sum()), num_unique=unique,
                     num_classes=h.num_classes, top_k=h.top_k, hard=bool(hard), store=store_identity(store),
                     dedup=dedup, threshold_mode=threshold_mode, thresholds_per_class=thresholds)


def _check_settings(threshold: float, per_class: int | None, threshold_mode: str, dedup_distance: int) -> None:
    """One-line ConfigErrors for selection settings out of range."""
    if not (0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ConfigError(f"pseudo.threshold must be in [0, 1], got {threshold}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"pseudo.per_class must be >= 1, got {per_class}")
    if threshold_mode not in THRESHOLD_MODES:
        raise ConfigError(f"pseudo.threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, got {threshold_mode!r}")
    if not 0 <= dedup_distance < PHASH_BITS:
        raise ConfigError(f"pseudo.dedup_distance must be in [0, {PHASH_BITS - 1}], got {dedup_distance}")


def _create_labels_view(con, files: list[str], top_k: int) -> None:
    """The ``labels`` view over the store's shards (with each row's shard number), or an empty
    table of the same schema for an empty store (every image unreadable)."""
    quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    if files:
        con.execute("CREATE TEMP VIEW labels AS SELECT key, predicted, confidence, topk_class, topk_prob, "
                    "\"index\", CAST(regexp_extract(filename, 'part-(\\d+)\\.parquet$', 1) AS INTEGER) AS shard "
                    f"FROM read_parquet([{quoted}], filename = true)")
    else:
        con.execute("CREATE TEMP TABLE labels (key VARCHAR, predicted INTEGER, confidence FLOAT, "
                    f"topk_class INTEGER[{top_k}], topk_prob FLOAT[{top_k}], \"index\" BIGINT, shard INTEGER)")


def _above_threshold(con, source: str, threshold: float, threshold_mode: str,
                     num_classes: int) -> tuple[str, list[float] | None]:
    """The SQL condition a row must meet to be kept, and the per-class thresholds (per-class mode)."""
    # float32 comparison, as the store holds float32 confidences; repr() round-trips the double
    above = f"confidence >= CAST({float(threshold)!r} AS FLOAT)"
    if threshold_mode != "per-class":
        return above, None
    thresholds = per_class_thresholds(con, source, threshold, num_classes)
    listed = ", ".join(repr(t) for t in thresholds)
    # a class outside the store's classes gets the global threshold, so the caller's check names it
    above = (f"confidence >= COALESCE(list_extract(CAST([{listed}] AS FLOAT[]), predicted + 1), "
             f"CAST({float(threshold)!r} AS FLOAT))")
    log.info("per-class thresholds: " + (", ".join(f"{c}: {t:.3f}" for c, t in enumerate(thresholds))
                                         if len(thresholds) <= 20 else
                                         f"{min(thresholds):.3f} to {max(thresholds):.3f} over "
                                         f"{len(thresholds)} classes (all in selection.json)"))
    return above, thresholds


def per_class_thresholds(con, source: str, threshold: float, num_classes: int) -> list[float]:
    """``pseudo.threshold_mode: per-class``: each predicted class's threshold, ``threshold x
    (its mean top-1 confidence / the mean over all rows of ``source``)``, clipped to [0, 1].

    Scaling by the mean (rather than, say, a per-class quantile) keeps the configured threshold's
    meaning on average, keeps it fixed where the teacher is equally sure of every class, and lowers
    it in proportion for a class whose images all score low (a hard or under-represented class),
    which a global threshold would empty. A class with no images keeps ``threshold``."""
    rows = con.execute(f"SELECT predicted, avg(confidence), count(*) FROM {source} GROUP BY predicted").fetchall()
    total = sum(n for _, _, n in rows)
    overall = sum(m * n for _, m, n in rows) / total if total else 0.0
    out = [float(threshold)] * num_classes
    for c, mean, _ in rows:
        if 0 <= c < num_classes and overall > 0:
            out[c] = float(min(1.0, max(0.0, threshold * mean / overall)))
    return out


_COLUMNS_SQL = "key, shard, \"index\", predicted, confidence, topk_class, topk_prob"
# A row's place in store order as one number (shard, then position; positions are < 2^32).
_POS_SQL = "(CAST(shard AS BIGINT) * 4294967296 + \"index\")"
# No ORDER BY here or below: with preserve_insertion_order a filtered scan of the shard files (listed
# in shard order) comes out in store order, and sorting the wide rows is what made memory grow.
_UNBALANCED = f"SELECT {_COLUMNS_SQL}, 1 AS copies FROM scan"


def _selection_query(con, kept: np.ndarray, k: int, seed: str) -> tuple[str, dict]:
    """The balanced selection as a filtered scan in store order, and its parameters.

    Each class's rule comes down to one cut-off row: an over-full class (n > K) takes its rows up
    to its K-th in (confidence descending, store order); an under-full one (n < K) gives every row
    K // n copies and one more to its rows up to its (K % n)-th in (md5 draw, store order). The
    cut-offs come from one sort of narrow columns (class, confidence, position, draw) of the
    classes that need one, read back once; DuckDB's sort spills under ``memory_limit``. A window
    per class instead (``row_number() OVER (PARTITION BY predicted ...)``) holds whole classes with
    their wide columns, so its memory grew with the pool (+470 MB at 10^6 rows in 3 classes).
    """
    n = kept.astype(np.int64)
    extra = np.where((n > 0) & (n < k), k % np.maximum(n, 1), 0)
    target = np.where(n > k, k - 1, np.where(extra > 0, extra - 1, -1))  # 0-based rank of the cut-off row
    by_class = {"need": (target >= 0).tolist(), "under": (n < k).tolist()}
    cut_conf = np.zeros(len(n), np.float32)
    cut_pos = np.full(len(n), -1, np.int64)  # -1: no cut-off (the class is taken whole, or gets no extra copy)
    cut_draw = [""] * len(n)
    if (target >= 0).any():
        sort = f"""
            SELECT predicted, confidence, pos, draw FROM (
                SELECT predicted, confidence, {_POS_SQL} AS pos,
                       CASE WHEN list_extract($under, predicted + 1) THEN md5($seed || key) END AS draw
                FROM kept WHERE list_extract($need, predicted + 1))
            ORDER BY predicted, draw, CASE WHEN draw IS NULL THEN confidence END DESC, pos"""
        seen = np.zeros(len(n), np.int64)  # rows of each class read so far
        for batch in con.sql(sort, params=by_class | {"seed": seed}).to_arrow_reader(BATCH_ROWS):
            pred = batch.column("predicted").to_numpy().astype(np.int64)
            if not len(pred):
                continue
            starts = np.r_[0, np.flatnonzero(pred[1:] != pred[:-1]) + 1]  # the batch is sorted by class
            offset = np.arange(len(pred)) - np.repeat(starts, np.diff(np.r_[starts, len(pred)]))
            for i in np.flatnonzero(seen[pred] + offset == target[pred]):
                c = pred[i]
                cut_conf[c] = batch.column("confidence")[i].as_py()
                cut_pos[c] = batch.column("pos")[i].as_py()
                cut_draw[c] = batch.column("draw")[i].as_py() or ""
            seen += np.bincount(pred, minlength=len(n))
    query = f"""
        SELECT {_COLUMNS_SQL}, copies FROM (
            SELECT *, CASE
                WHEN n >= $k THEN CAST(cpos < 0 OR confidence > cconf OR (confidence = cconf AND pos <= cpos) AS INTEGER)
                ELSE $k // n + CAST(cpos >= 0 AND (draw < cdraw OR (draw = cdraw AND pos <= cpos)) AS INTEGER)
              END AS copies
            FROM (
                SELECT *, {_POS_SQL} AS pos, list_extract($n, predicted + 1) AS n,
                       list_extract(CAST($cconf AS FLOAT[]), predicted + 1) AS cconf,
                       list_extract($cpos, predicted + 1) AS cpos, list_extract($cdraw, predicted + 1) AS cdraw,
                       CASE WHEN list_extract($cpos, predicted + 1) >= 0 AND list_extract($n, predicted + 1) < $k
                            THEN md5($seed || key) END AS draw
                FROM scan))
        WHERE copies > 0"""
    # float32 -> Python float -> FLOAT is exact, so the confidence comparisons are float32 ones.
    return query, {"k": k, "seed": seed, "n": n.tolist(), "cconf": cut_conf.tolist(), "cpos": cut_pos.tolist(),
                   "cdraw": cut_draw}


def _write_outputs(con, query: str, params: dict, out_path: Path, num_classes: int, meta: dict,
                   kept: np.ndarray, k: int | None, below: int, dedup: dict | None = None,
                   dropped: np.ndarray | None = None, thresholding: dict | None = None) -> tuple[np.ndarray, int]:
    """Stream the query's rows into selection.parquet and the expanded selection.arrow (record
    batches of exactly EXPANDED_BATCH_ROWS rows but the last, so row i is in batch i // that).
    Rows at the sorted positions ``dropped`` (copies of held-out images) are left out.
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
                last = -1
                for batch in reader:
                    batch = pa.RecordBatch.from_arrays([batch.column(n).cast(schema.field(n).type) for n in COLUMNS],
                                                       schema=schema)
                    if batch.num_rows:  # the scan has no ORDER BY (see _UNBALANCED): check it is in store order
                        pos = (batch.column("shard").to_numpy().astype(np.int64) << 32) + batch.column("index").to_numpy()
                        if pos[0] <= last or (np.diff(pos) <= 0).any():
                            raise DataError("the selection query returned rows out of store order")
                        last = int(pos[-1])
                        if dropped is not None and len(dropped):
                            at = np.minimum(np.searchsorted(dropped, pos), len(dropped) - 1)
                            batch = batch.filter(pa.array(dropped[at] != pos))
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
                                   "selected_per_class": selected.tolist(), "dedup": dedup,
                                   **(thresholding or {"threshold_mode": "global", "thresholds_per_class": None})}
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
