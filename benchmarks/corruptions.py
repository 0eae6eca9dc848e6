"""Speed of fanlens.corruptions against the reference (imagecorruptions-imaug), the full 19 x 5 sweep.

Both corrupt the same 224 x 224 images (crops of scikit-image's photos): fanlens in one batched
call per corruption and severity, the reference image by image (its interface). The reference's
glass blur takes seconds per image, so it is timed on ``--ref-glass-images`` images and scaled
to the batch (its time per image does not depend on the batch). Both sides run once untimed
first (numba compiles the reference's glass blur then).

Run: python benchmarks/corruptions.py [--images 64] [--ref-glass-images 4] [--size 224]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from fanlens import corruptions as C

from _common import machine


def photos(n: int, size: int) -> np.ndarray:
    from skimage import data

    rng = np.random.default_rng(0)
    src = [np.asarray(Image.fromarray(getattr(data, k)()).convert("RGB")) for k in ("astronaut", "chelsea", "coffee",
                                                                                    "rocket")]
    out = []
    for i in range(n):
        p = src[i % 4]
        h, w = p.shape[:2]
        s = min(h, w) // 2 + int(rng.integers(0, min(h, w) // 2))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out.append(np.asarray(Image.fromarray(p[y : y + s, x : x + s]).resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--ref-glass-images", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    import imagecorruptions as ic

    imgs = photos(args.images, args.size)
    x = torch.from_numpy(imgs.copy()).permute(0, 3, 1, 2).float() / 255
    for n in C.NAMES:  # warm-up: numba compilation, torch kernels
        ic.corrupt(imgs[0], corruption_name=n, severity=1)
        C.corrupt(x[:2], n, 1)
    print(f"machine: {machine()}")
    print(f"{args.images} images of {args.size}x{args.size}, severities 1-5; seconds for the 5 severities")
    print(f"{'corruption':<18} {'reference':>10} {'fanlens':>9} {'speed-up':>9}")
    tot_r = tot_f = 0.0
    for n in C.NAMES:
        k = args.ref_glass_images if n == "glass_blur" else args.images
        t = time.perf_counter()
        for s in C.SEVERITIES:
            for im in imgs[:k]:
                ic.corrupt(im, corruption_name=n, severity=s)
        ref = (time.perf_counter() - t) * args.images / k
        t = time.perf_counter()
        for s in C.SEVERITIES:
            C.corrupt(x, n, s)
        ours = time.perf_counter() - t
        tot_r += ref
        tot_f += ours
        scaled = " (scaled from %d images)" % k if k != args.images else ""
        print(f"{n:<18} {ref:10.2f} {ours:9.2f} {ref / ours:8.1f}x{scaled}")
    print(f"{'all 19 x 5':<18} {tot_r:10.2f} {tot_f:9.2f} {tot_r / tot_f:8.1f}x  (goal >= 20x overall, "
          f">= 100x for glass blur)")


if __name__ == "__main__":
    main()
