"""The paper's claims as numbers: a statistic, a 95 % bootstrap interval and a verdict for each.

The claims (Zhou et al., ICML 2022) and the statistics that test them, per model unless said:

- **C1** (Fig. 3a/3b): over the blocks, the significant-eigenvalue count and the perturbation
  fall together, most steeply in the middle blocks.
  ``c1_spearman``: Spearman rho between the per-block mean count and the per-block mean
  perturbation (expected > 0); ``c1_count_drop`` and ``c1_perturbation_drop``: the paired change
  from the first block to the blocks at 30-70 % relative depth, the mean over images of
  ``mean(x_i[mid blocks]) - x_i[first block]`` (expected < 0).
- **C2** (Fig. 3c): noise decays more through ViT and FAN than through a ResNet.
  ``c2_decay_ratio``: last-block / first-block mean perturbation of each model (expected < 1);
  ``c2_ratio_difference``: a transformer's ratio minus a CNN's (expected < 0).
- **C3** (Fig. 4, the title): better grouping goes with more robustness. The grouping score is
  the mask agreement (ARI of the 2-cluster groups with the object mask) where masks exist,
  otherwise minus the count; robustness is minus the perturbation, or minus the corruption
  error. ``c3_blocks``: Spearman rho across the blocks of a model; ``c3_models``: across
  models (score: mean over blocks; robustness: last-block perturbation, mean corruption error);
  ``c3_training``: across the training snapshots of one architecture (expected > 0).
- **C4** (Fig. 5): at a fixed width, more heads give more robustness. ``c4_heads``: Spearman
  rho between the number of heads and robustness (expected > 0).

Interval: percentile bootstrap over images: the images are resampled with replacement
(``n_boot`` times, seeded), the per-block means recomputed from the per-image values the
results carry, and the statistic recomputed. Models analysed on the same images are
resampled together (paired). Verdict: **holds** when the interval lies on the claimed side of
the null value, **contradicted** when it lies on the other side, **inconclusive** when it
contains the null (or the statistic is undefined, e.g. a count that is constant over blocks).

Example::

    ev = [claims.Evidence("ViT", spec, probe, scores=mask_scores), ...]
    res = claims.check(ev)
    print(res.to_markdown())
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._threads import map_items
from ._validation import FanlensError, check_positive_int, check_seed
from .execution import record as execution_record
from .results import ProbeResult, RobustnessResult, SpectrumResult, rows_to_csv, versions, write_atomic

__all__ = ["Evidence", "ClaimRow", "ClaimsResult", "check", "spearman", "bootstrap_weights", "VERDICTS", "C3_NOT_AVAILABLE",
           "EACH_SIGMA", "MIN_NETWORKS", "MIN_IMAGES", "MIN_BLOCKS", "MIN_RESAMPLES",
           "DEFAULT_N_BOOT", "MID_DEPTH", "CSV_FIELDS", "HEADS_SERIES"]

VERDICTS = ("holds", "contradicted", "inconclusive")
DEFAULT_N_BOOT = 1000
MID_DEPTH = (0.3, 0.7)
LEVEL = 0.95
HEADS_SERIES = "heads"  # Evidence.series of models that only enter C4 (the heads variants)
CSV_FIELDS = ("claim", "statistic", "scope", "models", "value", "ci_low", "ci_high", "null", "expected", "verdict",
              "n_networks", "n_images", "n_units", "level", "note")
MIN_NETWORKS = 3
"""An architecture-level verdict needs at least this many networks (independent training seeds)."""
MIN_IMAGES = 8
"""A verdict needs at least this many images (fewer: *inconclusive*, the reason in ``note``)."""
MIN_BLOCKS = 3
"""A verdict about a depth profile needs at least this many blocks."""
MIN_RESAMPLES = 200
"""A verdict needs at least this many bootstrap resamples (5 in each tail of the 95 % interval)."""


@dataclass(frozen=True)
class Evidence:
    """What fanlens measured on one model: the input of :func:`check`.

    Attributes:
        label: the model's name in the table.
        spectrum, probe: results of the same images (``per_image`` values needed).
        scores: mask agreement of the groups (:class:`fanlens.grouping.GroupingScores`) on the
            same images, or ``None``.
        robustness: :class:`~fanlens.results.RobustnessResult` on the same images, or ``None``.
        heads: attention heads per block (C4), or ``None``. Every model with ``heads`` enters
            C4; a model with ``series="heads"`` enters C4 only (a heads variant).
        series, step: a training series (e.g. ``"vit"``) and the snapshot's training step (C3
            across training; snapshots enter nothing else), or ``None``.
        family: ``"cnn"`` or ``"transformer"``; ``None`` reads it from the block layouts (all
            ``NCHW``: a CNN).
        architecture: the unit of inference this network belongs to (e.g. ``"ViT"`` for the
            networks ``zoo:vit``, ``zoo:vit@1``, ``zoo:vit@2``, trained with different seeds);
            ``None``: the network is its own unit. Networks of one architecture are resampled
            hierarchically (networks, then images) and compared with other architectures as a
            whole.
    """

    label: str
    spectrum: SpectrumResult
    probe: ProbeResult
    scores: Any = None
    robustness: RobustnessResult | None = None
    heads: int | None = None
    series: str | None = None
    step: int | None = None
    family: str | None = None
    architecture: str | None = None

    @property
    def kind(self) -> str:
        if self.family is not None:
            return self.family
        return "cnn" if all(b.layout.layout == "NCHW" for b in self.spectrum.blocks) else "transformer"


@dataclass(frozen=True)
class ClaimRow:
    """One statistic: its value, interval, the null and expected direction, the verdict."""

    claim: str
    statistic: str
    scope: str
    models: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    null: float
    expected: str
    verdict: str
    n_images: int
    n_units: int
    note: str = ""
    n_networks: int = 1
    level: str = "model"
    # "model": a network that is its own unit; "network": one of several networks of an architecture (listed for
    # the record, the verdict about the architecture is the "architecture" row)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("value", "ci_low", "ci_high"):
            d[k] = "" if d[k] is None else f"{d[k]:.6g}"
        d["null"] = f"{self.null:g}"
        return d


@dataclass
class ClaimsResult:
    """The claim table, with the parameters that shaped it."""

    rows: list[ClaimRow]
    parameters: dict = field(default_factory=dict)

    def verdicts(self, claim: str | None = None) -> list[str]:
        return [r.verdict for r in self.rows if claim is None or r.claim == claim]

    def to_csv(self) -> str:
        return rows_to_csv([r.to_dict() for r in self.rows], CSV_FIELDS)

    def to_markdown(self) -> str:
        """A short table: claim, statistic, model(s), value, 95 % interval, verdict, n."""
        p = self.parameters
        lines = [
            "| claim | statistic | model(s) | value | 95 % interval | expected | verdict | n |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            val = "undefined" if r.value is None else f"{r.value:.3g}"
            ci = "" if r.ci_low is None else f"[{r.ci_low:.3g}, {r.ci_high:.3g}]"
            n = (f"{r.n_networks} networks x " if r.n_networks > 1 else "") + f"{r.n_images} images" + (
                f", {r.n_units} {r.scope}" if r.scope != "images" else "")
            verdict = f"**{r.verdict}**" + (f" ({r.note})" if r.note else "")
            lines.append(f"| {r.claim} | {r.statistic} | {r.models} | {val} | {ci} | {r.expected} | {verdict} | {n} |")
        head = (f"Percentile bootstrap over images, {p.get('n_boot')} resamples, seed {p.get('seed')}; "
                f"perturbation at sigma = {p.get('sigma')}, count rule `{p.get('rule')}`, mid-depth blocks at "
                f"{MID_DEPTH[0]:g}-{MID_DEPTH[1]:g} relative depth. Definitions: `fanlens.claims`.")
        return head + "\n\n" + "\n".join(lines) + "\n"

    def write_files(self, directory: str | Path) -> list[Path]:
        """Write ``claims.csv``, ``claims.md`` and ``claims.json`` (parameters) into ``directory``."""
        d = Path(directory)
        out = []
        for name, data in (("claims.csv", self.to_csv()), ("claims.md", self.to_markdown()),
                           ("claims.json", json.dumps({"parameters": self.parameters, "versions": versions(),
                                                       "execution": execution_record()},
                                                      indent=2) + "\n")):
            write_atomic(d / name, data.encode())
            out.append(d / name)
        return out

    def save(self, directory: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write the files into ``directory`` as one unit (new or empty unless ``overwrite``)."""
        from .runner import OutputFolder

        folder = OutputFolder(directory, overwrite=overwrite, command="claims", param="directory")
        with folder.staging() as tmp:
            self.write_files(tmp)
        return folder.written


# --------------------------------------------------------------------------- statistics
def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho along the last axis (average ranks for ties); NaN where either side is constant."""
    from scipy.stats import rankdata

    rx = rankdata(np.asarray(x, dtype=float), axis=-1)
    ry = rankdata(np.asarray(y, dtype=float), axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(1 + n_boot, n)`` resampling counts; row 0 is the sample itself (all ones)."""
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    return np.concatenate([np.ones((1, n)), w])


def _verdict(lo: float, hi: float, null: float, sign: int) -> str:
    if (sign > 0 and lo > null) or (sign < 0 and hi < null):
        return "holds"
    if (sign > 0 and hi < null) or (sign < 0 and lo > null):
        return "contradicted"
    return "inconclusive"


class _Resampler:
    """Per-model per-image arrays, resampled with shared weights for models on the same images."""

    def __init__(self, evidence: Sequence[Evidence], n_boot: int, seed: int) -> None:
        self.n_boot = n_boot
        rng = np.random.default_rng(seed)
        self.weights: dict[tuple, np.ndarray] = {}
        self.key: dict[str, tuple] = {}
        for ev in evidence:
            names = tuple(ev.spectrum.provenance.images)
            if names not in self.weights:
                self.weights[names] = bootstrap_weights(len(names), n_boot, rng)
            self.key[ev.label] = names

    def means(self, label: str, values: np.ndarray) -> np.ndarray:
        """``values`` (n, ...) -> ``(1 + n_boot, ...)`` means; row 0 the sample mean."""
        w = self.weights[self.key[label]]
        v = np.asarray(values, dtype=np.float64)
        return np.tensordot(w, v, axes=(1, 0)) / v.shape[0]

    def n(self, label: str) -> int:
        return len(self.key[label])

    def within_block(self, label: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``(1 + n_boot,)``: per resample, the Spearman rho across images of ``x`` and ``y`` ((n, L)
        per-image values) in every block, averaged over the blocks where it is defined."""
        w = self.weights[self.key[label]]
        x, y = np.asarray(x, float), np.asarray(y, float)
        # block by block on the caller's cores (numpy leaves the GIL in its array loops; fanlens._threads)
        rho = np.stack(map_items(lambda j: resampled_spearman(x[:, j], y[:, j], w), range(x.shape[1])), axis=-1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with every block constant: NaN
            return np.nanmean(rho, axis=-1)


def _resampled_ranks(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(R, n)``: per resample (row of counts ``w``), the average rank that image ``i``'s value ``v[i]``
    takes among the resample's values (each image counted ``w[r, i]`` times), as scipy's rankdata gives
    it on the drawn sample."""
    order = np.argsort(v, kind="stable")
    vs = v[order]
    start = np.flatnonzero(np.r_[True, vs[1:] != vs[:-1]])  # first sorted position of each distinct value
    end = np.r_[start[1:], len(vs)] - 1
    cw = np.cumsum(w[:, order], axis=1)
    before = np.where(start > 0, cw[:, np.maximum(start - 1, 0)], 0.0)
    rank_g = before + (cw[:, end] - before + 1.0) / 2.0  # (R, groups)
    group = np.cumsum(np.r_[True, vs[1:] != vs[:-1]]) - 1
    ranks = np.empty(w.shape, dtype=np.float64)
    ranks[:, order] = rank_g[:, group]
    return ranks


def resampled_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman rho of ``x`` and ``y`` (``(n,)``) in every bootstrap resample (``w``: ``(R, n)`` counts):
    the same as :func:`spearman` on the drawn samples (each image repeated as often as drawn; average ranks
    for ties), without drawing them: the ranks come from one sort and cumulative counts, and rho is the
    count-weighted correlation of the ranks. NaN where a resample's values are constant on either side, or
    where ``x`` or ``y`` holds a non-finite value."""
    w = np.asarray(w, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return np.full(w.shape[0], np.nan)
    rx, ry = _resampled_ranks(x, w), _resampled_ranks(y, w)
    tot = w.sum(1, keepdims=True)
    rx = rx - (w * rx).sum(1, keepdims=True) / tot
    ry = ry - (w * ry).sum(1, keepdims=True) / tot
    den = np.sqrt((w * rx * rx).sum(1) * (w * ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (w * rx * ry).sum(1) / np.where(den > 0, den, 1.0), np.nan)


EACH_SIGMA = "each"
"""``check(sigma=EACH_SIGMA)``: every model's probe at its own single noise level (the damage-matched cells)."""

C3_NOT_AVAILABLE = ("not available: no object masks. C3 needs a grouping score that is not the count "
                    "(C1 relates the count to the perturbation already)")


def _not_available(claim: str, statistic: str, scope: str, models: str, n_images: int, n_units: int) -> ClaimRow:
    return ClaimRow(claim, statistic, scope, models, None, None, None, 0.0, "> 0", "inconclusive", n_images, n_units,
                    C3_NOT_AVAILABLE)


def _row(claim: str, statistic: str, scope: str, models: str, samples: np.ndarray, null: float, sign: int,
         n_images: int, n_units: int, note: str = "") -> ClaimRow:
    """Point value (row 0) and percentile interval (rows 1..) of ``samples``; verdict against ``null``."""
    expected = f"{'>' if sign > 0 else '<'} {null:g}"
    point, boot = float(samples[0]), samples[1:]
    finite = boot[np.isfinite(boot)]
    if not math.isfinite(point) or finite.size < 0.95 * boot.size:
        why = "undefined: " + (note or "a profile is constant")
        return ClaimRow(claim, statistic, scope, models, None, None, None, null, expected, "inconclusive", n_images,
                        n_units, why)
    lo, hi = (float(q) for q in np.percentile(finite, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2]))
    if finite.size < boot.size:
        note = (note + "; " if note else "") + f"{boot.size - finite.size} resamples undefined"
    r = ClaimRow(claim, statistic, scope, models, point, lo, hi, null, expected, _verdict(lo, hi, null, sign),
                 n_images, n_units, note)
    short = ([f"{n_images} images (a verdict needs at least {MIN_IMAGES})"] if n_images < MIN_IMAGES else []) + (
        [f"{boot.size} bootstrap resamples (a verdict needs at least {MIN_RESAMPLES})"]
        if boot.size < MIN_RESAMPLES else [])
    return _below_minimum(r, short)


def _below_minimum(r: ClaimRow, reasons: Sequence[str]) -> ClaimRow:
    """``r`` with its verdict made *inconclusive* when the data are below a documented minimum."""
    if not reasons or r.verdict not in ("holds", "contradicted"):
        return r
    note = "; ".join(reasons) + f" (the interval alone says {r.verdict})"
    return dataclasses.replace(r, verdict="inconclusive", note=(r.note + "; " if r.note else "") + note)


def _few_blocks(n_blocks: int) -> list[str]:
    return [f"{n_blocks} blocks (a verdict about a depth profile needs at least {MIN_BLOCKS})"] \
        if n_blocks < MIN_BLOCKS else []


def _column(res: ProbeResult, sigma: float | None) -> int:
    if res.per_image is None:
        raise FanlensError(f"the probe result of {res.model!r} has no per-image values (saved by an older fanlens); "
                           f"run the analysis again.")
    if res.mode == "pure_vs_clean":  # one column: pure N(0, 1) inputs against the clean images
        return 0
    if res.perturbations or res.mode != "additive":
        raise FanlensError("probe must be an additive Gaussian-noise probe (sigmas), not a corruption or pure-noise "
                           f"probe. Got mode={res.mode!r}, perturbations={list(res.perturbations)}.")
    if sigma == EACH_SIGMA:  # every probe at its own noise level (e.g. damage-matched): one sigma each
        if len(res.sigmas) != 1:
            raise FanlensError(f"sigma={EACH_SIGMA!r} needs probes with one noise level each; the probe of "
                               f"{res.model!r} has {list(res.sigmas)}.")
        return 0
    sig = max(res.sigmas) if sigma is None else float(sigma)
    if sig not in res.sigmas:
        raise FanlensError(f"sigma must be one of the probe's sigmas {res.sigmas}. Got {sigma!r} instead.")
    return res.sigmas.index(sig)


def _mid_blocks(n_blocks: int) -> np.ndarray:
    depth = np.linspace(0, 1, n_blocks) if n_blocks > 1 else np.zeros(1)
    mid = np.flatnonzero((depth >= MID_DEPTH[0] - 1e-9) & (depth <= MID_DEPTH[1] + 1e-9))
    if mid.size == 0 or n_blocks < 3:
        raise FanlensError(f"C1 needs blocks at {MID_DEPTH[0]:g}-{MID_DEPTH[1]:g} relative depth; a model with "
                           f"{n_blocks} blocks has none.")
    return mid


def _corruption_error(rob: RobustnessResult) -> np.ndarray:
    """Per image: the mean 0/1 error (or flip) over every corruption and severity."""
    if rob.per_image is None:
        raise FanlensError(f"the robustness result of {rob.model!r} has no per-image values; run it again.")
    return np.asarray(rob.per_image, dtype=np.float64)[:, 1:].mean(axis=1)


# --------------------------------------------------------------------------- the check
def check(
    evidence: Sequence[Evidence],
    *,
    sigma: float | str | None = None,
    rule: str | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> ClaimsResult:
    """Compute every claim the evidence allows, with 95 % bootstrap intervals and verdicts.

    Args:
        evidence: one :class:`Evidence` per model (trained models; snapshots and heads
            variants carry ``series``/``step`` and ``heads``).
        sigma: the probe's noise level used as "perturbation" (default 0.1 when present,
            else the largest); ``"each"``: every probe has one noise level of its own
            (e.g. the sigma at which each model's accuracy halves) and that one is used.
        rule: the counting rule (default: the spectrum's first rule).
        n_boot: bootstrap resamples (at least 1000 for a reported interval; fewer for tests).
        seed: seeds the resampling.

    Returns:
        :class:`ClaimsResult` (``rows``, ``to_csv()``, ``to_markdown()``, ``save(dir)``).
    """
    evidence = list(evidence)
    if not evidence or not all(isinstance(e, Evidence) for e in evidence):
        raise FanlensError(f"evidence must be a non-empty list of fanlens.claims.Evidence. Got {evidence!r} instead.")
    labels = [e.label for e in evidence]
    if len(set(labels)) != len(labels):
        raise FanlensError(f"evidence labels must be distinct. Got {labels} instead.")
    check_positive_int("n_boot", n_boot)
    check_seed(seed)
    first = evidence[0]
    if isinstance(sigma, str) and sigma != EACH_SIGMA:
        raise FanlensError(f"sigma must be a noise level, None or {EACH_SIGMA!r}. Got {sigma!r} instead.")
    if sigma is None and first.probe.mode == "pure_vs_clean":
        sigma = 1.0
    elif sigma is None:
        sigma = 0.1 if 0.1 in first.probe.sigmas else (max(first.probe.sigmas) if first.probe.sigmas else None)
    rule = first.spectrum.rules[0] if rule is None else rule
    data: dict[str, dict[str, np.ndarray]] = {}
    for e in evidence:
        if e.spectrum.per_image is None:
            raise FanlensError(f"the spectrum result of {e.label!r} has no per-image values (saved by an older "
                               f"fanlens); run the analysis again.")
        if rule not in e.spectrum.rules:
            raise FanlensError(f"rule must be one of {e.spectrum.rules} (the rules of {e.label!r}). Got {rule!r}.")
        if tuple(e.probe.provenance.images) != tuple(e.spectrum.provenance.images):
            raise FanlensError(f"the spectrum and the probe of {e.label!r} must come from the same images.")
        d = {"count": e.spectrum.per_image[:, :, e.spectrum.rules.index(rule)],
             "pert": e.probe.per_image[:, :, _column(e.probe, sigma)]}
        n = d["count"].shape[0]
        if e.scores is not None:
            ari = np.asarray(e.scores.ari, dtype=float).T
            if ari.shape != d["count"].shape:
                raise FanlensError(f"the mask scores of {e.label!r} must cover the same images and blocks as its "
                                   f"spectrum ({d['count'].shape}). Got {ari.shape} instead.")
            d["ari"] = ari
        if e.robustness is not None:
            ce = _corruption_error(e.robustness)
            if ce.shape[0] != n or tuple(e.robustness.provenance.images) != tuple(e.spectrum.provenance.images):
                raise FanlensError(f"the robustness result of {e.label!r} must come from the spectrum's images.")
            d["cerr"] = ce
        data[e.label] = d
    rs = _Resampler(evidence, n_boot, seed)
    units = _Units(evidence, n_boot, seed)
    rows: list[ClaimRow] = []
    # the main models; snapshots (step) enter the training series only, heads variants (series "heads") C4 only
    single = [e for e in evidence if e.step is None and e.series != HEADS_SERIES]

    def per_model(claim: str, stat: str, scope: str, evs: Sequence[Evidence], fn: Callable[[Evidence], np.ndarray],
                  null: float, sign: int, note: Callable[[Evidence], str] | str = "") -> None:
        """A row per network, then one per architecture with several networks (hierarchical resampling)."""
        samples = {e.label: fn(e) for e in evs}
        shared = {e.label for e in evs if e.architecture is not None}
        for e in evs:
            r = _row(claim, stat, scope, e.label, samples[e.label], null, sign, rs.n(e.label),
                     data[e.label]["pert"].shape[1], note(e) if callable(note) else note)
            r = _below_minimum(r, _few_blocks(data[e.label]["pert"].shape[1]))
            rows.append(dataclasses.replace(r, level="network") if e.label in shared else r)
        for u in units.of(evs):
            if u.members[0].architecture is not None:
                first = u.members[0]
                r = units.row(u, [samples[e.label] for e in u.members], claim, stat, scope, null, sign,
                              rs.n(first.label), data[first.label]["pert"].shape[1],
                              note(first) if callable(note) else note)
                rows.append(_below_minimum(r, _few_blocks(min(data[e.label]["pert"].shape[1] for e in u.members))))

    # C1 and C3 across blocks, per model
    mids = {}
    for e in single:
        L = data[e.label]["count"].shape[1]
        if L >= 3:
            mids[e.label] = _mid_blocks(L)
    per_model("C1", "c1_spearman", "blocks", single,
              lambda e: spearman(rs.means(e.label, data[e.label]["count"]), rs.means(e.label, data[e.label]["pert"])),
              0.0, +1, lambda e: "trend across blocks: anything that changes with depth correlates; the C1 verdict "
              "rests on c1_within_block" if data[e.label]["count"].shape[1] >= 3 else "fewer than 3 blocks")
    per_model("C1", "c1_within_block", "images", single,
              lambda e: rs.within_block(e.label, data[e.label]["count"], data[e.label]["pert"]), 0.0, +1,
              "per block, Spearman rho across images of count and perturbation; mean over blocks")
    with_mid = [e for e in single if e.label in mids]
    for key, stat in (("count", "c1_count_drop"), ("pert", "c1_perturbation_drop")):
        per_model("C1", stat, "images", with_mid,
                  lambda e, key=key: rs.means(e.label, data[e.label][key][:, mids[e.label]].mean(axis=1)
                                              - data[e.label][key][:, 0]), 0.0, -1)
    with_ari = [e for e in single if "ari" in data[e.label]]
    per_model("C3", "c3_blocks (mask ARI vs -perturbation)", "blocks", with_ari,
              lambda e: spearman(rs.means(e.label, data[e.label]["ari"]), -rs.means(e.label, data[e.label]["pert"])),
              0.0, +1, "trend across blocks: confounded by depth like c1_spearman; the C3 verdict of a model rests "
              "on c3_within_block")
    per_model("C3", "c3_within_block (mask ARI vs -perturbation)", "images", with_ari,
              lambda e: rs.within_block(e.label, data[e.label]["ari"], -data[e.label]["pert"]), 0.0, +1,
              "per block, Spearman rho across images of mask ARI and -perturbation; mean over blocks")
    no_ari = [e for e in single if "ari" not in data[e.label]]
    for e in no_ari:
        r = _not_available("C3", "c3_within_block", "images", e.label, rs.n(e.label), data[e.label]["count"].shape[1])
        rows.append(r if e.architecture is None else dataclasses.replace(r, level="network"))
    for u in units.of(no_ari):
        if u.members[0].architecture is not None:
            r = _not_available("C3", "c3_within_block", "images", u.label, rs.n(u.members[0].label),
                               data[u.members[0].label]["count"].shape[1])
            rows.append(dataclasses.replace(r, level="architecture", n_networks=len(u.members)))

    # C2: decay ratio per model, and transformer minus CNN (per architecture)
    ratios = {}
    for e in single:
        mp = rs.means(e.label, data[e.label]["pert"])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[e.label] = mp[:, -1] / mp[:, 0]
    per_model("C2", "c2_decay_ratio (last / first block)", "images", single, lambda e: ratios[e.label], 1.0, -1)
    cnns = units.of([e for e in single if e.kind == "cnn"])
    trans = units.of([e for e in single if e.kind != "cnn"])
    for t in trans:
        for c in cnns:
            paired = rs.key[t.members[0].label] == rs.key[c.members[0].label]
            rows.append(units.across_row(
                [t, c], lambda v: v[0] - v[1], {u.label: [ratios[e.label] for e in u.members] for u in (t, c)},
                "C2", "c2_ratio_difference (transformer - CNN)", "images", f"{units.name(t)} - {units.name(c)}", 0.0,
                -1, min(rs.n(t.members[0].label), rs.n(c.members[0].label)), 2,
                "" if paired else "independent resamples (different images)"))
            rows[-1] = _below_minimum(rows[-1], _few_blocks(min(data[e.label]["pert"].shape[1]
                                                                for e in t.members + c.members)))

    # C3 across models
    rows += _across("C3", "c3_models", "models", single, data, rs, units)
    # C3 across training, per series
    series: dict[str, list[Evidence]] = {}
    for e in evidence:
        if e.series is not None and e.step is not None and e.series != HEADS_SERIES:
            series.setdefault(e.series, []).append(e)
    for name, evs in series.items():
        evs = sorted(evs, key=lambda e: e.step)
        rows += _across("C3", f"c3_training[{name}]", "snapshots", evs, data, rs, None)
    # C4: heads, per architecture (the networks of one head count form a unit)
    with_heads = [e for e in evidence if e.step is None and e.heads is not None]
    heads_units = sorted(units.of(with_heads), key=lambda u: u.members[0].heads)
    if len({u.members[0].heads for u in heads_units}) >= 3:
        heads = np.array([u.members[0].heads for u in heads_units], dtype=float)
        lab = ", ".join(f"{units.name(u)} ({u.members[0].heads})" for u in heads_units)
        n = min(rs.n(e.label) for e in with_heads)

        def rho(v: list[np.ndarray]) -> np.ndarray:
            rob = np.stack(v, axis=-1)
            return spearman(np.broadcast_to(heads, rob.shape), rob)

        rows.append(units.across_row(
            heads_units, rho, {u.label: [-rs.means(e.label, data[e.label]["pert"])[:, -1] for e in u.members]
                               for u in heads_units},
            "C4", "c4_heads (heads vs -last-block perturbation)", "models", lab, 0.0, +1, n, len(heads_units)))
        if all("cerr" in data[e.label] for e in with_heads):
            rows.append(units.across_row(
                heads_units, rho, {u.label: [-rs.means(e.label, data[e.label]["cerr"]) for e in u.members]
                                   for u in heads_units},
                "C4", "c4_heads (heads vs -corruption error)", "models", lab, 0.0, +1, n, len(heads_units)))
    params = {"n_boot": n_boot, "seed": seed, "sigma": sigma, "rule": rule, "level": LEVEL,
              "mid_depth": list(MID_DEPTH), "min_networks": MIN_NETWORKS,
              "interval": "percentile bootstrap over images (paired across models on the same images); for an "
              "architecture with several networks, hierarchical: networks with replacement, then images",
              "models": [{"label": e.label, "model": e.spectrum.model,
                          "weights_sha256": e.spectrum.provenance.weights_sha256, "heads": e.heads,
                          "series": e.series, "step": e.step, "family": e.kind,
                          "architecture": e.architecture} for e in evidence]}
    return ClaimsResult(rows, params)


@dataclass
class _Unit:
    """One unit of inference: an architecture and its networks; ``m`` the network multiplicities per
    resample ``(1 + n_boot, networks)``, row 0 all ones."""

    label: str
    members: list
    m: np.ndarray


class _Units:
    """The architectures of the evidence and their hierarchical resampling (networks, then images:
    the image weights of :class:`_Resampler` apply inside every drawn network)."""

    def __init__(self, evidence: Sequence[Evidence], n_boot: int, seed: int) -> None:
        groups: dict[str, list[Evidence]] = {}
        for e in evidence:
            groups.setdefault(e.architecture or e.label, []).append(e)
        rng = np.random.default_rng([seed, 1])  # a stream of its own: the image resamples stay as they were
        self.units: dict[str, _Unit] = {}
        for label, members in groups.items():
            k = len(members)
            m = np.ones((1 + n_boot, k)) if k == 1 else bootstrap_weights(k, n_boot, rng)
            self.units[label] = _Unit(label, members, m)
        self.of_label = {e.label: e.architecture or e.label for e in evidence}

    def of(self, evs: Sequence[Evidence]) -> list[_Unit]:
        """The units of ``evs`` (in order of appearance), each restricted to the networks in ``evs``."""
        out: dict[str, list[Evidence]] = {}
        for e in evs:
            out.setdefault(self.of_label[e.label], []).append(e)
        res = []
        for label, members in out.items():
            u = self.units[label]
            keep = [i for i, e in enumerate(u.members) if e in members]
            res.append(_Unit(label, [u.members[i] for i in keep], u.m[:, keep]))
        return res

    @staticmethod
    def name(u: _Unit) -> str:
        return u.label  # an architecture by its name (the networks: n_networks), a network alone by its label

    @staticmethod
    def combine(u: _Unit, samples: Sequence[np.ndarray]) -> np.ndarray:
        """``(1 + n_boot,)``: per resample, the mean over the drawn networks of their statistic."""
        st = np.stack([np.asarray(v, dtype=np.float64) for v in samples], axis=-1)
        with np.errstate(invalid="ignore"):
            return (u.m * st).sum(-1) / len(u.members)

    def row(self, u: _Unit, samples: Sequence[np.ndarray], claim: str, stat: str, scope: str, null: float,
            sign: int, n_images: int, n_units: int, note: str = "") -> ClaimRow:
        """The architecture's row: the mean over its networks, hierarchical interval, and the verdict only
        when every network's own value is on the same side."""
        r = _row(claim, stat, scope, self.name(u), self.combine(u, samples), null, sign, n_images, n_units, note)
        points = [float(v[0]) for v in samples]
        return self._agree(r, u, points, [e.label for e in u.members], null, len(u.members))

    def across_row(self, us: Sequence[_Unit], fn: Callable[[list[np.ndarray]], np.ndarray],
                   samples: dict[str, list[np.ndarray]], claim: str, stat: str, scope: str, models: str,
                   null: float, sign: int, n_images: int, n_units: int, note: str = "") -> ClaimRow:
        """A statistic of several architectures (``fn`` of their combined samples, in the order of ``us``);
        sign agreement over the replicates that take the j-th network of every architecture."""
        value = fn([self.combine(u, samples[u.label]) for u in us])
        r = _row(claim, stat, scope, models, value, null, sign, n_images, n_units, note)
        if all(u.members[0].architecture is None for u in us):
            return r
        k = max(len(u.members) for u in us)
        reps = [float(fn([np.asarray(samples[u.label][min(j, len(u.members) - 1)][..., :1], dtype=np.float64)
                          for u in us])[0]) for j in range(k)]
        names = [f"replicate {j} ({', '.join(u.members[min(j, len(u.members) - 1)].label for u in us)})"
                 for j in range(k)]
        r = dataclasses.replace(r, n_networks=sum(len(u.members) for u in us))
        return self._agree(r, None, reps, names, null, min(len(u.members) for u in us if len(u.members) > 1))

    @staticmethod
    def _agree(r: ClaimRow, u: _Unit | None, points: list[float], names: list[str], null: float,
               k: int) -> ClaimRow:
        r = dataclasses.replace(r, level="architecture", n_networks=max(r.n_networks, len(u.members) if u else 1))
        if r.verdict not in ("holds", "contradicted") or r.value is None:
            return r
        side = np.sign(r.value - null)
        off = [f"{n} {p:.3g}" for n, p in zip(names, points) if not (np.isfinite(p) and np.sign(p - null) == side)]
        why = []
        if off:
            why.append(f"networks disagree in sign ({'; '.join(off)})")
        if k < MIN_NETWORKS:
            why.append(f"{k} networks: an architecture verdict needs at least {MIN_NETWORKS}")
        if why:
            note = "; ".join(why) + f" (the interval alone says {r.verdict})"
            return dataclasses.replace(r, verdict="inconclusive", note=(r.note + "; " if r.note else "") + note)
        return r


def _across(claim: str, stat: str, scope: str, evs: Sequence[Evidence], data: dict, rs: _Resampler,
            units: _Units | None) -> list[ClaimRow]:
    """Spearman rho across units (architectures, snapshots) between grouping score and robustness."""
    us = units.of(evs) if units is not None else [_Unit(e.label, [e], np.ones((1, 1))) for e in evs]
    if len(us) < 3:
        return []
    labels = ", ".join(_Units.name(u) for u in us)
    n = min(rs.n(e.label) for e in evs)
    if not all("ari" in data[e.label] for e in evs):
        return [_not_available(claim, stat, scope, labels, n, len(us))]
    gname = "mean mask ARI"
    out = []
    pairs: list[tuple[str, Callable[[Evidence], np.ndarray]]] = [
        ("-last-block perturbation", lambda e: -rs.means(e.label, data[e.label]["pert"])[:, -1])]
    if all("cerr" in data[e.label] for e in evs):
        pairs.append(("-corruption error", lambda e: -rs.means(e.label, data[e.label]["cerr"])))
    note = "" if len({rs.key[e.label] for e in evs}) == 1 else "independent resamples (different images)"
    g = {u.label: [rs.means(e.label, data[e.label]["ari"]).mean(axis=1) for e in u.members] for u in us}

    for rname, fn in pairs:
        r = {u.label: [fn(e) for e in u.members] for u in us}
        samples = {u.label: [np.stack([a, b]) for a, b in zip(g[u.label], r[u.label])] for u in us}

        def rho(v: list[np.ndarray]) -> np.ndarray:  # v: per unit (2, R) -> spearman across units
            st = np.stack(v, axis=-1)  # (2, R, units)
            return spearman(st[0], st[1])

        if units is None:
            out.append(_row(claim, f"{stat} ({gname} vs {rname})", scope, labels, rho([samples[u.label][0] for u in us]),
                            0.0, +1, n, len(us), note))
        else:
            out.append(units.across_row(us, rho, samples, claim, f"{stat} ({gname} vs {rname})", scope, labels, 0.0,
                                        +1, n, len(us), note))
    return out
