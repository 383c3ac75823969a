"""Pools listed one item per line in a text file (folders after their walk, file lists), sharded
by the byte offsets of shard starts: only one integer per shard is kept in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ...runtime.distributed import DistContext, broadcast_object
from ...runtime.errors import DataError
from ...runtime.files import atomic_write
from .base import UnlabeledSource, check_shard_size


class LineIndexSource(UnlabeledSource):
    """A pool listed one item per line in a text file, sharded by byte offsets of shard starts.

    A shard is read by seeking to its offset and reading ``shard_size`` lines. The index (and the
    listing it points at) is built once under the ``prepare`` folder and kept there: a resumed run
    sees the same shards.
    """

    random_access = True

    def __init__(self, shard_size: int, limit: int | None = None):
        self.shard_size = check_shard_size(shard_size)
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


def index_lines(list_path: Path, shard_size: int, limit: int | None = None) -> dict:
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
