"""GPU JPEG decoding for the labeler: when it is chosen (stubbed measurements, since CI has no GPU),
and the decode path itself, run on the CPU (torchvision's decode_jpeg takes any device)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import _label_helpers as H
import noisystudent.label.inference as inference
import noisystudent.label.jpeg_decode as J
from noisystudent.config.schema import NoiseConfig
from noisystudent.data.pool import folder_source
from noisystudent.data.transforms import eval_transform, train_transform
from noisystudent.label.inference import label_to_store
from noisystudent.label.store import load_pseudo_labels
from noisystudent.runtime.errors import ConfigError

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


def _photo(rng, w, h) -> Image.Image:
    base = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))


def _encoded(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pool(root, n=12, fmt="jpg", bad=()):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        path = root / f"{i:03d}.{fmt}"
        if i in bad:
            path.write_bytes(J.JPEG_MAGIC + b"not really a jpeg")
        else:
            _photo(rng, 20 + i, 14 + i % 5).save(path)
    return folder_source(root, shard_size=5)


@pytest.mark.parametrize("rates,gpu", [
    ({"cpu_img_s": 500, "gpu_img_s": 5000}, True),
    ({"cpu_img_s": 500, "gpu_img_s": 520}, False),  # within the 1.1x margin
    ({"cpu_img_s": 8000, "gpu_img_s": 20000, "model_img_s": 3000}, False),  # the model is the limit anyway
    ({"cpu_img_s": 1000, "gpu_img_s": 30000, "model_img_s": 6000}, True),  # 5000 against 1000
])
def test_gpu_decoding_is_preferred_only_when_labeling_is_predicted_faster(rates, gpu):
    use, reason = J.prefer_gpu_decoding(rates)
    assert use is gpu and "predicted" in reason


def _never(*a, **k):
    raise AssertionError("must not measure")


def test_cpu_runs_never_take_the_gpu_path(tmp_path):
    pool, clean = _pool(tmp_path / "p"), eval_transform(8, 3, H.MEAN, H.STD)
    pool.prepare(tmp_path / "work")
    assert J.choose_decoder("auto", torch.device("cpu"), clean, pool, 2, measure=_never) == (
        False, {"decoder": "cpu", "reason": "labeling on cpu"})
    assert J.choose_decoder("cpu", CUDA, clean, pool, 2, measure=_never)[0] is False
    assert not J.gpu_decoding_available(torch.device("cpu"))
    with pytest.raises(ConfigError, match="decode must be one of"):
        J.choose_decoder("nvjpeg", CUDA, clean, pool, 2)
    with pytest.raises(ConfigError, match="decode='cuda' needs a CUDA device, labeling runs on cpu"):
        label_to_store(H.teacher_net(), pool, tmp_path / "store", transform=clean, num_classes=10, teacher="t",
                       device="cpu", decode="cuda", num_workers=0, progress=False)


def test_the_decoder_is_chosen_from_measurements_on_a_jpeg_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(J, "gpu_decoding_available", lambda device: True)
    clean = eval_transform(8, 3, H.MEAN, H.STD)
    jpegs, pngs = _pool(tmp_path / "jpg"), _pool(tmp_path / "png", fmt="png")
    for p in (jpegs, pngs):
        p.prepare(tmp_path / ("work-" + p.root.name))
    seen = {}

    def measure(sample, transform, decoder, workers, model):
        seen.update(n=len(sample), jpeg=all(s[:3] == J.JPEG_MAGIC for s in sample), workers=workers)
        return dict(rates, sample=len(sample))

    rates = {"cpu_img_s": 100.0, "gpu_img_s": 1000.0}
    use, info = J.choose_decoder("auto", CUDA, clean, jpegs, 3, measure=measure)
    assert use and info["decoder"] == "cuda" and info["gpu_img_s"] == 1000.0
    assert seen == {"n": 5, "jpeg": True, "workers": 3}  # the first shard's images
    rates = {"cpu_img_s": 1000.0, "gpu_img_s": 900.0}
    assert J.choose_decoder("auto", CUDA, clean, jpegs, 3, measure=measure)[1]["decoder"] == "cpu"
    assert J.choose_decoder("cuda", CUDA, clean, jpegs, 3, measure=_never)[0] is True
    assert J.choose_decoder("auto", CUDA, clean, pngs, 3, measure=_never)[1]["reason"] == \
        "0 of the first 5 images are JPEGs"
    noisy = train_transform(8, 3, H.MEAN, H.STD, NoiseConfig(), flip=True)
    assert "not an un-augmented" in J.choose_decoder("auto", CUDA, noisy, jpegs, 3, measure=_never)[1]["reason"]

    def broken(*a, **k):
        raise RuntimeError("nvjpeg: bad state")

    assert J.choose_decoder("auto", CUDA, clean, jpegs, 3, measure=broken)[1]["reason"] == \
        "GPU decoding failed: nvjpeg: bad state"


def test_the_decoder_assembles_encoded_decoded_and_bad_items_in_order():
    rng = np.random.default_rng(1)
    clean = eval_transform(8, 3, H.MEAN, H.STD)
    imgs = [_photo(rng, 23, 17), _photo(rng, 12, 30), _photo(rng, 40, 20)]
    worker = J.EncodedOrDecoded(clean.host)
    items = [worker(_encoded(imgs[0])), worker(_encoded(imgs[1], "PNG")), worker(J.JPEG_MAGIC + b"junk"),
             worker(_encoded(imgs[2]))]
    assert [t.dim() for t in items] == [1, 3, 1, 1]  # JPEGs stay encoded, the PNG is decoded in the worker
    x, kept, bad = J.GpuJpegDecoder(torch.device("cpu"), clean)(items)
    assert kept == [0, 1, 3] and [i for i, _ in bad] == [2] and x.dtype == torch.uint8 and x.shape == (3, 3, 8, 8)
    reference = torch.stack([clean.host(im) for im in imgs])
    assert torch.equal(x[1], reference[1])
    # Decoder and interpolation differ from PIL's by rounding only.
    assert (x.float() - reference.float()).abs().mean() < 4


def test_labeling_through_the_gpu_path_matches_the_cpu_path(tmp_path, monkeypatch):
    pool = _pool(tmp_path / "pool", n=12, bad=(4,))
    # hashes=False: image hashes need each image decoded on the CPU, so with them `auto` never decodes on the GPU
    common = dict(transform=eval_transform(8, 3, H.MEAN, H.STD), num_classes=10, teacher="t", top_k=3,
                  batch_size=4, num_workers=1, precision="fp32", progress=False, device="cpu", hashes=False)
    cpu = label_to_store(H.teacher_net(), pool, tmp_path / "cpu", **common)
    assert cpu.run["decode"]["decoder"] == "cpu"
    # The check that keeps CPU runs off the GPU path, bypassed: GpuJpegDecoder runs with device="cpu".
    monkeypatch.setattr(inference, "choose_decoder", lambda *a, **k: (True, {"decoder": "cuda", "reason": "test"}))
    gpu = label_to_store(H.teacher_net(), pool, tmp_path / "gpu", **common)
    assert gpu.run["decode"]["decoder"] == "cuda" and gpu.num_rows == cpu.num_rows == 11 and gpu.num_bad == 1
    a, b = load_pseudo_labels(tmp_path / "cpu"), load_pseudo_labels(tmp_path / "gpu")
    assert a.keys == b.keys
    assert np.mean(a.topk_index[:, 0] == b.topk_index[:, 0]) >= 0.8
