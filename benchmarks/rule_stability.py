"""Which significant-eigenvalue rule gives the most stable per-block signal?

For each model, token centring on/off, and rule: the per-block mean count over images,
the spread over images, and

- SNR = (max_l mean_l - min_l mean_l) / mean_l std_l: how far the block-to-block
  differences stand out from image-to-image variation (a rule that saturates at the same
  count in every block has SNR 0);
- split-half r: Pearson correlation of the per-block mean profiles computed on two
  disjoint halves of the images (how reproducible the depth profile is).

Run: python benchmarks/rule_stability.py [--models NAME ...] [--checkpoints FILE ...] [--images samples|synthetic|DIR]
(``synthetic``: held-out procedural shapes, for the zoo models: ``--models zoo:vit zoo:fan zoo:cnn``)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import fanlens
from fanlens import spectral as sp
from fanlens.data import data_config, resolve_images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "resnet18", "convnext_atto"])
    ap.add_argument("--checkpoints", nargs="*", default=None, help="one per model, or none (random init, seed 0)")
    ap.add_argument("--images", default="samples")
    ap.add_argument("--max-images", type=int, default=64)
    args = ap.parse_args()
    for i, name in enumerate(args.models):
        lm = fanlens.build_model(name, checkpoint=args.checkpoints[i] if args.checkpoints else None)
        if args.images == "synthetic":
            from fanlens.synthetic import SyntheticShapes

            x = SyntheticShapes(args.max_images, seed=0, split="test").batch(range(args.max_images))[0]
        else:
            imgs = resolve_images(args.images, data_config(lm.model))
            x = torch.cat([b for b, _ in imgs.batches(16)])[: args.max_images]
        half = x.shape[0] // 2
        for center in (True, False):
            full = fanlens.spectrum(lm, x, center=center, progress=False)
            a = fanlens.spectrum(lm, x[:half], center=center, progress=False)
            b = fanlens.spectrum(lm, x[half:], center=center, progress=False)
            print(f"\n{name} ({lm.weights}), center={center}, {full.n_images} images, {len(full.blocks)} blocks")
            print(f"{'rule':22s} {'first':>7s} {'last':>7s} {'min':>7s} {'max':>7s} {'img std':>8s} {'SNR':>6s} {'split-half r':>13s}")
            for rule in sp.RULES:
                m, s = full.count(rule), full.count(rule, "std")
                snr = (m.max() - m.min()) / max(float(np.nanmean(s)), 1e-9)
                ma, mb = a.count(rule), b.count(rule)
                r = np.corrcoef(ma, mb)[0, 1] if ma.std() > 0 and mb.std() > 0 else float("nan")
                print(f"{rule:22s} {m[0]:7.2f} {m[-1]:7.2f} {m.min():7.2f} {m.max():7.2f} {np.nanmean(s):8.2f} "
                      f"{snr:6.2f} {r:13.2f}")


if __name__ == "__main__":
    main()
