"""Batched image operations shared by the corruptions and perturbations.

Everything here works on float tensors shaped (N, C, H, W) on any device. The reference code
(Hendrycks' ImageNet-C / imagecorruptions) is per-image numpy + OpenCV + scikit-image + scipy;
these are the few building blocks needed to express the same operations as batched torch ops.
Randomness always comes from an explicit ``torch.Generator`` (never the global RNG).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- random numbers


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device``; seeded with ``seed``, or non-deterministically when None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def ensure_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    return generator if generator is not None else new_generator(None, device)


def randn(shape, g: torch.Generator, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device and move: the numbers then depend only on the seed, not on
    # where the images live (pass a generator on the images' device to avoid the copy).
    return torch.randn(shape, generator=g, device=g.device).to(device)


def rand(shape, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device).to(device)


def uniform(shape, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * rand(shape, g, device)


def poisson(rates: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.poisson(rates.to(g.device), generator=g).to(rates.device)


def randint(low: int, high: int, shape, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=g, device=g.device).to(device)


# --------------------------------------------------------------------------- padding and filters


def pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source indices for padding a length-``n`` axis, for any pad width (even wider than ``n``).

    ``mode``: "replicate" (OpenCV BORDER_REPLICATE, scipy "nearest"), "symmetric" (scipy
    "reflect": d c b a | a b c d) or "mirror" (OpenCV BORDER_REFLECT_101: d c b | a b c d).
    torch's own ``F.pad`` cannot pad past the input size, which small images (16 px) need.
    """
    i = torch.arange(-before, n + after, device=device)
    if mode == "replicate" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        i = i.remainder(2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "mirror":
        i = i.remainder(2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(f"unknown padding mode {mode!r}")


def pad2d(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """Pad the last two dims by ``ph`` / ``pw`` on each side."""
    H, W = x.shape[-2:]
    x = x.index_select(-2, pad_index(H, ph, ph, mode, x.device))
    return x.index_select(-1, pad_index(W, pw, pw, mode, x.device))


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage / skimage Gaussian taps: radius int(truncate * sigma + 0.5)."""
    r = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    if sigma <= 0:
        return torch.ones(1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def cv2_gaussian_kernel1d(ksize: int, sigma: float) -> torch.Tensor:
    """OpenCV ``getGaussianKernel`` for sigma > 0."""
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return k / k.sum()


@lru_cache(maxsize=256)
def _filter_matrix_cpu(n: int, taps: tuple[float, ...], mode: str) -> torch.Tensor:
    k = torch.tensor(taps, dtype=torch.float64)
    r = len(taps) // 2
    idx = pad_index(n, r, r, mode, torch.device("cpu"))
    cols = idx[torch.arange(n)[:, None] + torch.arange(len(taps))[None, :]]
    rows = torch.arange(n)[:, None].expand_as(cols)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows.reshape(-1), cols.reshape(-1)), k.expand_as(cols).reshape(-1), accumulate=True)
    return m.float()


def filter_matrix(n: int, kernel1d: torch.Tensor, mode: str, device: torch.device) -> torch.Tensor:
    """(n, n) matrix M with M @ v = centred 1-D correlation of v with ``kernel1d`` under ``mode``."""
    taps = tuple(float(v) for v in kernel1d.flatten())
    return _filter_matrix_cpu(n, taps, mode).to(device)


def separable_filter(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate the last two dims with ``kh`` (rows) and ``kw`` (columns), border ``mode``.

    The border rule is folded into an (n, n) matrix per axis, so the filter is two matmuls whose
    cost does not depend on the kernel length (Gaussian sigmas reach 170 px, wider than the
    image) and which run much faster on CPU than a single-channel conv2d.
    """
    H, W = x.shape[-2:]
    if max(H, W) > 1024:  # matrices would get large: padded depthwise convolution instead
        shape = x.shape
        rh, rw = len(kh) // 2, len(kw) // 2
        y = pad2d(x.reshape(-1, 1, H, W), rh, rw, mode)
        y = F.conv2d(F.conv2d(y, kh.to(x).view(1, 1, -1, 1)), kw.to(x).view(1, 1, 1, -1))
        return y.reshape(shape)
    mh = filter_matrix(H, kh, mode, x.device).to(x.dtype)
    mw = filter_matrix(W, kw, mode, x.device).to(x.dtype)
    return mh @ x @ mw.T


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian (per channel); its default border is "nearest" = replicate."""
    k = gaussian_kernel1d(sigma, truncate)
    return separable_filter(x, k, k, mode)


def box_blur3(x: torch.Tensor) -> torch.Tensor:
    """cv2.blur(x, (3, 3)): 3x3 mean with BORDER_REFLECT_101."""
    k = torch.full((3,), 1 / 3, dtype=torch.float64)
    return separable_filter(x, k, k, "mirror")


def correlate2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Centred 2-D correlation of every channel with ``kernel``.

    ``kernel`` is (k, k) shared by all images, or (N, k, k) one per image (e.g. motion blur
    with a random angle per image). Large or per-image kernels go through the FFT, which is
    one batched op whatever the kernel; small shared ones are a few shifted adds.
    """
    N, C, H, W = x.shape
    k = kernel.shape[-1]
    r = k // 2
    xp = pad2d(x, r, r, mode)
    if kernel.dim() == 2 and k <= 5:
        # a few shifted adds: much faster on CPU than conv2d with one input channel
        out = torch.zeros_like(x)
        weights = kernel.flatten().tolist()
        for t, w in enumerate(weights):
            if w:
                i, j = divmod(t, k)
                out.add_(xp[..., i:i + H, j:j + W], alpha=w)
        return out
    Hp, Wp = H + 2 * r, W + 2 * r
    kf = torch.flip(kernel.to(x), dims=(-2, -1))
    kf = kf.view(1, 1, k, k) if kernel.dim() == 2 else kf.view(N, 1, k, k)
    spec = torch.fft.rfft2(xp, s=(Hp, Wp)) * torch.fft.rfft2(kf, s=(Hp, Wp))
    y = torch.fft.irfft2(spec, s=(Hp, Wp))
    return y[..., k - 1:k - 1 + H, k - 1:k - 1 + W]


# --------------------------------------------------------------------------- kernels


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """ImageNet-C defocus kernel: an aliased disk smoothed by a small OpenCV Gaussian."""
    if radius <= 8:
        L = torch.arange(-8, 9, dtype=torch.float64)
        ksize = 3
    else:
        L = torch.arange(-radius, radius + 1, dtype=torch.float64)
        ksize = 5
    Y, X = torch.meshgrid(L, L, indexing="ij")
    d = ((X ** 2 + Y ** 2) <= radius ** 2).double()
    d /= d.sum()
    g = cv2_gaussian_kernel1d(ksize, alias_blur)
    return separable_filter(d.view(1, 1, *d.shape), g, g, "mirror")[0, 0]


def motion_offsets(radius: int, sigma: float, angles_deg: torch.Tensor, size: tuple[int, int]):
    """Per-image tap offsets (dy, dx) and weights of imagecorruptions' ``_motion_blur``, (N, taps)
    each; taps that leave the image get weight 0 and the rest are renormalised."""
    width = 2 * int(radius) + 1
    t = torch.arange(width, dtype=torch.float64)
    w = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    w = w / w.sum()
    a = torch.deg2rad(angles_deg.double().cpu())[:, None]
    dy = -torch.ceil(t[None] * torch.sin(a) - 0.5).long()
    dx = -torch.ceil(t[None] * torch.cos(a) - 0.5).long()
    inside = (dy.abs() < size[0]) & (dx.abs() < size[1])
    wt = torch.where(inside, w[None].expand_as(dy), torch.zeros(()).double())
    return dy, dx, wt / wt.sum(1, keepdim=True)


def motion_kernels(radius: int, sigma: float, angles_deg: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One motion-blur kernel per angle, (N, K, K), as imagecorruptions' ``_motion_blur``.

    The reference shifts the image by (dx_i, dy_i) = -ceil(i * (cos, sin)(angle) - 0.5) for
    i < 2 * radius + 1 and sums with one-sided Gaussian weights, replicating edges. The same sum is
    a sparse kernel; building it lets all images (each with its own angle) blur in one FFT.
    The reference stops at taps that leave the image (only possible when the image is smaller
    than the kernel) without renormalising, which darkens the image; we drop them and renormalise.
    """
    dy, dx, wt = motion_offsets(radius, sigma, angles_deg, size)
    width = 2 * int(radius) + 1
    R = width - 1
    K = 2 * R + 1
    n = len(angles_deg)
    flat = (R - dy) * K + (R - dx) + torch.arange(n)[:, None] * K * K
    kern = torch.zeros(n * K * K, dtype=torch.float64)
    kern.index_put_((flat.reshape(-1),), wt.reshape(-1), accumulate=True)
    return kern.view(n, K, K).float()


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles_deg: torch.Tensor) -> torch.Tensor:
    """Blur each image along its own angle (degrees), replicating edges like the reference.

    On GPU, one batched FFT with per-image kernels (:func:`motion_kernels`). On CPU, the
    reference's own shift-and-add on slices of the edge-padded batch, which is memory-bound and
    several times cheaper there than the FFT.
    """
    N, C, H, W = x.shape
    if x.device.type != "cpu":
        k = motion_kernels(radius, sigma, angles_deg, (H, W)).to(x.device)
        return correlate2d(x, k, "replicate")
    dy, dx, wt = motion_offsets(radius, sigma, angles_deg, (H, W))
    R = 2 * int(radius)
    xp = pad2d(x, R, R, "replicate")
    out = torch.zeros_like(x)
    for n in range(N):
        for oy, ox, w in zip(dy[n].tolist(), dx[n].tolist(), wt[n].tolist()):
            if w:
                out[n].add_(xp[n, :, R - oy:R - oy + H, R - ox:R - ox + W], alpha=w)
    return out


# --------------------------------------------------------------------------- geometry


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre by ``zoom`` >= 1 and crop back to the input size.

    Same as the reference's centre crop + ``scipy.ndimage.zoom(order=1)`` (which maps corners to
    corners, i.e. align_corners=True, and rounds the output size) + centred trim.
    """
    H, W = x.shape[-2:]
    ch, cw = int(math.ceil(H / zoom)), int(math.ceil(W / zoom))
    top, left = (H - ch) // 2, (W - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    oh, ow = max(H, round(ch * zoom)), max(W, round(cw * zoom))
    if ch == 1 or cw == 1:
        out = F.interpolate(crop, size=(oh, ow), mode="nearest")
    else:
        out = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
    tt, tl = (oh - H) // 2, (ow - W) // 2
    return out[..., tt:tt + H, tl:tl + W]


def pixel_grid(n: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (row, col), each (n, h, w), float32."""
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return yy.expand(n, h, w), xx.expand(n, h, w)


def sample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, padding: str,
           mode: str = "bilinear") -> torch.Tensor:
    """Read ``x`` at pixel coordinates (rows, cols) (each (N, H', W')) with grid_sample.

    ``padding``: "zeros", "border", "mirror" (reflect about edge pixel centres, OpenCV
    BORDER_REFLECT_101) or "symmetric" (reflect about the image edge, scipy "reflect").
    """
    H, W = x.shape[-2:]
    if padding == "mirror":
        align, pm = True, "reflection"
    elif padding == "symmetric":
        align, pm = False, "reflection"
    else:
        align, pm = False, padding
    if align:
        gx = cols * (2.0 / max(W - 1, 1)) - 1.0
        gy = rows * (2.0 / max(H - 1, 1)) - 1.0
    else:
        gx = (2.0 * cols + 1.0) / W - 1.0
        gy = (2.0 * rows + 1.0) / H - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode=mode, padding_mode=pm, align_corners=align)


def warp_matrix(x: torch.Tensor, inv: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Projective warp: output pixel p (col, row, 1) reads input at ``inv @ p`` (inv: (N, 3, 3))."""
    N, _, H, W = x.shape
    yy, xx = pixel_grid(N, H, W, x.device)
    inv = inv.to(x.device, torch.float32)
    p = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1)  # (N, H, W, 3)
    q = torch.einsum("nij,nhwj->nhwi", inv, p)
    cols = q[..., 0] / q[..., 2]
    rows = q[..., 1] / q[..., 2]
    return sample(x, rows, cols, padding)


def affine_about_centre(x: torch.Tensor, angle_deg: float = 0.0, translate: tuple[float, float] = (0.0, 0.0),
                        scale: float = 1.0, padding: str = "zeros") -> torch.Tensor:
    """Rotate (counter-clockwise, degrees) and scale about the image centre, then translate
    (pixels, x right / y down), bilinear: torchvision ``F.affine`` semantics without shear."""
    N, _, H, W = x.shape
    cx, cy = (W - 1) * 0.5, (H - 1) * 0.5
    a = math.radians(angle_deg)
    rs = torch.tensor([[scale * math.cos(a), scale * math.sin(a), 0.0],
                       [-scale * math.sin(a), scale * math.cos(a), 0.0],
                       [0.0, 0.0, 1.0]], dtype=torch.float64)
    t1 = torch.tensor([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=torch.float64)
    t2 = torch.tensor([[1, 0, cx + translate[0]], [0, 1, cy + translate[1]], [0, 0, 1]], dtype=torch.float64)
    inv = torch.linalg.inv(t2 @ rs @ t1).float().expand(N, 3, 3)
    return warp_matrix(x, inv, padding)


@lru_cache(maxsize=64)
def _pil_box_windows(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    # PIL's BOX resampling (ImagingResample precompute_coeffs): output pixel o averages, with equal
    # weights, the input pixels whose centres lie within half a (scaled) output pixel of its
    # centre: a contiguous window [lo, hi).
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    lo, hi = [], []
    for o in range(n_out):
        centre = (o + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), n_in)
        inside = [i for i in range(first, last) if -0.5 < (i - centre + 0.5) / fscale <= 0.5]
        lo.append(inside[0] if inside else min(int(centre), n_in - 1))
        hi.append(inside[-1] + 1 if inside else lo[-1] + 1)
    return torch.tensor(lo), torch.tensor(hi)


def _box_resize_axis(x: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    lo, hi = (t.to(x.device) for t in _pil_box_windows(x.shape[dim], n_out))
    if bool(((hi - lo) == 1).all()):  # upsampling: every window is one pixel
        return x.index_select(dim, lo)
    c = torch.cumsum(x, dim=dim)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)  # window sums by differences
    shape = [1] * x.dim()
    shape[dim] = n_out
    return (c.index_select(dim, hi) - c.index_select(dim, lo)) / (hi - lo).to(x.dtype).view(shape)


def pil_box_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``PIL.Image.resize(size, Image.BOX)`` (down- or up-sampling) with window sums from cumsums."""
    return _box_resize_axis(_box_resize_axis(x, size[0], -2), size[1], -1)


# --------------------------------------------------------------------------- colour


def rgb_to_gray(x: torch.Tensor, weights=(0.2989, 0.5870, 0.1140)) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W); default weights are the reference's ``rgb2gray``."""
    w = torch.tensor(weights, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def shift_value(x: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """HSV brightness: V <- clip(V + c, 0, 1) with hue and saturation kept (skimage round trip).

    With H and S fixed every RGB channel is proportional to V, so the round trip is a per-pixel
    rescale; black pixels (V = 0, S = 0 by skimage's convention) become grey V'. For one channel
    this is clip(x + c), as the reference does for greyscale images.
    """
    if x.shape[1] == 1:
        return (x + c).clamp(0, 1)
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    ratio = v2 / v.clamp_min(1e-12)
    return torch.where(v > 0, x * ratio, v2.expand_as(x)).clamp(0, 1)


def scale_saturation(x: torch.Tensor, mult: float, add: float) -> torch.Tensor:
    """HSV saturation: S <- clip(S * mult + add, 0, 1), hue and value kept (skimage round trip).

    Each channel is V - (V - channel) * S'/S; grey pixels (S = 0) have hue 0 (red) in skimage,
    so they become (V, V(1 - S'), V(1 - S')).
    """
    v = x.amax(1, keepdim=True)
    mn = x.amin(1, keepdim=True)
    s = torch.where(v > 0, (v - mn) / v.clamp_min(1e-12), torch.zeros_like(v))
    s2 = (s * mult + add).clamp(0, 1)
    coloured = v - (v - x) * (s2 / s.clamp_min(1e-12))
    grey = torch.cat([v, v * (1 - s2), v * (1 - s2)], dim=1)
    return torch.where(s > 0, coloured, grey).clamp(0, 1)


# --------------------------------------------------------------------------- textures


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Diamond-square height maps in [0, 1], (n, mapsize, mapsize), as the ImageNet-C fog helper.

    The reference fills one big array through strided slices; here each level is a dense
    (n, r, r) grid that is interleaved with its new square and diamond points into (n, 2r, 2r),
    the same recurrence with contiguous memory (mapsize must be a power of two).
    """
    assert mapsize & (mapsize - 1) == 0
    ul = torch.zeros(n, 1, 1, device=device)
    wibble = 100.0

    def wibbled_mean(a: torch.Tensor) -> torch.Tensor:
        return a / 4 + wibble * uniform(a.shape, -wibble, wibble, g, device)

    while ul.shape[-1] < mapsize:
        r = ul.shape[-1]
        below = torch.roll(ul, -1, dims=1)
        sq = wibbled_mean(ul + below + torch.roll(ul, -1, dims=2) + torch.roll(below, -1, dims=2))
        top = wibbled_mean(sq + torch.roll(sq, 1, dims=1) + ul + torch.roll(ul, -1, dims=2))
        left = wibbled_mean(sq + torch.roll(sq, 1, dims=2) + ul + below)
        even = torch.stack([ul, top], dim=-1).reshape(n, r, 2 * r)
        odd = torch.stack([left, sq], dim=-1).reshape(n, r, 2 * r)
        ul = torch.stack([even, odd], dim=2).reshape(n, 2 * r, 2 * r)
        wibble /= wibbledecay
    m = ul - ul.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def next_power_of_2(v: int) -> int:
    return 1 if v <= 1 else 2 ** (v - 1).bit_length()
