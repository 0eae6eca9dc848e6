"""Speed of fanlens.corruptions against the reference (imagecorruptions-imaug), the full 19 x 5 sweep.

Both corrupt the same images (crops of scikit-image's photos): fanlens in one batched call per
corruption and severity, the reference image by image (its interface). The reference's glass
blur takes a fraction of a second per image, so it is timed on ``--ref-glass-images`` images and
scaled to the batch (its time per image does not depend on the batch). Every corruption is
warmed up on both sides first (numba compiles the reference's glass blur then); then, per
corruption, the two sides (all five severities each) run ``--rounds`` times in a shuffled order
per round (``_common.alternate``): median [min, max] per side, the ratio of the medians and the
per-round ratios. ``--compete`` runs a second torch job beside it.

Run: python benchmarks/corruptions.py [--images 16] [--rounds 9] [--ref-glass-images 4] [--size 224]
     [--compete]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from PIL import Image

from fanlens import corruptions as C

from _common import Competitor, alternate, machine, ratio_line


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
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ref-glass-images", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--compete", action="store_true", help="run a competing torch job beside the benchmark")
    args = ap.parse_args()
    import imagecorruptions as ic

    imgs = photos(args.images, args.size)
    x = torch.from_numpy(imgs.copy()).permute(0, 3, 1, 2).float() / 255
    for n in C.NAMES:  # warm-up: numba compilation, torch kernels
        ic.corrupt(imgs[0], corruption_name=n, severity=1)
        C.corrupt(x[:2], n, 1)
    rows = []
    with Competitor(args.compete) as comp:
        for n in C.NAMES:
            k = min(args.ref_glass_images, args.images) if n == "glass_blur" else args.images

            def reference(n=n, k=k):
                for s in C.SEVERITIES:
                    for im in imgs[:k]:
                        ic.corrupt(im, corruption_name=n, severity=s)

            def ours(n=n):
                for s in C.SEVERITIES:
                    C.corrupt(x, n, s)

            t = alternate({"reference": reference, "fanlens": ours}, rounds=args.rounds, warmup=0)
            rows.append((n, [v * args.images / k for v in t["reference"]], t["fanlens"], k))
    print(f"machine: {machine()}; {comp.label}")
    print(f"{args.images} images of {args.size}x{args.size}, severities 1-5; seconds for the 5 severities, "
          f"median of {args.rounds} shuffled rounds [min, max]")
    print(f"{'corruption':<18} {'reference':>22} {'fanlens':>22} {'speed-up':>9}  per round")
    tot_r = tot_f = 0.0
    for n, ref, ours, k in rows:
        r, line = ratio_line(ref, ours)
        tot_r += statistics.median(ref)
        tot_f += statistics.median(ours)
        per = [a / b for a, b in zip(ref, ours)]
        scaled = f" (reference scaled from {k} images)" if k != args.images else ""
        print(f"{n:<18} {_cell(ref):>22} {_cell(ours):>22} {r:8.1f}x  [{min(per):.1f}, {max(per):.1f}]{scaled}")
    print(f"{'all 19 x 5':<18} {tot_r:22.2f} {tot_f:22.2f} {tot_r / tot_f:8.1f}x  (sums of the medians; goal >= 20x "
          f"overall, >= 100x for glass blur)")


def _cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


if __name__ == "__main__":
    main()
