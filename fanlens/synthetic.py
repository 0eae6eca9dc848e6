"""A deterministic procedural dataset of shapes on textured backgrounds, with masks.

Each image is 64 x 64 RGB: a textured background and one object from
:data:`SHAPE_CLASSES` with a random position, scale, rotation, colour and texture.
The object is always brighter than the background, so that small ViTs learn the task.
Image ``i`` of a split is a pure function of ``(seed, split, i)``, generated on the fly:
nothing is stored, and any worker, process or machine renders the same pixels.

Example::

    ds = SyntheticShapes(1000, seed=0, split="val")
    pixels, label, mask = ds[3]   # (3, 64, 64) float in [0, 1], int, (64, 64) bool
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._validation import FanlensError, check_choice, check_positive_int

__all__ = ["SHAPE_CLASSES", "IMAGE_SIZE", "SPLITS", "SyntheticShapes", "render"]

SHAPE_CLASSES = ("disk", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
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
        self.num_classes = len(SHAPE_CLASSES)

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> _Sample:
        if not 0 <= i < self.n:
            raise FanlensError(f"index must be in [0, {self.n - 1}]. Got {i!r} instead.")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(i)])
        return render(rng, self.size)

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
