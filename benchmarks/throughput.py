"""(d) Throughput of ``fanlens probe`` in images per second, for the record.

Writes N images into a temporary folder and times ``fanlens.noise_probe`` on them with the
model built once beforehand (image decoding and preprocessing, clean + noisy forward passes,
statistics), after one untimed warm-up run, ``--rounds`` runs, median [min, max] and N.
``--compete`` runs a second torch job beside it.

Run: python benchmarks/throughput.py [--model vit_small_patch16_224] [--images 64] [--sigmas 0.1] [--rounds 9]
     [--compete]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import fanlens

from _common import Competitor, alternate, machine, spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--sigmas", default="0.1")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compete", action="store_true")
    args = ap.parse_args()
    lm = fanlens.build_model(args.model)  # built once, outside the timing
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(Path(d) / f"{i:04d}.png")

        def probe():
            fanlens.noise_probe(lm, d, sigmas=args.sigmas, batch_size=args.batch_size, device=args.device,
                                progress=False)

        with Competitor(args.compete) as comp:
            times = alternate({"probe": probe}, rounds=args.rounds)["probe"]
    n_sig = len([s for s in args.sigmas.split(",") if float(s) != 0])
    m = statistics.median(times)
    print(f"machine: {machine()}; {comp.label}")
    print(f"fanlens.noise_probe({args.model}, sigmas={args.sigmas}) on {args.images} images: {spread(times)} -> "
          f"{args.images / m:.1f} images/s ({args.images * (1 + n_sig) / m:.1f} forward images/s incl. noisy copies)")


if __name__ == "__main__":
    main()
