"""Cost of checkpointing: ``fanlens.analyze`` with a checkpoint every N batches vs without.

The same images (a pixel tensor, so no decoding noise), the same model (ViT-S, random init,
seed 0), the default rule; both sides warmed up, then ``--rounds`` rounds with the two sides in
a shuffled order per round (``_common.alternate``), median [min, max] (N) per side and the
ratio; ``--compete`` runs a second torch job beside them. Also printed: the size of one
checkpoint file and the time to write it.

Run: python benchmarks/checkpoint_cost.py [--model vit_small_patch16_224] [--batches 20] [--batch 8]
     [--every 10] [--rounds 9] [--compete]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fanlens

from _common import Competitor, alternate, machine, ratio_line, spread

GOAL = 1.02


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--compete", action="store_true")
    args = ap.parse_args()
    lm = fanlens.build_model(args.model)
    h, w = fanlens.data.data_config(lm.model).input_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batches * args.batch, 3, h, w, generator=g)
    common = dict(sigmas=(0.1,), rules=("rel_threshold",), batch_size=args.batch, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="fanlens-ckpt-bench-"))

    def run(side: str) -> None:
        state = tmp / "state"
        shutil.rmtree(state, ignore_errors=True)
        extra = dict(state_dir=state, checkpoint_every=args.every) if side == "with" else {}
        fanlens.analyze(lm, x, **common, **extra)

    with Competitor(args.compete) as comp:
        times = alternate({"without": lambda: run("without"), "with": lambda: run("with")}, rounds=args.rounds)
    # one checkpoint on its own: size and write time
    from fanlens.runner import RunState

    saves: list[tuple[float, int]] = []
    real_save = RunState.save

    def timed_save(self, accs, done):
        t = time.perf_counter()
        real_save(self, accs, done)
        saves.append((time.perf_counter() - t, self.path.stat().st_size))

    RunState.save = timed_save
    try:
        fanlens.analyze(lm, x[: args.batch * 3], **common, state_dir=tmp / "one", checkpoint_every=1)
    finally:
        RunState.save = real_save
    shutil.rmtree(tmp, ignore_errors=True)

    r, line = ratio_line(times["with"], times["without"])
    n_ckpt = args.batches // args.every
    print(f"machine: {machine()}; {comp.label}")
    print(f"model {args.model}, {args.batches} batches of {args.batch} images (+ noisy copies), default rule, "
          f"checkpoint every {args.every} batches ({n_ckpt} checkpoints per run)")
    print(f"without checkpoints: {spread(times['without'])}")
    print(f"with checkpoints:    {spread(times['with'])}")
    print(f"one checkpoint: {saves[-1][1] / 1024:.1f} KiB written in {1000 * statistics.median(t for t, _ in saves):.1f} ms")
    print(f"with / without: {line} (goal <= {GOAL}x: {'met' if r <= GOAL else 'missed'})")

if __name__ == "__main__":
    main()
