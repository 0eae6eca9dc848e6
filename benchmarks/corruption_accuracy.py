"""End-to-end fidelity: top-1 accuracy of each zoo model on held-out procedural images under
fanlens' corruptions and under the reference's (imagecorruptions-imaug), per corruption and
severity. Goal: they differ by at most 2 points everywhere.

The images (64 x 64, the zoo's size) go to both as the same uint8 pixels; the reference's output
(uint8) and fanlens' (float) are classified the same way. Prints a markdown table.

Run: python benchmarks/corruption_accuracy.py [--images 512] [--batch 128] [--corruptions a,b]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fanlens
from fanlens import corruptions as C
from fanlens.synthetic import SyntheticShapes

from _common import machine

# corruptions with random draws: fanlens and the reference draw different noise, so their
# accuracies on n images differ by sampling noise alone (standard error ~ sqrt(2 p (1 - p) / n))
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform", "spatter")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--corruptions", default=",".join(C.NAMES), help="comma-separated (default: all 19)")
    args = ap.parse_args()
    import imagecorruptions as ic

    x, y, _ = SyntheticShapes(args.images, seed=0, split="test").batch(range(args.images))
    u8 = (x * 255).round().to(torch.uint8)
    x = u8.float() / 255
    arr = u8.permute(0, 2, 3, 1).numpy()
    models = {n: fanlens.zoo.load(n) for n in fanlens.zoo.ZOO_NAMES}
    from fanlens.data import data_config

    def accuracy(lm, pixels: torch.Tensor) -> float:
        cfg = data_config(lm.model)
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(pixels), args.batch):
                p = lm.model(cfg.normalize(pixels[i : i + args.batch])).argmax(-1)
                correct += int((p == y[i : i + args.batch]).sum())
        return correct / len(pixels)

    t0 = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"{args.images} held-out procedural images (seed 0, 64x64); accuracy in % (fanlens / reference)\n")
    clean = {n: accuracy(lm, x) for n, lm in models.items()}
    print("| corruption | severity | " + " | ".join(f"{n} fanlens | {n} reference | diff" for n in models) + " |")
    print("|---|---|" + "---|---|---|" * len(models))
    print("| clean | | " + " | ".join(f"{100 * clean[n]:.1f} | {100 * clean[n]:.1f} | 0.0" for n in models) + " |")
    worst = 0.0
    over = []  # (corruption, severity, model, diff, z) of the cells more than 2 points apart
    np.random.seed(0)
    for name in args.corruptions.split(","):
        for s in C.SEVERITIES:
            ours = C.corrupt(x, name, s, indices=range(args.images))
            ref = torch.from_numpy(np.stack([ic.corrupt(a, corruption_name=name, severity=s) for a in arr]))
            ref = ref.permute(0, 3, 1, 2).float() / 255
            cells = []
            for n, lm in models.items():
                a, b = accuracy(lm, ours), accuracy(lm, ref)
                worst = max(worst, abs(a - b))
                if abs(a - b) > 0.02:
                    # two independent draws of a random corruption: binomial standard error of the gap
                    se = np.sqrt((a * (1 - a) + b * (1 - b)) / args.images)
                    over.append((name, s, n, a - b, (a - b) / se if se > 0 else float("inf")))
                cells.append(f"{100 * a:.1f} | {100 * b:.1f} | {100 * (a - b):+.1f}")
            print(f"| {name} | {s} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nlargest difference: {100 * worst:.1f} points (goal <= 2); {time.perf_counter() - t0:.0f} s")
    print(f"cells more than 2 points apart: {len(over)}")
    for name, s, n, d, z in over:
        kind = "random" if name in RANDOM else "deterministic"
        print(f"  {name} s{s} {n}: {100 * d:+.1f} points, z = {z:+.2f} ({kind}"
              + (", within sampling noise (|z| < 2)" if kind == "random" and abs(z) < 2 else "") + ")")


if __name__ == "__main__":
    main()
