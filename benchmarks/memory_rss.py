"""(c) Peak RSS of a streamed analysis for a small and a 10x larger image folder.

Each count runs in a fresh process (so peaks do not mix): it writes N images into a
temporary folder, runs the spectrum and the noise probe over the folder in batches
(``--mode separate``: two streamed passes; ``--mode analyze``: one pass for both), and
reports the process's peak resident set size (ru_maxrss).

Each count runs ``--rounds`` times (fresh processes, the counts in a shuffled order per round;
one peak varies by several per cent between runs), and the median [min, max] peak per count and
the ratio of the medians are reported. ``--compete`` runs a second torch job beside them.
``--heap-trim both`` runs every count with fanlens' heap trim between batches (``fanlens._heap``)
on and off, side by side in the shuffled order, and reports the time and peak ratios.

Run: python benchmarks/memory_rss.py --counts 100 1000 --model vit_small_patch16_224 --mode analyze [--rounds 9]
     [--heap-trim on|off|both] [--compete]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(model: str, n: int, batch_size: int, mode: str) -> None:
    import numpy as np
    from PIL import Image

    import fanlens

    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (240, 240, 3), dtype=np.uint8)).save(Path(d) / f"{i:05d}.png")
        t0 = time.perf_counter()
        if mode == "analyze":
            s, p = fanlens.analyze(model, d, sigmas=(0.1,), batch_size=batch_size, progress=False)
        else:
            s = fanlens.spectrum(model, d, batch_size=batch_size, progress=False)
            p = fanlens.noise_probe(model, d, sigmas=(0.1,), batch_size=batch_size, progress=False)
        dt = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "peak_rss_mib": peak_mib, "seconds": dt, "n_spectrum": s.n_images,
                      "n_probe": p.n_images}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--counts", type=int, nargs="+", default=[64, 640])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mode", choices=("separate", "analyze"), default="separate")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--compete", action="store_true")
    ap.add_argument("--heap-trim", choices=("on", "off", "both"), default="on",
                    help="fanlens' heap trim between batches (FANLENS_HEAP_TRIM); both: side by side")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(args.model, args.child, args.batch_size, args.mode)
        return
    import os
    import random
    import statistics

    from _common import Competitor, ratio_line

    sides = ["on", "off"] if args.heap_trim == "both" else [args.heap_trim]
    keys = [(n, side) for n in args.counts for side in sides]
    peaks: dict[tuple, list[float]] = {k: [] for k in keys}
    secs: dict[tuple, list[float]] = {k: [] for k in keys}
    rng = random.Random(0)
    with Competitor(args.compete) as comp:
        for _ in range(args.rounds):
            order = list(keys)
            rng.shuffle(order)
            for n, side in order:
                env = dict(os.environ, FANLENS_HEAP_TRIM="1" if side == "on" else "0")
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch-size",
                                      str(args.batch_size), "--mode", args.mode, "--child", str(n)],
                                     capture_output=True, text=True, check=True, env=env)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                peaks[n, side].append(row["peak_rss_mib"])
                secs[n, side].append(row["seconds"])
    print(f"{args.model} ({args.mode}), batch {args.batch_size}, {comp.label}, {args.rounds} rounds of fresh "
          f"processes, counts and sides in a shuffled order per round:")
    for side in sides:
        print(f"heap trim between batches {side} (FANLENS_HEAP_TRIM={'1' if side == 'on' else '0'}):")
        for n in args.counts:
            p, t = peaks[n, side], secs[n, side]
            print(f"  {n:5d} images  peak RSS median {statistics.median(p):8.1f} MiB [{min(p):.1f}, {max(p):.1f}] "
                  f"(N={len(p)}); {statistics.median(t):.1f} s [{min(t):.1f}, {max(t):.1f}] for the analysis")
        if len(args.counts) > 1:
            a, b = args.counts[0], args.counts[-1]
            print(f"  growth {b / a:.0f}x images -> {statistics.median(peaks[b, side]) / statistics.median(peaks[a, side]):.3f}x "
                  f"median peak RSS")
    if len(sides) == 2:
        for n in args.counts:
            print(f"time, trim on / off, {n} images: {ratio_line(secs[n, 'on'], secs[n, 'off'])[1]}")
            print(f"peak, trim on / off, {n} images: {ratio_line(peaks[n, 'on'], peaks[n, 'off'])[1]}")


if __name__ == "__main__":
    main()
