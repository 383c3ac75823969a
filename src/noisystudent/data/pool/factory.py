"""The pool a run names: :func:`path_source` tells a folder, a file list and WebDataset shards
apart (local or remote), :func:`build_pool` joins it to the dataset's own unlabeled images."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from ...config.schema import DataConfig
from ...runtime.errors import DataError
from ..datasets import ImageSet
from ..splits import pool_path
from .base import DEFAULT_SHARD_SIZE, UnlabeledSource
from .concat import ConcatSource
from .filelist import FileListSource
from .folder import FolderSource
from .memory import ImageSetSource
from .remote import is_url
from .webdataset import WebDatasetSource

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _shards(text: str, limit: int | None) -> WebDatasetSource:
    if limit is not None:
        raise DataError(f"data.max_unlabeled cannot cut a WebDataset pool ({text}); list fewer shards")
    return WebDatasetSource(text)


def _url_source(text: str, shard_size: int, limit: int | None) -> UnlabeledSource:
    path = urlsplit(text).path if not text.startswith("pipe:") else ""
    if text.startswith("pipe:") or path.endswith(TAR_SUFFIXES) or "{" in text:
        return _shards(text, limit)
    if path.endswith(".txt"):
        return FileListSource(text, shard_size, limit=limit)
    raise DataError(f"a remote pool is WebDataset shards (.tar, a {{0000..0099}} pattern, pipe:COMMAND) or a .txt "
                    f"file list, not {text}")


def path_source(path: str | Path, shard_size: int = DEFAULT_SHARD_SIZE, limit: int | None = None) -> UnlabeledSource:
    """The pool a user names with ``data.unlabeled`` (or ``noisystudent label CKPT POOL``): a folder
    (searched recursively), a file list (``.txt``, or any other file: one path per line) or
    WebDataset tar shards (a path, or a brace pattern such as ``/data/pool-{000000..009999}.tar``).
    Shards and file lists may be URLs (``https://``, ``s3://``, ``gs://``, any fsspec protocol) or
    ``pipe:COMMAND`` shards (:mod:`~noisystudent.data.pool.remote`)."""
    text = str(path)
    if is_url(text):
        return _url_source(text, shard_size, limit)
    if text.endswith(TAR_SUFFIXES) or "{" in text:
        return _shards(text, limit)
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
    """Images named one per line in ``path`` (a file or a URL; relative lines resolve against ``root``)."""
    return FileListSource(path, shard_size, root)


def imageset_source(images: ImageSet, shard_size: int = DEFAULT_SHARD_SIZE) -> ImageSetSource:
    """The pipeline's unlabeled :class:`~noisystudent.data.datasets.ImageSet` as a sharded source."""
    return ImageSetSource(images, shard_size)
