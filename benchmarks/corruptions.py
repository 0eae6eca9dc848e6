"""Speed of fanlens.corruptions against the reference (imagecorruptions-imaug), the full 19 x 5 sweep.

Both corrupt the same images (crops of scikit-image's photos). The reference works image by
image (its interface); fanlens either in one batched call per corruption and severity
(``--batches 32``: the whole set) or one call per image (``--batches 1``): the same images and
work on both sides, so the ratio says what a caller gains from each way of calling. fanlens runs
inside its execution policy (``fanlens.execution.policy``, and ``keep_freed_memory`` for the whole
process, reference included), as the commands do.

The reference's glass blur takes a fraction of a second per image, so it is timed on
``--ref-glass-images`` images and scaled to the set (its time per image does not depend on the
others). Every corruption is warmed up on both sides first (numba compiles the reference's glass
blur then); then, per corruption, the two sides (all five severities each) run ``--rounds`` times
in a shuffled order per round (``_common.alternate``): median [min, max] per side, the ratio of
the medians and the per-round ratios' median [min, max]. Conditions (``--conditions``): ``alone``,
and ``torch2``: beside a competing torch job (a 256² matmul loop, torch's default threads: 2 here)
started before the condition's block and stopped after it; fanlens's policy is decided at the start
of each condition's block, as a command decides it at its start.

Run: python benchmarks/corruptions.py [--images 32] [--size 128] [--batches 1,32] [--rounds 3]
     [--conditions alone,torch2] [--ref-glass-images 4] [--only pixelate,...] [--repeat 1]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from PIL import Image

from fanlens import corruptions as C
from fanlens import execution

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
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ref-glass-images", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batches", default="1,32", help="fanlens' batch sizes (comma-separated)")
    ap.add_argument("--conditions", default="alone,torch2")
    ap.add_argument("--only", default=None, help="comma-separated corruptions (default: all 19)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="sweeps per side and round (the seconds are per sweep): beside a competing job a sweep of "
                         "a fast corruption (tens of ms) is shorter than the scheduler's noise")
    args = ap.parse_args()
    import imagecorruptions as ic

    # as the command does at its start (fanlens.execution.prepare_command_line): freed memory is kept for
    # reuse, process-wide, so the reference (in this process too) runs under the same allocator
    print("allocator:", "freed memory kept for reuse" if execution.keep_freed_memory() else "default")

    batches = [int(v) for v in args.batches.split(",")]
    names = args.only.split(",") if args.only else list(C.NAMES)
    imgs = photos(args.images, args.size)
    x = torch.from_numpy(imgs.copy()).permute(0, 3, 1, 2).float() / 255
    for n in names:  # warm-up: numba compilation, torch kernels
        ic.corrupt(imgs[0], corruption_name=n, severity=1)
        C.corrupt(x[:2], n, 1)
    results = {}
    for cond in args.conditions.split(","):
        # the policy is decided as a command decides it: once, at its start, with the competitor running
        with Competitor(cond == "torch2") as comp, execution.policy() as pol:
            for batch in batches:
                rows = []
                for n in names:
                    k = min(args.ref_glass_images, args.images) if n == "glass_blur" else args.images

                    def reference(n=n, k=k):
                        for _ in range(args.repeat):
                            for s in C.SEVERITIES:
                                for im in imgs[:k]:
                                    ic.corrupt(im, corruption_name=n, severity=s)

                    def ours(n=n, batch=batch):
                        for _ in range(args.repeat):
                            for s in C.SEVERITIES:
                                for i in range(0, len(x), batch):
                                    C.corrupt(x[i : i + batch], n, s, indices=range(i, min(i + batch, len(x))))

                    t = alternate({"reference": reference, "fanlens": ours}, rounds=args.rounds, warmup=0)
                    rows.append((n, [v * args.images / k / args.repeat for v in t["reference"]],
                                 [v / args.repeat for v in t["fanlens"]], k))
                results[(cond, batch)] = (rows, f"{comp.label}; fanlens threads {pol.threads} ({pol.source}, "
                                                f"other processes kept {pol.load:.2f} cores busy)")
    print(f"machine: {machine()}")
    for (cond, batch), (rows, label) in results.items():
        print(f"\n{label}; fanlens batch {batch}")
        print(f"{args.images} images of {args.size}x{args.size}, severities 1-5; seconds for the 5 severities, "
              f"median of {args.rounds} shuffled rounds [min, max]"
              + (f" ({args.repeat} sweeps per side and round)" if args.repeat > 1 else ""))
        print(f"{'corruption':<18} {'reference':>22} {'fanlens':>22} {'speed-up':>9}  per round median [min, max]")
        tot_r = tot_f = 0.0
        below = []
        for n, ref, ours, k in rows:
            r, _ = ratio_line(ref, ours)
            tot_r += statistics.median(ref)
            tot_f += statistics.median(ours)
            per = [a / b for a, b in zip(ref, ours)]
            if statistics.median(per) < 1:
                below.append(n)
            scaled = f" (reference scaled from {k} images)" if k != args.images else ""
            print(f"{n:<18} {_cell(ref):>22} {_cell(ours):>22} {r:8.2f}x  {statistics.median(per):.2f} "
                  f"[{min(per):.2f}, {max(per):.2f}]{scaled}")
        print(f"{'all':<18} {tot_r:22.2f} {tot_f:22.2f} {tot_r / tot_f:8.2f}x  (sums of the medians; goal >= 3x "
              f"beside a competing job)")
        print(f"below 1x (per-round median): {', '.join(below) if below else 'none'}")


def _cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


if __name__ == "__main__":
    main()
