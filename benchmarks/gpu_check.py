"""GPU check: every analysis on CUDA agrees with the CPU, and how much faster it is.

One short prepared script (a few minutes at most): ``vit_small_patch16_224`` (random init,
seed 0) on 32 random images at 224 x 224; ``fanlens.analyze`` (spectrum + probe at two
sigmas), ``fanlens.noise_probe`` in pure mode and ``fanlens.group_tokens`` on CPU and on
CUDA; the largest differences and the median times. Then the 19 ImageNet-C corruptions at
severity 3 on the same images: CPU/CUDA agreement (the random draws are made on the CPU, so
only float rounding differs) and the speed-up of the full 19 x 5 sweep. Exits 1 on disagreement, 0 when it
agrees, and 2 (printing so) when no CUDA device is present.

The models are built once per device before any timing (same seed: the same weights); the
timings cover the analyses only, CPU and CUDA runs alternating after a warm-up of each.

Run: python benchmarks/gpu_check.py [--images 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import fanlens

from _common import machine, med


def run(device: str, x: torch.Tensor, model):
    t = time.perf_counter()
    spec, probe = fanlens.analyze(model, x, sigmas=(0.05, 0.2), device=device, batch_size=16, progress=False)
    pure = fanlens.noise_probe(model, mode="pure", n_noise=16, device=device, progress=False)
    groups = fanlens.group_tokens(model, x[:4], n_clusters=4, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, spec, probe, pure, groups


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if not torch.cuda.is_available():
        print("no CUDA device available: nothing to check")
        return 2
    print(f"cuda: {torch.cuda.get_device_name(0)}")
    x = torch.rand(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    lm_cpu = fanlens.build_model(args.model, seed=0)  # built once per device, outside the timing
    lm_gpu = fanlens.build_model(args.model, seed=0)
    run("cpu", x, lm_cpu), run("cuda", x, lm_gpu)  # warm-up of both
    cpu, gpu = [], []
    for _ in range(args.repeats):  # alternating
        cpu.append(run("cpu", x, lm_cpu))
        gpu.append(run("cuda", x, lm_gpu))
    _, s_c, p_c, u_c, g_c = cpu[0]
    _, s_g, p_g, u_g, g_g = gpu[0]
    checks = {
        "probe mean (max rel diff)": np.max(np.abs(p_c.mean - p_g.mean) / np.abs(p_c.mean).clip(1e-9)),
        "pure-noise norm (max rel diff)": np.max(np.abs(u_c.mean - u_g.mean) / np.abs(u_c.mean).clip(1e-9)),
        "eigenvalue spectrum (max abs diff)": np.nanmax(np.abs(s_c.eig_mean - s_g.eig_mean)),
        "rel_threshold count (max abs diff of means)": np.max(np.abs(s_c.count("rel_threshold") - s_g.count("rel_threshold"))),
    }
    tol = {"probe mean (max rel diff)": 1e-3, "pure-noise norm (max rel diff)": 1e-3,
           "eigenvalue spectrum (max abs diff)": 1e-3, "rel_threshold count (max abs diff of means)": 0.5}
    ok = True
    for k, v in checks.items():
        good = v <= tol[k]
        ok &= good
        print(f"{k}: {v:.2e} (tolerance {tol[k]:g}) {'ok' if good else 'DISAGREES'}")
    from sklearn.metrics import adjusted_rand_score

    ari = [adjusted_rand_score(a[i].ravel(), b[i].ravel()) for a, b in zip(g_c.labels, g_g.labels) for i in range(4)]
    print(f"group labels CPU vs CUDA: median ARI {np.median(ari):.3f}")
    tc, tg = med([c[0] for c in cpu]), med([g[0] for g in gpu])
    print(f"time: CPU {tc:.2f} s, CUDA {tg:.2f} s -> {tc / tg:.1f}x speed-up")
    ok &= corruptions(x)
    return 0 if ok else 1


def corruptions(x: torch.Tensor) -> bool:
    """CPU vs CUDA for every corruption (severity 3), and the time of the 19 x 5 sweep on each."""
    from fanlens import corruptions as C

    ok = True
    worst = {}
    for n in C.NAMES:
        a = C.corrupt(x, n, 3, seed=1)
        b = C.corrupt(x.cuda(), n, 3, seed=1).cpu()
        worst[n] = float((a - b).abs().max())
        tol = 2 / 255 if n == "jpeg_compression" else 1e-3
        if worst[n] > tol:
            ok = False
            print(f"corruption {n}: CPU vs CUDA max abs diff {worst[n]:.2e} > {tol:.1e} DISAGREES")
    print(f"corruptions CPU vs CUDA: worst max abs diff {max(worst.values()):.2e} ({max(worst, key=worst.get)})")
    times = {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev)
        t = time.perf_counter()
        for n in C.NAMES:
            for s in C.SEVERITIES:
                C.corrupt(xd, n, s)
        if dev == "cuda":
            torch.cuda.synchronize()
        times[dev] = time.perf_counter() - t
    print(f"19 x 5 corruption sweep on {len(x)} images: CPU {times['cpu']:.1f} s, CUDA {times['cuda']:.1f} s -> "
          f"{times['cpu'] / times['cuda']:.1f}x")
    return ok


if __name__ == "__main__":
    sys.exit(main())
