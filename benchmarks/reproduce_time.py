"""(i) Where ``fanlens reproduce`` spends its time on the embedded zoo.

Three sides, in a shuffled order per round after a warm-up (``_common.alternate``):

- ``imports``: a fresh interpreter importing ``fanlens.pipeline`` (what every run pays first);
- ``analyses``: the analyses ``reproduce`` ran when issue 14 set its 10-second goal: spectrum,
  noise probe, mask groups, Figure 4 groups and colours of the three zoo models and their
  random-init twins, spectrum and probe of the head variants: ``reproduce``'s own per-model pass
  (``pipeline._run_one``) without the robustness grid and the corruption probe, which came later;
- ``reproduce``: the whole ``fanlens.pipeline.reproduce`` (with corruptions, claims, figures and
  the report) into a temporary folder.

Run: python benchmarks/reproduce_time.py [--rounds 9]  (about 2 min per round)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile

from fanlens import pipeline, zoo

from _common import alternate, machine, spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanlens_reproduce_time_")
    x, masks, _names, labels = pipeline._zoo_images(pipeline.DEFAULT_N_IMAGES, 0)

    def imports() -> None:
        subprocess.run([sys.executable, "-c", "import fanlens.pipeline"], check=True)

    def analyses() -> None:
        for name in zoo.ZOO_NAMES:
            for lm in (zoo.load(name), zoo.load(name, random_init=True, seed=0)):
                pipeline._run_one(lm, lm.name, name, False, x, masks, pipeline.DEFAULT_SIGMAS, 0, "cpu", 32, False,
                                  labels)
        for name in (n for n in zoo.HEAD_VARIANTS if n in zoo.available()):
            pipeline._run_one(zoo.load(name), name, name, False, x, None, pipeline.DEFAULT_SIGMAS, 0, "cpu", 32,
                              False, labels, figures=False)

    def reproduce() -> None:
        pipeline.reproduce(None, out=f"{tmp}/out", overwrite=True, progress=False)

    try:
        times = alternate({"imports": imports, "analyses": analyses, "reproduce": reproduce}, rounds=args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {machine()}; quiet")
    print(f"imports (fresh interpreter, import fanlens.pipeline): {spread(times['imports'])}")
    print(f"analyses of the issue-14 workload (no corruptions):    {spread(times['analyses'])}")
    print(f"whole reproduce (corruptions, claims, figures, report): {spread(times['reproduce'])}")


if __name__ == "__main__":
    main()
