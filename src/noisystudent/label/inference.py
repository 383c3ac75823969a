"""The teacher's side of pseudo labeling: pool shards batched in DataLoader workers
(:class:`ShardBatches`, also used by :mod:`noisystudent.evaluate.predict`), the inference copy of
the model and its top-k (:class:`Predictor`), the bf16 calibration; and :func:`label_to_store`,
the one call that labels a pool into a store, streaming, sharded, resumable and distributed (the
work and the coordination it runs are in :mod:`noisystudent.label.labeler`; the unlabeled sources
in :mod:`noisystudent.data.pool`)."""

from __future__ import annotations

import copy
import hashlib
import os
import time
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
from ..runtime.distributed import DistContext
from ..runtime.errors import ConfigError, DataError, error_reason
from ..runtime.precision import BF16_MIN_SPEEDUP  # the speed bar training's `auto` applies too
from .hashing import hash_inputs, pack_hashes
from .jpeg_decode import DECODERS, DecodeAndTransform, EncodedOrDecoded, GpuJpegDecoder, choose_decoder
from .labeler import Labeler, LabelingCoordinator, LabelingPlan, plan_labeling
from .store import StoreHeader, StoreManifest

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
        pixels: list[np.ndarray] = []  # per image, what the batched DCT reads
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
                pixels.append(image_hash[1])
            if len(keys) == self.batch_size:
                yield {"shard": shard, "keys": keys, "pos": pos, "x": self._collate(tensors), "bad": bad,
                       "last": False, "items": -1, "hashes": self._hashes(exact, pixels)}
                keys, pos, tensors, bad, exact, pixels = [], [], [], [], [], []
        yield {"shard": shard, "keys": keys, "pos": pos, "x": self._collate(tensors),
               "bad": bad, "last": True, "items": items, "hashes": self._hashes(exact, pixels)}

    def _hashes(self, exact: list[int], pixels: list[np.ndarray]) -> bytes | None:
        return pack_hashes(exact, pixels) if self.hash_mode is not None else None


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


class ShardLoader:
    """A rank's shards as batches on the device: :class:`ShardBatches` read in ``num_workers``
    DataLoader workers, then copied through ``device_input`` (pinned, one batch ahead on CUDA)."""

    def __init__(self, source: UnlabeledSource, load: Callable, batch_size: int, num_workers: int,
                 device_input: DeviceInput, stack: bool = True, hash_mode: str | None = None):
        self.source, self.load, self.batch_size, self.num_workers = source, load, batch_size, num_workers
        self.device_input, self.stack, self.hash_mode = device_input, stack, hash_mode

    def __call__(self, shards: list[int]) -> Iterator[dict]:
        workers = min(self.num_workers, len(shards))  # a worker without a shard would only cost memory
        loader = DataLoader(ShardBatches(self.source, shards, self.load, self.batch_size, stack=self.stack,
                                         hash_mode=self.hash_mode),
                            batch_size=None, num_workers=workers, pin_memory=self.device_input.device.type == "cuda",
                            prefetch_factor=2 if workers else None)
        return self.device_input.batches(loader)


def _check_options(precision: str, temperature: float, top_k: int, batch_size: int, decode: str,
                   device: torch.device) -> None:
    """One-line ConfigErrors for labeling options no run can use."""
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


def _choose_decoding(plan: LabelingPlan, decode: str, hashes: bool, device: torch.device, transform: Callable,
                     source: UnlabeledSource, num_workers: int, logits: Callable) -> tuple[bool, dict]:
    """Rank 0: whether the pool's JPEGs are decoded on the GPU, and why (every rank decodes the same way)."""
    if not plan.pending:
        return False, {"decoder": "cpu", "reason": "nothing to label"}
    if hashes and decode == "auto":
        return False, {"decoder": "cpu", "reason": "image hashes need the image decoded on the CPU"}
    return choose_decoder(decode, device, transform, source, num_workers, logits)


def label_to_store(model: nn.Module, source: UnlabeledSource, store_dir: Path | str, *, transform: Callable,
                   num_classes: int, teacher: str, device: torch.device | str | None = None,
                   top_k: int = PseudoLabelConfig.top_k,
                   temperature: float = 1.0, batch_size: int = 256,
                   num_workers: int | None = None, ctx: DistContext | None = None, precision: str = "auto",
                   channels_last: bool = True, fold_bn: bool = True, progress: bool = True,
                   decode: str = "auto", hashes: bool = True) -> StoreManifest:
    """Label every shard of ``source`` not yet in the store with the teacher (no noise).

    Resumable: finished shards are skipped, never recomputed; a resumed run must use the same
    teacher, classes, top-k, temperature and source (checked against the store header). The store
    keeps the teacher's top-k probabilities; hard labels are a selection's reading of them.
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

    The one-call form of :mod:`noisystudent.label.labeler`: rank 0 plans (:func:`plan_labeling`),
    each rank's :class:`Labeler` labels its shards, the :class:`LabelingCoordinator` makes every
    collective call.
    """
    ctx = ctx or DistContext()
    device = torch.device(device) if device is not None else ctx.device
    store_dir = Path(store_dir)
    _check_options(precision, temperature, top_k, batch_size, decode, device)
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    k = min(int(top_k), int(num_classes))
    split = isinstance(transform, ImageTransform)  # workers run its CPU part, the device normalises
    load = DecodeAndTransform(transform.host if split else transform)
    hash_mode = ("L" if split and transform.channels == 1 else "RGB") if hashes else None
    requested = dict(num_classes=int(num_classes), teacher=str(teacher), top_k=k, temperature=float(temperature))

    coordinator = LabelingCoordinator(ctx, store_dir)
    coordinator.prepare(source)
    predictor = Predictor(prepare_model(model, device, channels_last, fold_bn), device, "fp32",
                          float(temperature), k, channels_last, transform.normalize if split else None)

    def calibrate() -> tuple[str, dict]:
        return calibrate_precision(predictor, _calibration_batches(source, load, batch_size))

    plan = coordinator.from_main(lambda: plan_labeling(
        store_dir, StoreHeader(precision="", source=source.fingerprint(), **requested), precision, calibrate))
    predictor.precision = plan.header.precision
    use_gpu, decode_info = coordinator.from_main(lambda: _choose_decoding(
        plan, decode, hashes, device, transform, source, num_workers, predictor.logits))
    if use_gpu:
        load = EncodedOrDecoded(transform.host)
    labeler = Labeler(store_dir, plan.header, source,
                      ShardLoader(source, load, batch_size, num_workers, predictor.input, not use_gpu, hash_mode),
                      predictor, GpuJpegDecoder(device, transform) if use_gpu else None, hash_mode,
                      progress and ctx.is_main)
    settings = {"num_workers": num_workers, "batch_size": batch_size, "device": str(device),
                "decode": decode_info, "image_hashes": hash_mode is not None}
    return coordinator.run(labeler, plan, settings)
