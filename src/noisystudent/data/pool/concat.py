"""Several unlabeled sources end to end, as one pool."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from ...runtime.distributed import DistContext
from ...runtime.errors import DataError
from .base import UnlabeledSource


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
