"""Corruptions: shape / dtype / range, they change the image, grow with severity, are seeded."""

import math

import pytest
import torch

from noisystudent.robustness import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from noisystudent.robustness import _ops as ops
from noisystudent.robustness import corruptions as C


def scene(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """A deterministic test picture: gradients, a disc, a striped square, 1 or 3 channels."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 0.25 + 0.35 * xx + 0.15 * torch.sin(2 * math.pi * 3 * yy)
    disc = ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.06).float()
    square = ((xx > 0.15) & (xx < 0.4) & (yy > 0.55) & (yy < 0.85)).float()
    stripes = 0.1 * torch.sign(torch.sin(2 * math.pi * xx * w / 6))
    chans = [base + 0.4 * disc + stripes * square, base * 0.8 - 0.2 * disc + 0.3 * square,
             0.5 - 0.3 * xx + 0.2 * disc * yy]
    return torch.stack(chans[:c]).clamp(0, 1).expand(n, c, h, w).contiguous()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_names():
    assert len(CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert set(ALL_CORRUPTIONS) == set(C.PARAMS["imagenet"]) == set(C.PARAMS["cifar"]) == set(C.PARAMS["tinyimagenet"])


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (2, 1, 28, 28), (2, 3, 32, 32)])
def test_shape_dtype_range_change_seed(name, shape):
    x = scene(*shape)
    for s in (1, 3, 5):
        y = corrupt(x, name, s, gen(7))
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        if not (name == "saturate" and shape[1] == 1):  # no colour to change: identity, as the reference
            assert (y - x).abs().max() > 1e-3, f"{name} severity {s} left the image unchanged"
        assert torch.equal(y, corrupt(x, name, s, gen(7)))
    if name == "saturate" and shape[1] == 1:
        assert torch.equal(corrupt(x, name, 5, gen(0)), x)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_imagenet_size_rgb(name):
    x = scene(1, 3, 224, 224)
    y = corrupt(x, name, 3, gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    assert (y - x).abs().max() > 1e-3


def test_dtypes_and_random_draws_per_image():
    x = scene(3, 3, 32, 32)
    y64 = corrupt(x.double(), "gaussian_noise", 2, gen(0))
    assert y64.dtype == torch.float64
    u8 = (x * 255).round().to(torch.uint8)
    yu8 = corrupt(u8, "contrast", 2, gen(0))
    assert yu8.dtype == torch.uint8 and yu8.shape == u8.shape
    y = corrupt(x, "motion_blur", 3, gen(0))  # each image draws its own angle
    assert not torch.allclose(y[0], y[1])
    assert not torch.equal(corrupt(x, "gaussian_noise", 2, gen(0)), corrupt(x, "gaussian_noise", 2, gen(1)))


def test_presets_by_size():
    assert C.resolve_preset("auto", 16, 16) == "cifar"
    assert C.resolve_preset("auto", 32, 32) == "cifar"
    assert C.resolve_preset("auto", 64, 64) == "tinyimagenet"
    assert C.resolve_preset("auto", 224, 224) == "imagenet"
    x = scene(1, 3, 32, 32)
    forced = corrupt(x, "gaussian_noise", 5, gen(0), preset="imagenet")
    auto = corrupt(x, "gaussian_noise", 5, gen(0))
    assert (forced - x).abs().mean() > (auto - x).abs().mean()  # 0.38 vs 0.10 noise std
    with pytest.raises(ValueError):
        corrupt(x, "nope", 1)
    with pytest.raises(ValueError):
        corrupt(x, "fog", 6)


def test_glass_blur_waves_equal_the_sequential_swap_loop():
    """The batched wave schedule reproduces the reference's sequential pixel-swap loop exactly."""
    H, W, d = 13, 11, 2
    x = torch.rand(1, 3, H, W, generator=gen(3))
    offsets = torch.randint(-d, d, (1, 2, H, W), generator=gen(4))
    ref = x[0].clone()
    for h in range(H - d, d, -1):
        for w in range(W - d, d, -1):
            hp, wp = h + offsets[0, 0, h, w].item(), w + offsets[0, 1, h, w].item()
            a, b = ref[:, h, w].clone(), ref[:, hp, wp].clone()
            ref[:, h, w], ref[:, hp, wp] = b, a
    flat = x.reshape(1, 3, H * W).clone()
    for hh, ww in C._glass_schedule(H, W, d):
        here = hh * W + ww
        there = ((hh + offsets[:, 0, hh, ww]) * W + ww + offsets[:, 1, hh, ww])[:, None].expand(1, 3, -1)
        a, b = flat[:, :, here], flat.gather(2, there)
        flat[:, :, here] = b
        flat.scatter_(2, there, a)
    assert torch.equal(flat.view(3, H, W), ref)


# --------------------------------------------------------------------------- severity


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def _saturation(x: torch.Tensor) -> float:
    v, mn = x.amax(1), x.amin(1)
    return ((v - mn) / v.clamp_min(1e-6)).mean().item()


def _measure(name: str, shape, severity: int, preset: str) -> float:
    """A monotone measure of how strongly ``name`` corrupts, chosen honestly per corruption.

    Mean |corrupted - clean| over 4 independent draws, except:
      frost, fog: 1 - correlation with the clean image (they blend in a texture and rescale, so
        the mean difference depends on brightness; what grows is the texture's weight);
      pixelate: on a horizontal ramp (on a detailed picture aliasing makes the error wobble
        between block sizes);
      glass_blur: difference after smoothing both images at a fixed scale (the sharp shuffle
        noise is partly undone by the severity's own blur, the displacement is not);
      elastic_transform: RMS of the local displacement field in pixels.
    """
    n, c, h, w = shape
    x = scene(n, c, h, w)
    if name == "pixelate":
        x = torch.linspace(0, 1, w).expand(n, c, h, w).contiguous()
    if name == "elastic_transform":
        params = C.PARAMS[C.resolve_preset(preset, h, w)][name][severity - 1]
        _, field = C._elastic_fields(n, h, w, params, gen(0), torch.device("cpu"))
        return 0.0 if field is None else field.pow(2).mean().sqrt().item()
    y = corrupt(x, name, severity, gen(0), preset=preset)
    if name in ("frost", "fog"):
        return 1 - _corr(y, x)
    if name == "glass_blur":
        return (ops.gaussian_blur(y, 1.0) - ops.gaussian_blur(x, 1.0)).abs().mean().item()
    if name == "saturate":
        return _saturation(y)
    return (y - x).abs().mean().item()


# Severity ranges over which the reference parameters make the measure grow; outside them the
# reference changes the kind of corruption rather than its amount.
_RANGES = {
    # ImageNet elastic: severities 1-2 are large smooth warps, 3-5 local jitter of growing size
    ("elastic_transform", "imagenet"): [(3, 4, 5)],
    # ImageNet snow: severity 3 has fewer but larger flakes than 2 (thresholds 0.5 -> 0.9)
    ("snow", "imagenet"): [(1, 2), (3, 4, 5)],
    # ImageNet fog: severities 3 and 4 share the fog strength (2.5); 4 only roughens the texture
    ("fog", "imagenet"): [(1, 2, 3), (4, 5), (3, 5)],
}


@pytest.mark.parametrize("name", [n for n in ALL_CORRUPTIONS if n != "saturate"])
@pytest.mark.parametrize("shape,preset", [((4, 1, 28, 28), "auto"), ((4, 3, 32, 32), "auto"),
                                          ((4, 3, 64, 64), "auto"), ((2, 3, 128, 128), "imagenet")])
def test_grows_with_severity(name, shape, preset):
    p = C.resolve_preset(preset, *shape[-2:])
    if name == "spatter":  # water drops (1-3), then mud (4-5): two kinds, each growing
        ranges = [(1, 2, 3), (4, 5)]
    else:
        ranges = _RANGES.get((name, p), [(1, 2, 3, 4, 5)])
    for sevs in ranges:
        vals = [_measure(name, shape, s, preset) for s in sevs]
        assert all(b >= a - 1e-6 for a, b in zip(vals, vals[1:])), f"{name} {p} {sevs}: {vals}"
    assert _measure(name, shape, 5, preset) > 0


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_saturate_severities(preset):
    """Saturate desaturates (1 -> 2, stronger) then oversaturates (3 -> 5, stronger)."""
    x = scene(1, 3, 32, 32)
    s0 = _saturation(x)
    s = [_saturation(corrupt(x, "saturate", k, gen(0), preset=preset)) for k in range(1, 6)]
    assert s[1] < s[0] < s0 < s[2] <= s[3] <= s[4]


# --------------------------------------------------------------------------- building blocks vs references


def test_box_resize_matches_pil():
    from PIL import Image

    img = torch.rand(23, 31, generator=gen(5))
    for size in [(13, 18), (7, 29), (23, 31), (40, 45)]:
        ref = Image.fromarray(img.numpy()).resize((size[1], size[0]), Image.BOX)
        ours = ops.pil_box_resize(img[None, None], size)[0, 0]
        assert torch.allclose(ours, torch.from_numpy(__import__("numpy").array(ref)), atol=1e-5)


def test_motion_blur_cpu_shifts_equal_fft_kernels():
    x = torch.rand(3, 2, 20, 24, generator=gen(6))
    angles = torch.tensor([-40.0, 3.0, 44.0])
    a = ops.motion_blur(x, 5, 2.0, angles)
    b = ops.correlate2d(x, ops.motion_kernels(5, 2.0, angles, (20, 24)), "replicate")
    assert torch.allclose(a, b, atol=1e-5)


def test_clipped_zoom_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 1, 21, 21, generator=gen(8), dtype=torch.float64)
    for z in (1.06, 1.3, 2.0):
        h = 21
        ch = math.ceil(h / z)
        top = (h - ch) // 2
        ref = ndimage.zoom(x[0, 0, top:top + ch, top:top + ch].numpy(), z, order=1)
        trim = (ref.shape[0] - h) // 2
        ref = ref[trim:trim + h, trim:trim + h]
        assert torch.allclose(ops.clipped_zoom(x, z)[0, 0], torch.from_numpy(ref), atol=1e-6)
