"""A folder of image files (searched recursively) as an unlabeled pool."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ...runtime.errors import DataError
from ...runtime.files import atomic_write
from ..datasets import SkippedFiles, is_image_file
from .base import DEFAULT_SHARD_SIZE
from .lines import LineIndexSource, index_lines


def walk_images(root: Path, skipped: SkippedFiles | None = None,
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


class FolderSource(LineIndexSource):
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
            for rel in walk_images(self.root, skipped, links):
                f.write(rel.encode("utf-8", "surrogateescape") + b"\n")

        atomic_write(list_path, listing)
        for what in (skipped, links):
            what.report(f"unlabeled folder {self.root}")
        index = index_lines(list_path, self.shard_size, self.limit)
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
