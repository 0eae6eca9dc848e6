"""(h) Repeated forward passes in ``fanlens reproduce`` on the embedded zoo.

A forward pre-hook on every zoo model records each input image it is given (a hash of the
sample's bytes, per model instance); an image that reaches the same model twice is a repeated
forward pass. Printed per model: images forwarded, distinct, repeated, and where the repeats
come from (how many times each repeated image was seen), and the wall time of the whole run.

Run: python benchmarks/forward_passes.py [--out /tmp/fanlens_forward_passes]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import shutil
import time

import torch

from fanlens import pipeline, zoo

from _common import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/fanlens_forward_passes")
    args = ap.parse_args()
    types = {type(zoo.load(n).model) for n in zoo.available()}
    seen: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    names: dict[int, str] = {}

    def pre(module, inputs):
        if type(module) not in types or not inputs or not isinstance(inputs[0], torch.Tensor):
            return None
        names.setdefault(id(module), type(module).__name__)
        x = inputs[0].detach().contiguous().cpu()
        for sample in x:
            seen[id(module)][hashlib.sha1(sample.numpy().tobytes()).hexdigest()] += 1
        return None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    try:
        pipeline.reproduce(out=args.out, progress=False)
    finally:
        handle.remove()
    seconds = time.perf_counter() - t
    print(f"machine: {machine()}")
    total = distinct = 0
    for key, counts in seen.items():
        n, d = sum(counts.values()), len(counts)
        total, distinct = total + n, distinct + d
        times = collections.Counter(c for c in counts.values() if c > 1)
        print(f"{names[key]:>24} (instance {key % 10000:04d}): {n:6d} images forwarded, {d:6d} distinct, "
              f"{n - d:5d} repeated; repeated images by times seen: {dict(sorted(times.items()))}")
    print(f"all models: {total} forwarded, {distinct} distinct, {total - distinct} repeated; reproduce {seconds:.1f} s")


if __name__ == "__main__":
    main()
