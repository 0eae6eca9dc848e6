"""(a) Analysis overhead: the full analysis vs the bare forward passes it needs.

Full analysis = ``fanlens.analyze``: capture of every block, spectral statistics of every block
(the given rules, 32 top eigenvalues), the noise probe at one sigma. The forward passes it
needs: the clean batch and its noisy copy (2 x batch images). The sides run in a shuffled
order per round after a warm-up (see ``_common.alternate``); ``--compete`` runs a second torch
job beside them (started and stopped here). ``--threads-policy off`` times fanlens with its
threading policy for small work (one intra-op thread, the batch split over worker threads)
switched off, for the side-by-side comparison.

Run: python benchmarks/overhead.py [--model vit_small_patch16_224] [--batch 16] [--rounds 9]
     [--rules rel_threshold] [--compete] [--threads-policy on|off]
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import fanlens
from fanlens import spectral as sp
from fanlens.analysis import make_noise
from fanlens.data import data_config

from _common import Competitor, alternate, machine, ratio_line, spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rules", default=",".join(sp.RULES), help="comma-separated counting rules")
    ap.add_argument("--compete", action="store_true", help="run a competing torch job beside the benchmark")
    ap.add_argument("--threads-policy", choices=("on", "off"), default="on",
                    help="off: fanlens' small work keeps torch's thread count (the behaviour before the policy)")
    args = ap.parse_args()
    rules = tuple(r for r in args.rules.split(",") if r)
    if args.threads_policy == "off":
        import fanlens.analysis as an

        # looked up at call time: the small work stays on torch's intra-op pool, unsplit
        an.one_thread = contextlib.nullcontext
        sp.split_rows = lambda fn, *rows: fn(*rows)
    lm = fanlens.build_model(args.model)
    model = lm.model.to(args.device)
    cfg = data_config(model)
    h, w = cfg.input_size
    x = torch.rand(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    eps = torch.stack([make_noise(0, i, (3, h, w)) for i in range(args.batch)])
    both = cfg.normalize(torch.cat([x, x + 0.1 * eps])).to(args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare():
        with torch.inference_mode():
            model(both)
        sync()

    def full():
        fanlens.analyze(lm, x, sigmas=(0.1,), rules=rules, batch_size=args.batch, device=args.device, progress=False)
        sync()

    with Competitor(args.compete) as comp:
        t = alternate({"bare": bare, "full": full}, rounds=args.rounds)
    _, line = ratio_line(t["full"], t["bare"])
    print(f"machine: {machine()}; {comp.label}")
    print(f"model {args.model}, batch {args.batch} (+{args.batch} noisy), device {args.device}, rules {','.join(rules)}, "
          f"threads policy {args.threads_policy}")
    print(f"bare forward passes (2 x {args.batch} images): {spread(t['bare'])}")
    print(f"full analysis (fanlens.analyze):        {spread(t['full'])}")
    print(f"analyze / bare forward: {line}")


if __name__ == "__main__":
    main()
