"""Helpers shared by the benchmark scripts: side-by-side timing in shuffled order, spreads, a
competing process, the machine's description.

Every comparison warms both sides up, then runs ``rounds`` rounds; in each round every side
runs once, in an order drawn at random (seeded), so that drift of the machine (thermal,
another job) falls on both sides alike. Reported: median [min, max] and N per side, the ratio
of the medians, and the median [min, max] of the per-round ratios (the two sides of one round
ran back to back).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

COMPETITOR = (
    "import torch\n"
    "a = torch.rand(256, 256)\n"
    "while True:\n"
    "    a = (a @ a).clamp(-1, 1)\n"
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}; Python {platform.python_version()}")


class Competitor:
    """A second job on the machine while the block runs (by default a 256² torch matmul loop with
    torch's default threads; ``code``: another Python loop), started by the benchmark and stopped
    when the block ends."""

    def __init__(self, enabled: bool = True, code: str = COMPETITOR, settle_s: float = 2.0) -> None:
        self.enabled, self.code, self.settle_s = enabled, code, settle_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Competitor":
        if self.enabled:
            self.proc = subprocess.Popen([sys.executable, "-c", self.code], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            time.sleep(self.settle_s)  # let it import its library and start computing
        return self

    def __exit__(self, *exc) -> bool:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        return False

    @property
    def label(self) -> str:
        return "with a competing torch job (256² matmul loop, default threads)" if self.enabled else "quiet"


def alternate(sides: dict[str, Callable[[], object]], rounds: int = 9, warmup: int = 1,
              seed: int = 0) -> dict[str, list[float]]:
    """Time every side once per round, in a shuffled order per round, after ``warmup`` untimed
    runs of each; returns the seconds per side, in round order."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    rng = random.Random(seed)
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            t = time.perf_counter()
            sides[n]()
            out[n].append(time.perf_counter() - t)
    return out


def spread(xs: list[float], unit: str = "s") -> str:
    return f"median {statistics.median(xs):.3f} {unit} [{min(xs):.3f}, {max(xs):.3f}] (N={len(xs)})"


def ratio_line(num: list[float], den: list[float]) -> tuple[float, str]:
    """Ratio of the medians, and the per-round ratios' median [min, max]."""
    r = statistics.median(num) / statistics.median(den)
    per = [a / b for a, b in zip(num, den)]
    return r, (f"{r:.3f}x (ratio of medians); per round median {statistics.median(per):.3f}x "
               f"[{min(per):.3f}, {max(per):.3f}]")


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)
