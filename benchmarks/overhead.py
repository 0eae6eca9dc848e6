"""(a) Analysis overhead: the full analysis vs the bare forward passes it needs.

Full analysis = ``fanlens.analyze``: capture of every block, spectral statistics of every
block (five rules, 32 top eigenvalues), the noise probe at one sigma. The forward passes it
needs: the clean batch and its noisy copy (2 x batch images). Both are timed alternately,
several repeats, and the ratio of medians is printed; a breakdown shows where the rest goes.

Run: python benchmarks/overhead.py [--model vit_small_patch16_224] [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import fanlens
from fanlens import spectral as sp
from fanlens.analysis import _SpectralAcc, make_noise
from fanlens.data import data_config

from _common import machine, med

GOAL = 1.15


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rules", default=",".join(sp.RULES), help="comma-separated counting rules")
    args = ap.parse_args()
    rules = tuple(r for r in args.rules.split(",") if r)
    lm = fanlens.build_model(args.model)
    model = lm.model.to(args.device)
    cfg = data_config(model)
    h, w = cfg.input_size
    x = torch.rand(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    eps = torch.stack([make_noise(0, i, (3, h, w)) for i in range(args.batch)])
    both = cfg.normalize(torch.cat([x, x + 0.1 * eps])).to(args.device)

    def bare():
        with torch.inference_mode():
            model(both)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def full():
        fanlens.analyze(lm, x, sigmas=(0.1,), rules=rules, batch_size=args.batch, device=args.device, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    bare(), full()  # warm-up
    tb, tf = [], []
    for _ in range(args.repeats):
        t = time.perf_counter(); bare(); tb.append(time.perf_counter() - t)
        t = time.perf_counter(); full(); tf.append(time.perf_counter() - t)
    ratio = med(tf) / med(tb)
    # breakdown: the spectral statistics alone, on captured tokens
    with torch.inference_mode(), fanlens.TokenCapture(model) as cap:
        cap.run(both)
        bts = list(cap.block_tokens())
    acc = _SpectralAcc(rules, {}, "cosine", True, 10, 32, 1024, False, 32, None)
    ts = []
    for _ in range(args.repeats):
        t = time.perf_counter(); acc.update(bts, args.batch); ts.append(time.perf_counter() - t)
    a = torch.cat([sp.affinity(bt.tokens[: args.batch]) for bt in bts])
    te = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        sp.spectrum(a, normalized=any(r in sp.NORMALIZED_RULES for r in rules))
        te.append(time.perf_counter() - t)
    print(f"machine: {machine()}")
    print(f"model {args.model}, batch {args.batch} (+{args.batch} noisy), {len(bts)} blocks, device {args.device}, "
          f"rules {','.join(rules)}")
    print(f"bare forward passes (2 x {args.batch} images): median {med(tb):.3f} s  {[round(v, 3) for v in tb]}")
    print(f"full analysis (fanlens.analyze):        median {med(tf):.3f} s  {[round(v, 3) for v in tf]}")
    print(f"overhead ratio: {ratio:.3f}x  (goal <= {GOAL}x: {'met' if ratio <= GOAL else f'missed by {ratio - GOAL:.3f}x'})")
    print(f"  of which spectral statistics of {len(bts)} blocks: median {med(ts):.3f} s "
          f"({med(ts) / med(tb):.2f}x of the bare forward)")
    print(f"  of which the batched eigendecompositions ({a.shape[0]} matrices of {a.shape[1]}^2): "
          f"median {med(te):.3f} s")


if __name__ == "__main__":
    main()
