"""Optional GPU JPEG decoding for the labeler (``torchvision.io.decode_jpeg(device="cuda")``, batched).

On the default CPU path each DataLoader worker decodes, resizes and crops its images. With many
GPUs per node and few cores per GPU, decoding can be what limits labeling; then the workers only
read the files, and the GPU decodes a whole batch at once (nvJPEG) and resizes and crops it
there. It is used only where it pays: :func:`choose_decoder` takes it on a CUDA device, for an
un-augmented transform, on a pool whose first images are JPEGs, when the measured rates
(:func:`measure_decoding`, decided by :func:`prefer_gpu_decoding`) say labeling will be faster;
a CPU device never reaches it. Items that are not JPEGs, or that nvJPEG rejects (CMYK, some
truncated files), are decoded on the CPU as before, so the set of unreadable images is the same.
Pixels differ from the CPU path by interpolation rounding (tensor resize against PIL's), so the
labels are equivalent, not identical; the choice is recorded in the store's manifest.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
from PIL import Image

from ..data.pool import UnlabeledSource, Unreadable, decode_image
from ..data.transforms import ImageTransform
from ..runtime.errors import ConfigError, error_reason

DECODERS = ("auto", "cpu", "cuda")
JPEG_MAGIC = b"\xff\xd8\xff"
GPU_DECODE_MIN_SPEEDUP = 1.1  # the GPU path must be predicted this much faster to be taken
SAMPLE_IMAGES = 64  # images of the first shard read to decide
MIN_JPEG_SHARE = 0.9  # below this share of JPEGs in the sample the pool is not treated as JPEG


class DecodeAndTransform:
    """The CPU path of a worker: payload -> PIL image -> ``transform`` (picklable)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, payload) -> torch.Tensor:
        return self.transform(decode_image(payload))


def _read_bytes(payload) -> bytes | None:
    """The encoded bytes of a file or bytes payload; None for decoded payloads (images, arrays)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, (str, os.PathLike)):
        with open(payload, "rb") as f:
            return f.read()
    return None


class EncodedOrDecoded:
    """The GPU path of a worker: a JPEG stays encoded (a 1-D uint8 tensor of its bytes, decoded
    later on the GPU); any other payload is decoded and transformed here (a uint8 CHW tensor)."""

    def __init__(self, host: Callable):
        self.host = host

    def __call__(self, payload) -> torch.Tensor:
        if callable(payload) and not isinstance(payload, (Image.Image, Unreadable)):
            payload = payload()
        data = _read_bytes(payload)
        if data is not None and data[:3] == JPEG_MAGIC:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return self.host(decode_image(payload if data is None else data))


class GpuJpegDecoder:
    """Decodes a worker batch (:class:`EncodedOrDecoded` items) on ``device`` and applies the
    transform's geometry there: returns ``(uint8 images (N, C, H, W) or None, positions in the
    batch of those images, [(position, reason)] of unreadable items)``."""

    def __init__(self, device: torch.device, transform: ImageTransform):
        from torchvision.io import ImageReadMode

        if transform.geometry is None:
            raise ConfigError("GPU JPEG decoding needs an un-augmented transform (a fixed resize and crop)")
        self.device, self.transform = torch.device(device), transform
        self.mode = ImageReadMode.GRAY if transform.channels == 1 else ImageReadMode.RGB

    def _geometry(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        g = self.transform.geometry
        if g[0] == "resize":
            return TF.resize(img, [g[1], g[1]], antialias=True)
        return TF.center_crop(TF.resize(img, [g[1]], antialias=True), [g[2], g[2]])

    def _on_cpu(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.transform.host(decode_image(encoded.numpy().tobytes())).to(self.device)

    def __call__(self, items: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
        from torchvision.io import decode_jpeg

        images: dict[int, torch.Tensor] = {i: t.to(self.device, non_blocking=True)
                                           for i, t in enumerate(items) if t.dim() != 1}
        encoded = [i for i, t in enumerate(items) if t.dim() == 1]
        bad: list[tuple[int, str]] = []
        decoded: list = []
        if encoded:
            try:
                decoded = decode_jpeg([items[i] for i in encoded], mode=self.mode, device=self.device)
            except RuntimeError:  # one file nvJPEG rejects fails the whole batch: find it
                decoded = []
                for i in encoded:
                    try:
                        decoded.append(decode_jpeg(items[i], mode=self.mode, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
        for i, img in zip(encoded, decoded):
            try:
                images[i] = self._geometry(img) if img is not None else self._on_cpu(items[i])
            except Exception as e:  # noqa: BLE001 - as on the CPU path: any decoder error is a bad image
                bad.append((i, error_reason(e, with_type=True)))
        order = sorted(images)
        return (torch.stack([images[i] for i in order]) if order else None), order, bad


def gpu_decoding_available(device: torch.device) -> bool:
    """True where torchvision can decode JPEGs on ``device`` (a CUDA device; checked by decoding one)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import io

        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
        decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), device=device)
        return True
    except Exception:  # noqa: BLE001 - a torchvision without nvJPEG, a driver without it: CPU decoding
        return False


def _sample(source: UnlabeledSource, n: int) -> list[bytes | None]:
    """The encoded bytes of up to ``n`` items of the first shard (None: not a file or bytes)."""
    out: list[bytes | None] = []
    for _, payload in source.iter_shard(0) if source.num_shards else ():
        if len(out) >= n:
            break
        try:
            out.append(_read_bytes(payload() if callable(payload) and not isinstance(payload, Image.Image)
                                   else payload))
        except OSError:
            out.append(None)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decoding(sample: list[bytes], transform: ImageTransform, decoder: GpuJpegDecoder, workers: int,
                     model: Callable[[torch.Tensor], object] | None = None) -> dict:
    """Images/s of CPU decoding (one core, times ``workers``: they decode in parallel), of GPU
    decoding (batched, after a warm-up), and of ``model`` on the decoded batch (the labeler's
    prediction, which shares the GPU with GPU decoding)."""
    start = time.perf_counter()
    for data in sample:
        transform.host(decode_image(data))
    cpu_s = (time.perf_counter() - start) / len(sample)
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in sample]
    x, _, _ = decoder(encoded)  # warm-up: nvJPEG's handles and buffers
    _sync(decoder.device)
    start = time.perf_counter()
    for _ in range(2):
        x, _, _ = decoder(encoded)
    _sync(decoder.device)
    gpu_s = (time.perf_counter() - start) / (2 * len(sample))
    rates = {"cpu_img_s": round(max(1, workers) / cpu_s, 1), "gpu_img_s": round(1 / gpu_s, 1),
             "sample": len(sample), "workers": workers}
    if model is not None and x is not None:
        model(x)
        _sync(decoder.device)
        start = time.perf_counter()
        for _ in range(2):
            model(x)
        _sync(decoder.device)
        rates["model_img_s"] = round(2 * len(x) / (time.perf_counter() - start), 1)
    return rates


def prefer_gpu_decoding(rates: dict) -> tuple[bool, str]:
    """The decision from measured rates: workers decode in parallel with the model (the slower
    of the two sets the pace), GPU decoding runs in series with it (the times add)."""
    cpu, gpu, model = rates["cpu_img_s"], rates["gpu_img_s"], rates.get("model_img_s")
    cpu_path = min(cpu, model) if model else cpu
    gpu_path = 1 / (1 / gpu + 1 / model) if model else gpu
    faster = gpu_path >= GPU_DECODE_MIN_SPEEDUP * cpu_path
    return faster, (f"predicted {gpu_path:.0f} img/s with GPU decoding, {cpu_path:.0f} with CPU decoding "
                    f"({'>=' if faster else '<'} {GPU_DECODE_MIN_SPEEDUP}x)")


def choose_decoder(requested: str, device: torch.device, transform: Callable, source: UnlabeledSource,
                   workers: int, model: Callable | None = None, *,
                   measure: Callable[..., dict] = measure_decoding) -> tuple[bool, dict]:
    """Whether the labeler decodes on the GPU: ``(use_gpu, info)`` for ``label_to_store``'s
    ``decode`` (``auto``: where it measures faster; ``cpu``: never; ``cuda``: wherever it can)."""
    if requested not in DECODERS:
        raise ConfigError(f"decode must be one of {DECODERS}, got {requested!r}")
    if requested == "cpu":
        return False, {"decoder": "cpu", "reason": "requested"}
    device = torch.device(device)
    if device.type != "cuda":
        if requested == "cuda":
            raise ConfigError(f"decode='cuda' needs a CUDA device, labeling runs on {device}")
        return False, {"decoder": "cpu", "reason": f"labeling on {device.type}"}
    if not isinstance(transform, ImageTransform) or transform.geometry is None:
        return False, {"decoder": "cpu", "reason": "the transform is not an un-augmented resize and crop"}
    if not gpu_decoding_available(device):
        return False, {"decoder": "cpu", "reason": "torchvision cannot decode JPEGs on this GPU"}
    sample = _sample(source, SAMPLE_IMAGES)
    jpegs = [d for d in sample if d is not None and d[:3] == JPEG_MAGIC]
    if not jpegs or len(jpegs) < MIN_JPEG_SHARE * len(sample):
        return False, {"decoder": "cpu", "reason": f"{len(jpegs)} of the first {len(sample)} images are JPEGs"}
    if requested == "cuda":
        return True, {"decoder": "cuda", "reason": "requested"}
    try:
        rates = measure(jpegs, transform, GpuJpegDecoder(device, transform), workers, model)
    except Exception as e:  # noqa: BLE001 - a sample nvJPEG cannot decode: keep the CPU path
        return False, {"decoder": "cpu", "reason": f"GPU decoding failed: {error_reason(e)}"}
    use, reason = prefer_gpu_decoding(rates)
    return use, {"decoder": "cuda" if use else "cpu", "reason": reason, **rates}
