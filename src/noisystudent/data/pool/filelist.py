"""Images named one per line in a text file: a local list or one at a URL, whose lines are local
paths, URLs, or paths relative to the list's folder (a URL's folder for a remote list)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

from ...runtime.errors import DataError
from ...runtime.files import atomic_write
from .base import DEFAULT_SHARD_SIZE
from .lines import LineIndexSource, index_lines
from .remote import READ_CHUNK, is_url, join_url, open_stream, read_url


class FileListSource(LineIndexSource):
    """Images named one per line in a text file (absolute, or relative to ``root``, which defaults
    to the list file's folder); the key is the line as written. A list given as a URL is copied
    into the ``prepare`` folder (``files.txt``), which freezes it for the run; lines that are URLs,
    or relative lines of a remote list, are read through :mod:`~noisystudent.data.pool.remote`."""

    kind = "file-list"

    def __init__(self, list_path: Path | str, shard_size: int = DEFAULT_SHARD_SIZE, root: Path | str | None = None,
                 limit: int | None = None):
        super().__init__(shard_size, limit)
        self.list_url = str(list_path) if is_url(str(list_path)) else None
        self.list_path = Path(list_path) if self.list_url is None else None
        if root is None:
            root = self.list_url.rpartition("/")[0] if self.list_url else self.list_path.resolve().parent
        self.root: Path | str = str(root) if is_url(str(root)) else Path(root)

    def _build_index(self, work_dir: Path) -> dict:
        if self.list_url is not None:
            copy = work_dir / "files.txt"

            def download(f) -> None:  # streamed: a list of 10^8 lines is never in memory
                with open_stream(self.list_url) as src:
                    while chunk := src.read(READ_CHUNK):
                        f.write(chunk)

            atomic_write(copy, download)
            index = index_lines(copy, self.shard_size, self.limit) | {"url": self.list_url}
        else:
            if not self.list_path.is_file():
                raise DataError(f"file list not found: {self.list_path}")
            index = index_lines(self.list_path.resolve(), self.shard_size, self.limit)
        if index["num_items"] == 0:
            raise DataError(f"file list {self.list_url or self.list_path} names no images")
        self._check_files_exist(Path(index["list"]), index["num_items"])
        return index

    def _check_files_exist(self, listing: Path, num_items: int) -> None:
        """A listed local file that does not exist is a mistake in the list, not an unreadable image:
        refuse the list (one streaming pass of stat calls), naming the first missing files. Remote
        items are not checked (a request each): one that is missing is listed as a bad image."""
        if isinstance(self.root, str):
            return
        missing, count = [], 0
        with open(listing, encoding="utf-8", errors="surrogateescape") as f:
            lines = (line.rstrip("\r\n") for line in f if line.strip())
            for n, line in enumerate(lines):
                if n >= num_items:
                    break
                if not is_url(line) and not (self.root / line).exists():
                    count += 1
                    if len(missing) < 3:
                        missing.append(line)
        if count:
            raise DataError(f"file list {self.list_path} names {count} file(s) that do not exist (relative lines "
                            f"resolve against {self.root}): {', '.join(missing)}{' ...' if count > 3 else ''}")

    def _index_matches(self, index: dict) -> str | None:
        if self.list_url is not None:
            if index.get("url") != self.list_url:
                return f"list {index.get('url')} != {self.list_url}"
        else:
            if index.get("list") != str(self.list_path.resolve()):
                return f"list {index.get('list')} != {self.list_path.resolve()}"
            if self.list_path.stat().st_size != index.get("list_bytes"):
                return "the file list changed since the store was started"
        return super()._index_matches(index)

    def _item(self, line: str) -> object:
        if is_url(line) or isinstance(self.root, str):
            return functools.partial(read_url, join_url(str(self.root), line))  # read in the worker
        return self.root / line  # an absolute line replaces root

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        for line in self._lines(index):
            yield line, self._item(line)

    def open_item(self, shard: int, index: int, key: str) -> object:
        return self._item(key)

    def fingerprint(self) -> dict:
        return super().fingerprint() | ({"url": self.list_url} if self.list_url else {})
