"""Cost of checkpointing: ``fanlens.analyze`` with a checkpoint every N batches vs without.

The same images (a pixel tensor, so no decoding noise), the same model (ViT-S, random init,
seed 0), the default rule; the two sides alternate ABBA so that drift of the machine falls on
both, and the ratio of medians is printed with every single time. Also printed: the size of one
checkpoint file and the time to write it.

Run: python benchmarks/checkpoint_cost.py [--model vit_small_patch16_224] [--batches 20] [--batch 8]
     [--every 10] [--repeats 3]
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

from _common import machine

GOAL = 1.02


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = fanlens.build_model(args.model)
    h, w = fanlens.data.data_config(lm.model).input_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batches * args.batch, 3, h, w, generator=g)
    common = dict(sigmas=(0.1,), rules=("rel_threshold",), batch_size=args.batch, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="fanlens-ckpt-bench-"))
    times: dict[str, list[float]] = {"without": [], "with": []}

    def run(side: str) -> None:
        state = tmp / "state"
        shutil.rmtree(state, ignore_errors=True)
        extra = dict(state_dir=state, checkpoint_every=args.every) if side == "with" else {}
        t = time.perf_counter()
        fanlens.analyze(lm, x, **common, **extra)
        times[side].append(time.perf_counter() - t)

    run("without")  # warm-up (not counted)
    times["without"].clear()
    for _ in range(args.repeats):
        for side in ("without", "with", "with", "without"):
            run(side)
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

    a, b = statistics.median(times["without"]), statistics.median(times["with"])
    n_ckpt = args.batches // args.every
    print(f"machine: {machine()}")
    print(f"model {args.model}, {args.batches} batches of {args.batch} images (+ noisy copies), default rule, "
          f"checkpoint every {args.every} batches ({n_ckpt} checkpoints per run)")
    print("without checkpoints [s]: " + ", ".join(f"{t:.2f}" for t in times["without"]))
    print("with checkpoints    [s]: " + ", ".join(f"{t:.2f}" for t in times["with"]))
    print(f"one checkpoint: {saves[-1][1] / 1024:.1f} KiB written in {1000 * statistics.median(t for t, _ in saves):.1f} ms")
    print(f"median without {a:.2f} s, with {b:.2f} s: ratio {b / a:.3f}x (goal <= {GOAL}x: "
          f"{'met' if b / a <= GOAL else 'missed'})")


if __name__ == "__main__":
    main()
