"""Classify new images with a trained model: top-k class names and probabilities per image.

:class:`Predictor` is what ``noisystudent predict SOURCE... --model MODEL --out FILE`` runs:

* ``MODEL``: a run directory (its final model, the one ``noisystudent export`` writes), a
  checkpoint (``model.pt``) or a folder ``export`` wrote (``config.json`` + ``model.safetensors``);
* ``SOURCE``: a folder (searched recursively), a file list, WebDataset tar shards (the pool
  sources of :func:`noisystudent.data.pool.path_source`, local or remote) or image files;
* images are decoded and preprocessed as the labeler does: the pool's decoder in DataLoader
  workers and the checkpoint's clean transform (:func:`noisystudent.models.checkpoint.clean_transform`:
  its evaluation size, crop, interpolation, mean and std), normalised on the device in batches;
* the output has one row per readable image, in the source's order: ``image``, then ``class_1``,
  ``prob_1`` ... ``class_k``, ``prob_k`` (best first); ``.csv``, ``.jsonl`` or ``.parquet`` by the
  suffix of ``out``. It is written to a temporary file beside ``out`` and renamed when complete,
  so a killed run never leaves a partial file under the requested name;
* an unreadable image is not fatal: it is skipped, counted and listed in ``OUT.unreadable.tsv``
  (``image``, ``reason``), which is written on every run (a header alone when all were read).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data.datasets import is_image_file
from ..data.pool import ConcatSource, FileListSource, FolderSource, UnlabeledSource, path_source
from ..data.transforms import ImageTransform
from ..label.inference import Predictor as _BatchTopK
from ..label.inference import ShardBatches, default_num_workers, prepare_model
from ..label.jpeg_decode import DecodeAndTransform
from ..models.checkpoint import clean_transform, load_model
from ..runtime.distributed import select_device
from ..runtime.errors import CheckpointError, ConfigError, DataError
from ..runtime.files import atomic_write, temp_path
from ..runtime.progress import progress_bar
from ..runtime.workers import ignore_sigterm_in_worker

OUTPUT_FORMATS = (".csv", ".jsonl", ".parquet")
PRECISIONS = ("fp32", "bf16")
SHARD_SIZE = 1024  # images per listed shard: small enough that every decoding worker gets some
FLUSH_ROWS = 8192  # rows per write (a Parquet row group)


@dataclass(frozen=True)
class PredictResult:
    """What :meth:`Predictor.predict_to_file` wrote."""

    out: Path
    unreadable_file: Path
    images: int
    unreadable: int
    seconds: float
    device: str


def unreadable_path(out: Path) -> Path:
    """Where the images ``out``'s run could not read are listed: ``preds.csv`` ->
    ``preds.csv.unreadable.tsv`` (one per output, so outputs that differ only in format keep theirs)."""
    out = Path(out)
    return out.with_name(f"{out.name}.unreadable.tsv")


def output_format(out: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the suffix of ``out``; a one-line ConfigError otherwise."""
    suffix = Path(out).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"predict: --out {out}: the suffix picks the format, one of "
                          f"{', '.join(OUTPUT_FORMATS)}")
    return suffix[1:]


# ------------------------------------------------------------------------------ the model


def _exported_meta(config: dict, path: Path) -> dict:
    """The checkpoint-style metadata of a folder ``export`` wrote, from its timm ``config.json``:
    what :func:`~noisystudent.models.checkpoint.clean_transform` reads (sizes, mean/std,
    interpolation and crop) and the class names."""
    try:
        cfg, ours = config["pretrained_cfg"], config.get("noisystudent", {})
        channels, size = int(cfg["input_size"][0]), int(cfg["input_size"][-1])
        test = ours.get("test_size") or (cfg.get("test_input_size") or cfg["input_size"])[-1]
        classes = config.get("label_names") or [str(i) for i in range(config["num_classes"])]
        return {"model": config["architecture"], "num_classes": int(config["num_classes"]), "in_chans": channels,
                "classes": list(classes), "image_size": size, "test_size": int(test),
                "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                "data_config": {k: cfg.get(k) for k in ("interpolation", "crop_pct", "crop_mode")}}
    except (KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{path / 'config.json'}: not the config.json `noisystudent export` writes "
                              "(architecture, num_classes, pretrained_cfg.input_size/mean/std)") from None


def load_for_prediction(path: str | Path) -> tuple[nn.Module, dict, str]:
    """The model ``path`` names, its checkpoint metadata, and what it is (for messages): a run
    directory (its final model: the stage ``noisystudent export`` exports), a checkpoint file, or
    an exported folder (``config.json`` + ``model.safetensors``)."""
    from ..models.export import CONFIG, WEIGHTS, final_stage, load_exported
    from ..runtime.rundir import MANIFEST, MODEL, RunDir

    path = Path(path)
    if path.is_file():
        model, meta = load_model(path)
        return model, meta, str(path)
    if not path.is_dir():
        raise CheckpointError(f"predict: --model {path} not found (a run directory, a model.pt or an "
                              "exported folder)")
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        model, config = load_exported(path)
        return model, _exported_meta(config, path), f"{path} (exported {config.get('architecture')})"
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"predict: --model {path} is neither a run directory (no {MANIFEST}) nor an "
                              f"exported folder (no {CONFIG} + {WEIGHTS})")
    stage = final_stage(path)
    checkpoint = RunDir(path).file(stage, MODEL)
    model, meta = load_model(checkpoint)
    return model, meta, f"{checkpoint} (the run's final model)"


# ----------------------------------------------------------------------------- the sources


def image_source(sources: Sequence[str | Path], work_dir: Path) -> UnlabeledSource:
    """One pool from the command line's SOURCE arguments, in their order: image files (by
    extension; consecutive ones together) are listed in ``work_dir`` and read as a file list
    keyed as written; anything else is a pool :func:`~noisystudent.data.pool.path_source` names
    (a folder, keyed by the folder as written joined to the path inside it; a file list; tar shards)."""
    if not sources:
        raise ConfigError("predict: no SOURCE given (a folder, a file list, .tar shards or image files)")
    parts: list[UnlabeledSource] = []
    images: list[str] = []

    def list_images() -> None:  # relative lines resolve against the current folder: keys as typed
        if images:
            listing = Path(work_dir) / f"images-{len(parts)}.txt"
            listing.write_text("".join(f"{p}\n" for p in images))
            parts.append(FileListSource(listing, SHARD_SIZE, root=Path.cwd()))
            images.clear()

    for source in map(str, sources):
        if is_image_file(source):
            if not os.path.isfile(source):
                raise DataError(f"predict: image not found: {source}")
            images.append(source)
            continue
        list_images()
        part = path_source(source, SHARD_SIZE)
        parts.append(_FolderKeys(part, source) if isinstance(part, FolderSource) else part)
    list_images()
    return parts[0] if len(parts) == 1 else ConcatSource(parts)


class _FolderKeys(UnlabeledSource):
    """A folder pool whose keys are paths as the user would write them (``imgs/cat/1.jpg``, the
    folder argument joined to the image's path inside it) rather than paths inside the folder."""

    kind = "folder"

    def __init__(self, folder: FolderSource, typed: str):
        self.folder, self.typed = folder, typed

    def prepare(self, work_dir: Path, ctx=None) -> None:
        self.folder.prepare(work_dir, ctx)

    @property
    def num_shards(self) -> int:
        return self.folder.num_shards

    def shard_length(self, index: int) -> int | None:
        return self.folder.shard_length(index)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        for key, payload in self.folder.iter_shard(index):
            yield os.path.join(self.typed, key), payload


# ------------------------------------------------------------------------------- writing


def _columns(top_k: int) -> list[str]:
    return ["image"] + [f"{name}_{r}" for r in range(1, top_k + 1) for name in ("class", "prob")]


class _RowWriter:
    """Appends prediction rows to a temporary file in one of the three formats; :meth:`commit`
    renames it to ``out`` (Parquet through pyarrow; CSV and JSON lines through the standard library)."""

    def __init__(self, out: Path, top_k: int):
        self.out, self.format = Path(out), output_format(out)
        self.columns = _columns(top_k)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.out)  # hidden, beside out, this process's own (as atomic_write's)
        self.k = top_k
        self._parquet = None
        self._buffer: list = []  # Parquet: rows waiting for a full row group
        self._buffered = 0
        self._file = None if self.format == "parquet" else open(self.tmp, "w", newline="", encoding="utf-8")
        if self.format == "csv":
            self._csv = csv.writer(self._file)
            self._csv.writerow(self.columns)
        self.rows = 0

    def write(self, keys: list[str], names: np.ndarray, probs: np.ndarray) -> None:
        """Rows for ``keys``: ``names`` (N x k class names) and ``probs`` (N x k, best first)."""
        if not keys:
            return
        self.rows += len(keys)
        if self.format == "parquet":
            self._buffer.append((keys, names, probs))
            self._buffered += len(keys)
            if self._buffered >= FLUSH_ROWS:
                self._flush_parquet()
            return
        for key, row_names, row_probs in zip(keys, names.tolist(), probs.tolist()):
            values = [key] + [v for pair in zip(row_names, (round(p, 6) for p in row_probs)) for v in pair]
            if self.format == "csv":
                self._csv.writerow(values)
            else:
                self._file.write(json.dumps(dict(zip(self.columns, values))) + "\n")

    def _flush_parquet(self) -> None:
        """The buffered rows as one row group."""
        import pyarrow.parquet as pq

        keys = [k for chunk in self._buffer for k in chunk[0]]
        names = np.concatenate([c[1] for c in self._buffer]) if self._buffer else np.empty((0, self.k), object)
        probs = np.concatenate([c[2] for c in self._buffer]) if self._buffer else np.empty((0, self.k), np.float32)
        arrays = [pa.array(keys, pa.string())]
        for r in range(self.k):
            arrays += [pa.array(names[:, r].tolist(), pa.string()), pa.array(probs[:, r], pa.float32())]
        table = pa.Table.from_arrays(arrays, names=self.columns)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.tmp, table.schema)
        if len(keys) or self.rows == 0:  # an empty table still gets its schema
            self._parquet.write_table(table)
        self._buffer, self._buffered = [], 0

    def commit(self) -> None:
        """Close the temporary file and move it to ``out`` (an empty table when no image was read)."""
        if self.format == "parquet":
            if self._buffer or self._parquet is None:
                self._flush_parquet()
            self._parquet.close()
        else:
            self._file.close()
        os.replace(self.tmp, self.out)

    def discard(self) -> None:
        """Remove the temporary file (after an error: nothing is left under ``out``'s name)."""
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def _write_unreadable(path: Path, bad: list[tuple[str, str]]) -> None:
    def write(f) -> None:
        f.write(b"image\treason\n")
        for key, reason in bad:
            f.write(f"{key}\t{' '.join(reason.split())}\n".encode())

    atomic_write(path, write)


# ----------------------------------------------------------------------------- predicting


class Predictor:
    """A trained classifier that gives each image its top-k class names and probabilities, with
    the clean preprocessing its checkpoint records (as the labeler's teacher sees images).

    ``Predictor.load(path)`` takes a run directory, a ``model.pt`` or an exported folder;
    :meth:`predict` classifies images in memory, :meth:`predict_to_file` streams a pool of any
    size to CSV, JSON lines or Parquet.
    """

    def __init__(self, model: nn.Module, meta: dict, *, device: str | torch.device = "auto", top_k: int = 5,
                 batch_size: int = 64, num_workers: int | None = None, precision: str = "fp32"):
        if top_k < 1 or batch_size < 1:
            raise ConfigError("predict: --top-k and --batch-size must be >= 1")
        if precision not in PRECISIONS:
            raise ConfigError(f"predict: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.meta = meta
        self.classes = [str(c) for c in meta["classes"]]
        self.top_k = min(int(top_k), len(self.classes))
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.device = device if isinstance(device, torch.device) else select_device(str(device))
        self.transform = clean_transform(meta)
        split = isinstance(self.transform, ImageTransform)  # workers run its CPU part, the device normalises
        self._load = DecodeAndTransform(self.transform.host if split else self.transform)
        self._topk = _BatchTopK(prepare_model(model, self.device), self.device, precision, 1.0, self.top_k,
                                normalize=self.transform.normalize if split else None)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "Predictor":
        """A predictor for the model ``path`` names (see :func:`load_for_prediction`)."""
        model, meta, _ = load_for_prediction(path)
        return cls(model, meta, **kwargs)

    def _rows(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        idx, prob = self._topk(x)
        return np.asarray(self.classes, dtype=object)[idx], prob

    def predict(self, images: Iterable) -> list[dict]:
        """Top-k of each image (a PIL image, a path, encoded bytes or a uint8 array), in memory:
        ``[{"classes": [best, ...], "probs": [p, ...]}, ...]``. Raises DataError naming the
        first image it cannot read (:meth:`predict_to_file` lists them instead)."""
        results: list[dict] = []
        batch: list[torch.Tensor] = []

        def flush() -> None:
            if batch:
                names, probs = self._rows(torch.stack(batch))
                results.extend({"classes": n.tolist(), "probs": p.tolist()} for n, p in zip(names, probs))
                batch.clear()

        for i, image in enumerate(images):
            try:
                batch.append(self._load(image))
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad image
                what = image if isinstance(image, (str, os.PathLike)) else f"image {i}"
                raise DataError(f"predict: cannot read {what}: {e}") from None
            if len(batch) == self.batch_size:
                flush()
        flush()
        return results

    def predict_to_file(self, sources: Sequence[str | Path] | UnlabeledSource, out: str | Path,
                        progress: bool = True) -> PredictResult:
        """Classify every image of ``sources`` (SOURCE arguments, see :func:`image_source`, or an
        :class:`~noisystudent.data.pool.UnlabeledSource`) and write the rows to ``out``, with the
        unreadable images listed beside it (:func:`unreadable_path`)."""
        out = Path(out)
        output_format(out)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="noisystudent-predict-") as work:
            source = sources if isinstance(sources, UnlabeledSource) else image_source(sources, Path(work))
            source.prepare(Path(work) / "source")
            writer = _RowWriter(out, self.top_k)
            try:
                bad = self._stream(source, writer, progress)
                _write_unreadable(unreadable_path(out), bad)
                writer.commit()
            except BaseException:
                writer.discard()
                raise
        return PredictResult(out, unreadable_path(out), writer.rows, len(bad),
                             round(time.perf_counter() - start, 3), str(self.device))

    def _stream(self, source: UnlabeledSource, writer: _RowWriter, progress: bool) -> list[tuple[str, str]]:
        """Predict shard by shard in DataLoader workers; rows are written in the source's order
        (a shard's rows wait until every shard before it is written)."""
        shards = list(range(source.num_shards))
        workers = min(self.num_workers, len(shards))
        loader = DataLoader(ShardBatches(source, shards, self._load, self.batch_size), batch_size=None,
                            num_workers=workers, pin_memory=self.device.type == "cuda",
                            worker_init_fn=ignore_sigterm_in_worker if workers else None,
                            prefetch_factor=2 if workers else None)
        lengths = [source.shard_length(s) for s in shards]
        total = sum(lengths) if all(n is not None for n in lengths) else None
        bar = progress_bar(None, desc="predict", unit="img", total=total, enabled=progress)
        pending: dict[int, tuple[list, list]] = {}  # shard -> its (rows, unreadable), until its turn
        finished: set[int] = set()
        next_shard = num_bad = 0
        bad: list[tuple[str, str]] = []
        try:
            for batch in self._topk.input.batches(loader):
                rows, unreadable = pending.setdefault(batch["shard"], ([], []))
                unreadable.extend(batch["bad"])
                if batch["x"] is not None:
                    rows.append((batch["keys"], *self._rows(batch["x"])))
                num_bad += len(batch["bad"])
                bar.update(len(batch["keys"]) + len(batch["bad"]))
                bar.set_postfix(unreadable=num_bad, refresh=False)
                if batch["last"]:
                    finished.add(batch["shard"])
                while next_shard in finished:
                    rows, unreadable = pending.pop(next_shard, ([], []))
                    for keys, names, probs in rows:
                        writer.write(keys, names, probs)
                    bad.extend(unreadable)
                    next_shard += 1
        finally:
            bar.close()
        return bad
