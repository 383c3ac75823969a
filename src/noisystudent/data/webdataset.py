"""WebDataset tar shards as an unlabeled pool (:class:`WebDatasetSource`).

Read with :mod:`tarfile` in streaming mode rather than webdataset's ``tar_file_iterator``: that
iterator cannot tell a tar cut at a header boundary from a complete one, and a pool's truncated
shard must be listed among the bad images, not silently shortened. Sample grouping follows
webdataset's rule (the key is the path up to the first dot of the file name); shard patterns are
expanded with ``braceexpand``, as webdataset does.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Iterator, Sequence

from braceexpand import braceexpand

from ..runtime.distributed import DistContext
from ..runtime.errors import DataError
from .datasets import IMAGE_EXTENSIONS
from .pool import UnlabeledSource, Unreadable


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
        self.paths = [Path(p) for pat in patterns for p in braceexpand(str(pat))]
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



def webdataset_source(urls_or_paths: str | Sequence[str | Path]) -> WebDatasetSource:
    """Local WebDataset tar shards: a list of paths or a brace pattern (``data-{0000..0099}.tar``)."""
    return WebDatasetSource(urls_or_paths)
