"""(q') ``fanlens reproduce`` against the code before the specification grid, side by side (issue 24's bound:
the grid's run at most 3x the run before it, on 2 quiet cores).

The earlier code (default: 3f1e4e7, the last commit before the grid; its own zoo and weights) is exported
with ``git archive`` into a temporary folder and run from there; the current code is the checkout this script
lives in. Every round runs both, each in a fresh process (``python -m fanlens.cli reproduce --out DIR --overwrite
--no-progress``), in an order drawn at random per round (seeded). Printed per run: wall seconds and the
process's user + system CPU seconds (``os.wait4``); then median [min, max] per side and the per-round ratios.
The outputs of every current run are compared with the first one's (``results.csv``, ``claims.csv``: they
must be identical). Nothing else should run on the machine meanwhile.

Run: python benchmarks/reproduce_vs_pregrid.py [--rounds 2] [--baseline 3f1e4e7]  (about 7 min a round)
"""

from __future__ import annotations

import argparse
import filecmp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, spread

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ["-m", "fanlens.cli"]
"""The command of both sides, as a user runs it (the pre-grid code has no ``python -m fanlens``; the current code
sets its execution policy only when it runs as a command: ``python -c`` would leave OpenMP's threads spinning)."""


def run(code_dir: Path, out: Path) -> tuple[float, float]:
    """One ``reproduce`` in a fresh process whose ``fanlens`` is the one in ``code_dir``: (wall s, CPU s)."""
    env = dict(os.environ, PYTHONPATH=str(code_dir), PYTHONDONTWRITEBYTECODE="1")
    probe = subprocess.run([sys.executable, "-c", "import fanlens, sys; sys.stdout.write(fanlens.__file__)"],
                           cwd=code_dir, env=env, capture_output=True, text=True, check=True).stdout
    if not Path(probe).resolve().is_relative_to(code_dir.resolve()):
        raise SystemExit(f"the run from {code_dir} would import {probe}: not the code under test")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *LAUNCH, "reproduce", "--out", str(out), "--overwrite",
                             "--no-progress"], cwd=code_dir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()  # read while it runs: a full pipe would stall the child
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"reproduce from {code_dir} failed: {err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default="3f1e4e7", help="the commit before the specification grid")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fanlens_vs_pregrid_"))
    try:
        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        sides = {"pre-grid": base, "current": ROOT}
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        rng = random.Random(args.seed)
        print(f"machine: {machine()}")
        print(f"baseline {args.baseline}; current {subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}")
        for r in range(args.rounds):
            order = list(sides)
            rng.shuffle(order)
            for side in order:
                out = tmp / f"{side}-{r}"
                wall, cpu = run(sides[side], out)
                got[side].append((wall, cpu))
                print(f"round {r + 1}  {side:9s} {wall:7.1f} s wall  {cpu:7.1f} s CPU", flush=True)
                if side == "current" and r > 0:
                    for f in ("results.csv", "claims.csv"):
                        same = filecmp.cmp(tmp / f"current-0" / f, out / f, shallow=False)
                        print(f"          {f} {'identical to' if same else 'DIFFERS from'} round 1's")
                if not (side == "current" and r == 0):
                    shutil.rmtree(out, ignore_errors=True)
        for side, xs in got.items():
            print(f"{side:9s} wall {spread([w for w, _c in xs])}; CPU {spread([c for _w, c in xs])}")
        ratios = [c[0] / p[0] for c, p in zip(got["current"], got["pre-grid"])]
        print("per-round wall ratio current / pre-grid: " + ", ".join(f"{x:.2f}x" for x in ratios))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
