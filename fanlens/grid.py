"""The claims over a declared grid of analysis choices: a verdict that survives its own assumptions.

The paper publishes no noise level, input space, perturbation measure or counting rule, so no
single choice is privileged. :func:`evaluate` runs :func:`fanlens.claims.check` once per cell of
the grid (a :class:`Cell`: sigma, space, measure, rule) and :func:`headline` turns the cells into
one verdict per claim and model:

- *holds* (or *contradicted*) when the statistic that carries the claim's verdict (see
  :data:`HEADLINE_STATISTICS`) holds (is contradicted) in at least :data:`AGREEMENT` of the cells
  where it is defined and is never significantly the other way;
- *inconclusive* when no cell is significant either way;
- *depends on the specification* otherwise, naming the dimension whose values separate the
  verdicts best (e.g. ``sigma: holds at 0.05, 0.1; contradicted at 0.5, 1``);
- *not available* when no cell defines the statistic (e.g. C3 without object masks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import claims as cl
from ._output import write_atomic
from ._validation import FanlensError
from .results import rows_to_csv

__all__ = ["Cell", "GridRow", "HeadlineRow", "GridResult", "evaluate", "headline", "HEADLINE_STATISTICS",
           "AGREEMENT", "DIMENSIONS", "GRID_CSV_FIELDS", "HEADLINE_FIELDS", "damage_matched_sigma", "DAMAGE_FRACTION",
           "DAMAGE_MATCHED"]

AGREEMENT = 0.9
"""The share of defined cells that must agree for a verdict of *holds* or *contradicted*."""
DIMENSIONS = ("sigma", "space", "measure", "rule")
DAMAGE_FRACTION = 0.5
"""The damage-matched noise level of a model is where its accuracy falls to this fraction of its clean accuracy."""
DAMAGE_MATCHED = "half-accuracy"
"""The ``sigma`` of the damage-matched cells (each model at its own level, :func:`damage_matched_sigma`)."""
HEADLINE_STATISTICS = {"C1": ("c1_within_block",), "C2": ("c2_decay_ratio", "c2_ratio_difference"),
                       "C3": ("c3_within_block", "c3_models", "c3_training"), "C4": ("c4_heads",)}
"""Per claim, the statistics whose verdicts the headline is about (the others are descriptive)."""
GRID_CSV_FIELDS = DIMENSIONS + cl.CSV_FIELDS
HEADLINE_FIELDS = ("claim", "statistic", "models", "verdict", "cells", "holds", "contradicted", "inconclusive",
                   "median_value", "flips_with", "note")


@dataclass(frozen=True)
class Cell:
    """One specification: the noise level (``"0.1"``, ``"N(0,1)"``, ``"damage-matched"``), the input
    space, the perturbation measure and the counting rule."""

    sigma: str
    space: str
    measure: str
    rule: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GridRow:
    cell: Cell
    row: cl.ClaimRow

    def to_dict(self) -> dict:
        return {**self.cell.to_dict(), **self.row.to_dict()}


@dataclass(frozen=True)
class HeadlineRow:
    claim: str
    statistic: str
    models: str
    verdict: str
    cells: int
    holds: int
    contradicted: int
    inconclusive: int
    median_value: float | None
    flips_with: str
    note: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["median_value"] = "" if self.median_value is None else f"{self.median_value:.4g}"
        return d


@dataclass
class GridResult:
    """Every cell's claim rows and the headline verdicts, with the grid's parameters."""

    rows: list[GridRow]
    headline: list[HeadlineRow]
    parameters: dict = field(default_factory=dict)

    def to_csv(self) -> str:
        return rows_to_csv([r.to_dict() for r in self.rows], GRID_CSV_FIELDS)

    def headline_csv(self) -> str:
        return rows_to_csv([h.to_dict() for h in self.headline], HEADLINE_FIELDS)

    def to_markdown(self) -> str:
        p = self.parameters
        dims = "; ".join(f"{d}: {', '.join(map(str, p.get('values', {}).get(d, [])))}" for d in DIMENSIONS)
        lines = [f"Verdicts over a grid of {p.get('n_cells')} specifications ({dims}). A verdict is *holds* or "
                 f"*contradicted* when at least {AGREEMENT:.0%} of the cells that define the statistic say so and "
                 f"none says the opposite; otherwise *depends on the specification* (the dimension that separates "
                 f"the verdicts is named) or *inconclusive*. Every cell: `claims.csv`.", "",
                 "| claim | statistic | model(s) | verdict | holds / contradicted / inconclusive (cells) | median | "
                 "flips with |", "|---|---|---|---|---|---|---|"]
        for h in self.headline:
            med = "" if h.median_value is None else f"{h.median_value:.3g}"
            verdict = f"**{h.verdict}**" + (f" ({h.note})" if h.note else "")
            lines.append(f"| {h.claim} | {h.statistic} | {h.models} | {verdict} | {h.holds} / {h.contradicted} / "
                         f"{h.inconclusive} ({h.cells}) | {med} | {h.flips_with} |")
        return "\n".join(lines) + "\n"

    def write_files(self, directory: str | Path) -> list[Path]:
        """``claims.csv`` (every cell), ``claims.md`` (headline), ``claims_headline.csv`` into ``directory``."""
        d = Path(directory)
        out = []
        for name, text in (("claims.csv", self.to_csv()), ("claims.md", self.to_markdown()),
                           ("claims_headline.csv", self.headline_csv())):
            write_atomic(d / name, text.encode())
            out.append(d / name)
        return out


def damage_matched_sigma(accuracy: dict[float, float], clean: float, *,
                         fraction: float = DAMAGE_FRACTION) -> float | None:
    """The noise level at which a model's accuracy falls to ``fraction`` of its clean accuracy.

    ``accuracy`` maps noise levels (> 0) to the accuracy measured there; the first interval in
    which the accuracy crosses ``fraction * clean`` is interpolated, linearly in log sigma (linearly
    in sigma between 0 and the smallest level). Rounded to 3 significant digits. ``None`` when the
    accuracy stays above the target at every level (the grid's noise never does that much damage).
    """
    if not accuracy or any(not (float(k) > 0 and np.isfinite(float(k))) for k in accuracy):
        raise FanlensError(f"accuracy must map positive noise levels to accuracies. Got {accuracy!r} instead.")
    if not (0 < fraction < 1) or not (0 <= clean <= 1):
        raise FanlensError(f"fraction must be in (0, 1) and clean in [0, 1]. Got fraction={fraction!r}, "
                           f"clean={clean!r} instead.")
    target = fraction * float(clean)
    prev_s, prev_a = 0.0, float(clean)
    for sg in sorted(float(k) for k in accuracy):
        a = float(accuracy[sg])
        if a <= target:
            if prev_a <= target:  # clean accuracy 0: no level to speak of
                return None
            t = (prev_a - target) / (prev_a - a)
            if prev_s == 0.0:
                star = t * sg
            else:
                star = float(np.exp(np.log(prev_s) + t * (np.log(sg) - np.log(prev_s))))
            return float(f"{star:.3g}")
        prev_s, prev_a = sg, a
    return None


def _family(statistic: str) -> str:
    return statistic.split(" ")[0].split("[")[0]


def evaluate(cells: Sequence[tuple[Cell, Sequence[cl.Evidence], dict]], *, n_boot: int = cl.DEFAULT_N_BOOT,
             seed: int = 0, notes: Any = None) -> GridResult:
    """Check the claims in every cell: ``cells`` holds ``(cell, evidence, check_kwargs)`` (the
    evidence of the cell's probe, and ``sigma``/``rule`` for :func:`fanlens.claims.check`).
    ``notes(cell, row)``, when given, returns a caveat for a row (e.g. models at chance accuracy)."""
    if not cells:
        raise FanlensError("cells must hold at least one specification. Got none.")
    rows: list[GridRow] = []
    for cell, evidence, kw in cells:
        res = cl.check(evidence, n_boot=n_boot, seed=seed, **kw)
        for r in res.rows:
            extra = notes(cell, r) if notes is not None else ""
            if extra:
                r = dataclasses.replace(r, note=(r.note + "; " if r.note else "") + extra)
            rows.append(GridRow(cell, r))
    values = {d: list(dict.fromkeys(getattr(c, d) for c, _e, _k in cells)) for d in DIMENSIONS}
    params = dict(n_cells=len(cells), n_boot=n_boot, seed=seed, agreement=AGREEMENT, values=values,
                  headline_statistics={k: list(v) for k, v in HEADLINE_STATISTICS.items()})
    return GridResult(rows, headline(rows), params)


def headline(rows: Sequence[GridRow]) -> list[HeadlineRow]:
    """One verdict per claim, headline statistic and model(s) over the cells (module docstring); an
    architecture with several networks gets its verdict from its own rows (networks as the unit), the rows
    of its single networks stay in ``claims.csv``."""
    groups: dict[tuple[str, str, str], list[GridRow]] = {}
    for gr in rows:
        if gr.row.level == "network":  # one of an architecture's networks: the architecture's row has the verdict
            continue
        fam = _family(gr.row.statistic)
        if fam in HEADLINE_STATISTICS.get(gr.row.claim, ()):
            groups.setdefault((gr.row.claim, fam, gr.row.models), []).append(gr)
    out = []
    for (claim, fam, models), grs in groups.items():
        defined = [g for g in grs if g.row.value is not None]
        if not defined:
            note = grs[0].row.note if grs else ""
            out.append(HeadlineRow(claim, fam, models, "not available", 0, 0, 0, 0, None, "", note))
            continue
        v = [g.row.verdict for g in defined]
        h, c = v.count("holds"), v.count("contradicted")
        n = len(defined)
        if h >= AGREEMENT * n and c == 0:
            verdict = "holds"
        elif c >= AGREEMENT * n and h == 0:
            verdict = "contradicted"
        elif h == 0 and c == 0:
            verdict = "inconclusive"
        else:
            verdict = "depends on the specification"
        flips = _flipping_dimension(defined) if verdict == "depends on the specification" else ""
        med = float(np.median([g.row.value for g in defined]))
        out.append(HeadlineRow(claim, fam, models, verdict, n, h, c, n - h - c, med, flips))
    order = {c: i for i, c in enumerate(HEADLINE_STATISTICS)}
    return sorted(out, key=lambda r: (order.get(r.claim, 9), r.statistic, r.models))


_OUTCOMES = ("holds", "contradicted", "inconclusive")


def _flipping_dimension(rows: Sequence[GridRow]) -> str:
    """The dimension whose values separate the verdicts best, with the values on each side.

    Per value of a dimension, the shares of holds / contradicted / inconclusive cells; the dimension
    with the largest difference between two of its values (total variation distance of the shares)
    is named, each value labelled with its most frequent verdict (a tie: inconclusive). When every value
    has the same most frequent verdict, the text gives that verdict's share at the values where it is
    lowest and highest instead."""
    best, best_spread = "", 0.0
    for d in DIMENSIONS:
        by: dict[str, list[str]] = {}
        for g in rows:
            v = g.row.verdict if g.row.verdict in _OUTCOMES else "inconclusive"
            by.setdefault(str(getattr(g.cell, d)), []).append(v)
        if len(by) < 2:
            continue
        shares = {k: np.array([vs.count(o) / len(vs) for o in _OUTCOMES]) for k, vs in by.items()}
        keys = list(shares)
        spread = max(0.5 * float(np.abs(shares[a] - shares[b]).sum()) for i, a in enumerate(keys) for b in keys[i + 1:])
        if spread <= best_spread + 1e-12:
            continue
        label = {}
        for k, sh in shares.items():
            top = [o for o, x in zip(_OUTCOMES, sh) if x == sh.max()]
            label[k] = top[0] if len(top) == 1 else "inconclusive"
        if len(set(label.values())) > 1:
            parts = [f"{o} at {', '.join(k for k in keys if label[k] == o)}" for o in _OUTCOMES if o in label.values()]
            text = "; ".join(parts)
        else:
            o = next(iter(label.values()))
            j = _OUTCOMES.index(o)
            lo, hi = min(keys, key=lambda k: shares[k][j]), max(keys, key=lambda k: shares[k][j])
            text = (f"{o} in most cells at every value, from {shares[lo][j]:.0%} of the cells at {lo} to "
                    f"{shares[hi][j]:.0%} at {hi}")
        best, best_spread = f"{d}: {text}", spread
    return best or "no single dimension (the verdicts differ within every setting)"
