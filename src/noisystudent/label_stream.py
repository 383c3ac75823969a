"""Streaming, sharded, resumable and distributed pseudo labeling into a :mod:`label_store`.

The unlabeled pool is a :class:`UnlabeledSource`: a fixed, ordered list of shards, each an
iterable of ``(key, payload)`` items. Sources never materialise the pool: an image folder is
walked once into an on-disk listing (``<store>/source/``, which also freezes the pool so a resumed
run sees the same shards), a file list is indexed by byte offsets, WebDataset tar shards are read
as streams with :mod:`tarfile`.

:func:`label_to_store` gives each rank of a torchrun job its own share of the unfinished shards;
within a rank, DataLoader workers read, decode and transform whole shards (one shard per worker at
a time, so a batch never spans two shards), the main process runs the teacher and writes each shard
when its last batch is in. Memory is bounded by the shards in flight, not by the pool. Every shard
is labeled in the same batches whoever labels it, so one process and N processes write the same
store, and a killed run resumes at the first unfinished shard.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import IMAGE_EXTENSIONS, ImageSet
from .distributed import DistContext, all_reduce_sum, barrier, broadcast_object, shard_indices
from .errors import ConfigError, DataError
from .label_store import (StoreHeader, StoreManifest, consolidate, read_header, read_manifest,
                          remove_stale_temp_files, write_header, write_shard)
from .progress import progress_bar

DEFAULT_SHARD_SIZE = 8192
BF16_MIN_AGREEMENT = 0.999  # bf16 must agree with fp32 on at least this share of top-1 labels
BF16_MIN_SPEEDUP = 1.05  # and be at least this much faster, else fp32 is used
CALIBRATION_IMAGES = 1024
CALIBRATION_CHUNK = 64  # images per comparison: a teacher bf16 cannot label is caught after one
TIMED_CHUNKS = 3  # chunks timed (after a warm-up chunk) before bf16's speed is judged
PRECISIONS = ("auto", "fp32", "bf16")

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


def _check_shard_size(shard_size: int) -> int:
    if int(shard_size) < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    return int(shard_size)


class _LineIndexSource(UnlabeledSource):
    """A pool listed one item per line in a text file, sharded by byte offsets of shard starts.

    Only the offsets (one integer per shard) are kept in memory; a shard is read by seeking to
    its offset and reading ``shard_size`` lines.
    """

    def __init__(self, shard_size: int):
        self.shard_size = _check_shard_size(shard_size)
        self._index: dict | None = None

    # -- the index: {"list": path, "num_items": n, "offsets": [...], ...}
    def _build_index(self, work_dir: Path) -> dict:
        raise NotImplementedError

    def _index_matches(self, index: dict) -> str | None:
        """Why an existing index does not fit this source (None when it does)."""
        if index.get("shard_size") != self.shard_size:
            return f"shard_size {index.get('shard_size')} != {self.shard_size}"
        return None

    def prepare(self, work_dir: Path, ctx: DistContext | None = None) -> None:
        ctx = ctx or DistContext()
        work_dir = Path(work_dir)
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
                    tmp = path.with_name(".index.json.tmp")
                    tmp.write_text(json.dumps(result))
                    os.replace(tmp, path)
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
                "shard_size": self.shard_size, "list_bytes": idx["list_bytes"]}


def _index_lines(list_path: Path, shard_size: int) -> dict:
    """Byte offset of the first line of every shard of non-blank lines (streaming)."""
    offsets, n, pos = [], 0, 0
    with open(list_path, "rb") as f:
        for raw in f:
            if raw.strip():
                if n % shard_size == 0:
                    offsets.append(pos)
                n += 1
            pos += len(raw)
    return {"list": str(list_path), "num_items": n, "offsets": offsets, "shard_size": shard_size,
            "list_bytes": pos}


def _walk_images(root: Path, extensions: tuple[str, ...]) -> Iterator[str]:
    """Image files under ``root`` as relative POSIX paths, depth first with names sorted at every
    level: a stable order that needs only the directories on the current path in memory."""
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
            is_dir = entry.is_dir(follow_symlinks=False)  # like Path.rglob: no symlink loops
        except OSError:
            continue
        if is_dir:
            try:
                stack.append((child, open_dir(child)))
            except OSError:
                pass  # an unreadable directory contributes no images
        elif os.path.splitext(entry.name)[1].lower() in extensions and "\n" not in child:
            yield child


class FolderSource(_LineIndexSource):
    """Image files under ``root`` (recursive), keyed by their path relative to ``root``."""

    kind = "folder"

    def __init__(self, root: Path | str, shard_size: int = DEFAULT_SHARD_SIZE,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        super().__init__(shard_size)
        self.root = Path(root)
        self.extensions = tuple(e.lower() for e in extensions)

    def _build_index(self, work_dir: Path) -> dict:
        if not self.root.is_dir():
            raise DataError(f"unlabeled folder not found: {self.root}")
        list_path = work_dir / "files.txt"
        tmp = work_dir / ".files.txt.tmp"
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            for rel in _walk_images(self.root, self.extensions):
                f.write(rel + "\n")
        os.replace(tmp, list_path)
        index = _index_lines(list_path, self.shard_size)
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

    def __init__(self, list_path: Path | str, shard_size: int = DEFAULT_SHARD_SIZE, root: Path | str | None = None):
        super().__init__(shard_size)
        self.list_path = Path(list_path)
        self.root = Path(root) if root is not None else self.list_path.resolve().parent

    def _build_index(self, work_dir: Path) -> dict:
        if not self.list_path.is_file():
            raise DataError(f"file list not found: {self.list_path}")
        index = _index_lines(self.list_path.resolve(), self.shard_size)
        if index["num_items"] == 0:
            raise DataError(f"file list {self.list_path} names no images")
        return index

    def _index_matches(self, index: dict) -> str | None:
        if index.get("list") != str(self.list_path.resolve()):
            return f"list {index.get('list')} != {self.list_path.resolve()}"
        if self.list_path.stat().st_size != index.get("list_bytes"):
            return "the file list changed since the store was started"
        return super()._index_matches(index)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        for line in self._lines(index):
            yield line, self.root / line  # an absolute line replaces root


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style numeric ranges: ``shard-{000..099}.tar`` (zero padding kept)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    return [x for i in range(int(lo), int(hi) + 1)
            for x in expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's grouping rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _has_end_marker(path: Path, offset: int) -> bool:
    """A complete uncompressed tar has (at least) two zero blocks after its last member."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    return len(tail) == 1024 and not any(tail)


class WebDatasetSource(UnlabeledSource):
    """WebDataset tar shards (local files, optionally gzipped), one store shard per tar file.

    A sample is the run of consecutive members sharing a key; its first member with an image
    extension is the image. The store key is ``<tar name>/<sample key>``. A truncated or corrupt
    tar ends its shard early and is listed among the bad images.
    """

    kind = "webdataset"
    image_exts = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)

    def __init__(self, paths: str | Sequence[str | Path]):
        patterns = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.paths = [Path(p) for pat in patterns for p in expand_braces(str(pat))]
        if not self.paths:
            raise DataError("no WebDataset shards given")

    def prepare(self, work_dir: Path, ctx: DistContext | None = None) -> None:
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise DataError(f"WebDataset shard(s) not found: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    @property
    def num_shards(self) -> int:
        return len(self.paths)

    def shard_name(self, index: int) -> str:
        name = self.paths[index].name
        for suffix in (".tar.gz", ".tgz", ".tar"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        prefix = self.shard_name(index)
        current, image = None, None
        try:
            with tarfile.open(self.paths[index], mode="r|*") as tar:  # streaming: no member table
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member(member.name)
                    if key != current:
                        if current is not None:
                            yield f"{prefix}/{current}", image or Unreadable("no image in sample")
                        current, image = key, None
                    if image is None and ext.rsplit(".", 1)[-1] in self.image_exts:
                        f = tar.extractfile(member)
                        image = f.read() if f is not None else Unreadable("unreadable tar member")
                end, plain = tar.offset, getattr(tar.fileobj, "comptype", "tar") == "tar"
            if current is not None:
                yield f"{prefix}/{current}", image or Unreadable("no image in sample")
            if plain and not _has_end_marker(self.paths[index], end):
                # tarfile reads a tar cut inside a header as a normal end: check the end marker.
                yield f"{prefix}/<rest of shard>", Unreadable(f"truncated tar {self.paths[index]}: "
                                                              "no end-of-archive marker")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            # The rest of this tar is lost; say so under the shard's name, keep what was read.
            yield f"{prefix}/<rest of shard>", Unreadable(f"corrupt tar {self.paths[index]}: {e}")

    def fingerprint(self) -> dict:
        digest = hashlib.sha1()
        for p in self.paths:
            digest.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        return {"kind": self.kind, "num_shards": self.num_shards, "digest": digest.hexdigest()}


class ImageSetSource(UnlabeledSource):
    """An in-memory or lazy :class:`~noisystudent.data.ImageSet`, cut into shards of indices."""

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
        bank = self._patterns()
        start = index * self.shard_size
        for i in range(start, start + self.shard_length(index)):
            key = f"syn/{i:010d}"
            if self.bad_every and i % self.bad_every == self.bad_every - 1:
                yield key, b"this is not an image"
            else:
                yield key, bank[(i * 2654435761 + self.seed) % self.bank_size]

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "num_shards": self.num_shards, "num_items": self.num_images,
                "shard_size": self.shard_size, "size": self.size, "channels": self.channels,
                "seed": self.seed, "bank_size": self.bank_size, "bad_every": self.bad_every}


def folder_source(root: Path | str, shard_size: int = DEFAULT_SHARD_SIZE) -> FolderSource:
    """Every image file under ``root`` (recursive; millions are fine: the listing streams to disk)."""
    return FolderSource(root, shard_size)


def file_list_source(path: Path | str, shard_size: int = DEFAULT_SHARD_SIZE,
                     root: Path | str | None = None) -> FileListSource:
    """Images named one per line in ``path`` (relative lines resolve against ``root``)."""
    return FileListSource(path, shard_size, root)


def webdataset_source(urls_or_paths: str | Sequence[str | Path]) -> WebDatasetSource:
    """Local WebDataset tar shards: a list of paths or a brace pattern (``data-{0000..0099}.tar``)."""
    return WebDatasetSource(urls_or_paths)


def imageset_source(images: ImageSet, shard_size: int = DEFAULT_SHARD_SIZE) -> ImageSetSource:
    """The pipeline's unlabeled :class:`~noisystudent.data.ImageSet` as a sharded source."""
    return ImageSetSource(images, shard_size)


# ------------------------------------------------------------------------- worker batching


def _reason(e: Exception) -> str:
    """One line naming the error, without object addresses (so reruns list identical reasons)."""
    text = str(e).splitlines()[0] if str(e) else ""
    text = re.sub(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>", "<bytes>", text)
    return f"{type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', text)}"


class ShardBatches(IterableDataset):
    """Batches of decoded, transformed images, whole shards at a time.

    Worker ``w`` of ``W`` takes shards ``w, w + W, ...`` of its list. Each yielded batch is a dict:
    ``shard`` (index), ``keys`` and ``pos`` (key and item position in the shard of each image),
    ``x`` (stacked tensor or None), ``bad`` (list of ``(key, reason)``), ``last`` (the shard's
    final batch; a shard always ends with one, even when empty) and ``items`` (the shard's item
    count, on the last batch). Decoding errors are caught here, so a bad image never stops a worker.
    """

    def __init__(self, source: UnlabeledSource, shards: Sequence[int], transform: Callable, batch_size: int):
        self.source = source
        self.shards = list(shards)
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            yield from self.shard_batches(shard)

    def shard_batches(self, shard: int) -> Iterator[dict]:
        keys: list[str] = []
        pos: list[int] = []
        tensors: list[torch.Tensor] = []
        bad: list[tuple[str, str]] = []
        shape = None
        items = 0
        for item, (key, payload) in enumerate(self.source.iter_shard(shard)):
            items = item + 1
            try:
                x = self.transform(decode_image(payload))
                if shape is None:
                    shape = x.shape
                elif x.shape != shape:
                    raise DataError(f"transform gave shape {tuple(x.shape)}, expected {tuple(shape)}")
            except Exception as e:  # noqa: BLE001 - any decoder error (PIL raises many types) is a bad image
                bad.append((key, _reason(e)))
                continue
            keys.append(key)
            pos.append(item)
            tensors.append(x)
            if len(keys) == self.batch_size:
                yield {"shard": shard, "keys": keys, "pos": pos, "x": torch.stack(tensors), "bad": bad,
                       "last": False, "items": -1}
                keys, pos, tensors, bad = [], [], [], []
        yield {"shard": shard, "keys": keys, "pos": pos, "x": torch.stack(tensors) if tensors else None,
               "bad": bad, "last": True, "items": items}


# ------------------------------------------------------------------------------ inference


class _BatchNormLeafTracer(fx.Tracer):
    """Traces a model keeping every BatchNorm module as one call (timm's BatchNormAct2d included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)


def _foldable_norms() -> tuple[type, ...]:
    """BatchNorm classes whose eval forward is known exactly: plain BN, and timm's BN + drop + act."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return (nn.BatchNorm2d,)
    return (nn.BatchNorm2d, BatchNormAct2d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the convolution feeding it (saves a pass over every activation).

    Works on a torch.fx graph, so only a Conv2d whose output goes nowhere but into a BatchNorm
    (each module called once) is folded; timm's BatchNormAct2d becomes its drop + act. Returns a
    new GraphModule, or ``model`` itself when it cannot be traced (data-dependent control flow).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    try:
        gm = fx.GraphModule(model, _BatchNormLeafTracer().trace(model))
    except Exception:  # noqa: BLE001 - any tracing failure means: run the model as it is
        return model
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    norms = _foldable_norms()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in norms:
            continue
        bn, src = modules[node.target], node.args[0] if node.args else None
        if (not isinstance(src, fx.Node) or src.op != "call_module" or type(modules[src.target]) is not nn.Conv2d
                or len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1
                or bn.running_mean is None or len(node.args) != 1 or node.kwargs):
            continue
        _set_submodule(gm, src.target, fuse_conv_bn_eval(modules[src.target], bn))
        if type(bn) is nn.BatchNorm2d:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:
            _set_submodule(gm, node.target, nn.Sequential(bn.drop, bn.act))
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = True,
                  fold_bn: bool = True) -> nn.Module:
    """An inference copy of ``model``: eval mode (no dropout, no stochastic depth: the teacher is
    not noised), BatchNorm folded, channels-last weights. The caller's model is left untouched."""
    model = copy.deepcopy(model).eval().to(device)
    if fold_bn:
        model = fold_batchnorm(model)
    if channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Predictor:
    """Runs the prepared teacher on a batch and returns top-k of ``softmax(logits / T)``."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str, temperature: float,
                 top_k: int, channels_last: bool = True):
        self.model, self.device, self.precision = model, device, precision
        self.temperature, self.top_k, self.channels_last = temperature, top_k, channels_last

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = (precision or self.precision) == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.model(x).float()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        probs = torch.softmax(self.logits(x) / self.temperature, dim=1)
        prob, idx = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        return idx.to(torch.int32).cpu().numpy(), prob.cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate_precision(predictor: Predictor, batches: Iterable[torch.Tensor],
                        max_images: int = CALIBRATION_IMAGES) -> tuple[str, dict]:
    """Choose bf16 autocast only where it is faster than fp32 on this device and agrees with fp32
    on >= 99.9% of the top-1 labels of the first ``max_images`` images of ``batches`` (at 1024
    images: at most one disagreement).

    Each chunk of images runs in both precisions; those same runs are timed (from the second
    chunk on, the first pays one-off setup), and reading stops as soon as the answer is known, so
    a teacher that bf16 cannot label costs a chunk or two.
    """
    if predictor.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", {"reason": "no bf16 on this GPU"}
    allowed = int((1 - BF16_MIN_AGREEMENT) * max_images + 1e-9)
    seen = disagree = 0
    times = {"fp32": 0.0, "bf16": 0.0}
    info: dict = {}
    chunks = (chunk for x in batches for chunk in x.split(CALIBRATION_CHUNK))
    for n, x in enumerate(chunks):
        x = x[: max_images - seen]
        top1 = {}
        for precision in ("fp32", "bf16"):
            _sync(predictor.device)
            t = time.perf_counter()
            try:
                top1[precision] = predictor.logits(x, precision).argmax(1)
            except RuntimeError as e:  # no bf16 kernels on this device
                return "fp32", {"reason": f"bf16 failed: {e}"}
            _sync(predictor.device)
            times[precision] += (time.perf_counter() - t) if n > 0 else 0.0
        seen += len(x)
        disagree += int((top1["fp32"] != top1["bf16"]).sum())
        if disagree > allowed:  # already below the bar: no need to look further
            return "fp32", info | {"reason": f"bf16 top-1 disagrees with fp32 on {disagree} of the first "
                                             f"{seen} images (at most {allowed} of {max_images} allowed)"}
        if n == TIMED_CHUNKS or seen >= max_images:  # enough timed runs to judge the speed
            info["bf16_speedup"] = round(times["fp32"] / max(times["bf16"], 1e-9), 3)
            if info["bf16_speedup"] < BF16_MIN_SPEEDUP:
                return "fp32", info | {"reason": "bf16 not faster"}
        if seen >= max_images:
            break
    if seen == 0:
        return "fp32", {"reason": "no readable images to calibrate on"}
    if "bf16_speedup" not in info:  # a small pool: judge on the timed chunks there were
        if times["bf16"] == 0.0:
            return "fp32", info | {"reason": "too few images to time bf16"}
        info["bf16_speedup"] = round(times["fp32"] / times["bf16"], 3)
        if info["bf16_speedup"] < BF16_MIN_SPEEDUP:
            return "fp32", info | {"reason": "bf16 not faster"}
    if disagree > (1 - BF16_MIN_AGREEMENT) * seen:  # fewer images than asked for: judge the share
        return "fp32", info | {"reason": f"bf16 top-1 disagrees with fp32 on {disagree} of {seen} images"}
    return "bf16", info | {"calibration_images": seen, "bf16_top1_agreement": 1 - disagree / seen}


def _calibration_batches(source: UnlabeledSource, transform: Callable, batch_size: int,
                         max_shards: int = 8) -> Iterator[torch.Tensor]:
    """Decoded batches from the first shards, read in the main process only as far as needed.

    Decoding runs on one intra-op thread, as it does in DataLoader workers: per-image tensor ops
    gain nothing from a thread team, and on a busy machine its barriers cost far more than the ops.
    """
    batches = iter(ShardBatches(source, range(min(max_shards, source.num_shards)), transform, batch_size))
    threads = torch.get_num_threads()
    while True:
        torch.set_num_threads(1)
        try:
            batch = next(batches, None)
        finally:
            torch.set_num_threads(threads)
        if batch is None:
            return
        if batch["x"] is not None:
            yield batch["x"]


def default_num_workers() -> int:
    """Decoding workers per rank: the cores this rank can use, less one for the main process."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_rank - 1))


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the weights, to make a teacher identity like ``"ns_cnn_m:3fa2..."``."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if t.numel() else b"")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- labeling


@dataclass
class _ShardBuffer:
    """Predictions of one shard while its batches come in."""

    keys: list[str] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    idx: list[np.ndarray] = field(default_factory=list)
    prob: list[np.ndarray] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


def _setup_store(store_dir: Path, source: UnlabeledSource, predictor: Predictor, transform: Callable,
                 requested: dict, precision: str, batch_size: int) -> tuple[StoreHeader, list[int], dict]:
    """Rank 0: create or validate the store header, clean up a killed run; list pending shards."""
    header = read_header(store_dir)
    wanted = StoreHeader(precision="", source=source.fingerprint(), **requested)
    info: dict = {}
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
            precision, info = calibrate_precision(predictor, _calibration_batches(source, transform, batch_size))
        header = StoreHeader(precision=precision, source=wanted.source, **requested)
        write_header(store_dir, header)
    pending = read_manifest(store_dir).pending()
    return header, pending, info


def label_to_store(model: nn.Module, source: UnlabeledSource, store_dir: Path | str, *, transform: Callable,
                   num_classes: int, teacher: str, device: torch.device | str | None = None, top_k: int = 5,
                   temperature: float = 1.0, hard: bool = False, batch_size: int = 256,
                   num_workers: int | None = None, ctx: DistContext | None = None, precision: str = "auto",
                   channels_last: bool = True, fold_bn: bool = True, progress: bool = True) -> StoreManifest:
    """Label every shard of ``source`` not yet in the store with the teacher (no noise).

    Resumable: finished shards are skipped, never recomputed; a resumed run must use the same
    teacher, classes, top-k, temperature and source (checked against the store header).
    Distributed: every rank of ``ctx`` calls this with the same arguments and labels a contiguous
    share of the pending shards; ``store_dir`` must be on a filesystem all ranks share.
    ``precision``: ``"auto"`` measures bf16 autocast against fp32 on the first 1024 images and
    keeps it only if it is faster and agrees on >= 99.9% of top-1 labels; the choice is stored, so
    a resumed run uses the same. ``transform`` maps a PIL image (any mode) to a tensor; it runs in
    the ``num_workers`` DataLoader workers (default: :func:`default_num_workers`).
    Unreadable images are skipped and listed in ``<store>/bad_images.tsv``.
    Returns the store's manifest, with this run's statistics in ``manifest.run``.
    """
    ctx = ctx or DistContext()
    device = torch.device(device) if device is not None else ctx.device
    store_dir = Path(store_dir)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if top_k < 1 or batch_size < 1:
        raise ConfigError("top_k and batch_size must be >= 1")
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    k = min(int(top_k), int(num_classes))
    requested = dict(num_classes=int(num_classes), teacher=str(teacher), top_k=k,
                     temperature=float(temperature), hard=bool(hard))

    if ctx.is_main:
        store_dir.mkdir(parents=True, exist_ok=True)
    source.prepare(store_dir / "source", ctx)
    predictor = Predictor(prepare_model(model, device, channels_last, fold_bn), device, "fp32",
                          float(temperature), k, channels_last)

    setup: tuple | str = ""
    if ctx.is_main:
        try:
            setup = _setup_store(store_dir, source, predictor, transform, requested, precision, batch_size)
        except (DataError, OSError) as e:
            setup = str(e)
    setup = broadcast_object(setup, ctx)  # an error on rank 0 stops every rank, not only rank 0
    if isinstance(setup, str):
        raise DataError(setup)
    header, pending, calibration = setup
    predictor.precision = header.precision
    mine = [pending[i] for i in shard_indices(len(pending), ctx)]

    start = time.perf_counter()
    labeled, num_bad, shards_done = _label_shards(predictor, source, mine, store_dir, header, transform,
                                                  batch_size, num_workers, device, progress and ctx.is_main)
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(torch.tensor([labeled, num_bad, shards_done], dtype=torch.int64), ctx).tolist()
    elapsed = max(all_reduce_sum(torch.tensor([elapsed if r == ctx.rank else 0.0
                                               for r in range(ctx.world_size)], dtype=torch.float64),
                                 ctx).tolist())
    run = {"images_labeled": totals[0], "images_bad": totals[1], "shards_labeled": totals[2],
           "shards_skipped": header.source["num_shards"] - len(pending), "seconds": round(elapsed, 3),
           "images_per_s": round(totals[0] / elapsed, 1) if elapsed > 0 else None,
           "precision": header.precision, "calibration": calibration, "world_size": ctx.world_size,
           "num_workers": num_workers, "batch_size": batch_size, "device": str(device)}
    barrier(ctx)  # every rank's shards are written before rank 0 lists them
    manifest: StoreManifest | str = ""
    if ctx.is_main:
        manifest = consolidate(store_dir, run)
        if not manifest.complete:  # on a shared filesystem every pending shard has a record now
            manifest = (f"labeling finished but {manifest.num_shards - len(manifest.shards)} shard(s) of "
                        f"{store_dir} have no record: is the store on a filesystem all ranks share?")
    manifest = broadcast_object(manifest, ctx)
    if isinstance(manifest, str):
        raise DataError(manifest)
    return manifest


def _label_shards(predictor: Predictor, source: UnlabeledSource, shards: list[int], store_dir: Path,
                  header: StoreHeader, transform: Callable, batch_size: int, num_workers: int,
                  device: torch.device, progress: bool) -> tuple[int, int, int]:
    """Label ``shards`` (this rank's) and write each as soon as its last batch is predicted."""
    if not shards:
        return 0, 0, 0
    num_workers = min(num_workers, len(shards))  # a worker without a shard would only cost memory
    loader = DataLoader(ShardBatches(source, shards, transform, batch_size), batch_size=None,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if num_workers else None)
    lengths = [source.shard_length(s) for s in shards]
    total = sum(lengths) if all(n is not None for n in lengths) else None
    bar = progress_bar(None, desc="label", unit="img", total=total, enabled=progress)
    buffers: dict[int, _ShardBuffer] = {}
    labeled = num_bad = done = 0
    try:
        for batch in loader:
            buf = buffers.setdefault(batch["shard"], _ShardBuffer())
            if batch["x"] is not None:
                idx, prob = predictor(batch["x"])
                buf.keys.extend(batch["keys"])
                buf.pos.extend(batch["pos"])
                buf.idx.append(idx)
                buf.prob.append(prob)
            buf.bad.extend(batch["bad"])
            bar.update(len(batch["keys"]) + len(batch["bad"]))
            if batch["last"]:
                shard = batch["shard"]
                del buffers[shard]
                k = header.top_k
                write_shard(store_dir, header, shard, source.shard_name(shard), buf.keys,
                            np.concatenate(buf.idx) if buf.idx else np.empty((0, k), np.int32),
                            np.concatenate(buf.prob) if buf.prob else np.empty((0, k), np.float32), buf.bad,
                            positions=np.asarray(buf.pos, dtype=np.int64), items=batch["items"])
                labeled, num_bad, done = labeled + len(buf.keys), num_bad + len(buf.bad), done + 1
                if total is None:  # unknown shard sizes: extrapolate from the shards seen so far
                    bar.total = int((labeled + num_bad) / done * len(shards))
                bar.set_postfix(shards=f"{done}/{len(shards)}", bad=num_bad, refresh=False)
    finally:
        bar.close()
    return labeled, num_bad, done
