"""ImageNet-C corruptions on batched tensors (Hendrycks & Dietterich, 2019), CPU or CUDA.

``corrupt(images, name, severity, seed=0, indices=None)`` takes pixels ``(B, 3, H, W)`` in
[0, 1] and returns the corrupted pixels on the input's device and dtype, in [0, 1]. The 15
corruptions of the benchmark and its 4 held-out ones are in :data:`NAMES`, spelt as ImageNet-C
spells them, with the severity parameters of the reference implementation (written for
224 x 224 images; see "Other sizes").

Randomness. Every random draw of image ``i`` comes from its own generator seeded by
``SeedSequence([seed, indices[i], 2, NAMES.index(name)])``, on the CPU, so a corrupted image
depends on (seed, dataset index, corruption) alone: not on the batch size, the device, the
order of the images or the process count. The draws do not depend on the severity, so the
five severities of one image share their noise (paired, like the probe's sigmas).

Fidelity. ``tests/test_corruptions.py`` compares every corruption and severity with the
reference implementation (the ``imagecorruptions-imaug`` package, a test dependency only) on
natural photos and procedural images: deterministic corruptions by PSNR, random ones by the
mean and standard deviation of the residual (corrupted - clean) per channel. Deviations are
documented per function; :data:`DEVIATIONS` lists them.

Other sizes. The parameters are ImageNet-C's, in pixels where the reference's are (blur radii,
zoom factors, glass-blur shuffles, motion lengths), so a corruption at 64 x 64 covers a larger
share of the image than at 224 x 224; the reference does the same. Where the reference scales
with the image (elastic displacement fields) fanlens scales the same way.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._threads import for_chunks
from ._validation import FanlensError, check_choice, check_seed

__all__ = ["NAMES", "BENCHMARK", "HELD_OUT", "FAMILIES", "SEVERITIES", "DEVIATIONS", "MIN_SIDE", "corrupt"]

BENCHMARK = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
HELD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
NAMES = BENCHMARK + HELD_OUT
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
SEVERITIES = (1, 2, 3, 4, 5)
_STREAM = 2  # the corruptions' random stream, apart from the probe's noise and k-means

DEVIATIONS = {
    "jpeg_compression": "encoded and decoded by Pillow (libjpeg), as in the reference, on the CPU: images on "
                        "another device make a round trip",
    "frost": "the reference overlays crops of six frost photographs that ship inside it; fanlens makes its "
             "frost texture procedurally (no image data is shipped or downloaded)",
    "spatter": "where the liquid layer is empty (no water at all), the reference divides by zero; "
               "fanlens leaves the image as it is",
}


# --------------------------------------------------------------------------- randomness
def _generators(seed: int, indices: Sequence[int], name: str) -> list[torch.Generator]:
    gens = []
    for j in indices:
        st = np.random.SeedSequence([int(seed), int(j), _STREAM, NAMES.index(name)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator(device="cpu").manual_seed(int(st[0]) << 32 | int(st[1])))
    return gens


def _rand(gens, shape, dev, kind="normal"):
    """One draw per image from its own generator, ``(B, *shape)`` (each written in place: no stacking
    copy), on ``dev`` (float32)."""
    f = torch.randn if kind == "normal" else torch.rand
    out = torch.empty((len(gens), *shape))
    for i, g in enumerate(gens):
        f(tuple(shape), generator=g, out=out[i])
    return out.to(dev)


# --------------------------------------------------------------------------- filters
def _gauss_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's Gaussian kernel: radius ``int(truncate * sigma + 0.5)``, normalised."""
    r = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def _pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """Pad the last two dims. ``mode``: scipy's ``nearest`` (edge), ``reflect`` (half-sample
    symmetric, d c b a | a b c d) or ``mirror`` (whole-sample, OpenCV's default REFLECT_101)."""
    if mode == "nearest":
        return F.pad(x, (pw, pw, ph, ph), mode="replicate")
    if mode == "mirror":
        if ph < x.shape[-2] and pw < x.shape[-1]:
            return F.pad(x, (pw, pw, ph, ph), mode="reflect")
        mode = "reflect"  # too small to mirror: fall back to half-sample symmetric
    h, w = x.shape[-2:]
    iy = torch.arange(-ph, h + ph, device=x.device)
    ix = torch.arange(-pw, w + pw, device=x.device)
    iy, ix = _symmetric(iy, h), _symmetric(ix, w)
    return x[..., iy, :][..., ix]


def _symmetric(i: torch.Tensor, n: int) -> torch.Tensor:
    period = 2 * n
    i = torch.remainder(i, period)
    return torch.where(i < n, i, period - 1 - i)


def _sep_conv(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor, mode: str) -> torch.Tensor:
    """Separable correlation of every channel of ``x`` (B, C, H, W) with 1-D kernels."""
    b, c, h, w = x.shape
    ph, pw = kh.numel() // 2, kw.numel() // 2
    y = _pad(x.reshape(b * c, 1, h, w), ph, pw, mode)
    if kh.numel() + kw.numel() > 56:  # long kernels: one FFT pass with the outer product
        return _fft_correlate_valid(y, kh.double()[:, None] * kw.double()[None, :]).reshape(b, c, h, w)
    # short kernels: weighted sums of shifted views (several times faster than a one-channel
    # conv2d on the CPU, and the same sums in the same order)
    y = y[:, 0]
    t = y[:, :h, :] * float(kh[0])
    for i in range(1, kh.numel()):
        t.add_(y[:, i : i + h, :], alpha=float(kh[i]))
    out = t[:, :, :w] * float(kw[0])
    for j in range(1, kw.numel()):
        out.add_(t[:, :, j : j + w], alpha=float(kw[j]))
    return out.reshape(b, c, h, w)


def _gaussian_filter(x: torch.Tensor, sigma: float | tuple[float, float], mode: str = "nearest",
                     truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over the last two dims (skimage's ``gaussian``)."""
    sh, sw = (sigma, sigma) if not isinstance(sigma, tuple) else sigma
    return _sep_conv(x, _gauss_kernel1d(sh, truncate), _gauss_kernel1d(sw, truncate), mode)


def _fft_correlate_valid(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(y, k)`` (valid correlation of (N, 1, H, W) with one (kh, kw) kernel) through real
    FFTs: the cost no longer grows with the kernel's area. Equal to the direct sum up to float rounding (about 1e-6 of the
    range in float32)."""
    H, W = y.shape[-2:]
    kh, kw = k.shape[-2:]
    # transforms of a length with small factors only (a 148-point transform, 4 x 37, took 2.7 x as long as a
    # 150-point one): the zeros added at the end do not reach the valid part, as the wrap-around does not
    fh, fw = _fast_fft_length(H), _fast_fft_length(W)
    dt = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    kf = torch.flip(k.to(device=y.device, dtype=dt), dims=(-2, -1))  # correlation = convolution with the flip
    spec = torch.fft.rfft2(y.to(dt), s=(fh, fw)) * torch.fft.rfft2(kf, s=(fh, fw))
    full = torch.fft.irfft2(spec, s=(fh, fw))
    return full[..., kh - 1 : H, kw - 1 : W].to(y.dtype)  # circular wrap-around only touches the discarded border


@functools.lru_cache(maxsize=256)
def _fast_fft_length(n: int) -> int:
    """The smallest length >= ``n`` whose only prime factors are 2, 3 and 5."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _conv2d_same(x: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    b, c, h, w = x.shape
    kh, kw = k.shape
    y = _pad(x.reshape(b * c, 1, h, w), kh // 2, kw // 2, mode)
    if kh * kw > 81:  # large kernels (defocus blur's disks): FFT, as OpenCV's filter2D switches to a DFT
        return _fft_correlate_valid(y, k).reshape(b, c, h, w)
    return F.conv2d(y, k.to(x)[None, None]).reshape(b, c, h, w)


# --------------------------------------------------------------------------- colour
def _rgb2hsv(x: torch.Tensor) -> torch.Tensor:
    """skimage's rgb2hsv on (B, 3, H, W)."""
    r, g, b = x.unbind(1)
    v = x.max(1).values
    delta = v - x.min(1).values
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(r == v, (g - b) / d, torch.where(g == v, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.remainder(h / 6.0, 1.0)
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv2rgb(x: torch.Tensor) -> torch.Tensor:
    """skimage's hsv2rgb on (B, 3, H, W)."""
    h, s, v = x.unbind(1)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    hi = torch.remainder(hi, 6).long()
    choices = [
        torch.stack([v, t, p], 1), torch.stack([q, v, p], 1), torch.stack([p, v, t], 1),
        torch.stack([p, q, v], 1), torch.stack([t, p, v], 1), torch.stack([v, p, q], 1),
    ]
    out = torch.zeros_like(x)
    for i, ch in enumerate(choices):
        out = torch.where((hi == i)[:, None], ch, out)
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's RGB2GRAY (ITU-R 601 luma), (B, 1, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return (x * w[None, :, None, None]).sum(1, keepdim=True)


# --------------------------------------------------------------------------- geometry
def _zoom_linear(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """scipy.ndimage.zoom(order=1) without grid mode: corners map to corners."""
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=True)


def _clipped_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """The reference's clipped_zoom: the centre crop of side ceil(side / z), zoomed by z (output
    side round(crop * z)), then its top-left H x W."""
    h, w = x.shape[-2:]
    ch, cw = int(math.ceil(h / z)), int(math.ceil(w / z))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    out = _zoom_linear(crop, int(round(ch * z)), int(round(cw * z)))
    return out[..., :h, :w]


def _shift_clamped(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x shifted by (dx, dy) with the border row/column repeated (the reference's ``shift``)."""
    h, w = x.shape[-2:]
    iy = (torch.arange(h, device=x.device) - dy).clamp(0, h - 1)
    ix = (torch.arange(w, device=x.device) - dx).clamp(0, w - 1)
    return x[..., iy, :][..., ix]


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """The reference's motion blur: a Gaussian-weighted sum of copies shifted along a line (one
    angle per image), the border row/column repeated, summed copy by copy in the reference's order.
    Each copy is a view into the edge-padded image (no copy is made), so an image costs one
    multiply-add pass per copy, and its pixels do not depend on the other images of the batch."""
    width = 2 * radius + 1
    k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    k = k / k.sum()
    b, c, h, w = x.shape
    ang = np.radians(np.asarray(angles, dtype=np.float64).reshape(-1))
    py, px = width * np.sin(ang), width * np.cos(ang)
    hyp = np.hypot(py, px)
    steps = np.arange(width)[:, None]
    dy = -np.ceil(steps * py / hyp - 0.5).astype(np.int64)  # (width, B): the shift of copy i of image b
    dx = -np.ceil(steps * px / hyp - 0.5).astype(np.int64)
    # the reference stops an image's sum at the first shift that leaves the image
    alive = np.logical_and.accumulate((np.abs(dy) < h) & (np.abs(dx) < w), axis=0)
    r = int(max(np.abs(dy[alive]).max(initial=0), np.abs(dx[alive]).max(initial=0)))
    # shifted[y, x] = x[clamp(y - dy), clamp(x - dx)] = padded[y + r - dy, x + r - dx]
    padded = F.pad(x, (r, r, r, r), mode="replicate") if r else x
    out = torch.zeros_like(x)
    for bi in range(b):
        acc, src = out[bi], padded[bi]
        for i in np.flatnonzero(alive[:, bi]):
            oy, ox = r - int(dy[i, bi]), r - int(dx[i, bi])
            acc.add_(src[:, oy : oy + h, ox : ox + w], alpha=float(k[i]))
    return out


# --------------------------------------------------------------------------- the corruptions
def _gaussian_noise(x, s, gens):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][s - 1]
    return x + _rand(gens, x.shape[1:], x.device) * c


def _shot_noise(x, s, gens):
    c = [60, 25, 12, 5, 3][s - 1]
    rate = (x * c).float().cpu()
    out = torch.stack([torch.poisson(rate[i], generator=g) for i, g in enumerate(gens)])
    return out.to(x.device, x.dtype) / c


def _impulse_noise(x, s, gens):
    c = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    # each value is flipped with probability c, independently (the reference's amount), to 1 (salt) or
    # 0 (pepper) with probability 1/2 each. The flipped positions of an image are a Bernoulli process,
    # drawn as its geometric gaps (about c * n draws instead of n), then one salt-or-pepper draw each
    b = x.shape[0]
    n = x[0].numel()
    out = x.clone().reshape(b, n)
    log_keep = math.log1p(-c)
    for i, g in enumerate(gens):
        parts, last = [], -1.0
        while True:
            m = int(c * n + 6 * math.sqrt(c * n) + 16)
            gaps = torch.floor(torch.log(torch.rand(m, generator=g, dtype=torch.float64)) / log_keep) + 1
            pos = last + torch.cumsum(gaps, 0)
            parts.append(pos[pos < n])
            if bool(pos[-1] >= n):
                break
            last = float(pos[-1])
        flipped = torch.cat(parts).long()
        salt = torch.rand(flipped.numel(), generator=g) < 0.5
        out[i, flipped.to(x.device)] = salt.to(x.device, x.dtype)
    return out.reshape(x.shape)


def _speckle_noise(x, s, gens):
    c = [0.15, 0.2, 0.35, 0.45, 0.6][s - 1]
    return x + x * _rand(gens, x.shape[1:], x.device) * c


def _gaussian_blur(x, s, gens):
    return _gaussian_filter(x, [1, 2, 3, 4, 6][s - 1])


def _glass_blur(x, s, gens):
    """The reference's glass blur exactly: blur, truncate to uint8 levels, then, ``iters`` times,
    visit every inner pixel from the bottom-right to the top-left and give it the value of a random
    neighbour within ``[-delta, delta)`` (what the reference's in-place "swap" of two pixel views
    amounts to), then blur again. The sequential visits are resolved into one source pixel per
    pixel (:func:`_glass_sources`), so the whole batch moves in one gather."""
    sigma, delta, iters = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][s - 1]
    x = torch.floor(_gaussian_filter(x, sigma).clamp(0, 1) * 255) / 255  # the reference's uint8 step
    b, c, h, w = x.shape
    off = torch.stack([torch.randint(-delta, delta, (iters, h, w, 2), generator=g) for g in gens])
    src = torch.arange(h * w).expand(b, h * w)
    for it in range(iters):  # pass it reads what the passes before it left
        src = torch.gather(src, 1, _glass_sources(off[:, it], delta))
    src = src.to(x.device)[:, None].expand(b, c, h * w)
    x = torch.gather(x.reshape(b, c, h * w), 2, src).reshape(b, c, h, w)
    return _gaussian_filter(x, sigma)


def _glass_sources(off: torch.Tensor, delta: int) -> torch.Tensor:
    """Where each pixel's value comes from after one pass of glass blur's sequential copies.

    ``off`` (B, H, W, 2) holds each pixel's drawn offset (dx, dy). Pixels ``p`` with
    ``delta < y <= H - delta`` and ``delta < x <= W - delta`` are visited from the bottom-right to
    the top-left, and each takes the value its source ``q = p + (dy, dx)`` holds at that moment:
    ``q``'s final value when ``q`` was visited before ``p`` (a later row, or the same row further
    right), otherwise ``q``'s value from before the pass. So ``T(p) = T(q)`` in the first case and
    ``q`` in the second: chains that always step to earlier visits, resolved by pointer doubling
    (log2 of the longest chain gathers instead of one step per pixel). Returns flat indices
    (B, H * W) into the image before the pass."""
    b, h, w = off.shape[:3]
    ys = torch.arange(h)[:, None].expand(h, w)
    xs = torch.arange(w)[None, :].expand(h, w)
    visited = (ys > delta) & (ys <= h - delta) & (xs > delta) & (xs <= w - delta)
    qy = torch.where(visited, ys + off[..., 1], ys)
    qx = torch.where(visited, xs + off[..., 0], xs)
    before = visited.reshape(-1)[qy * w + qx] & ((qy > ys) | ((qy == ys) & (qx > xs)))
    ptr = (qy * w + qx).reshape(b, h * w)
    done = ~before.reshape(b, h * w)
    while not bool(done.all()):
        ptr, done = torch.where(done, ptr, torch.gather(ptr, 1, ptr)), done | torch.gather(done, 1, ptr)
    return ptr


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The reference's defocus kernel: a disk, then OpenCV's Gaussian blur of the kernel itself."""
    return torch.from_numpy(_disk_parts(radius, alias_blur)[0]).float()


@functools.lru_cache(maxsize=16)
def _disk_parts(radius: float, alias_blur: float):
    """The kernel in float64, and its parts: the disk's indicator ``d`` (before dividing by its
    ``n`` pixels) and the 1-D Gaussian ``g`` OpenCV blurs it with (ksize 3 or 5, border REFLECT_101)."""
    if radius <= 8:
        L, ks = np.arange(-8, 9), 3
    else:
        L, ks = np.arange(-radius, radius + 1), 5
    X, Y = np.meshgrid(L, L)
    d = ((X**2 + Y**2) <= radius**2).astype(np.float64)
    n = int(d.sum())
    g = np.exp(-((np.arange(ks) - (ks - 1) / 2) ** 2) / (2 * alias_blur**2))
    g = g / g.sum()
    t = torch.from_numpy(d / n)[None, None]
    kernel = _sep_conv(t, torch.from_numpy(g), torch.from_numpy(g), "mirror")[0, 0].numpy()
    return kernel, d, n, g


@functools.lru_cache(maxsize=16)
def _disk_as_boxes(radius: float, alias_blur: float):
    """The defocus kernel as ``(box of rows) then Gaussian``, where that is the kernel: the disk is a
    stack of row segments (row ``dy`` spans ``|dx| <= floor(sqrt(r^2 - dy^2))``), so correlating with
    it is a sum of shifted horizontal box sums, and the kernel's blur is a separable 3- or 5-tap
    filter after it. That holds when the blurred disk stays inside the kernel's square (the
    reference blurs the kernel with a mirrored border, which folds back what would leave it): radius
    6 or less of the severities. Returns ``(half-widths by dy, n, g, half-size)``, else ``None``."""
    kernel, d, n, g = _disk_parts(radius, alias_blur)
    half, rk = kernel.shape[0] // 2, len(g) // 2
    r = int(radius)
    if r != radius or r + rk > half:
        return None
    full = np.zeros((kernel.shape[0] + 2 * rk,) * 2)
    for p in range(2 * rk + 1):
        for q in range(2 * rk + 1):
            full[p : p + kernel.shape[0], q : q + kernel.shape[0]] += g[p] * g[q] * d / n
    inner = full[rk:-rk, rk:-rk] if rk else full
    if np.abs(full).sum() - np.abs(inner).sum() > 1e-12 or np.abs(inner - kernel).max() > 1e-12 * kernel.max():
        return None
    widths = {dy: math.isqrt(r * r - dy * dy) for dy in range(-r, r + 1)}
    return widths, n, tuple(float(v) for v in g), half


def _defocus_blur(x, s, gens):
    """The reference's ``filter2D`` with the defocus kernel (border REFLECT_101): as horizontal box
    sums, a sum over the disk's rows and the kernel's separable blur where that is the kernel
    (:func:`_disk_as_boxes`: about 2 x the speed of the FFT at radius 3), else through one FFT."""
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][s - 1]
    boxes = _disk_as_boxes(radius, alias)
    if boxes is None:
        return _conv2d_same(x, _disk(radius, alias), "mirror")
    widths, n, g, half = boxes
    b, c, h, w = x.shape
    rk = len(g) // 2
    q = _pad(x.reshape(b * c, h, w), half, half, "mirror")  # as the kernel path pads
    # E: the disk's sums at rows and columns [half - rk, half + size + rk) of the padded image
    he, we = h + 2 * rk, w + 2 * rk
    r0 = c0 = half - rk
    run = q[:, :, c0 : c0 + we].clone()  # horizontal box sums of half-width a, over every row, a = 0, 1, ...
    e = torch.zeros((b * c, he, we), dtype=x.dtype, device=x.device)
    for a in range(max(widths.values()) + 1):
        if a:
            run += q[:, :, c0 - a : c0 - a + we]
            run += q[:, :, c0 + a : c0 + a + we]
        for dy in (dy for dy, wd in widths.items() if wd == a):
            e += run[:, r0 + dy : r0 + dy + he, :]
    e *= 1.0 / n
    t = e[:, 0:h, :] * g[0]
    for p in range(1, len(g)):
        t.add_(e[:, p : p + h, :], alpha=g[p])
    out = t[:, :, 0:w] * g[0]
    for p in range(1, len(g)):
        out.add_(t[:, :, p : p + w], alpha=g[p])
    return out.reshape(b, c, h, w)


def _motion_blur_c(x, s, gens):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][s - 1]
    angles = _rand(gens, (), "cpu", "uniform") * 90 - 45
    return _motion_blur(x, radius, sigma, angles)


def _zoom_blur(x, s, gens):
    zooms = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
             np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][s - 1]
    out = x.clone()
    for z in zooms:
        out.add_(_clipped_zoom(x, float(z)))
    return out / (len(zooms) + 1)


@functools.lru_cache(maxsize=32)
def _plasma_wibbles(sizes: tuple[int, ...], wibbledecay: float) -> np.ndarray:
    """Each value's wibble, level by level (100, then divided by the decay per level; read-only)."""
    wibbles, wibble = [], 100.0
    for n in sizes:
        wibbles.append(np.full((3 * n * n,), wibble, dtype=np.float64))
        wibble /= wibbledecay
    out = np.concatenate(wibbles)
    out.flags.writeable = False
    return out


def _plasma_fractals(mapsize: int, wibbledecay: float, gens: list[torch.Generator]) -> torch.Tensor:
    """Diamond-square height maps in [0, 1] (the reference's ``plasma_fractal``), one per generator,
    computed on the batch at once: each image's uniform draws are made in one call (the same numbers,
    in the same order, as drawing level by level), then the diamond-square steps run on all maps
    together, in numpy: about 80 small float64 operations per call, each a few microseconds cheaper to
    dispatch there than as torch operations (the same IEEE operations in the same order, so the same bits)."""
    sizes = []
    step = mapsize
    while step >= 2:
        sizes.append(mapsize // step)
        step //= 2
    r = torch.stack([torch.rand(3 * sum(n * n for n in sizes), generator=g, dtype=torch.float64) for g in gens])
    b = len(gens)
    # every level's random term at once: wibble * (u * 2 * wibble - wibble) with each level's wibble (100,
    # divided by the decay level by level), the same operations per value as level by level
    w_all = _plasma_wibbles(tuple(sizes), wibbledecay)
    noise = w_all * (r.numpy() * 2 * w_all - w_all)
    m = np.zeros((b, mapsize, mapsize), dtype=np.float64)
    step, at = mapsize, 0

    def wibbled(a):
        nonlocal at
        n = a.shape[-1]
        out = a / 4 + noise[:, at : at + n * n].reshape(b, n, n)
        at += n * n
        return out

    def roll(a, shift, axis):  # np.roll by one place: the same copy without np.roll's generic setup (~8 us a call)
        if axis == 1:
            return np.concatenate((a[:, 1:], a[:, :1]) if shift == -1 else (a[:, -1:], a[:, :-1]), axis=1)
        return np.concatenate((a[..., 1:], a[..., :1]) if shift == -1 else (a[..., -1:], a[..., :-1]), axis=2)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corner + roll(corner, -1, 1)
        sq = sq + roll(sq, -1, 2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + roll(dr, 1, 1) + ul + roll(ul, -1, 2)
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled(lt)
        tt = dr + roll(dr, 1, 2) + ul + roll(ul, -1, 1)
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled(tt)
        step //= 2
    m = m - m.min(axis=(1, 2), keepdims=True)
    return torch.from_numpy(m / m.max(axis=(1, 2), keepdims=True)).float()


def _fog(x, s, gens):
    c0, c1 = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][s - 1]
    h, w = x.shape[-2:]
    size = 1 << (max(h, w, 3) - 1).bit_length()
    fog = _plasma_fractals(size, c1, gens)[:, None, :h, :w].to(x)
    mx = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + c0 * fog) * mx / (mx + c0)


def _frost_texture(h: int, w: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Procedural frost layers (B, 3, h, w) in [0, 1], one per generator: a mottled pale-blue film
    with thin bright ice needles in a few directions. Its overall level (0.3 to 0.8), tint and
    spread follow the six frost photographs of the reference (channel means 0.28-0.84,
    within-image std 0.06-0.19). Each image's draws come from its own generator, in a fixed
    order; the filtering runs on the whole batch."""
    n = max(8, (h * w) // 150)
    noise, needles, angles, level, spread = [], torch.zeros((len(gens), 1, h, w)), [], [], []
    for i, g in enumerate(gens):
        noise.append(torch.rand((1, h, w), generator=g))
        needles[i, 0, (torch.rand(n, generator=g) * h).long(), (torch.rand(n, generator=g) * w).long()] = 1.0
        angles.append(torch.rand(3, generator=g) * 180)
        level.append(0.3 + 0.5 * torch.rand((), generator=g))
        spread.append(0.06 + 0.08 * torch.rand((), generator=g))
    film = _gaussian_filter(torch.stack(noise), max(h, w) / 40, mode="reflect")
    mean = film.mean(dim=(1, 2, 3), keepdim=True)
    std = film.std(dim=(1, 2, 3), keepdim=True)
    film = (film - mean) / (std + 1e-8)  # zero mean, unit std per image
    angles = torch.stack(angles)  # (B, 3)
    radius, sigma = max(2, min(h, w) // 20), max(1.0, min(h, w) / 40)
    streak = sum(_motion_blur(needles, radius, sigma, angles[:, j]) for j in range(3))
    streak = streak / (streak.amax(dim=(1, 2, 3), keepdim=True) + 1e-8)
    base = torch.stack(level)[:, None, None, None] + torch.stack(spread)[:, None, None, None] * film + 0.35 * streak
    tint = torch.tensor([-0.08, 0.0, 0.05])[None, :, None, None]  # frost is pale blue (RGB)
    return (base + tint).clamp(0, 1)


def _frost(x, s, gens):
    c0, c1 = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][s - 1]
    h, w = x.shape[-2:]
    return c0 * x + c1 * _frost_texture(h, w, gens).to(x)


def _snow(x, s, gens):
    c = [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
         (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][s - 1]
    h, w = x.shape[-2:]
    layer = _rand(gens, (1, h, w), "cpu") * c[1] + c[0]
    layer = _clipped_zoom(layer, c[2])
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer).clamp(0, 1)
    angles = torch.stack([torch.rand((), generator=g) for g in gens]) * 90 - 135
    # the angle is the generator's draw after the layer's normals
    layer = _motion_blur(layer, c[4], c[5], angles)
    layer = (torch.round(layer * 255) / 255).to(x)
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + torch.flip(layer, dims=(-2, -1))


def _spatter(x, s, gens):
    c = [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
         (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)][s - 1]
    liquid = _rand(gens, (1, *x.shape[-2:]), "cpu") * c[1] + c[0]
    liquid = _gaussian_filter(liquid, c[2])
    liquid = torch.where(liquid < c[3], torch.zeros_like(liquid), liquid)
    if c[5] == 0:  # water: pale turquoise, brightest along the rims of the liquid layer
        level = torch.floor(liquid * 255).clamp(0, 255)  # the reference's uint8 layer
        m = level * _water_rims(level)
        peak = m.amax(dim=(-2, -1), keepdim=True)
        m = torch.where(peak > 0, m / torch.where(peak > 0, peak, torch.ones_like(peak)), m) * c[4]
        color = torch.tensor([175, 238, 238], dtype=x.dtype)[None, :, None, None] / 255
        return x + (m * color).to(x.device, x.dtype)
    m = (liquid > c[3]).float()  # mud
    m = _gaussian_filter(m, c[4])
    m = torch.where(m < 0.8, torch.zeros_like(m), m).to(x)
    color = torch.tensor([63, 42, 20], dtype=x.dtype, device=x.device)[None, :, None, None] / 255
    return x * (1 - m) + color * m


# The reference shapes water spatter with OpenCV: Canny edges of the liquid layer, the distance to
# them (5 x 5 chamfer, truncated at 20), a 3 x 3 box blur, histogram equalisation, an emboss
# filter and another box blur, with uint8 steps in between. The functions below are those steps
# on (B, 1, H, W) tensors of uint8 levels (held as floats), each tested equal to OpenCV's.
_TG22 = 13573  # OpenCV's Canny: tan(22.5 deg) in 1.15 fixed point


def _water_rims(level: torch.Tensor) -> torch.Tensor:
    edge = _canny(level, 50, 150)
    dist = _chamfer_distance(edge, 20.0)
    dist = torch.floor(_box3(dist))
    dist = _equalize_hist(dist)
    emboss = [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]
    p = F.pad(dist, (1, 1, 1, 1), mode="reflect")
    h, w = dist.shape[-2:]
    dist = sum(emboss[i][j] * p[..., i : i + h, j : j + w] for i in range(3) for j in range(3) if emboss[i][j])
    return torch.round(_box3(dist.clamp(0, 255)))  # the uint8 box blur rounds


def _box3(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``blur(x, (3, 3))``: 3 x 3 mean, border reflected without the edge (REFLECT_101)."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return sum(p[..., i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9


def _canny(level: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """OpenCV's ``Canny(level, low, high)`` (3 x 3 Sobel on the edge-replicated image, L1
    magnitude, non-maximum suppression in four directions, 8-connected hysteresis) as a bool map.

    Integer arithmetic in numpy: the Sobel sums of levels 0..255 (|.| <= 1020, magnitude <= 2040)
    fit int16, and the direction tests' products (at most 1020 * 2**16 + 1020 * 13573) int32. The
    suppression runs only at the pixels above ``low`` (gathered: a smooth liquid layer has few), the
    gradients and the magnitude on the whole batch."""
    shape = level.shape
    h, w = shape[-2:]
    lv = level.detach().reshape(-1, h, w).to("cpu", torch.int16).numpy()
    n = lv.shape[0]
    p = np.pad(lv, ((0, 0), (1, 1), (1, 1)), mode="edge")
    sx = p[:, :, 2:] - p[:, :, :-2]  # the Sobel filters as a difference, then a [1, 2, 1] smoothing
    dx = sx[:, :-2] + 2 * sx[:, 1:-1] + sx[:, 2:]
    sy = p[:, 2:, :] - p[:, :-2, :]
    dy = sy[:, :, :-2] + 2 * sy[:, :, 1:-1] + sy[:, :, 2:]
    mag = np.zeros((n, h + 2, w + 2), dtype=np.int16)  # the magnitude with a zero border
    inner = mag[:, 1:-1, 1:-1]
    np.add(np.abs(dx), np.abs(dy), out=inner)
    sel = np.flatnonzero(inner > low)  # the only pixels that can become edges
    b, rem = np.divmod(sel, h * w)
    y, x = np.divmod(rem, w)
    w2 = w + 2
    at = (b * (h + 2) + y + 1) * w2 + x + 1  # their positions in the bordered magnitude
    m = mag.reshape(-1)
    c = m[at].astype(np.int32)
    gx, gy = dx.reshape(-1)[sel].astype(np.int32), dy.reshape(-1)[sel].astype(np.int32)
    ax, ay = np.abs(gx), np.abs(gy) << 15
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << 16))
    diagonal = ~horizontal & ~vertical
    peak_h = (c > m[at - 1]) & (c >= m[at + 1])
    peak_v = (c > m[at - w2]) & (c >= m[at + w2])
    opposite = (gx ^ gy) < 0  # gradient along the anti-diagonal
    peak_d = np.where(opposite, (c > m[at - w2 + 1]) & (c > m[at + w2 - 1]),
                      (c > m[at - w2 - 1]) & (c > m[at + w2 + 1]))
    ok = (horizontal & peak_h) | (vertical & peak_v) | (diagonal & peak_d)
    candidate = np.zeros(n * h * w, dtype=bool)
    candidate[sel[ok]] = True
    strong = np.zeros(n * h * w, dtype=bool)
    strong[sel[ok & (c > high)]] = True
    return _hysteresis(torch.from_numpy(candidate).reshape(shape), torch.from_numpy(strong).reshape(shape))


def _hysteresis(candidate: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Canny's hysteresis: the candidates 8-connected (through candidates, within one image) to a
    strong one. One connected-component labelling (scipy's, in C) instead of growing the strong set
    a pixel per step (as many full passes as the longest chain: 22.8 ms for 32 images of 128²)."""
    from scipy import ndimage

    shape = candidate.shape
    cand = candidate.reshape(-1, *shape[-2:]).numpy()
    labels, n = ndimage.label(cand, structure=_EIGHT_CONNECTED)  # no links between images
    keep = np.zeros(n + 1, dtype=bool)
    keep[labels[strong.reshape(-1, *shape[-2:]).numpy()]] = True
    keep[0] = False
    return torch.from_numpy(keep[labels]).reshape(shape)


_EIGHT_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED[1] = True  # the 3 x 3 neighbourhood within an image, none across the batch axis


_CHAMFER = (1.0, 1.4, 2.1969)  # OpenCV's DIST_L2 5 x 5 mask: edge, diagonal and knight's-move steps
_CHAMFER_IN_NUMPY = True  # CPU tensors: the scan in numpy (below); torch's two ways serve other devices
_CHAMFER_VIEW_MAX = 512  # rows x width up to which the chamfer scan reduces over a window view (measured:
# 7 vs 12 ms for one 128-pixel-wide image, 51 vs 19 ms for 32)


def _chamfer_distance(zero: torch.Tensor, cap: float) -> torch.Tensor:
    """OpenCV's ``distanceTransform(DIST_L2, 5)`` to the True pixels of ``zero``, truncated at
    ``cap``: the two-pass chamfer scan OpenCV runs (a forward pass over the rows, top to bottom,
    with the mask's upper half; a backward pass, bottom to top, with its lower half), each row at
    once for the whole batch. Along a row, the step to the left (right) neighbour is a running
    minimum: ``d[x] = min over x' <= x of d[x'] + (x - x')``, one ``cummin``. In float64, then
    float32: equal to OpenCV's float32 scan to within 4e-6 (tested)."""
    h, w = zero.shape[-2:]
    lead = zero.shape[:-2]
    hv, diag, knight = _CHAMFER
    far = float(cap) + 3.0  # beyond the cap: distances past it are truncated anyway
    p = torch.full((int(np.prod(lead, dtype=np.int64)), h + 4, w + 4), far, dtype=torch.float64, device=zero.device)
    p[:, 2 : h + 2, 2 : w + 2] = torch.where(zero.reshape(-1, h, w), 0.0, far)
    ramp = torch.arange(w, dtype=torch.float64, device=zero.device) * hv
    inf = float("inf")
    near_w = [knight, diag, hv, diag, knight]  # the row next to the one scanned: offsets -2..2
    next_w = [inf, knight, inf, knight, inf]  # the row after it: the knight's moves only
    w_fwd = torch.tensor([next_w, near_w], dtype=torch.float64, device=zero.device)  # rows y-2, y-1
    w_bwd = torch.tensor([near_w, next_w], dtype=torch.float64, device=zero.device)  # rows y+1, y+2
    n, stride = p.shape[0], p.stride()

    def row_step(y: int, top: int, weights: torch.Tensor) -> torch.Tensor:
        # the least of the pixel and its eight candidates from the two rows [top, top + 2), each with its
        # weight added. min is exact, so the two ways below give the same bits: for few rows, one
        # reduction over a (n, w, 2, 5) window view (3 ops per row: the per-op overhead dominates); for
        # many, elementwise minimums of shifted rows (the strided reduction is slower there)
        if n * w <= _CHAMFER_VIEW_MAX:
            win = p[:, top].as_strided((n, w, 2, 5), (stride[0], 1, stride[1], 1))
            return torch.minimum(p[:, y, 2 : w + 2], (win + weights).amin(dim=(-2, -1)))
        r1, r2 = (p[:, top + 1], p[:, top]) if weights is w_fwd else (p[:, top], p[:, top + 1])
        row = torch.minimum(p[:, y, 2 : w + 2], r1[:, 2 : w + 2] + hv)
        row = torch.minimum(row, torch.minimum(r1[:, 1 : w + 1], r1[:, 3 : w + 3]) + diag)
        far_ = torch.minimum(torch.minimum(r1[:, 0:w], r1[:, 4 : w + 4]), torch.minimum(r2[:, 1 : w + 1], r2[:, 3 : w + 3]))
        return torch.minimum(row, far_ + knight)

    if _CHAMFER_IN_NUMPY and zero.device.type == "cpu":
        # on the CPU the same float64 operations in numpy, whose per-call cost on rows of ~100 values is
        # a fraction of torch's (the scan is 2 x H row steps of ~15 calls each; 128 x 128, one thread:
        # 2.5 vs 11.4 ms for one image, 15.5 vs 20.1 ms for 32)
        _chamfer_scan_numpy(p.numpy(), ramp.numpy())
        return p[:, 2 : h + 2, 2 : w + 2].clamp_max(cap).float().reshape(*lead, h, w)
    for y in range(2, h + 2):  # forward: the two rows above, then the left neighbour
        p[:, y, 2 : w + 2] = torch.cummin(row_step(y, y - 2, w_fwd) - ramp, dim=-1).values + ramp
    for y in range(h + 1, 1, -1):  # backward: the two rows below, then the right neighbour
        row = (row_step(y, y + 1, w_bwd) + ramp).flip(-1)
        p[:, y, 2 : w + 2] = torch.cummin(row, dim=-1).values.flip(-1) - ramp
    return p[:, 2 : h + 2, 2 : w + 2].clamp_max(cap).float().reshape(*lead, h, w)


def _chamfer_scan_numpy(p: np.ndarray, ramp: np.ndarray) -> None:
    """:func:`_chamfer_distance`'s two passes over the bordered rows ``p`` (n, h + 4, w + 4), in place,
    with the same float64 operations: per row, the least of the pixel and its eight candidates
    (elementwise minimums of shifted rows: min is exact and adding a weight is monotonic, so this
    equals the window reduction bit for bit), then the running minimum along the row
    (``minimum.accumulate``, torch's ``cummin``)."""
    hv, diag, knight = _CHAMFER
    n, hp, wp = p.shape
    h, w = hp - 4, wp - 4
    mn = np.minimum

    def least(y: int, near: np.ndarray, next_: np.ndarray) -> np.ndarray:
        row = mn(p[:, y, 2 : w + 2], near[:, 2 : w + 2] + hv)
        row = mn(row, mn(near[:, 1 : w + 1], near[:, 3 : w + 3]) + diag)
        far = mn(mn(near[:, 0:w], near[:, 4 : w + 4]), mn(next_[:, 1 : w + 1], next_[:, 3 : w + 3]))
        return mn(row, far + knight)

    for y in range(2, h + 2):  # forward: rows y - 1 and y - 2, then the left neighbour
        row = least(y, p[:, y - 1], p[:, y - 2])
        row -= ramp
        mn.accumulate(row, axis=-1, out=row)
        np.add(row, ramp, out=p[:, y, 2 : w + 2])
    for y in range(h + 1, 1, -1):  # backward: rows y + 1 and y + 2, then the right neighbour
        row = least(y, p[:, y + 1], p[:, y + 2])
        row += ramp
        row = row[:, ::-1]
        mn.accumulate(row, axis=-1, out=row)
        np.subtract(row[:, ::-1], ramp, out=p[:, y, 2 : w + 2])


def _equalize_hist(level: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``equalizeHist`` per image: the levels above the lowest one mapped by their
    cumulative count onto 0..255 (rounded); a constant image stays as it is."""
    b = level.shape[0]
    flat = level.reshape(b, -1).long()
    hist = torch.zeros(b, 256, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).float().argmax(1, keepdim=True)
    n_first = hist.gather(1, first)
    scale = 255.0 / (flat.shape[1] - n_first).clamp_min(1).float()
    lut = torch.round((hist.cumsum(1) - n_first).float() * scale).clamp(0, 255)
    lut = torch.where(torch.arange(256)[None] <= first, 0.0, lut)
    out = lut.gather(1, flat).reshape(level.shape)
    return torch.where((n_first == flat.shape[1])[:, :, None, None], level, out)


def _brightness(x, s, gens):
    """skimage's HSV round trip with V raised by ``c``: every RGB channel that ``hsv2rgb`` builds is
    V times a factor of H and S, so the round trip is a per-pixel scaling by V' / V (and V' grey
    where V = 0)."""
    c = [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * (v2 / torch.where(v > 0, v, torch.ones_like(v))), v2.expand_as(x))


def _saturate(x, s, gens):
    """skimage's HSV round trip with S mapped to ``clip(S * c0 + c1, 0, 1)``: with H and V fixed,
    every channel is ``V - (V - channel) * S' / S``; grey pixels (S = 0, so H = 0) become
    ``(V, V (1 - S'), V (1 - S'))``, as ``hsv2rgb`` makes them."""
    c0, c1 = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][s - 1]
    v = x.amax(1, keepdim=True)
    delta = v - x.amin(1, keepdim=True)
    coloured = delta > 0
    sat = torch.where(coloured, delta / torch.where(coloured, v, torch.ones_like(v)), torch.zeros_like(v))
    s2 = (sat * c0 + c1).clamp(0, 1)
    scaled = v - (v - x) * (s2 * v / torch.where(coloured, delta, torch.ones_like(delta)))
    grey = torch.cat([v, v * (1 - s2), v * (1 - s2)], 1)
    return torch.where(coloured, scaled, grey)


def _contrast(x, s, gens):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    m = x.mean(dim=(-2, -1), keepdim=True)
    return (x - m) * c + m


def _elastic_transform(x, s, gens):
    alpha = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12][s - 1]
    b, c, h, w = x.shape
    sigma = (h * 0.01, w * 0.01)
    max_d = h * 0.005
    u = _rand(gens, (2, h, w), x.device, "uniform") * 2 * max_d - max_d
    d = _gaussian_filter(u, sigma, mode="reflect", truncate=3) * alpha  # (B, 2, H, W): dx, dy
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    sx, sy = xx + d[:, 0], yy + d[:, 1]
    # scipy's map_coordinates(order=1, mode="reflect"): half-sample symmetric outside the image
    sx = _reflect_coord(sx, w)
    sy = _reflect_coord(sy, h)
    grid = torch.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _reflect_coord(v: torch.Tensor, n: int) -> torch.Tensor:
    period = 2 * n
    v = torch.remainder(v + 0.5, period) - 0.5
    return torch.where(v > n - 0.5, period - 1 - v, v).clamp(0, n - 1)


def _pixelate(x, s, gens):
    """Pillow's BOX down to ``c`` of the size, then NEAREST back up (the reference), on the whole batch.
    The box sums run along the height, then the width (:func:`_box_sums`: one strided slice per phase
    of the windows' period, or each row added into its window for long periods), the averages are
    upsampled by torch's ``nearest-exact`` interpolation where its source indices equal Pillow's
    (checked for the sizes at hand), else by two index selections."""
    c = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    h, w = x.shape[-2:]
    oh, ow = max(int(h * c), 1), max(int(w * c), 1)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # channels-last input as it is: the rows' windows on its (B, H, W * 3) memory (contiguous rows); the
        # (smaller) row sums then go, in one copy, into the order the columns' windows read best: (B, 3, W, oh)
        # where rows are added into windows (long periods, small inputs), else (B, 3, oh, W) (strided slices);
        # the same sums in the same order as from a (B, 3, H, W) copy
        b, ch = x.shape[:2]
        rows = _box_sums(x.permute(0, 2, 3, 1).reshape(b, h, w * ch), -2, oh).view(b, oh, w, ch)
        if x.device.type == "cpu" and (_period(w, ow) > _SLICE_MAX_PERIOD or rows.numel() <= _INDEX_ADD_MAX_NUMEL):
            down = _box_sums(rows.permute(0, 3, 2, 1).contiguous(), -2, ow).transpose(-1, -2)
        else:
            down = _box_sums(rows.permute(0, 3, 1, 2).contiguous(), -1, ow)
    else:
        down = _box_sums(_box_sums(x, -2, oh), -1, ow)  # (B, 3, oh, ow): the rows' windows, then the columns'
    down = down / _box_areas(h, oh, w, ow, x.dtype).to(x.device)  # each window's pixel count
    (my, ty), (mx, tx) = _upsample_map(h, oh), _upsample_map(w, ow)
    if ty and tx:
        return F.interpolate(down, size=(h, w), mode="nearest-exact")
    return down.index_select(-2, my.to(x.device)).index_select(-1, mx.to(x.device))


# measured on one thread, 32 images of 128 x 128: for periods q > 1 adding each row into its window
# (index_add_) beats the q strided slices per window offset and the earlier row gathers (severity 1,
# q = 19: 5.7 vs 11.1 ms per call with gathers); for whole blocks (q = 1) the slices win (2.2 vs 3.5 ms)
# except on small inputs, where the k slices' per-call cost dominates (one 128² image, 2 threads: 15 vs 37 us;
# 4 images: 55 vs 41 us)
_SLICE_MAX_PERIOD = 1
_INDEX_ADD_MAX_NUMEL = 2**16


@functools.lru_cache(maxsize=64)
def _box_areas(h: int, oh: int, w: int, ow: int, dtype: torch.dtype) -> torch.Tensor:
    """The pixel count of each of :func:`_pixelate`'s ``(oh, ow)`` windows, in ``dtype`` (never written to)."""
    return _box_windows_cpu(h, oh)[1].to(dtype)[:, None] * _box_windows_cpu(w, ow)[1].to(dtype)[None, :]


def _period(n_in: int, n_out: int) -> int:
    """The period ``q`` of Pillow's BOX windows from ``n_in`` to ``n_out`` pixels (``n_out / gcd``)."""
    return n_out // math.gcd(n_in, n_out)


def _box_sums(t: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    """Pillow's BOX window sums along ``dim`` (-2 or -1) of a contiguous ``t``, ``n_out`` windows, each
    window's pixels added in order. The windows repeat with a period: with ``n_in / n_out = p / q`` in
    lowest terms, window ``i + q`` is window ``i`` moved by ``p``, so the windows of one phase
    ``i mod q`` are strided slices of ``t`` (no gathers; whole blocks of ``k`` pixels when ``q = 1``).
    On the CPU, periods above :data:`_SLICE_MAX_PERIOD` (``q`` slices per window offset), and inputs of at most
    :data:`_INDEX_ADD_MAX_NUMEL` values, add each row, in order, into its window's row instead (``index_add_``
    from zeros; along ``dim = -1`` on a transposed copy): both add each window's pixels in the same order (the same bits). On other devices the slices
    serve every period (CUDA's ``index_add_`` accumulates in no fixed order)."""
    n_in = t.shape[dim]
    p, q = n_in // math.gcd(n_in, n_out), _period(n_in, n_out)
    if t.device.type == "cpu" and (q > _SLICE_MAX_PERIOD or t.numel() <= _INDEX_ADD_MAX_NUMEL):
        # (CUDA's index_add_ adds in no fixed order: slices there)
        if dim == -1:  # the columns as rows (one copy), then back as a view
            return _box_sums(t.transpose(-1, -2).contiguous(), -2, n_out).transpose(-1, -2)
        owner, shared, earlier, gap = _box_owner(n_in, n_out)
        out = t.new_zeros((*t.shape[:-2], n_out + gap, t.shape[-1]))  # a last row for pixels in no window
        out.index_add_(-2, owner.to(t.device), t)
        if len(shared):
            out.index_add_(-2, earlier.to(t.device), t.index_select(-2, shared.to(t.device)))
        return out.narrow(-2, 0, n_out) if gap else out
    idx, count = _box_windows_cpu(n_in, n_out)
    shape = list(t.shape)
    shape[dim] = n_out
    out = t.new_empty(shape)

    def take(a: torch.Tensor, start: int, m: int, step: int) -> torch.Tensor:
        return a.narrow(dim, start, step * (m - 1) + 1)[(..., slice(None, None, step)) + ((slice(None),) if dim == -2
                                                                                         else ())]

    for r in range(q):
        start, length = int(idx[r, 0]), int(count[r])
        m = (n_out - r + q - 1) // q
        dst = take(out, r, m, q)
        if length > 1:
            torch.add(take(t, start, m, p), take(t, start + 1, m, p), out=dst)
        else:
            dst.copy_(take(t, start, m, p))
        for j in range(2, length):
            dst.add_(take(t, start + j, m, p))
    return out


@functools.lru_cache(maxsize=64)
def _box_owner(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The windows of :func:`_box_windows_cpu` as one index per pixel, for ``index_add_`` (never written to).

    The windows tile the axis but for rounding at their boundaries (a pixel centre on a boundary): such
    a pixel may fall in no window, or be the last of one window and the first of the next. Returns
    ``owner`` (the window of each pixel: the later one for a shared pixel, ``n_out`` for none), the
    shared pixels and their earlier windows (added after the rest: they are those windows' last pixels,
    so every window's pixels are still added in order), and whether any pixel is in no window."""
    idx, count = _box_windows_cpu(n_in, n_out)
    owner = torch.full((n_in,), n_out, dtype=torch.long)
    shared, earlier = [], []
    for i in range(n_out):
        for j in idx[i, : int(count[i])].tolist():
            if int(owner[j]) != n_out:
                shared.append(j)
                earlier.append(int(owner[j]))
            owner[j] = i
    return owner, torch.tensor(shared, dtype=torch.long), torch.tensor(earlier, dtype=torch.long), bool(
        (owner == n_out).any())


@functools.lru_cache(maxsize=64)
def _box_windows_cpu(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's BOX resampling as windows: input pixel j counts for output i when its centre lies in
    [centre_i - scale/2, centre_i + scale/2). Returns the windows' indices ``(n_out, k)`` (``n_in``
    where a window is shorter than ``k``: a zero row) and their lengths."""
    scale = n_in / n_out
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    pos = torch.arange(n_in, dtype=torch.float64) + 0.5
    m = (pos[None] >= centre[:, None] - scale / 2) & (pos[None] < centre[:, None] + scale / 2)
    count = m.sum(1)
    k = max(int(count.max()), 1)
    idx = m.to(torch.uint8).argmax(1)[:, None] + torch.arange(k)[None]
    idx = torch.where(torch.arange(k)[None] < count[:, None], idx, n_in)
    return idx, count.clamp_min(1)


@functools.lru_cache(maxsize=64)
def _upsample_map(n_out: int, n_in: int) -> tuple[torch.Tensor, bool]:
    """Pillow's NEAREST source indices (never written to) and whether torch's ``nearest-exact`` takes the same."""
    m = _nearest_map(n_out, n_in)
    return m, torch.equal(_torch_nearest_map(n_out, n_in), m)


def _nearest_map(n_out: int, n_in: int) -> torch.Tensor:
    """Pillow's NEAREST source index of each output pixel: floor((i + 0.5) * n_in / n_out)."""
    return (torch.arange(n_out) * 2 + 1).mul(n_in).div(2 * n_out, rounding_mode="floor").clamp_max(n_in - 1)


def _torch_nearest_map(n_out: int, n_in: int) -> torch.Tensor:
    """The source index torch's ``nearest-exact`` interpolation takes for each output pixel."""
    probe = torch.arange(n_in, dtype=torch.float32)[None, None]
    return F.interpolate(probe, size=n_out, mode="nearest-exact")[0, 0].round().long()


def _jpeg_compression(x, s, gens):
    """JPEG at the reference's quality, through libjpeg as torchvision registers it (one encode and one
    decode per image, no file objects): the same bytes and pixels as the reference's Pillow round trip
    (tested). :func:`_jpeg_codec` picks the calls; where torchvision's codec is gone (deprecated in 0.29),
    Pillow does the same round trip image by image (:func:`_jpeg_pil`, also tested equal)."""
    q = [25, 18, 15, 10, 7][s - 1]
    # corrupt() admits pixels in [-1e-3, 1 + 1e-3] (data.check_pixels): x * 255 rounds into [-0, 255], so the
    # reference's clip to 0..255 changes nothing and the uint8 conversion is exact without a clamp pass
    x8 = x.detach().cpu() * 255
    x8 = x8.round_().to(torch.uint8)  # rounded in place: one float buffer (32 x 128² x 3: 1.2 vs 3.6 ms)
    codec = _jpeg_codec()
    if codec is None:
        return _jpeg_pil(x8, q).to(x.device, x.dtype).div_(255)
    encode, decode = codec
    decoded = [decode(encode(im, q)) for im in x8.unbind(0)]
    # the decoder's (3, H, W) tensors are views of (H, W, 3) pixels: each converted straight into its place in
    # one (B, H, W, 3) float array (one pass, no uint8 stack), handed back channels-last; one image: its own
    # float copy, in the same layout
    if len(decoded) == 1:
        return decoded[0].unsqueeze(0).to(x.dtype).div_(255).to(x.device)
    h, w = x.shape[-2:]
    out = torch.empty((len(decoded), h, w, 3), dtype=x.dtype)
    for i, d in enumerate(decoded):
        out[i].copy_(d.permute(1, 2, 0))
    return out.div_(255).permute(0, 3, 1, 2).to(x.device)


@functools.lru_cache(maxsize=1)
def _jpeg_codec() -> tuple[Callable, Callable] | None:
    """``(encode(image, quality), decode(data))`` for uint8 ``(3, H, W)`` images, or ``None`` (Pillow then).

    torchvision's ``encode_jpeg`` / ``decode_jpeg`` call the operators it registers, ``torch.ops.image.
    encode_jpeg`` and ``decode_jpeg``, after a usage log and a deprecation warning (0.29) on every call: ~30 us
    of a ~250 us call for one 128² image. Those operators are called directly where torchvision registers them
    with the signatures its wrappers use (:func:`_jpeg_operators`); else the wrappers (:func:`_jpeg_wrappers`)."""
    return _jpeg_operators() or _jpeg_wrappers()


def _jpeg_operators() -> tuple[Callable, Callable] | None:
    """torchvision's registered libjpeg operators, checked on a small round trip, or ``None``."""
    try:
        from torchvision.io import ImageReadMode

        ops, rgb = torch.ops.image, ImageReadMode.RGB.value
        probe = torch.zeros((3, 8, 8), dtype=torch.uint8)
        if ops.decode_jpeg(ops.encode_jpeg(probe, 50), rgb, False).shape != (3, 8, 8):
            return None
    except (ImportError, AttributeError, RuntimeError, TypeError):
        return None
    return (lambda im, q: ops.encode_jpeg(im, q)), (lambda data: ops.decode_jpeg(data, rgb, False))


def _jpeg_wrappers() -> tuple[Callable, Callable] | None:
    """torchvision's public ``encode_jpeg`` / ``decode_jpeg``, with their deprecation warning silenced around
    each call (in the calling thread: corrupt() runs JPEG there), or ``None``."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
    except ImportError:
        return None

    def quiet(call):
        def run(*args):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of "
                                        "TorchVision", category=DeprecationWarning)
                return call(*args)
        return run

    rgb = ImageReadMode.RGB
    return quiet(lambda im, q: encode_jpeg(im, quality=q)), quiet(lambda data: decode_jpeg(data, mode=rgb))


def _jpeg_pil(x8: torch.Tensor, quality: int) -> torch.Tensor:
    """Pillow's JPEG round trip of uint8 images ``(B, 3, H, W)``, image by image (the reference's way)."""
    import io

    from PIL import Image

    out = []
    for a in x8.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.asarray(im.convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


_FUNCS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur_c, "zoom_blur": _zoom_blur,
    "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise, "gaussian_blur": _gaussian_blur, "spatter": _spatter, "saturate": _saturate,
}


_DETERMINISTIC = frozenset({"gaussian_blur", "defocus_blur", "zoom_blur", "brightness", "saturate", "contrast",
                            "pixelate", "jpeg_compression"})
"""The corruptions that draw nothing (no generators are made for them)."""
_ANY_LAYOUT = frozenset({"pixelate", "jpeg_compression"})
"""The corruptions that take channels-last input as it is, without a (B, C, H, W) copy first: JPEG's encoder
wants the pixels channels-last, pixelate sums the rows' windows on channels-last memory (:func:`_pixelate`)."""
_WHOLE_BATCH = frozenset({"pixelate", "jpeg_compression"})
"""The corruptions run on the whole batch with the caller's torch threads instead of one chunk per thread: sums
and copies that memory bandwidth limits, where a second chunk saves less than joining the chunks costs; JPEG,
whose codec calls hold the interpreter between images (32 images of 128², 5 severities, 2 threads: 46.6 ms in
two chunks, 28.0 ms whole; 1 thread: 36.6 / 35.6 ms). JPEG's fallback through torchvision's wrappers silences
their warning in the calling thread, which this keeps it in."""
_IN_RANGE = frozenset({"jpeg_compression"})
"""Outputs in [0, 1] by construction (JPEG: decoded bytes / 255): no clamp."""
_KEEPS_RANGE = frozenset({"pixelate"})
"""Outputs within the input's range (pixelate: window averages, then copies of them; a float sum of values
at most 1 rounds to at most the window's length, so its average is at most 1, and likewise at least 0):
no clamp when the input is in [0, 1] (check_pixels admits a small overshoot, which is clamped)."""

MIN_SIDE = 2
"""The smallest image side every corruption accepts (a 1-pixel side has no neighbourhood: frost's
film would have no spread, spatter's filters no support)."""

def corrupt(images: torch.Tensor, name: str, severity: int, *, seed: int = 0,
            indices: Sequence[int] | None = None) -> torch.Tensor:
    """Corrupt a batch of images with ImageNet-C corruption ``name`` at ``severity``.

    Args:
        images: ``(B, 3, H, W)`` float pixels in [0, 1] (CPU or CUDA).
        name: one of :data:`NAMES`.
        severity: 1 to 5.
        seed: the random corruptions' seed (with ``indices``, see the module doc).
        indices: the images' dataset indices (default ``range(B)``): image ``i``'s random draws
            depend on ``(seed, indices[i], name)`` only.

    Returns:
        ``(B, 3, H, W)`` corrupted pixels in [0, 1], on the input's device and dtype.

    On the CPU the images are split over the caller's torch threads, one worker thread each
    (:func:`fanlens._threads.for_chunks`): the same pixels on any thread count and batch size.
    """
    check_choice("name", name, NAMES)
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise FanlensError(f"severity must be an int in 1..5. Got {severity!r} instead.")
    check_seed(seed)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FanlensError(f"images must be a tensor of shape (B, 3, H, W). Got {got} instead.")
    if not images.is_floating_point():
        raise FanlensError(f"images must hold float pixels in [0, 1]. Got dtype {images.dtype} instead.")
    b = images.shape[0]
    if b and min(images.shape[-2:]) < MIN_SIDE:
        raise FanlensError(f"images must be at least {MIN_SIDE} x {MIN_SIDE} pixels for {name!r} (every corruption "
                           f"states this minimum). Got {tuple(images.shape[-2:])} instead.")
    if indices is not None and any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in indices):
        raise FanlensError(f"indices must be ints (the images' dataset indices). Got {list(indices)[:8]} instead.")
    idx = list(range(b)) if indices is None else [int(i) for i in indices]
    if len(idx) != b:
        raise FanlensError(f"indices must hold one index per image ({b}). Got {len(idx)} instead.")
    if any(i < 0 for i in idx):
        raise FanlensError(f"indices must be non-negative dataset indices. Got {idx[:8]} instead.")
    if b == 0:  # nothing to corrupt
        return images.clone()
    gens = _generators(seed, idx, name) if name not in _DETERMINISTIC else [None] * b
    from .data import check_pixels

    x = images.float()
    if name not in _ANY_LAYOUT:  # one pass into (B, C, H, W) order (channels-last input is common): the
        x = x.contiguous()  # filters below read rows
    lo, hi = check_pixels(x, "images")  # on the copy when there is one (a contiguous read)
    # the output stays in [0, 1] without a clamp where the corruption keeps the input's range and the input is in it
    clamp = name not in _IN_RANGE and not (name in _KEEPS_RANGE and lo >= 0 and hi <= 1)
    parts: dict[int, torch.Tensor] = {}

    def run(start: int, stop: int) -> None:
        with torch.no_grad():
            y = _FUNCS[name](x[start:stop], int(severity), gens[start:stop])
            if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                y = y.clone()  # a corruption that left its input as it was: never hand back the caller's memory
            parts[start] = y.clamp_(0, 1) if clamp else y  # in place: no fresh output to fault in

    # image by image: the batch split over the caller's cores, one intra-op thread each (fanlens._threads),
    # each chunk's result kept and the chunks joined in order (one chunk: no copy at all)
    if name in _WHOLE_BATCH:  # (JPEG among them: its codec wrappers' warning filters act in this thread only)
        run(0, b)
    else:
        for_chunks(run, b, x.device)
    out = parts[0] if len(parts) == 1 else torch.cat([parts[k] for k in sorted(parts)])
    return out.to(images.dtype)
