"""The main job, ``fanlens reproduce``: the paper's Figure 3 and Figure 4 analyses, end to end.

With no models given it runs offline on the embedded zoo (ViT, FAN, CNN trained on the
procedural shapes) and a fixed set of held-out generated images with object masks. With
models given (timm names, FAN names, factories) it runs the paper's setting on real
images. Every model is paired with its random-init twin as the baseline.

Per model it computes the spectrum, the noise probe (several sigma), groups with 2
clusters scored against the masks (when masks exist) and groups with 4 clusters for the
Figure 4 panels; then writes the figures, ``results.csv`` and ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import analysis, claims, spectral
from . import grid as grid_mod
from ._validation import FanlensError, check_positive_int, check_seed
from .grouping import GroupingScores, mask_scores
from .models import LoadedModel, build_model
from .corruptions import BENCHMARK
from .data import data_config, resolve_images
from .execution import record as execution_record
from .results import (GroupsResult, ProbeResult, RobustnessResult, SpectrumResult, rows_to_csv, save_png, versions,
                      write_atomic)
from . import runner
from .robustness import corruption_errors, robustness_part
from .colouring import colouring_part
from .runner import OutputFolder

__all__ = ["Comparison", "compare", "ModelRun", "ReproduceResult", "reproduce", "TrainingDynamics", "training_dynamics", "DEFAULT_SIGMAS", "DEFAULT_N_IMAGES", "RANDOM_SUFFIX"]

_log = logging.getLogger(__name__)

DEFAULT_SIGMAS = (0.05, 0.1, 0.2)
DEFAULT_N_IMAGES = 64
GRID_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0)
"""The noise levels of the specification grid, in pixel and in normalised input space (1 in normalised
space is the paper's N(0, 1))."""
GRID_RULES = ("rel_threshold", "eigengap", "effective_rank")
GRID_PROBES = (("pixel", "additive"), ("pixel", "additive+layernorm"), ("normalized", "additive"),
               ("normalized", "additive+layernorm"))
SKIPPABLE = ("groups", "robustness")
"""Parts of ``reproduce`` that can be left out: the token groups (Figure 4, mask agreement, spectral colours)
and the corruption grid (robustness, the probe under corruptions, C2's corruption error, C4)."""
DEFAULT_OUT = "fanlens_out/reproduce"
MASK_CLUSTERS = 2
FIGURE4_CLUSTERS = 4
FIGURE4_IMAGES = (0, 1, 2)
CORRUPTION_PROBE_SEVERITY = 3
DECODE_LIMIT_BYTES = 2 * 2**30  # reproduce keeps the decoded images in memory up to this size
TRAINING_SEVERITIES = (3,)  # training-dynamics: corrupted accuracy at severity 3 (15 cells per snapshot)
ROBUSTNESS_BASELINE = "CNN"  # the zoo's CE / mCE are normalised by the zoo CNN
RANDOM_SUFFIX = "@random-init"
ZOO_LABELS = {"vit": "ViT", "fan": "FAN", "cnn": "CNN"}
_ZOO_SHORT = {v: k for k, v in ZOO_LABELS.items()}


@dataclass
class ModelRun:
    """Every result of one model (trained or its random-init twin)."""

    label: str
    short: str
    trained: bool
    spectrum: SpectrumResult
    probe: ProbeResult
    groups: GroupsResult | None
    scores: GroupingScores | None
    robustness: RobustnessResult | None = None
    corruption_probe: ProbeResult | None = None
    heads: int | None = None
    colours: Any = None  # SpectralColours of the Figure 4 images, for the report's viewer
    alone: bool = False  # a model without weights, analysed as a random-init model only (no twin, no claims)
    pure_probe: ProbeResult | None = None  # pure N(0, 1) inputs, feature norm / the clean images' (Figure 3c input)
    grid_probes: dict = field(default_factory=dict)  # (space, measure) -> additive ProbeResult at GRID_SIGMAS
    noise_accuracy: dict = field(default_factory=dict)  # (space, sigma) -> accuracy (or agreement with the clean
    # prediction without labels) under the grid's noise, from the same forward passes
    chance: float | None = None  # the accuracy up to which a model counts as at chance (see _chance_level)
    clean_accuracy: float | None = None  # top-1 on the clean images (1.0 without labels: agreement with itself)
    damage: dict = field(default_factory=dict)  # space -> {"sigma", "accuracy"}: the damage-matched level
    damage_probes: dict = field(default_factory=dict)  # (space, measure) -> ProbeResult at damage[space]["sigma"]
    architecture: str | None = None  # the unit of inference when an architecture has several networks (seeds)

    def evidence(self, series: str | None = None, probe: ProbeResult | None = None) -> claims.Evidence:
        """This run as input of :func:`fanlens.claims.check` (``probe``: another probe of the same
        images, e.g. one cell of the specification grid)."""
        return claims.Evidence(self.label, self.spectrum, self.probe if probe is None else probe, scores=self.scores,
                               robustness=self.robustness, heads=self.heads, series=series,
                               architecture=self.architecture)

    def rows(self) -> list[dict]:
        rows = self.spectrum.rows() + self.probe.rows()
        if self.scores is not None:
            rows += self.scores.rows()
        for extra in (self.robustness, self.corruption_probe, self.pure_probe):
            if extra is not None:
                rows += extra.rows()
        for r in rows:
            r["model"] = self.label
        return rows


@dataclass
class ReproduceResult:
    runs: list[ModelRun]
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    claims: claims.ClaimsResult | None = None
    heads_runs: list[ModelRun] = field(default_factory=list)
    grid: Any = None  # fanlens.grid.GridResult: the claims over the specification grid
    network_runs: list[ModelRun] = field(default_factory=list)  # the zoo's further networks (seeds 1, 2, ...)


def _zoo_images(n: int, seed: int, task: str | None = None):
    from .synthetic import TASKS
    from .zoo import DEFAULT_TASK

    task = DEFAULT_TASK if task is None else task
    ds = TASKS[task](n, seed=seed, split="test")
    x, y, m = ds.batch(range(n))
    prefix = "synthetic" if task == "shapes" else f"synthetic-{task}"  # the shapes task keeps its image names
    return x, m.numpy(), [f"{prefix}:test:{seed}:{i}" for i in range(n)], y


def _pairs(models: Sequence[str] | None, pretrained: bool, checkpoints: Sequence[str] | None,
           seed: int) -> list[tuple[str, Callable[[], LoadedModel], Callable[[], LoadedModel]]]:
    """(short label, trained loader, random-init loader) per model."""
    if not models:
        from . import zoo

        missing = [n for n in zoo.ZOO_NAMES if n not in zoo.available()]
        if missing:
            raise FanlensError(f"the zoo weights of {missing} are not installed; run `fanlens train-zoo NAME` first.")
        return [
            (ZOO_LABELS[n], (lambda n=n: zoo.load(n)), (lambda n=n: zoo.load(n, random_init=True, seed=seed)))
            for n in zoo.ZOO_NAMES
        ]
    checkpoints = list(checkpoints or [])
    if checkpoints and len(checkpoints) != len(models):
        raise FanlensError(
            f"checkpoint must be given once per model ({len(models)}), or not at all. Got {len(checkpoints)} instead."
        )
    if checkpoints and pretrained:
        raise FanlensError("--pretrained and --checkpoint exclude each other; pass one.")
    out = []
    for i, spec in enumerate(models):
        ck = checkpoints[i] if checkpoints else None
        ck = None if ck in (None, "", "none", "-") else ck
        out.append(
            (
                spec,
                (lambda spec=spec, ck=ck: build_model(spec, pretrained=pretrained, checkpoint=ck, seed=seed)),
                (lambda spec=spec: build_model(spec, seed=seed)),
            )
        )
    return out


def _run_one(lm: LoadedModel, label: str, short: str, trained: bool, images: Any, masks: np.ndarray | None,
             sigmas: Sequence[float], seed: int, device: str, batch_size: int, progress: bool,
             labels: Any = None, figures: bool = True, severities: Sequence[int] = (1, 2, 3, 4, 5),
             skip: Sequence[str] = (), grid: bool | None = None, corrupted: Any = None) -> ModelRun:
    """Every analysis of one model from one pass over the images (:func:`runner.stream_parts`):
    each image goes through the model once with its noisy and probe-corrupted copies, under the
    token capture, and feeds the spectrum, the noise probe, the mask groups, the Figure 4 groups
    and colours (first images), the corruption probe and the classification; the other
    corruption cells are forwarded from there without the capture. ``figures=False`` leaves out
    what only the figures use (the Figure 4 groups and colours, the per-family corruption probe); ``skip``
    leaves out parts of :data:`SKIPPABLE`; ``grid`` (default: ``trained``) runs the specification grid's probes and
    the damage-matched pass; ``corrupted``: a :class:`fanlens.robustness.CorruptionCache` shared by the models
    of one run (the zoo networks see the same images: each corrupted batch made once)."""
    figures = figures and "groups" not in skip
    if "groups" in skip:
        masks = None
    from .lens import Lens

    lens = Lens(lm, images, batch_size=batch_size, device=device, seed=seed, progress=progress, cache_bytes=0,
                cache_spill=False)  # one pass serves every analysis: nothing to cache
    s = lens.setup
    common = dict(seed=seed, batch_size=batch_size)
    grid = trained if grid is None else grid  # the specification grid's probes: for the models whose claims are checked
    sig = tuple(dict.fromkeys(list(sigmas) + (list(GRID_SIGMAS) if grid else [])))
    part, _key, finish_analysis = analysis.analyze_part(s, sigmas=sig, groups=MASK_CLUSTERS if masks is
                                                        not None else None, **common)
    parts, finish = [part], {}
    if grid:  # the same noisy copies after a per-token LayerNorm, and the normalised-space copies (and theirs)
        finish["pixel/additive+layernorm"] = analysis.token_norm_twin(s, part, sigmas=sig, space="pixel", **common)
        npart, _key, finish["normalized/additive"] = analysis.probe_part(s, sigmas=GRID_SIGMAS, space="normalized",
                                                                          **common)
        finish["normalized/additive+layernorm"] = analysis.token_norm_twin(s, npart, sigmas=GRID_SIGMAS,
                                                                            space="normalized", **common)
        parts.append(npart)
        scored: dict = {}
        part.outputs = _noise_scorer(scored, "pixel", sig, labels)
        npart.outputs = _noise_scorer(scored, "normalized", GRID_SIGMAS, labels)
    # the paper's Figure 3 input: one pure N(0, 1) input per image, its features against the image's
    part, _key, finish["pure"] = analysis.probe_part(s, mode="pure_vs_clean", **common)
    parts.append(part)
    if figures:
        n_vis = min(len(FIGURE4_IMAGES), len(s.images))
        part, finish["groups"] = analysis.groups_part(s, n_clusters=FIGURE4_CLUSTERS, n_images=n_vis, **common)
        parts.append(part)
        part, finish["colours"] = colouring_part(s, n_images=n_vis, **common)
        parts.append(part)
    probe_in_robustness = figures and CORRUPTION_PROBE_SEVERITY in severities
    if trained and "robustness" not in skip:  # a random-init twin is at chance under every corruption
        part, _step, _key, finish["robustness"] = robustness_part(
            s, labels=labels, severities=severities, probe_severity=CORRUPTION_PROBE_SEVERITY if
            probe_in_robustness else None, corrupted=corrupted, **common)
        parts.append(part)
        if figures and not probe_in_robustness:
            part, cparams = analysis.corruption_probe_part(
                s, analysis.parse_corruptions(BENCHMARK, CORRUPTION_PROBE_SEVERITY), seed, batch_size=batch_size,
                processes=1)
            parts.append(part)
            finish["cprobe"] = lambda acc=part.accs[0]: acc.result(
                runner.make_provenance(s, seed, cparams, s.images.names), "pixel")
    lens.run(parts, "all analyses")
    out = finish_analysis()
    spec, probe = lens.record("spectrum", out[0]), lens.record("probe", out[1])
    pure = lens.record("pure_probe", finish["pure"]())
    grid_probes = {("pixel", "additive"): probe} if grid else {}
    for key in ("pixel/additive+layernorm", "normalized/additive", "normalized/additive+layernorm"):
        if key in finish:
            grid_probes[tuple(key.split("/"))] = finish[key]()
    scores = mask_scores(out[2], masks) if masks is not None else None
    vis = lens.record("groups", finish["groups"]()) if figures else None
    colours = finish["colours"]() if figures else None
    rob = cprobe = None
    if trained and "robustness" not in skip:
        rob = lens.record("robustness", finish["robustness"]())
        if probe_in_robustness:
            rob, cprobe = rob
        elif figures:
            cprobe = finish["cprobe"]()
    acc, chance, clean, damage, damage_probes = {}, None, None, {}, {}
    if grid:
        acc = {k: float(np.mean(np.concatenate(v))) for k, v in scored.items() if isinstance(k, tuple)}
        chance = _chance_level(scored["classes"], len(s.images))
        clean = float(np.mean(np.concatenate(scored["clean"])))
        damage, damage_probes = _damage_matched(lens, acc, clean, labels, common)
    return ModelRun(label, short, trained, spec, probe, vis, scores, rob, cprobe, colours=colours, pure_probe=pure,
                    grid_probes=grid_probes, noise_accuracy=acc, chance=chance, clean_accuracy=clean, damage=damage,
                    damage_probes=damage_probes)


def _damage_matched(lens: Any, acc: dict, clean: float, labels: Any, common: dict) -> tuple[dict, dict]:
    """The damage-matched level of the grid: per input space, the sigma at which this model's accuracy
    falls to half of its clean accuracy (:func:`fanlens.grid.damage_matched_sigma`, from the accuracies at
    :data:`GRID_SIGMAS`), and a second pass that probes exactly there (plain and after the per-token
    LayerNorm) and measures the accuracy reached. A space whose accuracy never halves gets no level."""
    s = lens.setup
    parts, finish, scored, damage = [], {}, {}, {}
    for space in ("pixel", "normalized"):
        curve = {sg: acc[(space, sg)] for sg in GRID_SIGMAS if (space, sg) in acc}
        star = grid_mod.damage_matched_sigma(curve, clean) if curve else None
        if star is None:
            continue
        part, _key, finish[(space, "additive")] = analysis.probe_part(s, sigmas=(star,), space=space, **common)
        finish[(space, "additive+layernorm")] = analysis.token_norm_twin(s, part, sigmas=(star,), space=space,
                                                                         **common)
        part.outputs = _noise_scorer(scored, space, (star,), labels)
        parts.append(part)
        damage[space] = {"sigma": star}
    if not parts:
        return {}, {}
    lens.run(parts, "damage-matched noise")
    for space, d in damage.items():
        d["accuracy"] = float(np.mean(np.concatenate(scored[(space, d["sigma"])])))
    return damage, {k: f() for k, f in finish.items()}


def _noise_scorer(scored: dict, space: str, sigmas: Sequence[float], labels: Any):
    """An outputs callback for a probe part: per noisy copy (``sigmas`` without 0, in order) whether each
    image's prediction is right (with ``labels``) or still the clean one (without), into ``scored``."""
    y_all = None if labels is None else np.asarray(labels).reshape(-1)
    nonzero = [v for v in sigmas if v != 0]

    def outputs(out: torch.Tensor, x: torch.Tensor, idx: list[int]) -> None:
        b = x.shape[0]
        pred = out.argmax(-1).cpu().numpy()
        scored["classes"] = int(out.shape[-1])
        ref = y_all[list(idx)] if y_all is not None else pred[:b]
        scored.setdefault("clean", []).append(pred[:b] == ref)
        for j, v in enumerate(nonzero):
            scored.setdefault((space, float(v)), []).append(pred[(j + 1) * b : (j + 2) * b] == ref)

    return outputs


def _chance_level(n_classes: int, n: int) -> float:
    """The accuracy at or below which a model is at chance on ``n`` images: 1 / classes plus 1.96
    binomial standard errors."""
    p = 1.0 / max(n_classes, 1)
    return p + 1.96 * float(np.sqrt(p * (1 - p) / max(n, 1)))


def _row_labels(models: str, members: dict[str, list[str]] | None = None) -> set[str]:
    """The model labels named in a claim row's ``models`` ("ViT", "ViT - CNN", "ViT-h1 (1), ViT-h2 (2)"); an
    architecture ("ViT") stands for its networks (``members``: architecture -> labels)."""
    out = set()
    for part in models.split(", "):
        for p in part.split(" - "):
            name = re.sub(r" \(\d+\)$", "", p.strip())
            out |= set((members or {}).get(name, [name]))
    return out


def _chance_notes(runs: Sequence[ModelRun]):
    """The ``notes`` of :func:`fanlens.grid.evaluate`: the models of a row that are at chance accuracy
    under the cell's noise (their verdicts there say little about robustness)."""
    members: dict[str, list[str]] = {}
    for r in runs:
        if r.architecture is not None:
            members.setdefault(r.architecture, []).append(r.label)

    def note(cell, row) -> str:
        if cell.sigma == grid_mod.DAMAGE_MATCHED:
            levels = [f"{r.label} sigma {r.damage[cell.space]['sigma']:g} (accuracy {r.damage[cell.space]['accuracy']:.2f}"
                      f" of clean {r.clean_accuracy:.2f})" for r in runs
                      if r.label in _row_labels(row.models, members) and cell.space in r.damage]
            missing = [r.label for r in runs if r.label in _row_labels(row.models, members) and r.trained
                       and cell.space not in r.damage]
            return "damage-matched: " + ", ".join(levels) + (
                f"; no level for {', '.join(missing)} (accuracy above half at every sigma)" if missing else "")
        try:
            sg = float(cell.sigma)
        except ValueError:  # the pure-noise input: no accuracy to speak of
            return ""
        named = _row_labels(row.models, members)
        low = [f"{r.label} {r.noise_accuracy[(cell.space, sg)]:.2f}" for r in runs
               if r.label in named and r.chance is not None and (cell.space, sg) in r.noise_accuracy
               and r.noise_accuracy[(cell.space, sg)] <= r.chance]
        return f"at chance accuracy at this sigma ({', '.join(low)})" if low else ""

    return note


def _grid_cells(runs: Sequence[ModelRun], heads_runs: Sequence[ModelRun]) -> list:
    """``(cell, evidence, check kwargs)`` for every specification of the grid: each rule of
    :data:`GRID_RULES` the spectra have, with each additive probe of :data:`GRID_PROBES` at each sigma of
    :data:`GRID_SIGMAS`, and with the pure-noise probe (``pure_vs_clean``)."""
    units = [(r, None) for r in runs if r.trained] + [(r, claims.HEADS_SERIES) for r in heads_runs]
    rules = [rule for rule in GRID_RULES if all(rule in r.spectrum.rules for r, _ in units)]
    cells = []
    for rule in rules:
        for space, measure in GRID_PROBES:
            for sg in GRID_SIGMAS:
                ev = [r.evidence(series, r.grid_probes[(space, measure)]) for r, series in units]
                cells.append((grid_mod.Cell(f"{sg:g}", space, measure, rule), ev, dict(sigma=sg, rule=rule)))
        for space, measure in GRID_PROBES:  # each model at the sigma where its own accuracy halves
            ev = [r.evidence(series, r.damage_probes[(space, measure)]) for r, series in units
                  if (space, measure) in r.damage_probes]
            if ev:
                cells.append((grid_mod.Cell(grid_mod.DAMAGE_MATCHED, space, measure, rule), ev,
                              dict(sigma=claims.EACH_SIGMA, rule=rule)))
        ev = [r.evidence(series, r.pure_probe) for r, series in units]
        cells.append((grid_mod.Cell("N(0,1)", "normalized", "pure_vs_clean", rule), ev, dict(rule=rule)))
    return cells


def _decode_once(images: Any, lm: LoadedModel, cache: dict, n_images: int | None = None) -> Any:
    """The images (the first ``n_images``) decoded once per preprocessing and kept for every
    analysis of the run, when they fit in :data:`DECODE_LIMIT_BYTES`; otherwise each analysis
    reads them again."""
    if isinstance(images, torch.Tensor):
        return images[:n_images] if n_images is not None else images
    cfg = data_config(lm.model)
    if cfg not in cache:
        cache[cfg] = resolve_images(images, cfg).first(n_images).decoded(DECODE_LIMIT_BYTES)
        if not cache[cfg].in_memory:
            _log.info("the images would take more than %d bytes decoded: each analysis reads them again",
                      DECODE_LIMIT_BYTES)
    return cache[cfg]


def _check_skip(skip: Sequence[str] | str) -> tuple[str, ...]:
    items = [v.strip() for v in skip.split(",") if v.strip()] if isinstance(skip, str) else list(skip)
    for v in items:
        if v not in SKIPPABLE:
            raise FanlensError(f"skip must name parts among {SKIPPABLE}. Got {v!r} instead.")
    return tuple(dict.fromkeys(items))


MAX_ZOO_IMAGES = 100_000
"""The most procedural images a zoo run renders (kept in memory, 48 KiB each as float pixels)."""


def _check_run_args(n_images: Any, seed: Any, batch_size: Any, sigmas: Any) -> tuple[float, ...]:
    check_positive_int("n_images", n_images, maximum=MAX_ZOO_IMAGES,
                       why="procedural images are rendered into memory, 48 KiB each")
    check_seed(seed)
    check_positive_int("batch_size", batch_size)
    return analysis.parse_sigmas(sigmas)


def _normalise_errors(runs: list[ModelRun]) -> None:
    """CE and mCE of the zoo models against the zoo CNN (top-1 errors only); a corruption under which
    the CNN makes no error on these images has no CE and is left out of the mCE (NaN CE)."""
    base = next((r.robustness for r in runs if r.trained and r.short == ROBUSTNESS_BASELINE and r.robustness
                 is not None and r.robustness.metric == "top1_error"), None)
    if base is None:
        return
    for r in runs:
        rob = r.robustness
        if rob is None or rob.metric != "top1_error":
            continue
        label, ce, rel, mce, rmce = corruption_errors(np.asarray(rob.mean), float(rob.clean[0]), rob.corruptions,
                                                      rob.severities, base, skip_undefined=True)
        r.robustness = dataclasses.replace(rob, baseline=label, ce=ce, relative_ce=rel, mce=mce, relative_mce=rmce)


def _save_fig(fig, path: Path) -> None:
    save_png(fig, path, dpi=120)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s).strip("_").lower()


def _figures(runs: list[ModelRun], out: Path, sigmas: Sequence[float], heads_runs: Sequence[ModelRun] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plotting

    trained = [r for r in runs if r.trained or r.alone]
    twins = {r.short: r for r in runs if not r.trained and not r.alone}
    sig = 0.1 if 0.1 in sigmas else max(sigmas)
    # Figure 3a/3b per model
    for r in trained:
        fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
        b = twins.get(r.short)
        plotting.plot_figure3ab(r.spectrum, r.probe, baseline_spectrum=b.spectrum if b else None,
                                baseline_probe=b.probe if b else None, sigma=sig, ax=ax, title=r.label)
        _save_fig(fig, out / f"figure3ab_{_slug(r.short)}.png")
    # Figure 3c: perturbation over relative depth, one panel per sigma
    fig, axes = plt.subplots(1, len(sigmas), figsize=(4.2 * len(sigmas), 3.6), layout="constrained", squeeze=False)
    for ax, s in zip(axes[0], sigmas):
        plotting.plot_depth_comparison({r.short: r.probe for r in trained}, sigma=s,
                                       baselines={k: v.probe for k, v in twins.items()}, ax=ax)
    _save_fig(fig, out / "figure3c.png")
    # Figure 3c with the paper's input: pure N(0, 1) noise, its feature norm / the clean images' (same block)
    fig, ax = plt.subplots(figsize=(5.2, 3.6), layout="constrained")
    plotting.plot_pure_vs_clean({r.short: r.pure_probe for r in trained if r.pure_probe is not None},
                                baselines={k: v.pure_probe for k, v in twins.items() if v.pure_probe is not None}, ax=ax)
    _save_fig(fig, out / "figure3c_pure_noise.png")
    # Figure 4 per model: trained and random-init rows per image
    for r in (r for r in trained if r.groups is not None):
        rows = [(r.short, r.groups)]
        if r.short in twins:
            rows.append((f"{r.short} (random)", twins[r.short].groups))
        n = min(len(FIGURE4_IMAGES), len(r.groups.images))
        fig = plotting.plot_groups_grid(rows, images=list(range(n)))
        _save_fig(fig, out / f"figure4_{_slug(r.short)}.png")
    # robustness under the ImageNet-C corruptions, and the per-block probe under each family
    robs = {r.short: r.robustness for r in trained if r.robustness is not None}
    if robs:
        _save_fig(plotting.plot_robustness_comparison(robs), out / "robustness.png")
    cps = [r for r in trained if r.corruption_probe is not None]
    if cps:
        fig, axes = plt.subplots(1, len(cps), figsize=(4.6 * len(cps), 3.8), layout="constrained", squeeze=False)
        for ax, r in zip(axes[0], cps):
            plotting.plot_probe_families(r.corruption_probe, r.spectrum, ax=ax)
            ax.set_title(r.label)
        _save_fig(fig, out / "corruption_families.png")
    # C4: robustness against the number of heads (the zoo ViTs of one width)
    with_heads = sorted([r for r in trained if r.heads is not None and r.short == "ViT"] + list(heads_runs),
                        key=lambda r: r.heads)
    if len(with_heads) >= 2:
        _save_fig(plotting.plot_heads({r.heads: (r.probe, r.robustness) for r in with_heads}, sigma=sig),
                  out / "heads.png")
    # grouping against the masks
    if all(r.scores is not None for r in runs):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
        for ax, metric in zip(axes, GroupingScores.METRICS):
            plotting.plot_mask_scores({r.short: r.scores for r in trained}, metric=metric,
                                      baselines={k: v.scores for k, v in twins.items()}, ax=ax)
        _save_fig(fig, out / "figure4_mask_agreement.png")


def _write_outputs(runs: list[ModelRun], out: Path, sigmas: Sequence[float], models, pretrained: bool, checkpoints,
                   image_names, imgs, n_images: int | None, seed: int, checked: claims.ClaimsResult | None,
                   heads_runs: list[ModelRun], skip: Sequence[str] = (), spec_grid: Any = None,
                   network_runs: Sequence[ModelRun] = ()) -> None:
    """Figures, ``results.csv``, ``claims.*`` and ``manifest.json`` of a reproduce run, into ``out``
    (a staging folder). The figures show each architecture's seed-0 network (and its twin); the further
    networks enter the tables and the claims."""
    _figures(runs, out, sigmas, [r for r in heads_runs if "@" not in r.label])
    # tables and provenance
    write_atomic(out / "results.csv", rows_to_csv([row for r in list(runs) + list(network_runs) + heads_runs
                                                   for row in r.rows()]).encode())
    if checked is not None:
        checked.write_files(out)
        write_atomic(out / "claims_default.md", checked.to_markdown().encode())
    if spec_grid is not None:  # claims.csv and claims.md: every cell of the grid and the headline verdicts
        from . import plotting

        spec_grid.write_files(out)
        _save_fig(plotting.plot_claims_grid(spec_grid), out / "claims_grid.png")
    if checked is not None and any(r.value is not None for r in checked.rows):
        from . import plotting

        _save_fig(plotting.plot_claims(checked), out / "claims.png")
    manifest = {
        "kind": "reproduce",
        "parameters": {
            "models": list(models) if models else "zoo", "pretrained": pretrained, "checkpoints": checkpoints,
            "images": image_names if image_names is not None else str(imgs), "n_images": n_images,
            "sigmas": list(sigmas), "seed": seed, "mask_clusters": MASK_CLUSTERS, "skipped": list(skip),
            "figure4_clusters": FIGURE4_CLUSTERS, "default_rule": spectral.DEFAULT_RULE,
            "robustness": {"corruptions": list(BENCHMARK), "severities": [1, 2, 3, 4, 5],
                           "baseline": ROBUSTNESS_BASELINE if not models else None,
                           "corruption_probe_severity": CORRUPTION_PROBE_SEVERITY},
        },
        "versions": versions(),
        "execution": execution_record(),
        "runs": [
            {
                "label": r.label,
                "trained": r.trained,
                "heads": r.heads,
                "architecture": r.architecture,
                **({"caveat": "no weights: analysed as a random-init model only (no twin, no claims)"}
                   if r.alone else {}),
                "spectrum": r.spectrum.manifest(),
                "probe": r.probe.manifest(),
                "groups": r.groups.manifest() if r.groups is not None else None,
                **({"robustness": r.robustness.manifest()} if r.robustness is not None else {}),
                **({"corruption_probe": r.corruption_probe.manifest()} if r.corruption_probe is not None else {}),
                **({"pure_probe": r.pure_probe.manifest()} if r.pure_probe is not None else {}),
            }
            for r in runs
        ],
        "heads_runs": [
            {"label": r.label, "heads": r.heads, "architecture": r.architecture, "spectrum": r.spectrum.manifest(),
             "probe": r.probe.manifest(), **({"robustness": r.robustness.manifest()} if r.robustness is not None else {})}
            for r in heads_runs
        ],
        "network_runs": [
            {"label": r.label, "heads": r.heads, "architecture": r.architecture, "spectrum": r.spectrum.manifest(),
             "probe": r.probe.manifest(), **({"robustness": r.robustness.manifest()} if r.robustness is not None else {})}
            for r in network_runs
        ],
        "claims": checked.parameters if checked is not None else None,
        "claims_grid": spec_grid.parameters if spec_grid is not None else None,
    }
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    _write_report(runs, out)


def _write_report(runs: list[ModelRun], out: Path) -> None:
    """The groups and spectral colours of each run's Figure 4 images under ``viewer/`` (what the
    report's block viewer shows), then ``report.html`` from the whole folder."""
    from .reporting import REPORT_NAME, build_html

    for i, r in enumerate(runs):
        if r.groups is None:
            continue
        folder = out / "viewer" / f"{i:02d}_{r.short}{'' if r.trained else '_random_init'}"
        r.groups.write_files(folder)
        if r.colours is not None:
            r.colours.save_npz(folder / "colours.npz")
    write_atomic(out / REPORT_NAME, build_html(out).encode("utf-8"))


def reproduce(
    models: Sequence[str] | None = None,
    *,
    pretrained: bool = False,
    checkpoints: Sequence[str] | None = None,
    images: Any = None,
    out: str | Path = DEFAULT_OUT,
    overwrite: bool = False,
    n_images: int | None = None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    skip: Sequence[str] | str = (),
) -> ReproduceResult:
    """Run the Figure 3 / Figure 4 analyses and write figures and tables into ``out``.

    Args:
        models: model specs; ``None`` for the embedded zoo (offline).
        pretrained: load each model's pretrained weights (real models).
        checkpoints: one local weights file per model (real models).
        images: images for real models (folder, files, ``"samples"``); the zoo uses
            ``n_images`` held-out procedural images with masks.
        n_images: the zoo's held-out images (default :data:`DEFAULT_N_IMAGES`); with real models,
            the first ``n_images`` of ``images`` (default: all).
        skip: parts to leave out, from :data:`SKIPPABLE` (a list or comma-separated).
        sigmas: noise levels of the probe (pixel space).
        out: output folder, new or empty unless ``overwrite=True`` (checked before any
            analysis; the files are written as one unit, see :class:`fanlens.runner.OutputFolder`).
    """
    t0 = time.perf_counter()
    say = log or (lambda s: None)
    skip = _check_skip(skip)
    zoo_run = not models
    if n_images is None and zoo_run:
        n_images = DEFAULT_N_IMAGES
    sigmas = _check_run_args(n_images if n_images is not None else 1, seed, batch_size, sigmas)
    if not models and images is not None:
        raise FanlensError("images applies to real models; the zoo uses its own held-out images with masks.")
    pairs = _pairs(models, pretrained, checkpoints, seed)
    folder = OutputFolder(out, overwrite=overwrite, command="reproduce")
    if models:
        imgs = "samples" if images is None else images
        masks = None
        image_names = None
        labels = None
    else:
        imgs, masks, image_names, labels = _zoo_images(n_images, seed)
    runs: list[ModelRun] = []
    decoded: dict = {}
    from .robustness import CorruptionCache

    # the zoo's networks' robustness grids run over the same held-out images: each batch corrupted once (64
    # images of 64 x 64 x 75 cells: 236 MiB held; real models' runs corrupt per model, no memory held)
    corrupted = CorruptionCache(512 * 2**20) if zoo_run else None
    for short, load_trained, load_random in pairs:
        for trained, loader in ((True, load_trained), (False, load_random)):
            lm = loader()
            alone = trained and lm.weights == "random init"
            if alone:  # no weights: not paired with itself, and left out of the claims
                _log.warning("%s has no weights (no --pretrained or --checkpoint): analysed as a random-init model "
                             "only, without a twin and without claims", lm.name)
            label = lm.name if trained and not alone else f"{lm.name}{RANDOM_SUFFIX}"
            say(f"analysing {label}")
            run = _run_one(lm, label, short, trained and not alone,
                           _decode_once(imgs, lm, decoded, None if zoo_run else n_images), masks, sigmas, seed,
                           device, batch_size, progress, labels, skip=skip, corrupted=corrupted)
            run.alone = alone
            runs.append(run)
            if alone:
                break
    heads_runs: list[ModelRun] = []
    network_runs: list[ModelRun] = []
    if not models:
        from . import zoo

        for r in runs:
            r.heads = zoo.HEADS.get(_ZOO_SHORT.get(r.short, ""))
        for name in zoo.ZOO_NAMES:  # the further networks of each architecture (seed 0 ran above, with its twin)
            for k in zoo.networks(name)[1:]:
                lm = zoo.load(zoo.network_name(name, k))
                say(f"analysing {lm.name}")
                run = _run_one(lm, lm.name, ZOO_LABELS[name], True, imgs, masks, sigmas, seed, device, batch_size,
                               progress, labels, figures=False, skip=skip, corrupted=corrupted)
                run.heads = zoo.HEADS.get(name)
                network_runs.append(run)
        for name in (n for n in zoo.HEAD_VARIANTS if n in zoo.available()):
            for k in zoo.networks(name):
                lm = zoo.load(zoo.network_name(name, k))
                say(f"analysing {lm.name} (heads, claim C4)")
                # C4 reads the perturbation and the corruption error: no groups needed
                run = _run_one(lm, lm.name, name, True, imgs, None, sigmas, seed, device, batch_size, progress,
                               labels, figures=False, skip=skip, corrupted=corrupted)
                run.heads = zoo.HEADS[name]
                heads_runs.append(run)
        _set_architectures([r for r in runs if r.trained] + network_runs + heads_runs)
    if corrupted is not None and (corrupted.hits or corrupted.misses):
        say(f"corrupted batches: {corrupted.misses} made, {corrupted.hits} reused ({corrupted.bytes / 2**20:.0f} MiB held)")
    del corrupted
    _normalise_errors(runs + network_runs + heads_runs)
    evidence = ([r.evidence() for r in runs + network_runs if r.trained]
                + [r.evidence(claims.HEADS_SERIES) for r in heads_runs])
    checked = spec_grid = None
    if evidence:
        say("checking the claims (bootstrap over images)")
        checked = claims.check(evidence, sigma=0.1 if 0.1 in sigmas else None, seed=seed)
        say("checking the claims over the specification grid")
        spec_grid = grid_mod.evaluate(_grid_cells(runs + network_runs, heads_runs), seed=seed,
                                      notes=_chance_notes([r for r in runs + network_runs + heads_runs if r.trained]))
    else:
        say("no model with weights: no claims are checked")
    with folder.staging() as out:
        _write_outputs(runs, out, sigmas, models, pretrained, checkpoints, image_names, imgs, n_images, seed,
                       checked, heads_runs, skip, spec_grid, network_runs)
    return ReproduceResult(runs, folder.written, time.perf_counter() - t0, checked, heads_runs, spec_grid,
                           network_runs)


def _set_architectures(runs: Sequence[ModelRun]) -> None:
    """The zoo architectures with several networks become units of inference (``ModelRun.architecture``:
    ``ViT``, ``FAN``, ``CNN``, ``vit-h1``, ...); an architecture with one network stays a model of its own."""
    by: dict[str, list[ModelRun]] = {}
    for r in runs:
        by.setdefault(r.short, []).append(r)
    for short, members in by.items():
        if len(members) > 1:
            for r in members:
                r.architecture = short


# --------------------------------------------------------------------------- several models, a few lines
@dataclass
class Comparison:
    """Spectrum, probe (and groups) of several models on the same images.

    Attributes:
        results: label -> ``(SpectrumResult, ProbeResult)``.
        groups: label -> :class:`GroupsResult` (empty unless ``n_clusters`` was given).
        seconds: wall time of the whole comparison.
    """

    results: dict[str, tuple[SpectrumResult, ProbeResult]]
    groups: dict[str, GroupsResult] = field(default_factory=dict)
    seconds: float = 0.0

    def plot(self, *, sigma: float | None = None, rule: str | None = None, fig=None):
        """Counts and perturbation over relative depth, one line per model (see
        :func:`fanlens.plotting.plot_comparison`); returns the Figure."""
        from .plotting import plot_comparison

        return plot_comparison(self.results, sigma=sigma, rule=rule, fig=fig)

    def plot_groups(self, *, images: Sequence[int] = (0,), fig=None):
        """Grouped tokens of every block, one row per model and image; returns the Figure."""
        from .plotting import plot_groups_grid

        if not self.groups:
            raise FanlensError("groups were not computed: call compare(..., n_clusters=K).")
        return plot_groups_grid(list(self.groups.items()), images=images, fig=fig)

    def rows(self) -> list[dict]:
        """Tidy rows (:data:`~fanlens.results.CSV_COLUMNS`), ``model`` set to each label."""
        rows = []
        for label, (spec, probe) in self.results.items():
            for r in spec.rows() + probe.rows():
                rows.append({**r, "model": label})
        return rows

    def to_csv(self) -> str:
        return rows_to_csv(self.rows())


def compare(
    models: dict[str, Any],
    images: Any = "samples",
    *,
    sigmas: Sequence[float] | float | str = DEFAULT_SIGMAS,
    n_clusters: int | None = None,
    group_images: int = 3,
    pretrained: bool = False,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    **kwargs: Any,
) -> Comparison:
    """Run :func:`fanlens.analyze` (and, with ``n_clusters``, :func:`fanlens.group_tokens`
    on the first ``group_images`` images) on every model with the same images and noise.

    Args:
        models: label -> model (a module, a spec string such as ``"zoo:fan"`` or a
            :class:`~fanlens.models.LoadedModel`). Labels ending in ``"(random init)"``
            are drawn dashed by :meth:`Comparison.plot`.
        images: as in :func:`fanlens.spectrum`.
        pretrained: load timm's pretrained weights for models given as names (download).
        kwargs: passed to :func:`fanlens.analyze` (``rules``, ``blocks``, ``input_size``, ...).
    """
    if not isinstance(models, dict) or not models:
        raise FanlensError(f"models must map at least one label to a model. Got {models!r} instead.")
    check_positive_int("group_images", group_images)
    t0 = time.perf_counter()
    out = Comparison({})
    common = dict(seed=seed, device=device, batch_size=batch_size, progress=progress)
    for label, model in models.items():
        lm = model if isinstance(model, LoadedModel) else build_model(model, pretrained=pretrained, seed=seed)
        out.results[label] = analysis.analyze(lm, images, sigmas=sigmas, **common, **kwargs)
        if n_clusters is not None:
            out.groups[label] = analysis.group_tokens(lm, images, n_clusters=n_clusters, n_images=group_images,
                                                      **common,
                                                      **{k: v for k, v in kwargs.items() if k in _GROUP_KEYS})
    out.seconds = time.perf_counter() - t0
    return out


_GROUP_KEYS = ("blocks", "affinity", "center", "knn", "token_budget", "input_size", "num_prefix_tokens", "layout",
               "grid")


# --------------------------------------------------------------------------- how grouping emerges in training
@dataclass
class TrainingDynamics:
    """Per architecture, per training snapshot: the analyses of :func:`reproduce` and the claim C3
    across training.

    Attributes:
        runs: architecture -> {step: :class:`ModelRun`}.
        val_accuracy: architecture -> {step: validation accuracy from the training card}.
        claims: :class:`fanlens.claims.ClaimsResult` (C3 across the snapshots of each series).
    """

    runs: dict[str, dict[int, ModelRun]]
    val_accuracy: dict[str, dict[int, float]]
    claims: claims.ClaimsResult | None = None
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _zoo_network(name: Any) -> bool:
    from . import zoo

    try:
        zoo.parse_network(name)
    except FanlensError:
        return False
    return "/" not in name


def _snapshot_cards(folder: Path) -> dict[str, dict]:
    from . import zoo

    cards = {}
    for p in sorted(folder.glob("*.json")):
        try:
            card = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise FanlensError(f"snapshots folder {str(folder)!r}: {p.name} is not a readable card ({e}).") from None
        if isinstance(card, dict) and card.get("snapshots") and _zoo_network(card.get("name")):
            cards[card["name"]] = card
    if not cards:
        raise FanlensError(f"snapshots must name a folder written by `fanlens train-zoo NAME --snapshots ...` (cards "
                           f"NAME.json listing snapshots). Got {str(folder)!r}, which has none.")
    return cards


def training_dynamics(
    snapshots: str | Path,
    *,
    out: str | Path = "fanlens_out/training-dynamics",
    overwrite: bool = False,
    n_images: int = DEFAULT_N_IMAGES,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
    severities: Sequence[int] = TRAINING_SEVERITIES,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainingDynamics:
    """Analyse the training snapshots of zoo models: count, perturbation, mask agreement, clean
    and corrupted accuracy per snapshot, C3 across training, one figure per architecture.

    Args:
        snapshots: a folder written by ``fanlens train-zoo NAME --snapshots 0,5,20,50,100``.
        out: output folder (new or empty unless ``overwrite``): ``results.csv``, ``claims.*``,
            ``training_NAME.png``, ``manifest.json``.
        n_images, sigmas, seed: as in :func:`reproduce` (the same held-out images).
        severities: the corrupted accuracy is the mean over the 15 ImageNet-C corruptions at
            these severities (default 3 alone: a fifth of the full grid's cost per snapshot).
    """
    from . import plotting, zoo
    from .models import build_model

    t0 = time.perf_counter()
    say = log or (lambda s: None)
    sigmas = _check_run_args(n_images, seed, batch_size, sigmas)
    src = Path(snapshots)
    if not src.is_dir():
        raise FanlensError(f"snapshots must be a folder. Got {str(src)!r} instead.")
    cards = _snapshot_cards(src)
    for name, card in cards.items():
        for snap in card["snapshots"]:
            if not (src / snap["file"]).is_file():
                raise FanlensError(f"snapshots folder {str(src)!r} lacks {snap['file']} listed in {name}.json.")
    tasks = {card.get("data", {}).get("task", "shapes") for card in cards.values()}
    if len(tasks) != 1 or not tasks <= set(zoo.TASKS):
        raise FanlensError(f"snapshots must come from one task of {tuple(zoo.TASKS)}; the cards in {str(src)!r} name "
                           f"{sorted(map(str, tasks))}.")
    (task,) = tasks
    folder = OutputFolder(out, overwrite=overwrite, command="training-dynamics")
    imgs, masks, image_names, labels = _zoo_images(n_images, seed, task)
    runs: dict[str, dict[int, ModelRun]] = {}
    val: dict[str, dict[int, float]] = {}
    for name, card in cards.items():
        runs[name], val[name] = {}, {}
        arch = zoo.parse_network(name)[1]
        for snap in card["snapshots"]:
            step = int(snap["step"])
            lm = build_model(f"zoo:{task}/{name}", checkpoint=str(src / snap["file"]), seed=seed)
            label = f"zoo:{name}@step-{step}"
            say(f"analysing {label}")
            run = _run_one(lm, label, name, True, imgs, masks, sigmas, seed, device, batch_size, progress, labels,
                           figures=False, severities=severities, grid=False)
            run.heads = zoo.HEADS.get(arch)
            runs[name][step] = run
            val[name][step] = float(snap["validation_accuracy"])
    evidence = [dataclasses.replace(r.evidence(series=name), step=step)
                for name, by_step in runs.items() for step, r in by_step.items()]
    checked = claims.check(evidence, sigma=0.1 if 0.1 in sigmas else None, seed=seed)
    checked.rows[:] = [r for r in checked.rows if r.statistic.startswith("c3_training")]
    import matplotlib

    matplotlib.use("Agg")
    with folder.staging() as tmp:
        for name, by_step in runs.items():
            fig = plotting.plot_training_dynamics(
                {st: (r.spectrum, r.probe, r.scores, r.robustness, val[name][st]) for st, r in by_step.items()},
                sigma=0.1 if 0.1 in sigmas else None)
            fig.suptitle(f"zoo {name}: {len(by_step)} snapshots of one training run", fontsize=9)
            _save_fig(fig, tmp / f"training_{_slug(name)}.png")
        rows = []
        for name, by_step in runs.items():
            for step, r in by_step.items():
                for row in r.rows():
                    rows.append(row)
                rows.append({"model": r.label, "metric": "validation_accuracy", "statistic": "mean",
                             "value": f"{val[name][step]:.6g}", "n": cards[name]["data"]["val_size"]})
        write_atomic(tmp / "results.csv", rows_to_csv(rows).encode())
        checked.write_files(tmp)
        manifest = {
            "kind": "training-dynamics",
            "parameters": {"snapshots": str(src), "n_images": n_images, "images": image_names, "sigmas": list(sigmas),
                           "seed": seed, "mask_clusters": MASK_CLUSTERS,
                           "robustness": {"corruptions": list(BENCHMARK), "severities": list(severities)}},
            "cards": cards,
            "versions": versions(),
            "execution": execution_record(),
            "runs": [{"label": r.label, "step": st, "spectrum": r.spectrum.manifest(), "probe": r.probe.manifest(),
                      **({"robustness": r.robustness.manifest()} if r.robustness is not None else {})}
                     for by_step in runs.values() for st, r in by_step.items()],
            "claims": checked.parameters,
        }
        write_atomic(tmp / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return TrainingDynamics(runs, val, checked, folder.written, time.perf_counter() - t0)
