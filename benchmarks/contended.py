"""fanlens commands alone and beside a competing CPU job: wall time and CPU seconds.

Each command runs as the ``fanlens`` console program would (``python -m fanlens.cli``, a fresh
process: the execution policy and OpenMP's wait policy apply as they do for a user), into a
temporary folder. Conditions:

- ``alone``: nothing else runs;
- ``torch2``: beside a 2-thread torch matmul loop (``torch.set_num_threads(2)``, 256² matrices);
- ``numpy1``: beside a 1-thread numpy loop (elementwise work on a 4 MB array, BLAS held to 1 thread).

Per round every (command, condition) pair runs once, in an order shuffled per round (seeded), so
that drift of the machine falls on all alike. The competitor starts before the command (and has
imported its library) and is stopped after it. Measured for fanlens's process only: wall seconds
and CPU seconds (user + system, from ``os.wait4``). Printed per command and condition: median
[min, max] over the rounds, and the ratios to ``alone`` (ratio of the medians). Goals (issue 26):
beside a competitor, CPU <= 1.3 x and wall <= 2.5 x of alone.

``--baseline DIR`` also runs the commands from another checkout of fanlens (``PYTHONPATH=DIR``),
alone, in the same rounds: the ratio of this checkout's wall time to it ("no slower than before").

Run: python benchmarks/contended.py [--rounds 3] [--commands reproduce,robustness] [--baseline DIR]
Needs a machine with nothing else running (the benchmark supplies the competition).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import Competitor, machine

COMPETITORS = {
    "torch2": ("import torch\ntorch.set_num_threads(2)\na = torch.rand(256, 256)\n"
               "while True:\n    a = (a @ a).clamp(-1, 1)\n"),
    "numpy1": ("import os\nos.environ['OPENBLAS_NUM_THREADS'] = '1'\nos.environ['OMP_NUM_THREADS'] = '1'\n"
               "import numpy as np\na = np.random.rand(512, 1024)\n"
               "while True:\n    a = np.sqrt(a * a + 1.0) - 0.5\n    a /= a.max()\n"),
}

COMMANDS = {
    "reproduce": ["reproduce", "--no-progress"],
    "robustness": ["robustness", "--model", "zoo:vit", "--images", "synthetic", "--n-images", "64", "--no-progress"],
}


def run_once(args: list[str], out: str, pythonpath: str | None) -> tuple[float, float]:
    """(wall s, CPU s) of one ``python -m fanlens.cli ARGS --out OUT --overwrite``."""
    env = dict(os.environ)
    env.pop("FANLENS_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "fanlens.cli", *args, "--out", out, "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f} [{min(xs):.1f}, {max(xs):.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--commands", default="reproduce,robustness")
    ap.add_argument("--conditions", default="alone,torch2,numpy1")
    ap.add_argument("--baseline", default=None, help="another checkout of fanlens, run alone for comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    commands = [c for c in args.commands.split(",") if c]
    conditions = [c for c in args.conditions.split(",") if c]
    for c in commands:
        if c not in COMMANDS:
            ap.error(f"--commands: expected some of {sorted(COMMANDS)}, got {c!r}")
    for c in conditions:
        if c != "alone" and c not in COMPETITORS:
            ap.error(f"--conditions: expected some of alone, {', '.join(COMPETITORS)}; got {c!r}")
    pairs = [(cmd, cond, None) for cmd in commands for cond in conditions]
    if args.baseline:
        pairs += [(cmd, "alone", args.baseline) for cmd in commands]
    tmp = tempfile.mkdtemp(prefix="fanlens_contended_")
    rng = random.Random(args.seed)
    res: dict[tuple, list[tuple[float, float]]] = {p: [] for p in pairs}
    try:
        for r in range(args.rounds):
            order = pairs[:]
            rng.shuffle(order)
            for cmd, cond, base in order:
                with Competitor(cond != "alone", COMPETITORS.get(cond, ""), settle_s=3.0):
                    w, c = run_once(COMMANDS[cmd], os.path.join(tmp, "out"), base)
                res[(cmd, cond, base)].append((w, c))
                tag = f"{cmd}/{cond}" + (" (baseline)" if base else "")
                print(f"round {r + 1}: {tag:<28} wall {w:7.1f} s  CPU {c:7.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"{args.rounds} rounds, shuffled per round; median [min, max]; ratios of the medians to 'alone'")
    print(f"{'command':<11} {'condition':<18} {'wall s':>20} {'CPU s':>20} {'wall/alone':>11} {'CPU/alone':>10}")
    for cmd in commands:
        alone = res.get((cmd, "alone", None))
        for cond in conditions:
            v = res[(cmd, cond, None)]
            walls, cpus = [a for a, _ in v], [b for _, b in v]
            rw = rc = ""
            if alone:
                rw = f"{statistics.median(walls) / statistics.median([a for a, _ in alone]):10.2f}x"
                rc = f"{statistics.median(cpus) / statistics.median([b for _, b in alone]):9.2f}x"
            print(f"{cmd:<11} {cond:<18} {cell(walls):>20} {cell(cpus):>20} {rw:>11} {rc:>10}")
        if args.baseline:
            v = res[(cmd, "alone", args.baseline)]
            walls, cpus = [a for a, _ in v], [b for _, b in v]
            rw = (f"{statistics.median([a for a, _ in alone]) / statistics.median(walls):10.2f}x" if alone else "")
            print(f"{cmd:<11} {'baseline, alone':<18} {cell(walls):>20} {cell(cpus):>20} {rw:>11}  (this/baseline)")
    print("goals: beside a competitor CPU <= 1.3x and wall <= 2.5x of alone; alone this/baseline <= 1.05x")


if __name__ == "__main__":
    main()
