"""A sharded Parquet store of pseudo labels, built to hold 10^8 images.

Layout of a store directory::

    store.json            header: teacher, classes, top-k, temperature, precision, source
    shards/part-000042.parquet
                          one file per source shard, one row per image (written atomically)
    done/part-000042.json completion record of shard 42: rows, bytes, unreadable images
    manifest.json         every finished shard, consolidated at the end of a labeling run
    bad_images.tsv        ``key<TAB>reason`` of every unreadable image, consolidated likewise
    source/               the frozen listing of the unlabeled pool (folder and file-list sources)

A shard counts as finished exactly when its ``done`` record exists. The record is written after the
Parquet file has been renamed into place, so a run killed at any point leaves either a finished
shard or nothing that counts, and a resumed run recomputes only shards without a record. Each shard
is written by exactly one process, so many ranks (on a shared filesystem) never contend for a file.

Shard schema (the one Parquet schema of pseudo labels; :func:`load_pseudo_labels` reads a small
store whole as :class:`PseudoLabels`)::

    key         string                     stable image key (relative path, tar/sample key, ...)
    topk_class  fixed_size_list<int32>[k]  the teacher's k most probable classes, best first
    topk_prob   fixed_size_list<float32>[k] their probabilities (softmax of logits / T)
    confidence  float32                    top-1 probability (= topk_prob[0])
    predicted   int32                      top-1 class (= topk_class[0])
    teacher     dictionary<int32, string>  the teacher's identity (one dictionary entry per file)
    index       int64                      position of the image among its shard's items, counting
                                           unreadable ones (so the pool position is the shard's
                                           first item + index)
    content_hash uint64                    exact hash of the decoded pixels (label.hashing; absent
    phash        uint64                    in stores labeled without hashes or before they existed)
                                           and the 64-bit perceptual hash, for the selection's dedup

Top-k rebuild rule (:func:`soft_targets`, the only one): the stored
probabilities go to their classes and the remaining mass ``max(0, 1 - sum(topk_prob))`` is spread
uniformly over the ``num_classes - k`` classes not stored; hard labels rebuild as one-hot top-1.
Hard or soft is the reader's choice (``pseudo.hard`` applies at selection), not the store's: a store
holds the teacher's probabilities either way, so runs that differ only in it label the pool once.

Size: at 1000 classes and k = 5 a row costs about 30 bytes (measured; ``benchmarks/
label_throughput.py`` prints it): class indices are dictionary + bit packed, probabilities use
byte-stream-split (their exponent bytes compress well), keys use delta encoding of shared prefixes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runtime.errors import DamagedOutputError, DataError
from ..runtime.files import atomic_write

FORMAT_VERSION = 1
HEADER_FILE = "store.json"
MANIFEST_FILE = "manifest.json"
BAD_IMAGES_FILE = "bad_images.tsv"
SHARD_DIR = "shards"
DONE_DIR = "done"
SCHEMA_METADATA_KEY = b"noisystudent"
COLUMNS = ("key", "topk_class", "topk_prob", "confidence", "predicted", "teacher", "index")
HASH_COLUMNS = ("content_hash", "phash")  # optional: present when the labeler hashed the images

# Parquet encodings chosen by measurement (see module docstring); dictionary encoding is kept only
# where values repeat, because byte-stream-split and delta columns must not be dictionary encoded.
_WRITE_OPTIONS = dict(
    compression="zstd",
    use_dictionary=["topk_class.list.element", "predicted", "teacher"],
    column_encoding={"key": "DELTA_BYTE_ARRAY", "topk_prob.list.element": "BYTE_STREAM_SPLIT",
                     "confidence": "BYTE_STREAM_SPLIT", "index": "DELTA_BINARY_PACKED"},
)


# ------------------------------------------------------------------------------ records


@dataclass
class PseudoLabels:
    """A small store in memory (the probe of the labeled validation split; tests): row ``i`` is
    the ``i``-th readable image, ``indices`` its position in the pool (None: row i is image i)."""

    keys: list[str]
    topk_index: np.ndarray  # (N, k) int32, most probable first
    topk_prob: np.ndarray  # (N, k) float32
    num_classes: int
    teacher: str
    temperature: float
    hard: bool = False  # how soft_targets reads them (a reader's choice: the store keeps probabilities)
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def confidence(self) -> np.ndarray:
        """Top-1 probability of each image."""
        return self.topk_prob[:, 0]

    @property
    def predicted(self) -> np.ndarray:
        """Top-1 class of each image."""
        return self.topk_index[:, 0]

    def soft_targets(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Target distributions (len(rows), num_classes) by the store's top-k rebuild rule."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        return soft_targets(self.topk_index[rows], self.topk_prob[rows], self.num_classes, self.hard)



@dataclass(frozen=True)
class StoreHeader:
    """What produced a store; a resumed run must match it so shards never mix teachers."""

    num_classes: int
    teacher: str
    top_k: int
    temperature: float
    precision: str  # resolved inference precision: "fp32" or "bf16"
    source: dict  # the source's fingerprint (kind, number and names of shards)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StoreHeader":
        """Read a header; the ``hard`` key of a store labeled before hard labels became the
        selection's choice is ignored (its shards hold the same probabilities)."""
        return cls(num_classes=int(d["num_classes"]), teacher=str(d["teacher"]), top_k=int(d["top_k"]),
                   temperature=float(d["temperature"]), precision=str(d["precision"]),
                   source=dict(d["source"]), format_version=int(d.get("format_version", FORMAT_VERSION)))

    def differences(self, other: "StoreHeader", ignore: Sequence[str] = ()) -> list[str]:
        """Human-readable list of fields that differ (empty when compatible)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: store has {mine[k]!r}, run has {theirs[k]!r}"
                for k in mine if k not in ignore and mine[k] != theirs[k]]


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: where it is and what it holds."""

    index: int
    name: str  # the source's name for the shard (tar file, list range, ...)
    file: str  # Parquet path relative to the store directory
    rows: int
    bytes: int
    num_bad: int
    items: int  # items the source yielded for the shard: rows + unreadable ones

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardRecord":
        return cls(index=int(d["index"]), name=str(d["name"]), file=str(d["file"]), rows=int(d["rows"]),
                   bytes=int(d["bytes"]), num_bad=int(d["num_bad"]),
                   items=int(d.get("items", int(d["rows"]) + int(d["num_bad"]))))


@dataclass
class StoreManifest:
    """The state of a store: its header and the shards finished so far (in shard order)."""

    store_dir: Path
    header: StoreHeader
    num_shards: int  # shards in the source
    shards: list[ShardRecord]
    run: dict = field(default_factory=dict)  # statistics of the labeling run that returned this

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_bad(self) -> int:
        return sum(s.num_bad for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def bytes_per_image(self) -> float:
        return self.num_bytes / max(1, self.num_rows)

    def pending(self) -> list[int]:
        """Shard indices not finished yet, in order."""
        done = {s.index for s in self.shards}
        return [i for i in range(self.num_shards) if i not in done]

    def row_offsets(self) -> np.ndarray:
        """Global row id of the first row of each finished shard (rows are numbered in shard order)."""
        return np.concatenate([[0], np.cumsum([s.rows for s in self.shards])]).astype(np.int64)[:-1]

    def item_offsets(self) -> np.ndarray:
        """Pool position of the first item of each finished shard (for a complete store)."""
        return np.concatenate([[0], np.cumsum([s.items for s in self.shards])]).astype(np.int64)[:-1]

    def to_dict(self) -> dict:
        return {"header": self.header.to_dict(), "num_shards": self.num_shards, "complete": self.complete,
                "num_rows": self.num_rows, "num_bad": self.num_bad, "num_bytes": self.num_bytes,
                "bytes_per_image": round(self.bytes_per_image, 3), "run": self.run,
                "shards": [s.to_dict() for s in self.shards]}


# ------------------------------------------------------------------------------ files


def shard_file(index: int) -> str:
    return f"{SHARD_DIR}/part-{index:06d}.parquet"


def _done_file(store_dir: Path, index: int) -> Path:
    return store_dir / DONE_DIR / f"part-{index:06d}.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part
    (flushed to disk before the rename: a shard's record must never outlive its data)."""
    atomic_write(path, data, fsync=True)


def remove_stale_temp_files(store_dir: Path) -> int:
    """Delete half-written files left by a killed run, and the completion records of shards whose
    file is no longer the size it was written with (cut short or overwritten since), so a resumed
    labeling run labels them again (call before any rank starts writing)."""
    n = 0
    for sub in (SHARD_DIR, DONE_DIR, "."):
        folder = store_dir / sub
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
    for rec in _cut_shards(store_dir, read_manifest(store_dir).shards):
        _done_file(store_dir, rec.index).unlink(missing_ok=True)
        n += 1
    return n


def _cut_shards(store_dir: Path, shards: Sequence["ShardRecord"]) -> list["ShardRecord"]:
    """Finished shards whose Parquet file is not the size their record says (one stat each)."""
    return [rec for rec in shards if (Path(store_dir) / rec.file).stat().st_size != rec.bytes]


def read_header(store_dir: Path) -> StoreHeader | None:
    path = Path(store_dir) / HEADER_FILE
    if not path.is_file():
        return None
    try:
        return StoreHeader.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"corrupt store header {path}: {e}") from None


def write_header(store_dir: Path, header: StoreHeader) -> None:
    store_dir = Path(store_dir)
    for sub in (SHARD_DIR, DONE_DIR):
        (store_dir / sub).mkdir(parents=True, exist_ok=True)
    write_atomic(store_dir / HEADER_FILE, json.dumps(header.to_dict(), indent=1).encode())


def _read_done(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"corrupt shard record {path}: {e}") from None


def read_manifest(store_dir: Path) -> StoreManifest:
    """The finished shards of a store, from the per-shard completion records (the ground truth)."""
    store_dir = Path(store_dir)
    header = read_header(store_dir)
    if header is None:
        raise DataError(f"not a pseudo-label store (no {HEADER_FILE}): {store_dir}")
    records = []
    for path in sorted((store_dir / DONE_DIR).glob("part-*.json")):
        rec = ShardRecord.from_dict(_read_done(path))
        if (store_dir / rec.file).is_file():  # a record whose data vanished does not count
            records.append(rec)
    records.sort(key=lambda r: r.index)
    return StoreManifest(store_dir=store_dir, header=header, num_shards=int(header.source["num_shards"]),
                         shards=records)


def iter_bad_images(store_dir: Path, shards: Sequence[ShardRecord] | None = None) -> Iterator[tuple[str, str]]:
    """``(key, reason)`` of every image skipped as unreadable, in shard order (streamed)."""
    store_dir = Path(store_dir)
    shards = read_manifest(store_dir).shards if shards is None else shards
    for rec in shards:
        if rec.num_bad:
            for key, reason in _read_done(_done_file(store_dir, rec.index))["bad"]:
                yield str(key), str(reason)


def bad_images(store_dir: Path, shards: Sequence[ShardRecord] | None = None) -> list[tuple[str, str]]:
    """``(key, reason)`` of every image skipped as unreadable, in shard order."""
    return list(iter_bad_images(store_dir, shards))


def consolidate(store_dir: Path, run: dict | None = None) -> StoreManifest:
    """Write ``manifest.json`` and ``bad_images.tsv`` from the shard records (one process only)."""
    manifest = read_manifest(store_dir)
    manifest.run = dict(run or {})
    write_atomic(Path(store_dir) / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=1).encode())
    def write_bad(f) -> None:  # streamed: the list may be long
        f.write(b"key\treason\n")
        for key, reason in iter_bad_images(store_dir, manifest.shards):
            f.write(f"{_tsv(key)}\t{_tsv(reason)}\n".encode("utf-8", "surrogateescape"))

    atomic_write(Path(store_dir) / BAD_IMAGES_FILE, write_bad)
    return manifest


def _tsv(s: str) -> str:
    return s.replace("\t", " ").replace("\n", " ")


# ------------------------------------------------------------------------------ writing


def shard_table(keys: Sequence[str], topk_class: np.ndarray, topk_prob: np.ndarray, header: StoreHeader,
                shard_index: int, shard_name: str, positions: np.ndarray | None = None,
                hashes: np.ndarray | None = None) -> pa.Table:
    """The Arrow table of one shard (``topk_class``/``topk_prob`` are (n, k), best first;
    ``positions``: each row's item position in the shard, default ``0..n-1``; ``hashes``: (n, 2)
    uint64 content hash and perceptual hash per row, or None for a shard without them)."""
    n, k = len(keys), header.top_k
    positions = np.arange(n) if positions is None else np.asarray(positions)
    topk_class = np.ascontiguousarray(topk_class, dtype=np.int32).reshape(n, k)
    topk_prob = np.ascontiguousarray(topk_prob, dtype=np.float32).reshape(n, k)
    table = pa.table({
        "key": pa.array(list(keys), pa.string()),
        "topk_class": pa.FixedSizeListArray.from_arrays(pa.array(topk_class.reshape(-1)), k),
        "topk_prob": pa.FixedSizeListArray.from_arrays(pa.array(topk_prob.reshape(-1)), k),
        "confidence": pa.array(topk_prob[:, 0] if n else np.empty(0, np.float32)),
        "predicted": pa.array(topk_class[:, 0] if n else np.empty(0, np.int32)),
        "teacher": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([header.teacher])),
        "index": pa.array(positions.astype(np.int64)),
    })
    if hashes is not None:
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(n, 2)
        for i, name in enumerate(HASH_COLUMNS):
            table = table.append_column(name, pa.array(hashes[:, i], pa.uint64()))
    # The keys PseudoLabels.load needs, plus what identifies the shard.
    meta = {"num_classes": header.num_classes, "teacher": header.teacher, "temperature": header.temperature,
            "top_k": k, "precision": header.precision, "shard": shard_index,
            "shard_name": shard_name, "format_version": FORMAT_VERSION}
    return table.replace_schema_metadata({SCHEMA_METADATA_KEY: json.dumps(meta).encode()})


def write_shard(store_dir: Path, header: StoreHeader, index: int, name: str, keys: Sequence[str],
                topk_class: np.ndarray, topk_prob: np.ndarray, bad: Sequence[tuple[str, str]] = (),
                positions: np.ndarray | None = None, items: int | None = None,
                hashes: np.ndarray | None = None) -> ShardRecord:
    """Write one finished shard atomically, then its completion record (which makes it count).

    ``positions``/``items``: each row's item position in the shard and the shard's item count,
    both counting unreadable items (default: rows first, then the bad ones); ``hashes``: see
    :func:`shard_table`."""
    store_dir = Path(store_dir)
    rel = shard_file(index)
    path = store_dir / rel
    table = shard_table(keys, topk_class, topk_prob, header, index, name, positions, hashes)
    atomic_write(path, lambda f: pq.write_table(table, f, **_WRITE_OPTIONS), fsync=True)
    rec = ShardRecord(index=index, name=name, file=rel, rows=len(keys), bytes=path.stat().st_size,
                      num_bad=len(bad), items=len(keys) + len(bad) if items is None else int(items))
    done = rec.to_dict() | {"bad": [[str(k), str(r)] for k, r in bad]}
    write_atomic(_done_file(store_dir, index), json.dumps(done).encode())
    return rec


# ------------------------------------------------------------------------------ reading


def soft_targets(topk_class: np.ndarray, topk_prob: np.ndarray, num_classes: int,
                 hard: bool = False) -> np.ndarray:
    """Rebuild (n, num_classes) float32 targets from top-k (the rule in the module docstring)."""
    idx = np.asarray(topk_class, dtype=np.int64)
    prob = np.asarray(topk_prob, dtype=np.float32)
    n, k = idx.shape
    out = np.zeros((n, num_classes), dtype=np.float32)
    if hard:
        out[np.arange(n), idx[:, 0]] = 1.0
        return out
    if k < num_classes:
        out += np.clip(1.0 - prob.sum(1, keepdims=True), 0.0, None) / (num_classes - k)
    np.put_along_axis(out, idx, prob, axis=1)
    return out


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, width: int, dtype) -> np.ndarray:
    """A fixed-size-list column as an (n, width) array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), width)


class LabelStore:
    """Read access to a pseudo-label store, shard by shard, without loading it whole."""

    def __init__(self, store_dir: Path, manifest: StoreManifest):
        self.store_dir = Path(store_dir)
        self.manifest = manifest

    @classmethod
    def open(cls, store_dir: Path | str, require_complete: bool = False) -> "LabelStore":
        """Open a store; ``require_complete`` refuses one whose labeling has not finished."""
        manifest = read_manifest(Path(store_dir))
        # in a run, the runner labels missing and cut shards again (the labeler forgets cut ones)
        if require_complete and (not manifest.complete or _cut_shards(store_dir, manifest.shards)):
            intact = len(manifest.shards) - len(_cut_shards(store_dir, manifest.shards))
            raise DamagedOutputError(f"pseudo-label store {store_dir} is incomplete: {intact} of "
                                     f"{manifest.num_shards} shards finished and intact (resume the labeling run)")
        return cls(Path(store_dir), manifest)

    @property
    def header(self) -> StoreHeader:
        return self.manifest.header

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def shards(self) -> list[ShardRecord]:
        return self.manifest.shards

    @property
    def bad_images(self) -> list[tuple[str, str]]:
        return bad_images(self.store_dir, self.manifest.shards)

    def read_shard(self, rec: ShardRecord, columns: Sequence[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(self.store_dir / rec.file, columns=list(columns) if columns else None)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"unreadable pseudo-label shard {self.store_dir / rec.file}: {e}") from None

    def shards_without_hashes(self) -> list[ShardRecord]:
        """Finished shards whose file has no image-hash columns (labeled without hashes, or by an
        older version); read from the Parquet footers only."""
        missing = []
        for rec in self.shards:
            try:
                names = set(pq.read_schema(self.store_dir / rec.file).names)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"unreadable pseudo-label shard {self.store_dir / rec.file}: {e}") from None
            if not set(HASH_COLUMNS) <= names:
                missing.append(rec)
        return missing

    def iter_shards(self, columns: Sequence[str] | None = None,
                    shards: Sequence[int] | None = None) -> Iterator[tuple[ShardRecord, int, pa.Table]]:
        """``(record, global row id of its first row, table)`` per shard; ``shards`` are positions
        in :attr:`shards` (default all), visited in the order given."""
        offsets = self.manifest.row_offsets()
        for pos in (range(len(self.shards)) if shards is None else shards):
            rec = self.shards[pos]
            yield rec, int(offsets[pos]), self.read_shard(rec, columns)

    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``batch_size`` rows over the whole store, in row order."""
        for _, _, table in self.iter_shards(columns):
            yield from table.to_batches(max_chunksize=batch_size)

    def to_pseudo_labels(self, hard: bool = False) -> PseudoLabels:
        """The whole store in memory (for stores that fit; rows in global row order), read as hard
        labels (one-hot top-1) when ``hard``."""
        if not self.manifest.complete:
            raise DataError(f"pseudo-label store {self.store_dir} is incomplete: "
                            f"{len(self.shards)} of {self.manifest.num_shards} shards finished")
        h = self.header
        keys: list[str] = []
        idx_parts, prob_parts, pos_parts = [], [], []
        first_items = self.manifest.item_offsets()
        for pos, (_, _, t) in enumerate(self.iter_shards(["key", "topk_class", "topk_prob", "index"])):
            keys.extend(t.column("key").to_pylist())
            idx_parts.append(fixed_list_to_numpy(t.column("topk_class"), h.top_k, np.int32))
            prob_parts.append(fixed_list_to_numpy(t.column("topk_prob"), h.top_k, np.float32))
            pos_parts.append(first_items[pos] + t.column("index").to_numpy())
        empty = (np.empty((0, h.top_k), np.int32), np.empty((0, h.top_k), np.float32))
        indices = np.concatenate(pos_parts).astype(np.int64) if pos_parts else np.empty(0, np.int64)
        return PseudoLabels(keys=keys,
                            topk_index=np.concatenate(idx_parts) if idx_parts else empty[0],
                            topk_prob=np.concatenate(prob_parts) if prob_parts else empty[1],
                            num_classes=h.num_classes, teacher=h.teacher, temperature=h.temperature,
                            hard=hard,
                            # None means "row i is pool image i", as PseudoLabels does without bad images
                            indices=None if np.array_equal(indices, np.arange(len(keys))) else indices)


def load_pseudo_labels(store_dir: Path | str, hard: bool = False) -> PseudoLabels:
    """A complete store as :class:`~noisystudent.label.pseudo_labels.PseudoLabels` (rows in shard
    order), read as hard labels when ``hard``."""
    return LabelStore.open(store_dir, require_complete=True).to_pseudo_labels(hard)
