"""Streaming, sharded, resumable and distributed pseudo labeling into a label store (see
:mod:`noisystudent.data.pool` for the unlabeled sources it reads)."""

from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config.schema import PseudoLabelConfig
from ..data.device_input import DeviceInput
from ..data.pool import UnlabeledSource, decode_image
from ..data.transforms import ImageTransform, Normalize
from ..runtime.distributed import DistContext, all_reduce_sum, barrier, broadcast_object, shard_indices
from ..runtime.errors import ConfigError, DataError, error_reason
from .store import (StoreHeader, StoreManifest, consolidate, read_header, read_manifest,
                    remove_stale_temp_files, write_header, write_shard, iter_bad_images)
from ..runtime.precision import BF16_MIN_SPEEDUP  # the speed bar training's `auto` applies too
from ..runtime.progress import progress_bar
from .hashing import hash_inputs, pack_hashes, unpack_hashes
from .jpeg_decode import DECODERS, DecodeAndTransform, EncodedOrDecoded, GpuJpegDecoder, choose_decoder

BF16_MIN_AGREEMENT = 0.999  # bf16 must agree with fp32 on at least this share of top-1 labels
CALIBRATION_IMAGES = 1024
CALIBRATION_CHUNK = 64  # images per comparison: a teacher bf16 cannot label is caught after one
TIMED_CHUNKS = 3  # chunks timed (after a warm-up chunk) before bf16's speed is judged
PRECISIONS = ("auto", "fp32", "bf16")

# ------------------------------------------------------------------------- worker batching


class ShardBatches(IterableDataset):
    """Batches of loaded images, whole shards at a time.

    ``load`` maps a payload to a tensor (:class:`~noisystudent.label.jpeg_decode.DecodeAndTransform`:
    decoded and transformed, uint8 for our transforms; ``EncodedOrDecoded`` for GPU decoding).
    Worker ``w`` of ``W`` takes shards ``w, w + W, ...`` of its list. Each yielded batch is a dict:
    ``shard`` (index), ``keys`` and ``pos`` (key and item position in the shard of each image),
    ``x`` (stacked tensor, or the list of tensors when not ``stack``; None when empty), ``bad``
    (list of ``(key, reason)``), ``last`` (the shard's final batch; a shard always ends with one,
    even when empty) and ``items`` (the shard's item count, on the last batch). Decoding errors
    are caught here, so a bad image never stops a worker. With ``hash_mode`` (``L`` or ``RGB``)
    each image is also hashed (:mod:`noisystudent.label.hashing`) here, where it is decoded, at its
    own resolution before the transform: ``hashes`` holds them (bytes, see ``pack_hashes``).
    """

    def __init__(self, source: UnlabeledSource, shards: Sequence[int], load: Callable, batch_size: int,
                 stack: bool = True, hash_mode: str | None = None):
        self.source = source
        self.shards = list(shards)
        self.load = load
        self.batch_size = batch_size
        self.stack = stack
        self.hash_mode = hash_mode

    def _collate(self, tensors: list[torch.Tensor]):
        return (torch.stack(tensors) if self.stack else tensors) if tensors else None

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
        exact: list[int] = []
        coefficients: list[np.ndarray] = []
        shape = None
        items = 0
        # the GPU path's load keeps JPEGs encoded: it gets the payload, the CPU path the decoded image
        reuse_decoded = not isinstance(self.load, EncodedOrDecoded)
        for item, (key, payload) in enumerate(self.source.iter_shard(shard)):
            items = item + 1
            try:
                if self.hash_mode is not None:
                    img = decode_image(payload)
                    image_hash = hash_inputs(img, self.hash_mode)
                    if reuse_decoded:
                        payload = img
                x = self.load(payload)
                if shape is None or not self.stack:
                    shape = x.shape
                elif x.shape != shape:
                    raise DataError(f"transform gave shape {tuple(x.shape)}, expected {tuple(shape)}")
            except Exception as e:  # noqa: BLE001 - any decoder error (PIL raises many types) is a bad image
                bad.append((key, error_reason(e, with_type=True)))
                continue
            keys.append(key)
            pos.append(item)
            tensors.append(x)
            if self.hash_mode is not None:
                exact.append(image_hash[0])
                coefficients.append(image_hash[1])
            if len(keys) == self.batch_size:
                yield {"shard": shard, "keys": keys, "pos": pos, "x": self._collate(tensors), "bad": bad,
                       "last": False, "items": -1, "hashes": self._hashes(exact, coefficients)}
                keys, pos, tensors, bad, exact, coefficients = [], [], [], [], [], []
        yield {"shard": shard, "keys": keys, "pos": pos, "x": self._collate(tensors),
               "bad": bad, "last": True, "items": items, "hashes": self._hashes(exact, coefficients)}

    def _hashes(self, exact: list[int], coefficients: list[np.ndarray]) -> bytes | None:
        return pack_hashes(exact, coefficients) if self.hash_mode is not None else None


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
    """Runs the prepared teacher on a batch and returns top-k of ``softmax(logits / T)``. Input
    batches go through :class:`~noisystudent.data.device_input.DeviceInput` (``normalize``: the
    transform's device part for uint8 batches; None for batches already normalised)."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str, temperature: float,
                 top_k: int, channels_last: bool = True, normalize: Normalize | None = None):
        self.model, self.device, self.precision = model, device, precision
        self.temperature, self.top_k, self.channels_last = temperature, top_k, channels_last
        self.input = DeviceInput(device, normalize, channels_last)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        x = self.input(x)
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


def _calibration_batches(source: UnlabeledSource, load: Callable, batch_size: int,
                         max_shards: int = 8) -> Iterator[torch.Tensor]:
    """Decoded batches from the first shards, read in the main process only as far as needed.

    Decoding runs on one intra-op thread, as it does in DataLoader workers: per-image tensor ops
    gain nothing from a thread team, and on a busy machine its barriers cost far more than the ops.
    """
    batches = iter(ShardBatches(source, range(min(max_shards, source.num_shards)), load, batch_size))
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
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
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
    hashes: list[np.ndarray] = field(default_factory=list)  # (n, 2) uint64 per batch, when hashing


def _setup_store(store_dir: Path, source: UnlabeledSource, predictor: Predictor, load: Callable,
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
            precision, info = calibrate_precision(predictor, _calibration_batches(source, load, batch_size))
        header = StoreHeader(precision=precision, source=wanted.source, **requested)
        write_header(store_dir, header)
    pending = read_manifest(store_dir).pending()
    return header, pending, info


def label_to_store(model: nn.Module, source: UnlabeledSource, store_dir: Path | str, *, transform: Callable,
                   num_classes: int, teacher: str, device: torch.device | str | None = None,
                   top_k: int = PseudoLabelConfig.top_k,
                   temperature: float = 1.0, hard: bool = False, batch_size: int = 256,
                   num_workers: int | None = None, ctx: DistContext | None = None, precision: str = "auto",
                   channels_last: bool = True, fold_bn: bool = True, progress: bool = True,
                   decode: str = "auto", hashes: bool = True) -> StoreManifest:
    """Label every shard of ``source`` not yet in the store with the teacher (no noise).

    Resumable: finished shards are skipped, never recomputed; a resumed run must use the same
    teacher, classes, top-k, temperature and source (checked against the store header).
    Distributed: every rank of ``ctx`` calls this with the same arguments and labels a contiguous
    share of the pending shards; ``store_dir`` must be on a filesystem all ranks share.
    ``precision``: ``"auto"`` measures bf16 autocast against fp32 on the first 1024 images and
    keeps it only if it is faster and agrees on >= 99.9% of top-1 labels; the choice is stored, so
    a resumed run uses the same. ``transform`` maps a PIL image (any mode) to a tensor; it runs in
    the ``num_workers`` DataLoader workers (default: :func:`default_num_workers`); for an
    :class:`~noisystudent.data.transforms.ImageTransform` only its CPU part does (uint8 out), and
    the batches are normalised on ``device``. ``decode``: ``auto`` decodes JPEG pools on the GPU
    where that measures faster (:func:`noisystudent.label.jpeg_decode.choose_decoder`; never on a
    CPU), ``cpu`` always in the workers, ``cuda`` on the GPU wherever it can. ``hashes``: store each
    image's content hash and perceptual hash (:mod:`noisystudent.label.hashing`), computed in the
    workers from the decoded image, in the transform's mode (``L`` for 1 channel, else ``RGB``);
    they need the image decoded on the CPU, so ``auto`` then decodes there.
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
    if decode not in DECODERS:
        raise ConfigError(f"decode must be one of {DECODERS}, got {decode!r}")
    if decode == "cuda" and device.type != "cuda":
        raise ConfigError(f"decode='cuda' needs a CUDA device, labeling runs on {device}")
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    k = min(int(top_k), int(num_classes))
    split = isinstance(transform, ImageTransform)  # workers run its CPU part, the device normalises
    load = DecodeAndTransform(transform.host if split else transform)
    hash_mode = ("L" if split and transform.channels == 1 else "RGB") if hashes else None
    requested = dict(num_classes=int(num_classes), teacher=str(teacher), top_k=k,
                     temperature=float(temperature), hard=bool(hard))

    if ctx.is_main:
        store_dir.mkdir(parents=True, exist_ok=True)
    source.prepare(store_dir / "source", ctx)
    predictor = Predictor(prepare_model(model, device, channels_last, fold_bn), device, "fp32",
                          float(temperature), k, channels_last, transform.normalize if split else None)

    setup: tuple | str = ""
    if ctx.is_main:
        try:
            setup = _setup_store(store_dir, source, predictor, load, requested, precision, batch_size)
        except (DataError, OSError) as e:
            setup = str(e)
    setup = broadcast_object(setup, ctx)  # an error on rank 0 stops every rank, not only rank 0
    if isinstance(setup, str):
        raise DataError(setup)
    header, pending, calibration = setup
    predictor.precision = header.precision
    mine = [pending[i] for i in shard_indices(len(pending), ctx)]
    decoding: tuple = (False, {"decoder": "cpu", "reason": "nothing to label"})
    if ctx.is_main and pending and hashes and decode == "auto":
        decoding = (False, {"decoder": "cpu", "reason": "image hashes need the image decoded on the CPU"})
    elif ctx.is_main and pending:  # rank 0 measures, every rank decodes the same way
        decoding = choose_decoder(decode, device, transform, source, num_workers, predictor.logits)
    use_gpu, decode_info = broadcast_object(decoding, ctx)
    decoder = GpuJpegDecoder(device, transform) if use_gpu else None
    if use_gpu:
        load = EncodedOrDecoded(transform.host)

    start = time.perf_counter()
    labeled, num_bad, shards_done = _label_shards(predictor, source, mine, store_dir, header, load, decoder,
                                                  batch_size, num_workers, device, progress and ctx.is_main,
                                                  hash_mode)
    elapsed = time.perf_counter() - start
    # Reduced on ctx.device: NCCL reduces GPU tensors only, gloo CPU ones.
    totals = all_reduce_sum(torch.tensor([labeled, num_bad, shards_done], dtype=torch.int64, device=ctx.device),
                            ctx).tolist()
    elapsed = max(all_reduce_sum(torch.tensor([elapsed if r == ctx.rank else 0.0
                                               for r in range(ctx.world_size)], dtype=torch.float64,
                                              device=ctx.device), ctx).tolist())
    run = {"images_labeled": totals[0], "images_bad": totals[1], "shards_labeled": totals[2],
           "shards_skipped": header.source["num_shards"] - len(pending), "seconds": round(elapsed, 3),
           "images_per_s": round(totals[0] / elapsed, 1) if elapsed > 0 else None,
           "precision": header.precision, "calibration": calibration, "world_size": ctx.world_size,
           "num_workers": num_workers, "batch_size": batch_size, "device": str(device), "decode": decode_info,
           "image_hashes": hash_mode is not None}
    barrier(ctx)  # every rank's shards are written before rank 0 lists them
    manifest: StoreManifest | str = ""
    if ctx.is_main:
        manifest = consolidate(store_dir, run)
        if not manifest.complete:  # on a shared filesystem every pending shard has a record now
            manifest = (f"labeling finished but {manifest.num_shards - len(manifest.shards)} shard(s) of "
                        f"{store_dir} have no record: is the store on a filesystem all ranks share?")
        elif manifest.num_rows == 0:  # refused as a folder without images is: nothing to select from
            manifest = _no_images(store_dir, manifest)
    manifest = broadcast_object(manifest, ctx)
    if isinstance(manifest, str):
        raise DataError(manifest)
    return manifest


def _no_images(store_dir: Path, manifest: StoreManifest) -> str:
    """Why a finished store holds no labeled image (an empty pool, or tars that are not tars)."""
    first = next(iter_bad_images(store_dir, manifest.shards), None)
    why = (f"{manifest.num_bad} unreadable, first {first[0]}: {first[1]} (all in {store_dir}/bad_images.tsv)"
           if first else "its shards hold no items")
    return f"the unlabeled pool has no readable images in its {manifest.num_shards} shard(s): {why}"


def _label_shards(predictor: Predictor, source: UnlabeledSource, shards: list[int], store_dir: Path,
                  header: StoreHeader, load: Callable, decoder: GpuJpegDecoder | None, batch_size: int,
                  num_workers: int, device: torch.device, progress: bool,
                  hash_mode: str | None = None) -> tuple[int, int, int]:
    """Label ``shards`` (this rank's) and write each as soon as its last batch is predicted.
    Batches reach the device through the predictor's :class:`DeviceInput` (pinned, copied one
    ahead); with ``decoder`` the workers' encoded JPEGs are decoded there first."""
    if not shards:
        return 0, 0, 0
    num_workers = min(num_workers, len(shards))  # a worker without a shard would only cost memory
    loader = DataLoader(ShardBatches(source, shards, load, batch_size, stack=decoder is None, hash_mode=hash_mode),
                        batch_size=None,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if num_workers else None)
    lengths = [source.shard_length(s) for s in shards]
    total = sum(lengths) if all(n is not None for n in lengths) else None
    bar = progress_bar(None, desc="label", unit="img", total=total, enabled=progress)
    buffers: dict[int, _ShardBuffer] = {}
    labeled = num_bad = done = 0
    try:
        for batch in predictor.input.batches(loader):
            buf = buffers.setdefault(batch["shard"], _ShardBuffer())
            x, keys, pos = batch["x"], batch["keys"], batch["pos"]
            hashes = unpack_hashes(batch["hashes"]) if batch["hashes"] is not None else None
            buf.bad.extend(batch["bad"])
            if decoder is not None and x is not None:
                x, kept, failed = decoder(x)
                buf.bad.extend((keys[i], reason) for i, reason in failed)
                keys, pos = [keys[i] for i in kept], [pos[i] for i in kept]
                hashes = hashes[kept] if hashes is not None else None
            if x is not None:
                idx, prob = predictor(x)
                buf.keys.extend(keys)
                buf.pos.extend(pos)
                buf.idx.append(idx)
                buf.prob.append(prob)
                if hashes is not None:
                    buf.hashes.append(hashes)
            bar.update(len(batch["keys"]) + len(batch["bad"]))
            if batch["last"]:
                shard = batch["shard"]
                del buffers[shard]
                k = header.top_k
                write_shard(store_dir, header, shard, source.shard_name(shard), buf.keys,
                            np.concatenate(buf.idx) if buf.idx else np.empty((0, k), np.int32),
                            np.concatenate(buf.prob) if buf.prob else np.empty((0, k), np.float32), buf.bad,
                            positions=np.asarray(buf.pos, dtype=np.int64), items=batch["items"],
                            hashes=(np.concatenate(buf.hashes) if buf.hashes else np.empty((0, 2), np.uint64))
                            if hash_mode is not None else None)
                labeled, num_bad, done = labeled + len(buf.keys), num_bad + len(buf.bad), done + 1
                if total is None:  # unknown shard sizes: extrapolate from the shards seen so far
                    bar.total = int((labeled + num_bad) / done * len(shards))
                bar.set_postfix(shards=f"{done}/{len(shards)}", bad=num_bad, refresh=False)
    finally:
        bar.close()
    return labeled, num_bad, done
