"""(c) Peak RSS of a streamed analysis for a small and a 10x larger image folder.

Each count runs in a fresh process (so peaks do not mix): it writes N images into a
temporary folder, runs the spectrum and the noise probe over the folder in batches
(``--mode separate``: two streamed passes; ``--mode analyze``: one pass for both), and
reports the process's peak resident set size (ru_maxrss).

Each count runs ``--rounds`` times (fresh processes, the counts in a shuffled order per round;
one peak varies by several per cent between runs), and the median [min, max] peak per count and
the ratio of the medians are reported. ``--compete`` runs a second torch job beside them.

Run: python benchmarks/memory_rss.py --counts 100 1000 --model vit_small_patch16_224 --mode analyze [--rounds 9]
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
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(args.model, args.child, args.batch_size, args.mode)
        return
    import random
    import statistics

    from _common import Competitor

    peaks: dict[int, list[float]] = {n: [] for n in args.counts}
    secs: dict[int, list[float]] = {n: [] for n in args.counts}
    rng = random.Random(0)
    with Competitor(args.compete) as comp:
        for _ in range(args.rounds):
            order = list(args.counts)
            rng.shuffle(order)
            for n in order:
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch-size",
                                      str(args.batch_size), "--mode", args.mode, "--child", str(n)],
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                peaks[n].append(row["peak_rss_mib"])
                secs[n].append(row["seconds"])
    print(f"{args.model} ({args.mode}), {comp.label}, {args.rounds} fresh processes per count:")
    for n in args.counts:
        p = peaks[n]
        print(f"  {n:5d} images  peak RSS median {statistics.median(p):8.1f} MiB [{min(p):.1f}, {max(p):.1f}] "
              f"(N={len(p)}; {statistics.median(secs[n]):.1f} s for spectrum + probe)")
    if len(args.counts) > 1:
        a, b = args.counts[0], args.counts[-1]
        print(f"growth {b / a:.0f}x images -> {statistics.median(peaks[b]) / statistics.median(peaks[a]):.3f}x "
              f"median peak RSS")

if __name__ == "__main__":
    main()
