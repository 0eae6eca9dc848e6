"""(j) A notebook session through one Lens against three module calls.

Three questions of one model on 64 images: the spectrum, the noise probe (one sigma) and the
groups (k = 4). Side A asks them through one :class:`fanlens.Lens` (the clean tokens captured
once); side B calls ``fanlens.spectrum``, ``fanlens.noise_probe`` and ``fanlens.group_tokens``.
A forward pre-hook counts the images given to the model (clean and noisy copies apart). Sides
alternate in shuffled order per round after a warm-up; printed: images forwarded per side, the
seconds of each side (median [min, max]) and their ratio.

Run: python benchmarks/lens_session.py [--model zoo:vit] [--rounds 5] [--compete]
"""

from __future__ import annotations

import argparse
import hashlib

import torch

import fanlens

from _common import Competitor, alternate, machine, ratio_line, spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compete", action="store_true")
    args = ap.parse_args()
    lm = fanlens.build_model(args.model, seed=0)
    size = fanlens.data.data_config(lm.model).input_size
    x = torch.rand(args.n_images, 3, *size, generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=32, progress=False)
    counts = {"lens": [0, 0], "three calls": [0, 0]}  # clean, other
    current = ["lens"]
    cfg = fanlens.data.data_config(lm.model)
    clean = {hashlib.sha1(v.numpy().tobytes()).hexdigest() for v in cfg.normalize(x)}

    def pre(_mod, inputs):
        for v in inputs[0].detach().contiguous():
            counts[current[0]][0 if hashlib.sha1(v.numpy().tobytes()).hexdigest() in clean else 1] += 1

    def lens_side():
        current[0] = "lens"
        with fanlens.Lens(lm, x, **kw) as lens:
            lens.spectrum()
            lens.probe(sigmas=0.1)
            lens.groups(k=4)

    def three_calls():
        current[0] = "three calls"
        fanlens.spectrum(lm, x, **kw)
        fanlens.noise_probe(lm, x, sigmas=0.1, **kw)
        fanlens.group_tokens(lm, x, n_clusters=4, **kw)

    handle = lm.model.register_forward_pre_hook(pre)
    lens_side()
    three_calls()
    handle.remove()
    print(f"machine: {machine()}; model {args.model} at {size[0]}x{size[1]}, {args.n_images} images, batch 32")
    for side, (c, o) in counts.items():
        print(f"  {side:>12}: {c} clean images forwarded ({c / args.n_images:.0f} per image), {o} noisy copies")
    with Competitor(args.compete) as comp:
        t = alternate({"lens": lens_side, "three calls": three_calls}, rounds=args.rounds)
        print(f"timing ({comp.label}):")
        for side in t:
            print(f"  {side:>12}: {spread(t[side])}")
        print("  lens / three calls: " + ratio_line(t["lens"], t["three calls"])[1])


if __name__ == "__main__":
    main()
