"""The zoo's networks, one row each: held-out accuracy, mask agreement against the random-init twin, cost.

For every installed network of a task (default: the zoo's default task), prints a Markdown table with

- the held-out top-1 accuracy on ``--n-images`` test images (default 512; the test split is never seen in
  training or in the stopping rule's validation checks);
- the mask ARI of 2 spectral clusters per block against the object masks, mean over the blocks and the first
  ``--ari-images`` test images (default 64), for the trained network and for its random-init twin (its own
  initial weights);
- the steps it trained (the stop rule may end a run before the planned 3,000; a network the extension rule
  continued shows each cycle's steps, e.g. ``3,000 + 1,000``), wall and CPU seconds (summed over its cycles),
  and the device, from its card.

    python benchmarks/zoo_networks.py                 # every installed network of the default task
    python benchmarks/zoo_networks.py --names vit,cnn # the networks of some architectures
    python benchmarks/zoo_networks.py --networks vit-h1@2,vit-h8@1  # some networks
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    import fanlens
    from fanlens import synthetic, zoo
    from fanlens.grouping import mask_scores
    from fanlens.zoo.training import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=zoo.DEFAULT_TASK, choices=tuple(zoo.TASKS))
    ap.add_argument("--names", default=",".join(zoo.ALL_NAMES), help="architectures, comma-separated")
    ap.add_argument("--networks", default=None,
                    help="only these networks, comma-separated (e.g. vit-h1@2,vit-h8@1; default: every installed one)")
    ap.add_argument("--n-images", type=int, default=512, help="held-out images for the accuracy")
    ap.add_argument("--ari-images", type=int, default=64, help="held-out images for the mask ARI")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    only = None if args.networks is None else {n.strip() for n in args.networks.split(",") if n.strip()}
    n = max(args.n_images, args.ari_images)
    x, y, m = synthetic.TASKS[args.task](n, seed=0, split="test").batch(range(n))
    x8 = (x * 255).round().to(torch.uint8)
    xa, ma = x[: args.ari_images], np.asarray(m[: args.ari_images])
    print(f"task {args.task}: accuracy on {args.n_images} held-out images, mask ARI (2 clusters, mean over blocks "
          f"and {args.ari_images} images)\n")
    print("| network | seed | steps | held-out accuracy | mask ARI trained | mask ARI random init | wall s | CPU s | "
          "device |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        for seed in zoo.networks(name, task=args.task):
            if only is not None and zoo.network_name(name, seed) not in only:
                continue
            spec = f"{args.task}/{zoo.network_name(name, seed)}"
            card = zoo.card(spec)
            lm = zoo.load(spec)
            acc = evaluate(lm.model, x8[: args.n_images], y[: args.n_images])
            aris = []
            for model in (lm.model, zoo.load(spec, random_init=True).model):
                g = fanlens.group_tokens(model, xa, n_clusters=2, progress=False)
                aris.append(float(np.asarray(mask_scores(g, ma).ari).mean()))
            # a network with several cycles (the extension rule): the steps of each, the times summed
            cycles = [c["training"]["steps"] for c in card.get("earlier_cycles", [])] + [card["training"]["steps"]]
            steps = " + ".join(f"{c:,}" for c in cycles)
            cpu = card.get("total_cpu_time_s", card.get("cpu_time_s"))
            wall = card.get("total_wall_time_s", card["wall_time_s"])
            print(f"| `{zoo.network_name(name, seed)}` | {seed} | {steps} | {acc:.1%} | "
                  f"{aris[0]:.3f} | {aris[1]:.3f} | {wall:,.0f} | "
                  f"{'' if cpu is None else f'{cpu:,.0f}'} | {card['machine']['device']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
