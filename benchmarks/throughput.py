"""(d) Throughput of ``fanlens probe`` in images per second, for the record.

Writes N images into a temporary folder and times the whole command (model build, image
decoding and preprocessing, clean + noisy forward passes, statistics, files), median of
several runs.

Run: python benchmarks/throughput.py [--model vit_small_patch16_224] [--images 64] [--sigmas 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fanlens import cli

from _common import machine, med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--sigmas", default="0.1")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(Path(d) / f"{i:04d}.png")
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(["probe", "--model", args.model, "--images", d, "--out", str(Path(d) / "out"),
                                 "--sigmas", args.sigmas, "--batch-size", str(args.batch_size), "--device",
                                 args.device, "--no-progress", "--no-figure"])
            times.append(time.perf_counter() - t)
            assert code == 0
    n_sig = len(args.sigmas.split(","))
    print(f"machine: {machine()}")
    print(f"fanlens probe --model {args.model} --sigmas {args.sigmas}: {args.images} images in median "
          f"{med(times):.1f} s -> {args.images / med(times):.1f} images/s "
          f"({args.images * (1 + n_sig) / med(times):.1f} forward images/s incl. noisy copies); runs {[round(t, 1) for t in times]}")


if __name__ == "__main__":
    main()
