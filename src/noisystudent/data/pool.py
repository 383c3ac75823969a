"""The unlabeled pool as a stream of shards: image folders, file lists, WebDataset tars, image sets.

Used by the streaming labeler (:mod:`noisystudent.label.inference`) and by the students' pseudo-labeled
dataset, so the pool is read one way everywhere.

The unlabeled pool is a :class:`UnlabeledSource`: a fixed, ordered list of shards, each an
iterable of ``(key, payload)`` items. Sources never materialise the pool: an image folder is
walked once into an on-disk listing (``<store>/source/``, which also freezes the pool so a resumed
run sees the same shards), a file list is indexed by byte offsets, WebDataset tar shards are read
as streams with :mod:`tarfile`.

"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ..runtime.distributed import DistContext, broadcast_object
from ..runtime.errors import ConfigError, DataError
from ..runtime.files import atomic_write
from ..config.schema import DataConfig
from .datasets import ImageSet, SkippedFiles, is_image_file, pool_path

DEFAULT_SHARD_SIZE = 8192

# --------------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Unreadable:
    """A payload standing for an item the source could not read (recorded as a bad image)."""

    reason: str


def decode_image(payload) -> Image.Image:
    """Turn a source payload into a loaded PIL image.

    Payloads: a PIL image, a uint8 array (H, W) or (H, W, C), encoded bytes, a file path, a
    zero-argument callable returning one of these, or :class:`Unreadable`.
    """
    if isinstance(payload, Unreadable):
        raise DataError(payload.reason)
    if callable(payload) and not isinstance(payload, Image.Image):
        payload = payload()
    if isinstance(payload, Image.Image):
        return payload
    if isinstance(payload, np.ndarray):
        arr = payload[..., 0] if payload.ndim == 3 and payload.shape[-1] == 1 else payload
        return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    if isinstance(payload, (bytes, bytearray, memoryview)):
        if len(payload) == 0:
            raise DataError("empty file")
        img = Image.open(io.BytesIO(payload))
    elif isinstance(payload, (str, os.PathLike)):
        if os.path.getsize(payload) == 0:
            raise DataError("empty file")
        img = Image.open(payload)
    else:
        raise DataError(f"unsupported payload type {type(payload).__name__}")
    img.load()  # decode now, in the worker, so errors surface here rather than in the transform
    return img


# ---------------------------------------------------------------------------------- sources


class UnlabeledSource:
    """An unlabeled pool as a fixed, ordered list of shards of ``(key, payload)`` items.

    Subclasses implement :meth:`iter_shard`, :attr:`num_shards` and :meth:`fingerprint`; those
    that need an on-disk index build it in :meth:`prepare`. Sources are pickled into DataLoader
    workers, so they hold only small state (paths, offsets), never the pool.
    """

    kind = "source"

    def prepare(self, work_dir: Path, ctx: DistContext | None = None) -> None:
        """Build whatever index the source needs under ``work_dir`` (once, on rank 0)."""

    @property
    def num_shards(self) -> int:
        raise NotImplementedError

    def shard_name(self, index: int) -> str:
        return f"{index:06d}"

    def shard_length(self, index: int) -> int | None:
        """Items in a shard when known without reading it (for progress and ETA)."""
        return None

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the pool and its sharding (stored in the store header)."""
        return {"kind": self.kind, "num_shards": self.num_shards}

    #: Whether :meth:`open_item` works: then a student reads its selected images by position
    #: (folders, file lists, image sets); otherwise it streams the shards (WebDataset tars).
    random_access = False

    def open_item(self, shard: int, index: int, key: str) -> object:
        """The payload of item ``index`` of shard ``shard`` (whose key is ``key``), read alone."""
        raise DataError(f"a {self.kind} pool is read as a stream of shards, not image by image")


def _check_shard_size(shard_size: int) -> int:
    if int(shard_size) < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    return int(shard_size)


class _LineIndexSource(UnlabeledSource):
    """A pool listed one item per line in a text file, sharded by byte offsets of shard starts.

    Only the offsets (one integer per shard) are kept in memory; a shard is read by seeking to
    its offset and reading ``shard_size`` lines.
    """

    random_access = True

    def __init__(self, shard_size: int, limit: int | None = None):
        self.shard_size = _check_shard_size(shard_size)
        self.limit = limit  # keep only the first ``limit`` items of the listing (data.max_unlabeled)
        self._index: dict | None = None

    # -- the index: {"list": path, "num_items": n, "offsets": [...], ...}
    def _build_index(self, work_dir: Path) -> dict:
        raise NotImplementedError

    def _index_matches(self, index: dict) -> str | None:
        """Why an existing index does not fit this source (None when it does)."""
        if index.get("shard_size") != self.shard_size:
            return f"shard_size {index.get('shard_size')} != {self.shard_size}"
        if index.get("limit") != self.limit:
            return f"limit {index.get('limit')} != {self.limit}"
        return None

    def prepare(self, work_dir: Path, ctx: DistContext | None = None) -> None:
        ctx = ctx or DistContext()
        work_dir = Path(work_dir)
        if self._index is not None:  # already prepared (the pipeline prepares the pool once per run)
            return
        result: dict | str | None = None
        if ctx.is_main:
            try:
                path = work_dir / "index.json"
                if path.is_file():  # resume: keep the frozen listing
                    result = json.loads(path.read_text())
                    why = self._index_matches(result)
                    if why:
                        result = f"the store's source index {path} does not match this source ({why})"
                else:
                    work_dir.mkdir(parents=True, exist_ok=True)
                    result = self._build_index(work_dir)
                    atomic_write(path, json.dumps(result))
            except (OSError, ValueError, DataError) as e:
                result = str(e)
        result = broadcast_object(result, ctx)
        if isinstance(result, str):
            raise DataError(result)
        self._index = result

    def _need_index(self) -> dict:
        if self._index is None:
            raise DataError(f"{self.kind} source used before prepare(work_dir)")
        return self._index

    @property
    def num_shards(self) -> int:
        return len(self._need_index()["offsets"])

    @property
    def num_items(self) -> int:
        return int(self._need_index()["num_items"])

    def shard_length(self, index: int) -> int:
        return min(self.shard_size, self.num_items - index * self.shard_size)

    def shard_name(self, index: int) -> str:
        start = index * self.shard_size
        return f"items-{start}-{start + self.shard_length(index)}"

    def _lines(self, index: int) -> Iterator[str]:
        idx = self._need_index()
        n = self.shard_length(index)
        with open(idx["list"], "rb") as f:
            f.seek(idx["offsets"][index])
            while n > 0:
                raw = f.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
                if line.strip():
                    n -= 1
                    yield line

    def fingerprint(self) -> dict:
        idx = self._need_index()
        return {"kind": self.kind, "num_shards": self.num_shards, "num_items": self.num_items,
                "shard_size": self.shard_size, "list_bytes": idx["list_bytes"], "limit": self.limit}

    def open_item(self, shard: int, index: int, key: str) -> object:
        return self.root / key  # the key is the path relative to root (an absolute one replaces it)


def _index_lines(list_path: Path, shard_size: int, limit: int | None = None) -> dict:
    """Byte offset of the first line of every shard of non-blank lines (streaming); only the first
    ``limit`` lines count when a limit is set."""
    offsets, n, pos = [], 0, 0
    with open(list_path, "rb") as f:
        for raw in f:
            if raw.strip():
                if limit is not None and n >= limit:
                    pos += len(raw)
                    continue
                if n % shard_size == 0:
                    offsets.append(pos)
                n += 1
            pos += len(raw)
    return {"list": str(list_path), "num_items": n, "offsets": offsets, "shard_size": shard_size,
            "list_bytes": pos, "limit": limit}


def _walk_images(root: Path, skipped: SkippedFiles | None = None,
                 links: SkippedFiles | None = None) -> Iterator[str]:
    """Image files under ``root`` as relative POSIX paths, depth first with names sorted at every
    level: a stable order that needs only the directories on the current path in memory. Images
    are told by the class folders' rule, :func:`~noisystudent.data.datasets.is_image_file`; other
    files are counted in ``skipped``, symlinked folders (not followed: they could loop) in ``links``."""
    stack: list[tuple[str, Iterator[os.DirEntry]]] = []

    def open_dir(rel: str) -> Iterator[os.DirEntry]:
        with os.scandir(root / rel if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        return iter(entries)

    stack.append(("", open_dir("")))
    while stack:
        rel, it = stack[-1]
        entry = next(it, None)
        if entry is None:
            stack.pop()
            continue
        child = f"{rel}/{entry.name}" if rel else entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            linked_dir = not is_dir and entry.is_symlink() and entry.is_dir()
        except OSError:
            continue
        if is_dir:
            try:
                stack.append((child, open_dir(child)))
            except OSError:
                pass  # an unreadable directory contributes no images
        elif linked_dir:
            if links is not None:
                links.add(child)
        elif is_image_file(entry.name) and "\n" not in child:
            yield child
        elif skipped is not None:
            skipped.add(child)


class FolderSource(_LineIndexSource):
    """Image files under ``root`` (recursive), keyed by their path relative to ``root``."""

    kind = "folder"

    def __init__(self, root: Path | str, shard_size: int = DEFAULT_SHARD_SIZE, limit: int | None = None):
        super().__init__(shard_size, limit)
        self.root = Path(root)

    def _build_index(self, work_dir: Path) -> dict:
        if not self.root.is_dir():
            raise DataError(f"unlabeled folder not found: {self.root}")
        list_path = work_dir / "files.txt"

        skipped, links = SkippedFiles(), SkippedFiles("symlinked folder(s), not followed (they could loop)")

        def listing(f) -> None:  # streamed to disk: a folder of 10^8 images is never a list in memory
            for rel in _walk_images(self.root, skipped, links):
                f.write(rel.encode("utf-8", "surrogateescape") + b"\n")

        atomic_write(list_path, listing)
        for what in (skipped, links):
            what.report(f"unlabeled folder {self.root}")
        index = _index_lines(list_path, self.shard_size, self.limit)
        if index["num_items"] == 0:
            raise DataError(f"unlabeled folder {self.root} contains no images")
        return index | {"root": str(self.root.resolve())}

    def _index_matches(self, index: dict) -> str | None:
        if index.get("root") != str(self.root.resolve()):
            return f"root {index.get('root')} != {self.root.resolve()}"
        return super()._index_matches(index)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        for rel in self._lines(index):
            yield rel, self.root / rel

    def fingerprint(self) -> dict:
        return super().fingerprint() | {"root": str(self.root.resolve())}


class FileListSource(_LineIndexSource):
    """Images named one per line in a text file (absolute, or relative to ``root``, which defaults
    to the list file's folder); the key is the line as written."""

    kind = "file-list"

    def __init__(self, list_path: Path | str, shard_size: int = DEFAULT_SHARD_SIZE, root: Path | str | None = None,
                 limit: int | None = None):
        super().__init__(shard_size, limit)
        self.list_path = Path(list_path)
        self.root = Path(root) if root is not None else self.list_path.resolve().parent

    def _build_index(self, work_dir: Path) -> dict:
        if not self.list_path.is_file():
            raise DataError(f"file list not found: {self.list_path}")
        index = _index_lines(self.list_path.resolve(), self.shard_size, self.limit)
        if index["num_items"] == 0:
            raise DataError(f"file list {self.list_path} names no images")
        self._check_files_exist(index["num_items"])
        return index

    def _check_files_exist(self, num_items: int) -> None:
        """A listed file that does not exist is a mistake in the list, not an unreadable image:
        refuse the list (one streaming pass of stat calls), naming the first missing files."""
        missing, count = [], 0
        with open(self.list_path, encoding="utf-8", errors="surrogateescape") as f:
            lines = (line.rstrip("\r\n") for line in f if line.strip())
            for n, line in enumerate(lines):
                if n >= num_items:
                    break
                if not (self.root / line).exists():
                    count += 1
                    if len(missing) < 3:
                        missing.append(line)
        if count:
            raise DataError(f"file list {self.list_path} names {count} file(s) that do not exist (relative lines "
                            f"resolve against {self.root}): {', '.join(missing)}{' ...' if count > 3 else ''}")

    def _index_matches(self, index: dict) -> str | None:
        if index.get("list") != str(self.list_path.resolve()):
            return f"list {index.get('list')} != {self.list_path.resolve()}"
        if self.list_path.stat().st_size != index.get("list_bytes"):
            return "the file list changed since the store was started"
        return super()._index_matches(index)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        for line in self._lines(index):
            yield line, self.root / line  # an absolute line replaces root


class ImageSetSource(UnlabeledSource):
    """An in-memory or lazy :class:`~noisystudent.data.datasets.ImageSet`, cut into shards of indices."""

    kind = "image-set"

    def __init__(self, images: ImageSet, shard_size: int = DEFAULT_SHARD_SIZE):
        self.images = images
        self.shard_size = _check_shard_size(shard_size)

    @property
    def num_shards(self) -> int:
        return -(-len(self.images) // self.shard_size)

    def shard_length(self, index: int) -> int:
        return min(self.shard_size, len(self.images) - index * self.shard_size)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        start = index * self.shard_size
        for i in range(start, start + self.shard_length(index)):
            yield self.images.key(i), functools.partial(self.images.load, i)

    random_access = True

    def open_item(self, shard: int, index: int, key: str) -> object:
        return self.images.load(shard * self.shard_size + index)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "num_shards": self.num_shards, "num_items": len(self.images),
                "shard_size": self.shard_size}


class SyntheticSource(UnlabeledSource):
    """``num_images`` images synthesised from their index (for tests and benchmarks): a fixed bank
    of random uint8 patterns, picked by a hash of the index. Every ``bad_every``-th item (if set)
    is corrupt bytes, to exercise the bad-image path."""

    kind = "synthetic"

    def __init__(self, num_images: int, shard_size: int = DEFAULT_SHARD_SIZE, size: int = 8,
                 channels: int = 3, seed: int = 0, bank_size: int = 256, bad_every: int = 0):
        self.num_images = int(num_images)
        self.shard_size = _check_shard_size(shard_size)
        self.size, self.channels, self.seed = size, channels, seed
        self.bank_size, self.bad_every = bank_size, bad_every
        self._bank: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_bank": None}  # workers rebuild the bank instead of receiving it

    def _patterns(self) -> np.ndarray:
        if self._bank is None:
            shape = (self.bank_size, self.size, self.size) + ((self.channels,) if self.channels > 1 else ())
            self._bank = np.random.default_rng(self.seed).integers(0, 256, shape, dtype=np.uint8)
        return self._bank

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_length(self, index: int) -> int:
        return min(self.shard_size, self.num_images - index * self.shard_size)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        start = index * self.shard_size
        for i in range(start, start + self.shard_length(index)):
            yield f"syn/{i:010d}", self._item(i)

    def _item(self, i: int) -> object:
        if self.bad_every and i % self.bad_every == self.bad_every - 1:
            return b"this is not an image"
        return self._patterns()[(i * 2654435761 + self.seed) % self.bank_size]

    random_access = True

    def open_item(self, shard: int, index: int, key: str) -> object:
        return self._item(shard * self.shard_size + index)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "num_shards": self.num_shards, "num_items": self.num_images,
                "shard_size": self.shard_size, "size": self.size, "channels": self.channels,
                "seed": self.seed, "bank_size": self.bank_size, "bad_every": self.bad_every}


class ConcatSource(UnlabeledSource):
    """Several sources end to end (e.g. a dataset's unlabeled remainder plus a folder of images).
    Shard ``i`` of the whole is shard ``i - offset`` of the part that holds it; each part keeps its
    own index under ``work_dir/part-<n>``."""

    kind = "concat"

    def __init__(self, parts: Sequence[UnlabeledSource]):
        if not parts:
            raise DataError("an unlabeled pool needs at least one source")
        self.parts = list(parts)

    def prepare(self, work_dir: Path, ctx: DistContext | None = None) -> None:
        for n, part in enumerate(self.parts):
            part.prepare(Path(work_dir) / f"part-{n}", ctx)

    def _offsets(self) -> list[int]:
        offsets = [0]
        for part in self.parts:
            offsets.append(offsets[-1] + part.num_shards)
        return offsets

    def _locate(self, index: int) -> tuple[UnlabeledSource, int]:
        offsets = self._offsets()
        for n, part in enumerate(self.parts):
            if index < offsets[n + 1]:
                return part, index - offsets[n]
        raise IndexError(f"shard {index} out of range ({offsets[-1]} shards)")

    @property
    def num_shards(self) -> int:
        return self._offsets()[-1]

    @property
    def random_access(self) -> bool:  # type: ignore[override]
        return all(p.random_access for p in self.parts)

    def shard_name(self, index: int) -> str:
        part, i = self._locate(index)
        return f"{part.kind}-{part.shard_name(i)}"

    def shard_length(self, index: int) -> int | None:
        part, i = self._locate(index)
        return part.shard_length(i)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        part, i = self._locate(index)
        return part.iter_shard(i)

    def open_item(self, shard: int, index: int, key: str) -> object:
        part, i = self._locate(shard)
        return part.open_item(i, index, key)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "num_shards": self.num_shards, "parts": [p.fingerprint() for p in self.parts]}


def path_source(path: str | Path, shard_size: int = DEFAULT_SHARD_SIZE, limit: int | None = None) -> UnlabeledSource:
    """The pool a user names with ``data.unlabeled`` (or ``noisystudent label CKPT POOL``): a folder
    (searched recursively), a file list (``.txt``, or any other file: one path per line) or
    WebDataset tar shards (a path, or a brace pattern such as
    ``/data/pool-{000000..009999}.tar``)."""
    text = str(path)
    if text.endswith((".tar", ".tar.gz", ".tgz")) or "{" in text:
        if limit is not None:
            raise DataError(f"data.max_unlabeled cannot cut a WebDataset pool ({text}); list fewer shards")
        return WebDatasetSource(text)
    if text.endswith(".txt") or Path(text).is_file():
        return FileListSource(text, shard_size, limit=limit)
    if not Path(text).is_dir():
        raise DataError(f"unlabeled pool not found: {text} (a folder, a .txt file list or .tar shards)")
    return FolderSource(text, shard_size, limit=limit)


def build_pool(cfg: DataConfig, remainder: ImageSet, shard_size: int = DEFAULT_SHARD_SIZE) -> UnlabeledSource | None:
    """The whole unlabeled pool of a run: the dataset's own remainder (``DataSplits.unlabeled``)
    followed by the pool ``data.unlabeled`` names; None when there is neither. ``data.max_unlabeled``
    caps the whole: the remainder was already subsampled by ``build_splits``, a listed pool keeps
    the first items of its listing."""
    parts: list[UnlabeledSource] = []
    if len(remainder):
        parts.append(ImageSetSource(remainder, shard_size))
    path = pool_path(cfg)
    if path:
        limit = None if cfg.max_unlabeled is None else max(1, cfg.max_unlabeled - len(remainder))
        parts.append(path_source(path, shard_size, limit))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else ConcatSource(parts)


def pool_size(pool: UnlabeledSource) -> int | None:
    """Items in a prepared pool when known without reading it (None for tar shards)."""
    lengths = [pool.shard_length(i) for i in range(pool.num_shards)]
    return None if any(n is None for n in lengths) else int(sum(lengths))


def folder_source(root: Path | str, shard_size: int = DEFAULT_SHARD_SIZE) -> FolderSource:
    """Every image file under ``root`` (recursive; millions are fine: the listing streams to disk)."""
    return FolderSource(root, shard_size)


def file_list_source(path: Path | str, shard_size: int = DEFAULT_SHARD_SIZE,
                     root: Path | str | None = None) -> FileListSource:
    """Images named one per line in ``path`` (relative lines resolve against ``root``)."""
    return FileListSource(path, shard_size, root)


def imageset_source(images: ImageSet, shard_size: int = DEFAULT_SHARD_SIZE) -> ImageSetSource:
    """The pipeline's unlabeled :class:`~noisystudent.data.datasets.ImageSet` as a sharded source."""
    return ImageSetSource(images, shard_size)


from .webdataset import WebDatasetSource, webdataset_source  # noqa: E402,F401  (it subclasses UnlabeledSource)
