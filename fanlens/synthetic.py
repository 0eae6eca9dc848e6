"""Deterministic procedural datasets of shapes with object masks: two tasks.

- ``"shapes"`` (:class:`SyntheticShapes`): 64 x 64 RGB, a dark textured background and one bright
  object from :data:`SHAPE_CLASSES` (8 classes). The object is always brighter than the background:
  brightness alone finds it.
- ``"textures"`` (:class:`SyntheticTextures`): 64 x 64 RGB, one object from :data:`TEXTURE_CLASSES`
  (10 classes) defined by texture only: object and background have the same mean intensity (0.5,
  then one tint for the whole image); the background is a smooth grating or band-pass noise at low
  contrast (+-0.14), the object a texture of another kind at 4.5 x the frequency and more contrast
  (+-0.3); one small distractor shape of another
  class and one occluding bar of background texture across the image (the mask excludes the bar).
  Finding the object needs grouping by texture (and the class, its outline).

Image ``i`` of a split is a pure function of ``(seed, split, i)``, generated on the fly:
nothing is stored, and any worker, process or machine renders the same pixels.

Example::

    ds = SyntheticShapes(1000, seed=0, split="val")
    pixels, label, mask = ds[3]   # (3, 64, 64) float in [0, 1], int, (64, 64) bool
    ds = TASKS["textures"](1000, seed=0, split="val")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._validation import FanlensError, check_choice, check_positive_int

__all__ = ["SHAPE_CLASSES", "TEXTURE_CLASSES", "IMAGE_SIZE", "SPLITS", "TASKS", "SyntheticShapes", "SyntheticTextures",
           "render", "render_textures"]

SHAPE_CLASSES = ("disk", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
TEXTURE_CLASSES = ("disk", "square", "triangle", "star", "cross", "ring", "crescent", "L", "T", "bar")
TEXTURE_FINE = 4.5  # the object's texture frequency over the background's
IMAGE_SIZE = 64
SPLITS = ("train", "val", "test")
_SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}


def _polygon_radius(theta: np.ndarray, n: int) -> np.ndarray:
    """Radius of a regular n-gon with circumradius 1 in direction theta."""
    sector = 2 * np.pi / n
    t = np.mod(theta, sector) - sector / 2
    return np.cos(np.pi / n) / np.cos(t)


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    th = np.arctan2(v, u)
    name = SHAPE_CLASSES[kind]
    if name == "disk":
        return r <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if name == "triangle":
        return r <= _polygon_radius(th - np.pi / 2, 3)
    if name == "star":
        sector = 2 * np.pi / 5
        t = np.abs(np.mod(th - np.pi / 2, sector) - sector / 2) / (sector / 2)  # 0 at a tip, 1 between tips
        return r <= 1.0 - 0.55 * t
    if name == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "hexagon":
        return r <= _polygon_radius(th, 6)
    # crescent: a disk minus a shifted disk
    return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)


def _smooth_noise(rng: np.random.Generator, size: int, n_waves: int, freq: tuple[float, float]) -> np.ndarray:
    """A sum of random plane waves in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size))
    for _ in range(n_waves):
        f = rng.uniform(*freq)
        a = rng.uniform(0, 2 * np.pi)
        out += np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi))
    out = (out - out.min()) / max(out.max() - out.min(), 1e-9)
    return out


@dataclass(frozen=True)
class _Sample:
    pixels: np.ndarray  # (H, W, 3) float32 in [0, 1]
    label: int
    mask: np.ndarray  # (H, W) bool


def render(rng: np.random.Generator, size: int = IMAGE_SIZE, label: int | None = None) -> _Sample:
    """Render one image from a random generator."""
    if label is None:
        label = int(rng.integers(len(SHAPE_CLASSES)))
    # background: dark, low-frequency texture with a little grain, tinted
    tint = rng.uniform(0.5, 1.0, size=3)
    bg = 0.08 + 0.3 * _smooth_noise(rng, size, 4, (0.5, 4.0))
    bg = bg[..., None] * tint + 0.03 * rng.standard_normal((size, size, 1))
    # object pose
    scale = rng.uniform(0.22, 0.36) * size
    cy, cx = rng.uniform(scale * 0.8, size - scale * 0.8, size=2)
    rot = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = (yy - cy) / scale, (xx - cx) / scale
    u = np.cos(rot) * dx + np.sin(rot) * dy
    v = -np.sin(rot) * dx + np.cos(rot) * dy
    mask = _shape_mask(label, u, v)
    # object: bright colour times a texture (stripes, checker or smooth noise)
    hue = rng.uniform(0, 1)
    colour = np.clip(np.abs(((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)
    colour = 0.55 + 0.45 * colour
    kind = int(rng.integers(3))
    if kind == 0:
        f, a = rng.uniform(2, 6), rng.uniform(0, np.pi)
        tex = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * dx + np.sin(a) * dy))
    elif kind == 1:
        f = rng.uniform(1.5, 4)
        tex = ((np.floor(f * u) + np.floor(f * v)) % 2).astype(float)
    else:
        tex = _smooth_noise(rng, size, 3, (1.0, 6.0))
    obj = colour * (0.75 + 0.25 * tex[..., None])
    img = np.where(mask[..., None], obj, bg)
    return _Sample(np.clip(img, 0.0, 1.0).astype(np.float32), label, mask)


def _outline(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The shapes of the textures task in unit coordinates (the shapes task's, an L, a T and a bar)."""
    if name == "L":
        return ((np.abs(u + 0.45) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v - 0.7) <= 0.3) & (np.abs(u) <= 0.75))
    if name == "T":
        return ((np.abs(v + 0.7) <= 0.3) & (np.abs(u) <= 1.0)) | ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0))
    if name == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.35)
    return _shape_mask(SHAPE_CLASSES.index(name), u, v)


def _texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, kind: int | None,
             fine: bool) -> tuple[np.ndarray, int]:
    """A zero-mean texture in [-1, 1] over unit coordinates: 0 an oriented grating, 1 a checker, 2
    band-pass noise (six gratings); ``fine``: :data:`TEXTURE_FINE` x the frequency."""
    kind = int(rng.integers(3)) if kind is None else kind
    a = rng.uniform(0, np.pi)
    m = TEXTURE_FINE if fine else 1.0
    if kind == 0:
        f = rng.uniform(2.5, 4) * m
        return np.sin(2 * np.pi * f * (np.cos(a) * x + np.sin(a) * y) + rng.uniform(0, 6.3)), kind
    if kind == 1:
        f = rng.uniform(1.5, 2.5) * m
        u, v = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
        return 2.0 * ((np.floor(f * u) + np.floor(f * v)) % 2) - 1, kind
    t = np.zeros_like(x)
    for _ in range(6):
        f, b = rng.uniform(2.5, 4) * m, rng.uniform(0, 2 * np.pi)
        t += np.sin(2 * np.pi * f * (np.cos(b) * x + np.sin(b) * y) + rng.uniform(0, 6.3))
    return np.clip(t / 2.5, -1, 1), kind


def render_textures(rng: np.random.Generator, size: int = IMAGE_SIZE, label: int | None = None) -> _Sample:
    """Render one image of the textures task (module docstring) from a random generator."""
    if label is None:
        label = int(rng.integers(len(TEXTURE_CLASSES)))
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    tint = rng.uniform(0.6, 1.0, size=3)
    amp, amp_o = 0.14, 0.3  # textures: 0.5 +- amp (background, occluder), 0.5 +- amp_o (object, distractor)
    bg, kb = _texture(rng, xx, yy, (0, 2)[int(rng.integers(2))], fine=False)  # smooth: grating or noise
    ko = (1, 2 if kb == 0 else 0)[int(rng.integers(2))]  # the object: another kind, fine
    ob, _ = _texture(rng, xx, yy, ko, fine=True)
    img = 0.5 + amp * bg

    def pose(smin: float, smax: float) -> tuple[np.ndarray, np.ndarray]:
        s = rng.uniform(smin, smax) * size
        cy, cx = rng.uniform(s * 0.8, size - s * 0.8, size=2)
        rot = rng.uniform(0, 2 * np.pi)
        dy, dx = (yy * size - cy) / s, (xx * size - cx) / s
        return np.cos(rot) * dx + np.sin(rot) * dy, -np.sin(rot) * dx + np.cos(rot) * dy

    k = int(rng.integers(len(TEXTURE_CLASSES) - 1))  # the distractor: a small shape of another class
    k += k >= label
    u, v = pose(0.08, 0.11)
    dt, _ = _texture(rng, xx, yy, None, fine=True)
    img = np.where(_outline(TEXTURE_CLASSES[k], u, v), 0.5 + amp_o * dt, img)
    u, v = pose(0.28, 0.38)
    mask = _outline(TEXTURE_CLASSES[label], u, v)
    img = np.where(mask, 0.5 + amp_o * ob, img)
    a, c, w = rng.uniform(0, np.pi), rng.uniform(0.3, 0.7), rng.uniform(0.02, 0.04)  # the occluding bar
    bar = np.abs(np.cos(a) * (xx - c) + np.sin(a) * (yy - c)) < w
    oc, _ = _texture(rng, xx, yy, kb, fine=False)
    img = np.where(bar, 0.5 + amp * oc, img)
    mask = mask & ~bar
    img = img[..., None] * tint / tint.mean() + 0.03 * rng.standard_normal((size, size, 1))
    return _Sample(np.clip(img, 0.0, 1.0).astype(np.float32), label, mask)


class SyntheticShapes(torch.utils.data.Dataset):
    """``n`` procedural images of one split; item ``i`` is ``(pixels (3, H, W), label, mask (H, W))``.

    Args:
        n: number of images.
        seed: dataset seed; with ``split`` and the index it determines every pixel.
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        size: image side in pixels.
    """

    def __init__(self, n: int, *, seed: int = 0, split: str = "train", size: int = IMAGE_SIZE) -> None:
        self.n = check_positive_int("n", n)
        self.seed = int(seed)
        self.split = check_choice("split", split, SPLITS)
        self.size = check_positive_int("size", size, minimum=16)
        self.num_classes = len(self.classes)

    classes = SHAPE_CLASSES
    task = "shapes"
    _render = staticmethod(render)

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> _Sample:
        if not 0 <= i < self.n:
            raise FanlensError(f"index must be in [0, {self.n - 1}]. Got {i!r} instead.")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(i)])
        return self._render(rng, self.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        s = self.sample(int(i))
        return torch.from_numpy(s.pixels).permute(2, 0, 1).contiguous(), s.label, torch.from_numpy(s.mask)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked ``(pixels (B, 3, H, W), labels (B,), masks (B, H, W))``."""
        items = [self[i] for i in indices]
        return (
            torch.stack([x for x, _, _ in items]),
            torch.tensor([y for _, y, _ in items]),
            torch.stack([m for _, _, m in items]),
        )


class SyntheticTextures(SyntheticShapes):
    """``n`` images of the textures task (objects defined by texture, module docstring); items as
    :class:`SyntheticShapes`."""

    classes = TEXTURE_CLASSES
    task = "textures"
    _render = staticmethod(render_textures)


TASKS = {"shapes": SyntheticShapes, "textures": SyntheticTextures}
"""The procedural tasks by name."""
