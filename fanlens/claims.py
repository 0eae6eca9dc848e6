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

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._validation import FanlensError, check_positive_int, check_seed
from .results import ProbeResult, RobustnessResult, SpectrumResult, rows_to_csv, versions, write_atomic

__all__ = ["Evidence", "ClaimRow", "ClaimsResult", "check", "spearman", "bootstrap_weights", "VERDICTS", "C3_NOT_AVAILABLE",
           "DEFAULT_N_BOOT", "MID_DEPTH", "CSV_FIELDS", "HEADS_SERIES"]

VERDICTS = ("holds", "contradicted", "inconclusive")
DEFAULT_N_BOOT = 1000
MID_DEPTH = (0.3, 0.7)
LEVEL = 0.95
HEADS_SERIES = "heads"  # Evidence.series of models that only enter C4 (the heads variants)
CSV_FIELDS = ("claim", "statistic", "scope", "models", "value", "ci_low", "ci_high", "null", "expected", "verdict",
              "n_images", "n_units", "note")


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
            n = f"{r.n_images} images" + (f", {r.n_units} {r.scope}" if r.scope != "images" else "")
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
                           ("claims.json", json.dumps({"parameters": self.parameters, "versions": versions()},
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
        w = self.weights[self.key[label]].astype(np.int64)
        n = w.shape[1]
        idx = np.stack([np.repeat(np.arange(n), row) for row in w])  # (R, n) the images each resample draws
        rho = spearman(np.asarray(x, float)[idx].transpose(0, 2, 1), np.asarray(y, float)[idx].transpose(0, 2, 1))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with every block constant: NaN
            return np.nanmean(rho, axis=-1)


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
    return ClaimRow(claim, statistic, scope, models, point, lo, hi, null, expected, _verdict(lo, hi, null, sign),
                    n_images, n_units, note)


def _column(res: ProbeResult, sigma: float | None) -> int:
    if res.per_image is None:
        raise FanlensError(f"the probe result of {res.model!r} has no per-image values (saved by an older fanlens); "
                           f"run the analysis again.")
    if res.mode == "pure_vs_clean":  # one column: pure N(0, 1) inputs against the clean images
        return 0
    if res.perturbations or res.mode != "additive":
        raise FanlensError("probe must be an additive Gaussian-noise probe (sigmas), not a corruption or pure-noise "
                           f"probe. Got mode={res.mode!r}, perturbations={list(res.perturbations)}.")
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
    sigma: float | None = None,
    rule: str | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> ClaimsResult:
    """Compute every claim the evidence allows, with 95 % bootstrap intervals and verdicts.

    Args:
        evidence: one :class:`Evidence` per model (trained models; snapshots and heads
            variants carry ``series``/``step`` and ``heads``).
        sigma: the probe's noise level used as "perturbation" (default 0.1 when present,
            else the largest).
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
    rows: list[ClaimRow] = []
    # the main models; snapshots (step) enter the training series only, heads variants (series "heads") C4 only
    single = [e for e in evidence if e.step is None and e.series != HEADS_SERIES]

    # C1 and C3 across blocks, per model
    for e in single:
        d, n = data[e.label], rs.n(e.label)
        L = d["count"].shape[1]
        mc, mp = rs.means(e.label, d["count"]), rs.means(e.label, d["pert"])
        rows.append(_row("C1", "c1_spearman", "blocks", e.label, spearman(mc, mp), 0.0, +1, n, L,
                         "trend across blocks: anything that changes with depth correlates; the C1 verdict rests "
                         "on c1_within_block" if L >= 3 else "fewer than 3 blocks"))
        rows.append(_row("C1", "c1_within_block", "images", e.label, rs.within_block(e.label, d["count"], d["pert"]),
                         0.0, +1, n, L, "per block, Spearman rho across images of count and perturbation; mean over "
                         "blocks"))
        if L >= 3:
            mid = _mid_blocks(L)
            for key, stat in (("count", "c1_count_drop"), ("pert", "c1_perturbation_drop")):
                diff = d[key][:, mid].mean(axis=1) - d[key][:, 0]
                rows.append(_row("C1", stat, "images", e.label, rs.means(e.label, diff), 0.0, -1, n, L))
        if "ari" in d:
            rows.append(_row("C3", "c3_blocks (mask ARI vs -perturbation)", "blocks", e.label,
                             spearman(rs.means(e.label, d["ari"]), -mp), 0.0, +1, n, L))
        else:
            rows.append(_not_available("C3", "c3_blocks", "blocks", e.label, n, L))

    # C2: decay ratio per model, and transformer minus CNN
    ratios = {}
    for e in single:
        mp = rs.means(e.label, data[e.label]["pert"])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[e.label] = mp[:, -1] / mp[:, 0]
        rows.append(_row("C2", "c2_decay_ratio (last / first block)", "images", e.label, ratios[e.label], 1.0, -1,
                         rs.n(e.label), data[e.label]["pert"].shape[1]))
    cnns = [e for e in single if e.kind == "cnn"]
    trans = [e for e in single if e.kind != "cnn"]
    for t in trans:
        for c in cnns:
            paired = rs.key[t.label] == rs.key[c.label]
            rows.append(_row("C2", "c2_ratio_difference (transformer - CNN)", "images", f"{t.label} - {c.label}",
                             ratios[t.label] - ratios[c.label], 0.0, -1, min(rs.n(t.label), rs.n(c.label)), 2,
                             "" if paired else "independent resamples (different images)"))

    # C3 across models
    rows += _across("C3", "c3_models", "models", single, data, rs)
    # C3 across training, per series
    series: dict[str, list[Evidence]] = {}
    for e in evidence:
        if e.series is not None and e.step is not None and e.series != HEADS_SERIES:
            series.setdefault(e.series, []).append(e)
    for name, evs in series.items():
        evs = sorted(evs, key=lambda e: e.step)
        rows += _across("C3", f"c3_training[{name}]", "snapshots", evs, data, rs)
    # C4: heads
    with_heads = sorted((e for e in evidence if e.step is None and e.heads is not None), key=lambda e: e.heads)
    if len({e.heads for e in with_heads}) >= 3:
        heads = np.array([e.heads for e in with_heads], dtype=float)
        lab = ", ".join(f"{e.label} ({e.heads})" for e in with_heads)
        n = min(rs.n(e.label) for e in with_heads)
        rob = np.stack([-rs.means(e.label, data[e.label]["pert"])[:, -1] for e in with_heads], axis=-1)
        rows.append(_row("C4", "c4_heads (heads vs -last-block perturbation)", "models", lab,
                         spearman(np.broadcast_to(heads, rob.shape), rob), 0.0, +1, n, len(with_heads)))
        if all("cerr" in data[e.label] for e in with_heads):
            rob = np.stack([-rs.means(e.label, data[e.label]["cerr"]) for e in with_heads], axis=-1)
            rows.append(_row("C4", "c4_heads (heads vs -corruption error)", "models", lab,
                             spearman(np.broadcast_to(heads, rob.shape), rob), 0.0, +1, n, len(with_heads)))
    params = {"n_boot": n_boot, "seed": seed, "sigma": sigma, "rule": rule, "level": LEVEL,
              "mid_depth": list(MID_DEPTH), "interval": "percentile bootstrap over images (paired across models "
              "on the same images)",
              "models": [{"label": e.label, "model": e.spectrum.model,
                          "weights_sha256": e.spectrum.provenance.weights_sha256, "heads": e.heads,
                          "series": e.series, "step": e.step, "family": e.kind} for e in evidence]}
    return ClaimsResult(rows, params)


def _across(claim: str, stat: str, scope: str, evs: Sequence[Evidence], data: dict, rs: _Resampler) -> list[ClaimRow]:
    """Spearman rho across units (models, snapshots) between grouping score and robustness."""
    if len(evs) < 3:
        return []
    labels = ", ".join(e.label for e in evs)
    n = min(rs.n(e.label) for e in evs)
    if not all("ari" in data[e.label] for e in evs):
        return [_not_available(claim, stat, scope, labels, n, len(evs))]
    g = np.stack([rs.means(e.label, data[e.label]["ari"]).mean(axis=1) for e in evs], axis=-1)
    gname = "mean mask ARI"
    out = []
    pairs: list[tuple[str, Callable[[Evidence], np.ndarray]]] = [
        ("-last-block perturbation", lambda e: -rs.means(e.label, data[e.label]["pert"])[:, -1])]
    if all("cerr" in data[e.label] for e in evs):
        pairs.append(("-corruption error", lambda e: -rs.means(e.label, data[e.label]["cerr"])))
    for rname, fn in pairs:
        r = np.stack([fn(e) for e in evs], axis=-1)
        note = "" if len({rs.key[e.label] for e in evs}) == 1 else "independent resamples (different images)"
        out.append(_row(claim, f"{stat} ({gname} vs {rname})", scope, labels, spearman(g, r), 0.0, +1, n, len(evs),
                        note))
    return out
