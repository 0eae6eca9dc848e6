"""Calibration of the zoo task that needs grouping (issue 24): the versions tried, by the zoo recipe.

Objects of one of 10 shapes whose texture (fine gratings, checkers or band-pass noise) differs from a
coarser background texture of the same mean intensity (0.5) and contrast, with 1-2 small distractor
shapes and one occluding bar; masks exclude the bar. Brightness alone cannot separate object and
background: the mean intensity inside and outside the masks of 40 images was 0.504 and 0.497.

Measured on 2 CPU cores (one thread, beside other work), the zoo recipe (AdamW, warm-up + cosine, label
smoothing, flips, batch 64), 12,000 training images, 1,000 validation images:
- version 1 (object and background textures of the same frequency band): ViT at chance after 500 steps
  (val 8.6 %, loss 2.287 = ln 10);
- version 2 (the object's texture 2.5x finer; argument 2): CNN (timm ResNet-18-like, max-pool removed so
  that its last stage is 4 x 4) 18 / 28 / 33 / 35 / 38 % at 250 / 500 / 750 / 1000 / 1500 steps.
Both are far below the 85-97 % the issue asks for after 3,000 steps. Version 3 (the default) replaces the
look-alike classes (hexagon, pentagon, ellipse) by an L, a T and a bar, and keeps the high-contrast checker
off the background (smooth gratings or noise there): CNN 28 / 36 / 49 / 63 / 65 % at 250 / 500 / 750 /
1250 / 1500 steps (a 1,500-step schedule, one thread, niced beside the test suite).
Version 4: the object's texture 4.5x the background's frequency (was 2.5x), larger objects (0.28-0.38 of
the side), one smaller distractor, a thinner occluder: ViT 28.5 / 39.7 / 45.4 % at 250 / 500 / 750 steps
(1,500-step schedule, 2 threads, beside other work).
Version 5 (argument 5; what ``fanlens.synthetic.SyntheticTextures`` renders, pixel for pixel, apart from
the seeding): version 4 with the object's (and distractor's) texture at +-0.3 and the background's (and
occluder's) at +-0.14 around the same mean 0.5: ViT 37.3 / 53.5 % at 250 / 500 steps. The zoo's 3,000-step
results are in the cards of ``fanlens/zoo/weights/textures/``.

Run: python benchmarks/task_calibration.py cnn 1500   (prints validation accuracy every 250 steps)
"""

import math
import os
import sys
import time
import json

import numpy as np
import torch
import torch.nn.functional as F

from fanlens.synthetic import _shape_mask, _polygon_radius

FINE = 4.5  # version 4: the object's texture 4.5x the background's frequency (period 3.5-6 px at 64 x 64)
VERSION = 3  # set by the command line: python benchmarks/task_calibration.py ARCH STEPS [VERSION]
CLASSES_V2 = ("disk", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "pentagon", "ellipse")
CLASSES_V3 = ("disk", "square", "triangle", "star", "cross", "ring", "crescent", "L", "T", "bar")
CLASSES = CLASSES_V3


def shape(kind, u, v):
    name = CLASSES[kind]
    if name == "pentagon":
        r = np.hypot(u, v); th = np.arctan2(v, u)
        return r <= _polygon_radius(th - np.pi / 2, 5)
    if name == "ellipse":
        return np.hypot(u, v / 0.55) <= 1.0
    if name == "L":
        return ((np.abs(u + 0.45) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v - 0.7) <= 0.3) & (np.abs(u) <= 0.75))
    if name == "T":
        return ((np.abs(v + 0.7) <= 0.3) & (np.abs(u) <= 1.0)) | ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0))
    if name == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.35)
    return _shape_mask(("disk", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent").index(name),
                       u, v)


def texture(rng, dx, dy, kind=None, fine=False):
    """Zero-mean texture in [-1, 1]: oriented grating, checker or band-pass noise; ``fine``: 2-3x the frequency."""
    kind = int(rng.integers(3)) if kind is None else kind
    a = rng.uniform(0, np.pi)
    m = (FINE if VERSION >= 4 else 2.5) if fine else 1.0
    if kind == 0:
        f = rng.uniform(2.5, 4) * m
        return np.sin(2 * np.pi * f * (np.cos(a) * dx + np.sin(a) * dy) + rng.uniform(0, 6.3)), kind
    if kind == 1:
        f = rng.uniform(1.5, 2.5) * m
        u = np.cos(a) * dx + np.sin(a) * dy; v = -np.sin(a) * dx + np.cos(a) * dy
        return 2.0 * ((np.floor(f * u) + np.floor(f * v)) % 2) - 1, kind
    t = np.zeros_like(dx)
    for _ in range(6):
        f = rng.uniform(2.5, 4) * m; b = rng.uniform(0, 2 * np.pi)
        t += np.sin(2 * np.pi * f * (np.cos(b) * dx + np.sin(b) * dy) + rng.uniform(0, 6.3))
    return np.clip(t / 2.5, -1, 1), kind

def render(rng, size=64, label=None):
    if label is None:
        label = int(rng.integers(len(CLASSES)))
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    tint = rng.uniform(0.6, 1.0, size=3)
    amp = 0.22
    if VERSION >= 3:  # a smooth background (grating or noise); the object's texture of another kind
        bg, kb = texture(rng, xx, yy, (0, 2)[int(rng.integers(2))])
        ko = (1, 2 if kb == 0 else 0)[int(rng.integers(2))]
    else:
        bg, kb = texture(rng, xx, yy)
        ko = (kb + int(rng.integers(1, 3))) % 3  # object texture of another kind than the background
    ob, _ = texture(rng, xx, yy, ko, fine=True)
    amp_o = 0.3 if VERSION >= 5 else amp  # version 5: the object's texture at more contrast, the background's less
    if VERSION >= 5:
        amp = 0.14
    img = 0.5 + amp * bg
    def pose(smin, smax):
        s = rng.uniform(smin, smax) * size
        cy, cx = rng.uniform(s * 0.8, size - s * 0.8, size=2)
        rot = rng.uniform(0, 2 * np.pi)
        dy, dx = ((yy * size) - cy) / s, ((xx * size) - cx) / s
        return np.cos(rot) * dx + np.sin(rot) * dy, -np.sin(rot) * dx + np.cos(rot) * dy
    # distractors: 1-2 small shapes of another class, background's texture kind with another phase/orientation
    for _ in range(int(rng.integers(1, 3)) if VERSION < 4 else 1):
        k = int(rng.integers(len(CLASSES) - 1)); k += k >= label
        u, v = pose(0.09, 0.14) if VERSION < 4 else pose(0.08, 0.11)
        dt, _ = texture(rng, xx, yy, None, fine=True)
        img = np.where(shape(k, u, v), 0.5 + amp_o * dt, img)
    u, v = pose(0.24, 0.36) if VERSION < 4 else pose(0.28, 0.38)
    mask = shape(label, u, v)
    img = np.where(mask, 0.5 + amp_o * ob, img)
    # occluder: one bar of background texture across the image
    a = rng.uniform(0, np.pi); c = rng.uniform(0.3, 0.7); w = rng.uniform(0.03, 0.07) if VERSION < 4 else rng.uniform(0.02, 0.04)
    bar = np.abs(np.cos(a) * (xx - c) + np.sin(a) * (yy - c)) < w
    oc, _ = texture(rng, xx, yy, kb)
    img = np.where(bar, 0.5 + amp * oc, img)
    mask = mask & ~bar
    img = img[..., None] * tint / tint.mean() * 0.5 / 0.5
    img = img + 0.03 * rng.standard_normal((size, size, 1))
    return np.clip(img, 0, 1).astype(np.float32), label, mask

def dataset(n, seed, split):
    sid = {"train": 0, "val": 1, "test": 2}[split]
    xs = np.empty((n, 3, 64, 64), np.uint8); ys = np.empty(n, np.int64); ms = np.empty((n, 64, 64), bool)
    for i in range(n):
        x, y, m = render(np.random.default_rng([seed, 100 + sid, i]))
        xs[i] = np.round(x.transpose(2, 0, 1) * 255); ys[i] = y; ms[i] = m
    return torch.from_numpy(xs), torch.from_numpy(ys), torch.from_numpy(ms)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("CALIB_THREADS", "1")))  # one thread by default: it runs beside other work
    global CLASSES, VERSION
    arch = sys.argv[1]; steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    VERSION = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    CLASSES = CLASSES_V2 if VERSION == 2 else CLASSES_V3
    t0 = time.time()
    xs, ys, _ = dataset(12000, 0, "train"); xv, yv, _ = dataset(1000, 0, "val")
    print("render", time.time() - t0, flush=True)
    from fanlens import zoo

    m = zoo.build(arch, seed=0).train()  # the zoo architecture, with a 10-class head
    if arch == "cnn":
        m.maxpool = torch.nn.Identity()  # stride 16: the last stage is 4 x 4 at 64 x 64
    m.reset_classifier(10)
    lr = 2e-3 if arch == "cnn" else 1e-3
    norm = lambda x: (x.float() / 255 - 0.5) / 0.5
    dec = [p for n, p in m.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    nd = [p for n, p in m.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": dec, "weight_decay": 0.05}, {"params": nd, "weight_decay": 0.0}], lr=lr)
    g = torch.Generator().manual_seed(0)
    def evaluate():
        m.eval(); c = 0
        with torch.no_grad():
            for i in range(0, 1000, 250):
                c += int((m(norm(xv[i:i+250])).argmax(-1) == yv[i:i+250]).sum())
        m.train(); return c / 1000
    m.train(); t1 = time.time()
    for step in range(steps):
        cur = lr * (step + 1) / 100 if step < 100 else lr * 0.5 * (1 + math.cos(math.pi * (step - 100) / (steps - 100)))
        for pg in opt.param_groups: pg["lr"] = cur
        idx = torch.randint(0, 12000, (64,), generator=g)
        x = norm(xs[idx])
        if torch.rand(1, generator=g) < 0.5: x = x.flip(-1)
        if torch.rand(1, generator=g) < 0.5: x = x.flip(-2)
        loss = F.cross_entropy(m(x), ys[idx], label_smoothing=0.1)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
        if (step + 1) % 250 == 0:
            print(json.dumps(dict(arch=arch, step=step + 1, loss=round(loss.item(), 3), val=evaluate(), s_per_step=round((time.time() - t1) / (step + 1), 3))), flush=True)


if __name__ == "__main__":
    main()
