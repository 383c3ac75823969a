"""WebDataset tar shards as an unlabeled pool (:class:`WebDatasetSource`): local files, URLs
(fsspec) or ``pipe:COMMAND`` streams, optionally compressed.

Read with :mod:`tarfile` in streaming mode rather than webdataset's ``tar_file_iterator``: that
iterator cannot tell a tar cut at a header boundary from a complete one, and a pool's truncated
shard must be listed among the bad images, not silently shortened (tarfile cannot either: the end
marker is checked here). Sample grouping follows webdataset's rule (the key is the path up to the
first dot of the file name); shard patterns are expanded with ``braceexpand``, as webdataset does.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import tarfile
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

from braceexpand import braceexpand

from ...runtime.distributed import DistContext, broadcast_object
from ...runtime.errors import DataError
from ...runtime.files import atomic_write
from ..datasets import IMAGE_EXTENSIONS
from .base import UnlabeledSource, Unreadable
from .remote import READ_CHUNK, check_exists, is_url, open_stream, url_path

LISTING = "shards.txt"  # the frozen shard list in the prepare folder (RUN/pool/ for a run)
_BLOCK = 512
_WINDOW = 1 << 16  # bytes kept behind the read position: where tarfile looked for its next header
_MAGIC = ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's grouping rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _TarBytes:
    """The uncompressed tar stream, passed through to tarfile while remembering where it is and
    the last bytes read: the end-of-archive marker is checked where tarfile stopped."""

    def __init__(self, stream):
        head = stream.peek(6)[:6]
        self.stream = next((cls(fileobj=stream) for magic, cls in _MAGIC if head.startswith(magic)), stream)
        self.pos = 0
        self.recent: deque[tuple[int, bytes]] = deque()  # (start, bytes) of the last reads, >= _WINDOW bytes
        self.kept = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.recent.append((self.pos, data))
            self.pos += len(data)
            self.kept += len(data)
            while self.kept - len(self.recent[0][1]) >= _WINDOW:  # tarfile reads 10 KiB records at a time
                self.kept -= len(self.recent.popleft()[1])
        return data

    def ends_at(self, offset: int) -> bool:
        """Whether two zero blocks start at ``offset`` (a complete tar); reads on to the stream's end,
        so a transport's error or a command's exit status past the last member still counts."""
        want = 2 * _BLOCK
        while self.pos < offset + want and self.read(READ_CHUNK):
            pass
        tail = b"".join(data[max(0, offset - start): offset + want - start] for start, data in self.recent
                        if start < offset + want and start + len(data) > offset)
        while self.read(READ_CHUNK):  # drain: the rest is the last record's padding
            pass
        return len(tail) == want and not any(tail)


class WebDatasetSource(UnlabeledSource):
    """WebDataset tar shards (local paths, URLs or ``pipe:`` commands; plain, gzip, bzip2 or xz),
    one store shard per tar.

    A sample is the run of consecutive members sharing a key; its first member with an image
    extension is the image. The store key is ``<tar name>/<sample key>``. A truncated or corrupt
    tar ends its shard early and is listed among the bad images; a stream that cannot be read
    even after retries (:mod:`~noisystudent.data.pool.remote`) stops the run, naming the shard.
    """

    kind = "webdataset"
    image_exts = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)

    def __init__(self, urls: str | Sequence[str | Path]):
        patterns = [urls] if isinstance(urls, (str, Path)) else list(urls)
        self.urls = [str(p) for pat in patterns for p in braceexpand(str(pat))]
        if not self.urls:
            raise DataError("no WebDataset shards given")
        bad = next((u for u in self.urls if "\n" in u), None)
        if bad is not None:
            raise DataError(f"a WebDataset shard name holds a line break: {bad!r}")
        self._prepared = False

    @property
    def remote(self) -> bool:
        return any(is_url(u) for u in self.urls)

    def prepare(self, work_dir: Path, ctx: DistContext | None = None) -> None:
        """Check the shards are there (every local one; the first remote one, one request, when the
        list is first frozen) and freeze their list in ``work_dir/shards.txt``; a resumed run must
        name the same shards."""
        ctx = ctx or DistContext()
        if self._prepared:
            return
        problem = None
        if ctx.is_main:
            try:
                listing = Path(work_dir) / LISTING
                self._check_shards(remote=not listing.is_file())  # a report of a finished run reads no shard
                self._freeze(listing)
            except (DataError, OSError) as e:
                problem = str(e)
        problem = broadcast_object(problem, ctx)
        if problem:
            raise DataError(problem)
        self._prepared = True

    def _check_shards(self, remote: bool = True) -> None:
        local = [u for u in self.urls if not is_url(u)]
        missing = [u for u in local if not Path(u).is_file()]
        if missing:
            raise DataError(f"WebDataset shard(s) not found: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        first_remote = next((u for u in self.urls if is_url(u)), None)
        if remote and first_remote is not None:
            try:
                check_exists(first_remote)
            except DataError as e:
                raise DataError(f"WebDataset shard {e}") from None

    def _freeze(self, listing: Path) -> None:
        text = "".join(f"{u}\n" for u in self.urls)
        if listing.is_file():
            if listing.read_text(encoding="utf-8", errors="surrogateescape") != text:
                raise DataError(f"the pool's frozen shard list {listing} names other shards than "
                                f"{self.urls[0]} ... ({len(self.urls)}): the run was started on another pool")
            return
        listing.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(listing, text.encode("utf-8", "surrogateescape"))

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def shard_name(self, index: int) -> str:
        name = url_path(self.urls[index]).rstrip("/").rpartition("/")[2]
        for suffix in (".tar.gz", ".tgz", ".tar"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name or f"{index:06d}"

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        prefix, url = self.shard_name(index), self.urls[index]
        current, image = None, None
        with open_stream(url) as stream:
            try:
                data = _TarBytes(stream)
                with tarfile.open(fileobj=data, mode="r|") as tar:  # streaming: no member table
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
                    end = tar.offset
                if current is not None:
                    yield f"{prefix}/{current}", image or Unreadable("no image in sample")
                if not data.ends_at(end):
                    # tarfile reads a tar cut inside a header as a normal end: check the end marker.
                    yield f"{prefix}/<rest of shard>", Unreadable(f"truncated tar {url}: no end-of-archive marker")
            except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as e:
                # The rest of this tar is lost; say so under the shard's name, keep what was read.
                yield f"{prefix}/<rest of shard>", Unreadable(f"corrupt tar {url}: {e}")

    def fingerprint(self) -> dict:
        digest = hashlib.sha1()
        for u in self.urls:  # local shards by name and size (as stores made before URLs were read)
            digest.update((f"{u}\0" if is_url(u) else f"{Path(u).name}\0{Path(u).stat().st_size}\0").encode())
        return {"kind": self.kind, "num_shards": self.num_shards, "digest": digest.hexdigest()}


def webdataset_source(urls_or_paths: str | Sequence[str | Path]) -> WebDatasetSource:
    """WebDataset tar shards: a list of paths or URLs, or a brace pattern (``data-{0000..0099}.tar``,
    ``https://host/pool-{0000..0099}.tar``, ``pipe:curl -s https://host/pool-{0000..0099}.tar``)."""
    return WebDatasetSource(urls_or_paths)
