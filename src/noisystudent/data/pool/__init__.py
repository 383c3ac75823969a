"""The unlabeled pool as a stream of shards: image folders, file lists, WebDataset tars (local,
at URLs or from ``pipe:`` commands), image sets.

Used by the streaming labeler (:mod:`noisystudent.label.inference`) and by the students'
pseudo-labeled dataset, so the pool is read one way everywhere.

The unlabeled pool is an :class:`UnlabeledSource`: a fixed, ordered list of shards, each an
iterable of ``(key, payload)`` items. Sources never materialise the pool: an image folder is
walked once into an on-disk listing (``RUN/pool/``, which also freezes the pool so a resumed run
sees the same shards), a file list is indexed by byte offsets, WebDataset tar shards are read as
streams with :mod:`tarfile`. Modules, each importing only those before it: ``base`` (the source
interface, payloads), ``remote`` (URLs and ``pipe:`` streams with retries), ``lines``, ``folder``,
``filelist``, ``memory``, ``concat``, ``webdataset``, ``factory`` (which source a name means).
"""

from .base import DEFAULT_SHARD_SIZE, UnlabeledSource, Unreadable, check_shard_size, decode_image
from .concat import ConcatSource
from .factory import (build_pool, file_list_source, folder_source, imageset_source, path_source, pool_size)
from .filelist import FileListSource
from .folder import FolderSource, walk_images
from .lines import LineIndexSource, index_lines
from .memory import ImageSetSource, SyntheticSource
from .remote import ShardReadError, is_url, open_stream
from .webdataset import WebDatasetSource, webdataset_source

__all__ = [
    "DEFAULT_SHARD_SIZE", "UnlabeledSource", "Unreadable", "check_shard_size", "decode_image", "ConcatSource",
    "build_pool", "file_list_source", "folder_source", "imageset_source", "path_source", "pool_size",
    "FileListSource", "FolderSource", "walk_images", "LineIndexSource", "index_lines", "ImageSetSource",
    "SyntheticSource", "ShardReadError", "is_url", "open_stream", "WebDatasetSource", "webdataset_source",
]
