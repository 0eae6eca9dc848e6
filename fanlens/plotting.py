"""Figures from results. Plotting never computes an analysis; matplotlib is imported lazily.

Every function takes a result and ``ax=None`` (or ``fig=None``), draws, and returns the
Axes (or Figure); none calls ``show()`` or saves: saving belongs to the CLI/pipeline.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._validation import FanlensError
from .results import GroupsResult, ProbeResult, SpectrumResult

__all__ = [
    "PALETTE",
    "text_problems",
    "plot_heads",
    "plot_claims",
    "plot_claims_grid",
    "plot_training_dynamics",
    "plot_spectrum",
    "plot_rules",
    "plot_probe",
    "plot_groups",
    "plot_figure3ab",
    "plot_depth_comparison",
    "plot_pure_vs_clean",
    "plot_mask_scores",
    "plot_groups_grid",
    "plot_attribution",
    "plot_attribution_groups",
    "plot_attribution_share",
    "plot_probe_flip",
    "plot_comparison",
    "plot_attention",
    "plot_attention_maps",
    "plot_spectral_colour",
    "plot_spectral_colours",
    "plot_robustness",
    "plot_robustness_comparison",
    "plot_probe_families",
]

# Okabe-Ito: colour-blind safe
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    return ax


LEGEND_LABEL_WIDTH = 28  # characters per line of a legend entry beside the axes


def _legend_beside(ax, **kwargs):
    """The axes' legend to the right of its plot, outside it: it never covers a data point, and a
    constrained layout makes room for it (long labels wrapped, see :func:`_wrap_label`)."""
    kwargs.setdefault("fontsize", 7)
    handles, labels = ax.get_legend_handles_labels()
    labels = [_wrap_label(lab, LEGEND_LABEL_WIDTH) for lab in labels]
    return ax.legend(handles, labels, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5), **kwargs)


def _rule_label(rule: str) -> str:
    """Axis label of a counting rule or dimension measure."""
    if rule == "twonn":
        return "intrinsic dimension (TwoNN)"
    if rule == "rankme":
        return "RankMe"
    return f"significant eigenvalues ({rule})"


def plot_spectrum(result: SpectrumResult, *, rule: str | None = None, ax=None, label: str | None = None,
                  color: str | None = None):
    """Significant-eigenvalue count per block with its 95 % interval; returns the Axes."""
    if not isinstance(result, SpectrumResult):
        raise FanlensError(f"result must be a SpectrumResult. Got {type(result).__name__} instead.")
    ax = _axes(ax)
    rule = rule or result.rules[0]
    x = np.arange(len(result.blocks))
    y = result.count(rule)
    color = color or PALETTE[len(ax.lines) % len(PALETTE)]
    ax.plot(x, y, marker="o", color=color, label=label or f"{result.model} ({rule})")
    ax.fill_between(x, result.count(rule, "ci_low"), result.count(rule, "ci_high"), color=color, alpha=0.2)
    ax.set_xlabel("block")
    ax.set_ylabel(_rule_label(rule))
    ax.set_xticks(x)
    _legend_beside(ax)
    return ax


def plot_rules(result: SpectrumResult, *, rules: Sequence[str] | None = None, ax=None):
    """Every counting rule and dimension measure of ``result`` per block, on one axis (each with
    its 95 % interval), so that "how many groups" and "how many directions" can be read
    together; returns the Axes."""
    if not isinstance(result, SpectrumResult):
        raise FanlensError(f"result must be a SpectrumResult. Got {type(result).__name__} instead.")
    rules = tuple(result.rules if rules is None else rules)
    for r in rules:
        if r not in result.rules:
            raise FanlensError(f"rules must be among the result's rules {result.rules}. Got {r!r} instead.")
    ax = _axes(ax)
    x = np.arange(len(result.blocks))
    markers = "osD^v<>p"
    for i, r in enumerate(rules):
        color = PALETTE[i % len(PALETTE)]
        ax.plot(x, result.count(r), marker=markers[i % len(markers)], ms=4, color=color,
                label=_rule_label(r) if r in ("twonn", "rankme") else r)
        ax.fill_between(x, result.count(r, "ci_low"), result.count(r, "ci_high"), color=color, alpha=0.15)
    ax.set_xlabel("block")
    ax.set_ylabel("count / dimension")
    ax.set_xticks(x)
    ax.set_title(result.model)
    _legend_beside(ax)
    return ax


def plot_probe(result: ProbeResult, *, sigmas: Sequence[float] | None = None, ax=None, log: bool = False):
    """Relative perturbation (or relative feature norm) per block, one line per sigma; returns the Axes."""
    if not isinstance(result, ProbeResult):
        raise FanlensError(f"result must be a ProbeResult. Got {type(result).__name__} instead.")
    ax = _axes(ax)
    x = np.arange(len(result.blocks))
    for i, s in enumerate(result.columns if sigmas is None else sigmas):
        c = PALETTE[i % len(PALETTE)]
        lab = s if isinstance(s, str) else f"sigma={s:g}" if result.mode == "additive" else "pure N(0,1)"
        ax.plot(x, result.values(s), marker="o", color=c, label=lab)
        ax.fill_between(x, result.values(s, "ci_low"), result.values(s, "ci_high"), color=c, alpha=0.2)
    ax.set_xlabel("block")
    ax.set_ylabel("relative perturbation" if result.mode == "additive" else "feature norm / block 0")
    ax.set_title(result.model)
    ax.set_xticks(x)
    if log:
        ax.set_yscale("log")
    _legend_beside(ax)
    return ax


def plot_groups(result: GroupsResult, *, image: int = 0, blocks: Sequence[int] | None = None, fig=None,
                alpha: float = 0.55):
    """The image and its token groups of each block (one panel per block); returns the Figure."""
    if not isinstance(result, GroupsResult):
        raise FanlensError(f"result must be a GroupsResult. Got {type(result).__name__} instead.")
    if not 0 <= image < len(result.images):
        raise FanlensError(f"image must be in [0, {len(result.images) - 1}]. Got {image!r} instead.")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    idx = list(range(len(result.blocks))) if blocks is None else list(blocks)
    n = len(idx) + 1
    cols = min(n, 7)
    rows = -(-n // cols)
    if fig is None:
        fig = plt.figure(figsize=(2.0 * cols, 2.1 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    px = result.pixels[image]
    axes[0].imshow(px)
    axes[0].set_title("image", fontsize=9)
    kmax = int(result.n_clusters.max()) if result.n_clusters.size else 1
    cmap = ListedColormap([PALETTE[i % len(PALETTE)] for i in range(max(kmax, 1))])
    h, w = px.shape[:2]
    for ax, li in zip(axes[1:], idx):
        lab = result.labels[li][image]
        ax.imshow(px)
        ax.imshow(lab, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=alpha, extent=(0, w, h, 0),
                  interpolation="nearest")
        ax.set_title(f"{result.blocks[li].name} (k={int(result.n_clusters[li, image])})", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    return fig


# --------------------------------------------------------------------------- paper figures
def _depth(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)


def plot_figure3ab(spectrum: SpectrumResult, probe: ProbeResult, *, baseline_spectrum: SpectrumResult | None = None,
                   baseline_probe: ProbeResult | None = None, sigma: float | None = None, rule: str | None = None,
                   ax=None, title: str | None = None):
    """The paper's Figure 3a/3b: significant-eigenvalue count (left axis) and relative
    perturbation (right axis) per block, with 95 % intervals; a random-init baseline dashed.

    Returns ``(ax, ax_right)``.
    """
    if not isinstance(spectrum, SpectrumResult) or not isinstance(probe, ProbeResult):
        raise FanlensError("spectrum and probe must be a SpectrumResult and a ProbeResult.")
    ax = _axes(ax)
    rule = rule or spectrum.rules[0]
    sigma = max(probe.sigmas) if sigma is None else sigma
    right = ax.twinx()
    c_count, c_pert = PALETTE[0], PALETTE[3]
    for spec, prob, style, tag in ((spectrum, probe, "-", ""), (baseline_spectrum, baseline_probe, "--", " (random init)")):
        if spec is not None:
            x = np.arange(len(spec.blocks))
            ax.plot(x, spec.count(rule), style, marker="o", ms=3, color=c_count, label=f"eigenvalue count{tag}")
            ax.fill_between(x, spec.count(rule, "ci_low"), spec.count(rule, "ci_high"), color=c_count, alpha=0.15)
        if prob is not None:
            x = np.arange(len(prob.blocks))
            right.plot(x, prob.values(sigma), style, marker="s", ms=3, color=c_pert, label=f"perturbation{tag}")
            right.fill_between(x, prob.values(sigma, "ci_low"), prob.values(sigma, "ci_high"), color=c_pert, alpha=0.15)
    ax.set_xlabel("block")
    ax.set_ylabel(_rule_label(rule), color=c_count)
    right.set_ylabel(f"relative perturbation (sigma={sigma:g})", color=c_pert)
    ax.set_title(title or spectrum.model)
    lines = ax.get_lines() + right.get_lines()
    # below the axes: "best" cannot see the twin axis' lines
    ax.legend(lines, [l.get_label() for l in lines], frameon=False, fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=2)
    return ax, right


def _with_baselines(results: dict, baselines: dict | None):
    """``(result, colour, line style, label)`` for each labelled result, solid, followed by its
    random-init baseline of the same label (same colour, dashed) when there is one."""
    for i, (label, res) in enumerate(results.items()):
        c = PALETTE[i % len(PALETTE)]
        if res is not None:
            yield res, c, "-", label
        base = (baselines or {}).get(label)
        if base is not None:
            yield base, c, "--", f"{label} (random init)"


def plot_depth_comparison(probes: dict, *, sigma: float, baselines: dict | None = None, ax=None,
                          normalize: bool = True):
    """Relative perturbation over relative depth for several models (the paper's Figure 3c).

    ``probes`` maps a label to a :class:`ProbeResult`; ``baselines`` (same labels) are drawn
    dashed. With ``normalize``, each curve is divided by its first block's value.
    """
    ax = _axes(ax)
    for res, c, style, label in _with_baselines(probes, baselines):
        y = res.values(sigma)
        if normalize:
            y = y / max(float(y[0]), 1e-12)
        ax.plot(_depth(len(res.blocks)), y, style, marker="o", ms=3, color=c, label=label)
    ax.set_xlabel("relative depth")
    ax.set_ylabel("perturbation / first block" if normalize else "relative perturbation")
    ax.set_title(f"sigma={sigma:g}")
    _legend_beside(ax)
    return ax


def plot_pure_vs_clean(probes: dict, *, baselines: dict | None = None, ax=None):
    """The feature norm of pure N(0, 1) inputs divided by the clean images' at the same block, over
    relative depth, one line per model (``mode="pure_vs_clean"`` probes; baselines dashed), with the
    95 % interval over images; a falling line means noise fades next to real features. Returns the Axes."""
    ax = _axes(ax)
    for res, c, style, label in _with_baselines(probes, baselines):
        _check_type("probe", res, ProbeResult)
        if res.mode != "pure_vs_clean":
            raise FanlensError(f"probes must be mode='pure_vs_clean' results. Got mode={res.mode!r} for {label!r}.")
        x = _depth(len(res.blocks))
        ax.plot(x, res.values(), style, marker="o", ms=3, color=c, label=label)
        ax.fill_between(x, res.values(None, "ci_low"), res.values(None, "ci_high"), color=c, alpha=0.12)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xlabel("relative depth")
    ax.set_ylabel("feature norm of N(0,1) input / of the image")
    ax.set_title("pure-noise input against clean images", fontsize=9)
    _legend_beside(ax)
    return ax


def plot_mask_scores(scores: dict, *, metric: str = "mask_best_iou", baselines: dict | None = None, ax=None):
    """Agreement of each block's groups with the object masks, over relative depth."""
    ax = _axes(ax)
    for res, c, style, label in _with_baselines(scores, baselines):
        s = res.summary(metric)
        x = _depth(len(res.blocks))
        ax.plot(x, s["mean"], style, marker="o", ms=3, color=c, label=label)
        ax.fill_between(x, s["ci_low"], s["ci_high"], color=c, alpha=0.12)
    ax.set_xlabel("relative depth")
    ax.set_ylabel({"mask_ari": "ARI with object mask", "mask_best_iou": "best-cluster IoU with object"}.get(metric, metric))
    _legend_beside(ax)
    return ax


ROW_LABEL_WIDTH = 16  # characters per line of a row label beside an image


MAX_LABEL_LINES = 3


def _wrap_label(label: str, width: int, max_lines: int = MAX_LABEL_LINES) -> str:
    """``label`` on lines of at most ``width`` characters, broken after ``/``, ``_``, ``:``, ``@``,
    ``-`` and spaces (so that paths and model specs wrap too), and inside longer pieces. A label
    that needs more than ``max_lines`` lines loses its folders (``path/to/file.py:factory`` becomes
    ``file.py:factory``), then its start (``…`` in front)."""
    import re

    label = str(label)
    if -(-len(label) // max(width, 1)) > max_lines and "/" in label:
        label = re.sub(r"^.*/", "", label)
    if len(label) > width * max_lines:
        label = "…" + label[-(width * max_lines - 1):]
    pieces = [p for p in re.split(r"(?<=[/_:@\- ])", str(label)) if p]
    lines, cur = [], ""
    for p in pieces:
        while len(p) > width:  # a piece longer than a line: cut it
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(p[:width])
            p = p[width:]
        if len(cur) + len(p) > width and cur:
            lines.append(cur)
            cur = ""
        cur += p
    if cur:
        lines.append(cur)
    return "\n".join(line.strip() for line in lines)


def plot_groups_grid(rows: list, *, images: Sequence[int] = (0,), fig=None, alpha: float = 0.6):
    """Grouped tokens of every block for several models and images (the paper's Figure 4).

    ``rows`` is a list of ``(label, GroupsResult)``; for each image, one row per entry.
    Cluster colours are matched from block to block (Hungarian matching on overlap).
    Returns the Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .grouping import match_labels

    if not rows:
        raise FanlensError("rows must hold at least one (label, GroupsResult).")
    ncols = 1 + max(len(g.blocks) for _, g in rows)
    nrows = len(rows) * len(images)
    if fig is None:
        fig = plt.figure(figsize=(1.25 * ncols, 1.35 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = ListedColormap(list(PALETTE) * 4)
    same_blocks = len({tuple(g.block_names) for _, g in rows}) == 1
    r = 0
    for img in images:
        for label, g in rows:
            if not 0 <= img < len(g.images):
                raise FanlensError(f"images must index the groups' images [0, {len(g.images) - 1}]. Got {img!r} instead.")
            px = g.pixels[img]
            h, w = px.shape[:2]
            axes[r, 0].imshow(px)
            axes[r, 0].set_ylabel(_wrap_label(label, ROW_LABEL_WIDTH), fontsize=7)
            matched = match_labels([g.labels[li][img] for li in range(len(g.blocks))])
            for li, lab in enumerate(matched):
                ax = axes[r, li + 1]
                ax.imshow(px)
                ax.imshow(lab % cmap.N, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=alpha, extent=(0, w, h, 0),
                          interpolation="nearest")
                if r == 0 or not same_blocks:  # models with other blocks: every panel names its own
                    ax.set_title(g.blocks[li].name, fontsize=7 if same_blocks else 6)
            r += 1
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    return fig


# --------------------------------------------------------------------------- attributions and flips
def _check_type(name: str, obj, cls) -> None:
    if not isinstance(obj, cls):
        raise FanlensError(f"{name} must be a {cls.__name__}. Got {type(obj).__name__} instead.")


def _check_image(image: int, n: int) -> None:
    if not isinstance(image, (int, np.integer)) or not 0 <= image < n:
        raise FanlensError(f"image must be in [0, {n - 1}]. Got {image!r} instead.")


def plot_attribution(result, *, image: int = 0, ax=None, alpha: float = 0.65, cmap: str = "magma",
                     percentile: float = 99.0):
    """One image with its attribution map on top, scaled to the map's ``percentile`` (so a few
    extreme pixels do not hide the rest); returns the Axes."""
    from .attribution import AttributionResult

    _check_type("result", result, AttributionResult)
    _check_image(image, len(result.images))
    ax = _axes(ax)
    px = result.pixels[image]
    m = np.asarray(result.maps[image], dtype=float)
    top = float(np.percentile(m, percentile)) if m.size else 0.0
    top = top if top > 0 else float(m.max())
    h, w = px.shape[:2]
    ax.imshow(px)
    ax.imshow(np.clip(m / top, 0, 1) if top > 0 else m, cmap=cmap, vmin=0, vmax=1, alpha=alpha, extent=(0, w, h, 0))
    where = f" @ {result.blocks[0].name}" if result.blocks else ""
    ax.set_title(f"{result.method}{where}, class {int(result.targets[image])}", fontsize=8)
    ax.set_axis_off()
    return ax


def plot_attribution_share(share, *, ax=None, label: str | None = None, color: str | None = None):
    """Per block: the share of the attribution mass in its best group (mean, 95 % interval),
    and that group's share of the area (dotted: what a uniform map would give). Returns the Axes."""
    from .attribution import AttributionShare

    _check_type("share", share, AttributionShare)
    ax = _axes(ax)
    color = color or PALETTE[(len(ax.lines) // 2) % len(PALETTE)]
    x = np.arange(len(share.blocks))
    s = share.summary("attribution_share")
    a = share.summary("attribution_group_area")
    name = label or share.model
    ax.plot(x, s["mean"], marker="o", ms=3, color=color, label=f"{name}: mass in best group")
    ax.fill_between(x, s["ci_low"], s["ci_high"], color=color, alpha=0.15)
    ax.plot(x, a["mean"], ":", color=color, label=f"{name}: its area (uniform map)")
    ax.set_xticks(x)
    ax.set_xticklabels([b.name for b in share.blocks], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("block")
    ax.set_ylabel(f"share of {share.method} attribution")
    ax.legend(frameon=False, fontsize=7)
    return ax


def plot_attribution_groups(groups: GroupsResult, attributions, *, image: int = 0, blocks: Sequence[int] | None = None,
                            fig=None, alpha: float = 0.55):
    """The paper's grouped tokens next to an attribution map.

    Top row: the image, its attribution, and the (colour-matched) groups of each block,
    each titled with the share of the attribution mass in its best group for this image.
    Bottom row: that share per block over all images, against the area baseline.
    Returns the Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .attribution import attribution_share
    from .grouping import match_labels

    _check_type("groups", groups, GroupsResult)
    share = attribution_share(groups, attributions)
    _check_image(image, len(groups.images))
    idx = list(range(len(groups.blocks))) if blocks is None else list(blocks)
    for li in idx:
        if not isinstance(li, (int, np.integer)) or not 0 <= li < len(groups.blocks):
            raise FanlensError(f"blocks must index the groups' blocks [0, {len(groups.blocks) - 1}]. Got {li!r} instead.")
    ncols = len(idx) + 2
    if fig is None:
        fig = plt.figure(figsize=(max(1.45 * ncols, 6.0), 4.6), layout="constrained")
    gs = fig.add_gridspec(2, ncols, height_ratios=[1.0, 1.15])
    top = [fig.add_subplot(gs[0, j]) for j in range(ncols)]
    px = groups.pixels[image]
    h, w = px.shape[:2]
    top[0].imshow(px)
    top[0].set_title("image", fontsize=8)
    top[0].set_axis_off()
    plot_attribution(attributions, image=image, ax=top[1])
    cmap = ListedColormap(list(PALETTE) * 4)
    matched = match_labels([groups.labels[li][image] for li in idx])
    for ax, li, lab in zip(top[2:], idx, matched):
        ax.imshow(px)
        ax.imshow(lab % cmap.N, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=alpha, extent=(0, w, h, 0),
                  interpolation="nearest")
        v = share.share[li, image]
        ax.set_title(f"{groups.blocks[li].name}\nshare {v:.2f}" if np.isfinite(v) else groups.blocks[li].name,
                     fontsize=7)
        ax.set_axis_off()
    bottom = fig.add_subplot(gs[1, :])
    plot_attribution_share(share, ax=bottom, label=groups.model)
    bottom.set_title(f"over {len(groups.images)} images (mean, 95 % interval)", fontsize=8)
    return fig


def plot_probe_flip(probe: ProbeResult, flip, *, fig=None):
    """The per-block perturbation curve with, beside it, the smallest sigma that flips each
    image's prediction (same noise, same units). The probe's sigma levels are drawn as
    dotted lines in the right panel in their curve colours. Returns the Figure."""
    import matplotlib.pyplot as plt

    from .attribution import FlipResult

    _check_type("probe", probe, ProbeResult)
    _check_type("flip", flip, FlipResult)
    if probe.mode != "additive":
        raise FanlensError(f"probe must be an additive-mode ProbeResult. Got mode {probe.mode!r} instead.")
    if probe.space != flip.space:
        raise FanlensError(f"probe and flip must add noise in the same space. Got {probe.space!r} and {flip.space!r}.")
    if fig is None:
        fig = plt.figure(figsize=(8.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.2]})
    plot_probe(probe, ax=left)
    v = np.asarray(flip.min_sigma, dtype=float)
    ok = ~np.isnan(v)
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-0.15, 0.15, v.size)
    right.scatter(jitter[ok], v[ok], s=14, color=PALETTE[0], alpha=0.8, label="flipped")
    if (~ok).any():
        right.scatter(jitter[~ok], np.full((~ok).sum(), flip.max_sigma), marker="^", s=18, color=PALETTE[7],
                      label=f"not flipped up to {flip.max_sigma:g}")
    med = flip.median
    if np.isfinite(med):
        right.axhline(med, color=PALETTE[3], lw=1.5, label=f"median {med:.3g}")
    for i, sg in enumerate(probe.sigmas):
        right.axhline(sg, color=PALETTE[i % len(PALETTE)], ls=":", lw=1)
    right.set_xlim(-0.5, 0.5)
    right.set_xticks([])
    right.set_ylim(0, flip.max_sigma * 1.05)
    right.set_ylabel(f"sigma ({flip.space} space)")
    right.set_title(f"smallest sigma flipping\nthe prediction ({flip.n_flipped}/{len(flip.images)})", fontsize=8)
    right.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02))
    return fig


def plot_comparison(results: dict, *, sigma: float | None = None, rule: str | None = None, fig=None):
    """Several models side by side over relative depth: significant-eigenvalue count (left)
    and relative perturbation (right), each with its 95 % interval. ``results`` maps a label to ``(SpectrumResult,
    ProbeResult)``; labels ending in ``"(random init)"`` are drawn dashed. Returns the Figure."""
    import matplotlib.pyplot as plt

    if not results:
        raise FanlensError("results must map at least one label to (SpectrumResult, ProbeResult).")
    if fig is None:
        fig = plt.figure(figsize=(9.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    colours: dict[str, str] = {}
    for label, pair in results.items():
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], SpectrumResult)
                and isinstance(pair[1], ProbeResult)):
            raise FanlensError(f"results[{label!r}] must be a (SpectrumResult, ProbeResult) pair.")
        spec, prob = pair
        base = label.replace("(random init)", "").strip()
        c = colours.setdefault(base, PALETTE[len(colours) % len(PALETTE)])
        style = "--" if label.endswith("(random init)") else "-"
        r = rule or spec.rules[0]
        sg = max(prob.sigmas) if sigma is None else sigma
        xs, xp = _depth(len(spec.blocks)), _depth(len(prob.blocks))
        left.plot(xs, spec.count(r), style, marker="o", ms=3, color=c, label=label)
        left.fill_between(xs, spec.count(r, "ci_low"), spec.count(r, "ci_high"), color=c, alpha=0.12)
        right.plot(xp, prob.values(sg), style, marker="o", ms=3, color=c, label=label)
        right.fill_between(xp, prob.values(sg, "ci_low"), prob.values(sg, "ci_high"), color=c, alpha=0.12)
    left.set_xlabel("relative depth")
    left.set_ylabel(_rule_label(r))
    right.set_xlabel("relative depth")
    right.set_ylabel(f"relative perturbation (sigma={sg:g})")
    left.legend(frameon=False, fontsize=7)
    return fig


def plot_attention(attn, pixels, *, grid: tuple[int, int], query: tuple[int, int], head: int | None = None, ax=None,
                   alpha: float = 0.6, cmap: str = "viridis"):
    """Where one query token attends, over the image.

    Args:
        attn: one image's attention, ``(heads, N, N)`` or ``(N, N)`` (rows: queries), e.g.
            ``FAN.attention_maps(x)[i][b]``; heads are averaged unless ``head`` is given.
        pixels: ``(H, W, 3)`` uint8 or float image.
        grid: the token grid ``(h, w)``, ``h * w == N`` (row-major tokens).
        query: ``(row, col)`` of the query token; outlined in the plot.

    Returns the Axes.
    """
    from matplotlib.patches import Rectangle

    a = attn.detach().cpu().numpy() if hasattr(attn, "detach") else np.asarray(attn)
    a = a.astype(float)
    if a.ndim == 2:
        a = a[None]
    gh, gw = (int(v) for v in grid)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[1] != gh * gw:
        raise FanlensError(f"attn must be (heads, N, N) or (N, N) with N = {gh}*{gw}. Got shape {np.shape(attn)} instead.")
    if head is not None:
        if not isinstance(head, (int, np.integer)) or not 0 <= head < a.shape[0]:
            raise FanlensError(f"head must be in [0, {a.shape[0] - 1}]. Got {head!r} instead.")
        a = a[head : head + 1]
    r, c = query
    if not (0 <= r < gh and 0 <= c < gw):
        raise FanlensError(f"query must be (row, col) inside the {gh}x{gw} grid. Got {query!r} instead.")
    row = a[:, r * gw + c, :].mean(0).reshape(gh, gw)
    ax = _axes(ax)
    px = np.asarray(pixels)
    h, w = px.shape[:2]
    ax.imshow(px)
    ax.imshow(row, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
    ax.add_patch(Rectangle((c * w / gw, r * h / gh), w / gw, h / gh, fill=False, edgecolor="white", lw=1.5))
    ax.set_title(f"attention of token ({r}, {c})" + ("" if head is None else f", head {head}"), fontsize=8)
    ax.set_axis_off()
    return ax


def plot_attention_maps(maps, *, image: int = 0, blocks: Sequence[int] | None = None, head: int | None = None,
                        groups: GroupsResult | None = None, fig=None, alpha: float = 0.6, cmap: str = "viridis"):
    """CLS-to-patch attention of each block over one image (for models without a class token,
    the attention each patch receives, averaged over the queries), with the token groups of the
    same blocks in a second row when ``groups`` is given; returns the Figure.

    Args:
        maps: :class:`fanlens.AttentionMaps`.
        image: index of the image.
        blocks: indices into ``maps.blocks`` (default: all).
        head: one head (default: the mean of the heads).
        groups: a :class:`GroupsResult` of the same images; its blocks are matched by name.
    """
    from .attention import AttentionMaps

    if not isinstance(maps, AttentionMaps):
        raise FanlensError(f"maps must be an AttentionMaps. Got {type(maps).__name__} instead.")
    if not 0 <= image < len(maps.images):
        raise FanlensError(f"image must be in [0, {len(maps.images) - 1}]. Got {image!r} instead.")
    idx = list(range(len(maps.blocks))) if blocks is None else [int(b) for b in blocks]
    if groups is not None:
        if not isinstance(groups, GroupsResult):
            raise FanlensError(f"groups must be a GroupsResult. Got {type(groups).__name__} instead.")
        names = [b.name for b in groups.blocks]
        missing = [maps.blocks[i] for i in idx if maps.blocks[i] not in names]
        if missing or image >= len(groups.images):
            raise FanlensError(f"groups must hold the blocks {missing or ''} and image {image} of the attention "
                               f"maps. Got blocks {names} and {len(groups.images)} images instead.")
    heat, what = maps.overview(head)
    heat = heat[image]
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = 2 if groups is not None else 1
    cols = len(idx) + 1
    if fig is None:
        fig = plt.figure(figsize=(1.9 * cols, 2.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    px = maps.pixels[image]
    h, w = px.shape[:2]
    axes[0, 0].imshow(px)
    axes[0, 0].set_title("image", fontsize=8)
    for ax, li in zip(axes[0, 1:], idx):
        ax.imshow(px)
        ax.imshow(heat[li], cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_title(f"{maps.blocks[li]}\n{what}" + ("" if head is None else f", head {head}"), fontsize=7)
    if groups is not None:
        axes[1, 0].set_visible(False)
        kmax = max(int(groups.n_clusters.max()), 1)
        gcmap = ListedColormap([PALETTE[i % len(PALETTE)] for i in range(kmax)])
        gpx = groups.pixels[image]
        gh, gw = gpx.shape[:2]
        for ax, li in zip(axes[1, 1:], idx):
            gi = names.index(maps.blocks[li])
            ax.imshow(gpx)
            ax.imshow(groups.labels[gi][image], cmap=gcmap, vmin=-0.5, vmax=gcmap.N - 0.5, alpha=0.55,
                      extent=(0, gw, gh, 0), interpolation="nearest")
            ax.set_title(f"groups (k={int(groups.n_clusters[gi, image])})", fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig


def _check_colours(result):
    from .colouring import SpectralColours

    if not isinstance(result, SpectralColours):
        raise FanlensError(f"result must be a SpectralColours. Got {type(result).__name__} instead.")


def plot_spectral_colour(result, *, image: int = 0, block: int = 0, ax=None, alpha: float = 0.85):
    """One image's tokens of one block in their spectral colours, over the image; returns the Axes."""
    _check_colours(result)
    if not 0 <= image < len(result.images):
        raise FanlensError(f"image must be in [0, {len(result.images) - 1}]. Got {image!r} instead.")
    if not 0 <= block < len(result.blocks):
        raise FanlensError(f"block must be in [0, {len(result.blocks) - 1}]. Got {block!r} instead.")
    ax = _axes(ax)
    px = result.pixels[image]
    h, w = px.shape[:2]
    ax.imshow(px)
    ax.imshow(result.colours[block][image], alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_title(result.blocks[block].name, fontsize=8)
    ax.set_axis_off()
    return ax


def plot_spectral_colours(result, *, images: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
                          fig=None):
    """Spectral colours of several images (rows) and blocks (columns); the same colour is the
    same eigen-direction across images and, after alignment, across blocks. Returns the Figure."""
    _check_colours(result)
    import matplotlib.pyplot as plt

    rows = list(range(min(len(result.images), 4))) if images is None else [int(i) for i in images]
    cols = list(range(len(result.blocks))) if blocks is None else [int(b) for b in blocks]
    if fig is None:
        fig = plt.figure(figsize=(1.7 * (len(cols) + 1), 1.8 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(cols) + 1, squeeze=False)
    for r, i in enumerate(rows):
        axes[r, 0].imshow(result.pixels[i])
        axes[r, 0].set_title(result.images[i][-24:], fontsize=7)
        axes[r, 0].set_axis_off()
        for c, li in enumerate(cols):
            plot_spectral_colour(result, image=i, block=li, ax=axes[r, c + 1])
            if r:
                axes[r, c + 1].set_title("")
    return fig


def _short(name: str) -> str:
    return name.replace("_", " ").replace("compression", "").replace("transform", "").strip()


def plot_robustness(result, *, ax=None, vmax: float | None = None, title: str | None = None, colorbar: bool = True,
                    names: bool = True):
    """Corruption x severity heat map of the error (or flip rate), each cell annotated; the clean
    error and, with a baseline, each corruption's CE in the row labels. Returns the Axes."""
    from .results import RobustnessResult

    _check_type("result", result, RobustnessResult)
    if ax is None:
        import matplotlib.pyplot as plt

        _fig, ax = plt.subplots(figsize=(4.2, 0.32 * len(result.corruptions) + 1.4), layout="constrained")
    m = np.asarray(result.mean, dtype=float)
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax if vmax is not None else max(1e-6, float(np.nanmax(m))),
                   aspect="auto")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 * (im.norm.vmax or 1) else "black")
    ces = [(f"CE {result.ce[i]:.2f}" if np.isfinite(result.ce[i]) else "CE n/a") if result.baseline else ""
           for i in range(len(result.corruptions))]
    labels = [(_short(c) + (f"  ({ce})" if ce else "")) if names else ce for c, ce in zip(result.corruptions, ces)]
    ax.set_yticks(range(len(result.corruptions)), labels, fontsize=7)
    ax.set_xticks(range(len(result.severities)), [str(s) for s in result.severities])
    ax.set_xlabel("severity")
    what = "top-1 error" if result.metric == "top1_error" else "flip rate"
    clean = f", clean {result.clean[0]:.2f}" if result.metric == "top1_error" else ""
    mce = f", mCE {result.mce:.2f} vs {result.baseline}" if result.baseline and np.isfinite(result.mce) else ""
    ax.set_title(title or f"{result.model}: {what}{clean}{mce}", fontsize=8)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label=what, shrink=0.8)
    return ax


def plot_robustness_comparison(results: dict, *, fig=None):
    """Heat maps of several models side by side (one colour scale); returns the Figure."""
    if not isinstance(results, dict) or not results:
        raise FanlensError(f"results must map at least one label to a RobustnessResult. Got {results!r} instead.")
    import matplotlib.pyplot as plt

    n = len(results)
    first = next(iter(results.values()))
    if fig is None:
        fig = plt.figure(figsize=(3.3 * n + 1.0, 0.32 * len(first.corruptions) + 1.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    vmax = max(float(np.nanmax(np.asarray(r.mean))) for r in results.values()) or 1.0
    for k, (ax, (label, r)) in enumerate(zip(axes, results.items())):
        # the corruption names once, at the left; every model's own CEs beside its own map
        plot_robustness(r, ax=ax, vmax=vmax, title=_wrap_label(label, 28), colorbar=k == n - 1, names=k == 0)
    return fig


def plot_probe_families(probe: ProbeResult, spectrum: SpectrumResult | None = None, *, severity: int | None = None,
                        rule: str | None = None, ax=None):
    """Per-block perturbation under the four ImageNet-C families (noise, blur, weather, digital:
    the mean over the family's corruptions in ``probe`` at ``severity``), next to the
    significant-eigenvalue count of ``spectrum`` on a second axis; returns the Axes."""
    from .corruptions import FAMILIES

    _check_type("probe", probe, ProbeResult)
    if not probe.perturbations:
        raise FanlensError("probe must be a corruption probe (noise_probe(..., corruption=...)). Got Gaussian noise.")
    cols = [p.rpartition("@") for p in probe.perturbations]
    sevs = sorted({int(v) for _, _, v in cols})
    sev = sevs[-1] if severity is None else int(severity)
    if sev not in sevs:
        raise FanlensError(f"severity must be one of {sevs}. Got {severity!r} instead.")
    ax = _axes(ax)
    x = np.arange(len(probe.blocks))
    drawn = 0
    for i, (fam, names) in enumerate(FAMILIES.items()):
        idx = [k for k, (c, _, v) in enumerate(cols) if c in names and int(v) == sev]
        if not idx:
            continue
        y = np.asarray(probe.mean)[:, idx].mean(1)
        ax.plot(x, y, marker="o", color=PALETTE[i], label=f"{fam} ({len(idx)})")
        drawn += 1
    if not drawn:
        raise FanlensError(f"probe holds no benchmark corruption at severity {sev}.")
    ax.set_xlabel("block")
    ax.set_ylabel(f"relative perturbation (severity {sev})")
    ax.set_xticks(x)
    handles, labels = ax.get_legend_handles_labels()
    if spectrum is not None:
        _check_type("spectrum", spectrum, SpectrumResult)
        right = ax.twinx()
        r = rule or spectrum.rules[0]
        right.plot(np.arange(len(spectrum.blocks)), spectrum.count(r), "k--", marker="s", ms=3, label=f"count ({r})")
        right.set_ylabel(_rule_label(r))
        h2, l2 = right.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    ax.set_title(probe.model)
    return ax


def plot_heads(results: dict, *, sigma: float | None = None, fig=None):
    """Robustness against the number of heads (claim C4): ``results`` maps heads to
    ``(ProbeResult, RobustnessResult or None)``; left the last-block perturbation at ``sigma``,
    right the mean corruption error (where robustness results are given), each with its 95 %
    interval over images; returns the Figure."""
    if not isinstance(results, dict) or not results:
        raise FanlensError(f"results must map heads to (probe, robustness). Got {results!r} instead.")
    import matplotlib.pyplot as plt

    heads = sorted(results)
    robs = [results[h][1] for h in heads]
    n_panels = 2 if all(r is not None and r.per_image is not None for r in robs) else 1
    if fig is None:
        fig = plt.figure(figsize=(4.0 * n_panels, 3.2), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    last = [results[h][0].values(sigma)[-1] for h in heads]
    lo = [results[h][0].values(sigma, "ci_low")[-1] for h in heads]
    hi = [results[h][0].values(sigma, "ci_high")[-1] for h in heads]
    sig = max(results[heads[0]][0].sigmas) if sigma is None else sigma
    axes[0].errorbar(heads, last, yerr=[np.subtract(last, lo), np.subtract(hi, last)], marker="o", capsize=3,
                     color=PALETTE[0])
    axes[0].set(xscale="log", xlabel="heads", ylabel=f"last-block perturbation (sigma={sig:g})")
    if n_panels == 2:
        err = [np.asarray(r.per_image, float)[:, 1:].mean(1) for r in robs]
        m = [e.mean() for e in err]
        half = [1.96 * e.std(ddof=1) / np.sqrt(len(e)) if len(e) > 1 else 0.0 for e in err]
        axes[1].errorbar(heads, m, yerr=half, marker="o", capsize=3, color=PALETTE[1])
        what = "top-1 error" if robs[0].metric == "top1_error" else "flip rate"
        axes[1].set(xscale="log", xlabel="heads", ylabel=f"mean {what} under corruption")
    for ax in axes:
        ax.set_xticks(heads, [str(h) for h in heads])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    return fig


CLAIM_LABEL_WIDTH = 46
VERDICT_COLOURS = {"holds": "#2a9d8f", "contradicted": "#e76f51", "inconclusive": "#8d99ae",
                   "depends on the specification": "#e9c46a"}


def plot_claims(result, *, fig=None, wrap: int = CLAIM_LABEL_WIDTH):
    """Every defined statistic of a :class:`fanlens.claims.ClaimsResult` with its 95 % interval,
    coloured by verdict, one panel per claim (each on its own scale), the null value of each row
    marked by a grey tick; row labels (statistic · models) wrapped at ``wrap`` characters, the
    legend below the panels. Returns the Figure."""
    import textwrap

    from matplotlib.lines import Line2D

    from .claims import ClaimsResult

    _check_type("result", result, ClaimsResult)
    rows = [r for r in result.rows if r.value is not None]
    if not rows:
        raise FanlensError("result has no defined statistic to draw.")
    claims_in = sorted(dict.fromkeys(r.claim for r in rows))
    groups = [[r for r in rows if r.claim == c] for c in claims_in]
    labels = [[textwrap.fill(f"{r.statistic} · {r.models}", wrap) for r in g] for g in groups]
    lines = [sum(lab.count("\n") + 1 for lab in g) for g in labels]
    import matplotlib.pyplot as plt

    if fig is None:
        fig = plt.figure(figsize=(8.5, 0.24 * sum(lines) + 0.55 * len(groups) + 1.1), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw=dict(height_ratios=[max(n, 2) for n in lines]))[:, 0]
    for ax, claim, g, labs in zip(axes, claims_in, groups, labels):
        y = np.arange(len(g))[::-1]
        for yi, r in zip(y, g):
            ax.errorbar([r.value], [yi], xerr=[[r.value - r.ci_low], [r.ci_high - r.value]], fmt="o", capsize=3,
                        color=VERDICT_COLOURS.get(r.verdict, "k"), ms=4)
            ax.plot([r.null], [yi], "|", color="0.45", ms=12, mew=1.2)
        ax.set_yticks(y, labs, fontsize=7)
        ax.set_ylim(-0.6, len(g) - 0.4)
        ax.set_title(claim, loc="left", fontsize=8, fontweight="bold")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("statistic (95 % bootstrap interval); grey tick: the null value", fontsize=8)
    present = {r.verdict for r in rows}
    handles = [Line2D([], [], marker="o", ls="", color=c, label=v) for v, c in VERDICT_COLOURS.items() if v in present]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7, frameon=False)
    return fig


def plot_training_dynamics(rows: dict, *, sigma: float | None = None, rule: str | None = None, fig=None):
    """How grouping and robustness emerge during training, one architecture: ``rows`` maps the
    training step to ``(SpectrumResult, ProbeResult, GroupingScores or None, RobustnessResult or
    None, validation accuracy)``. Panels: the count per block, the perturbation per block (one
    line per snapshot, darker = later), and over the steps the mean mask ARI, the clean and the
    corrupted accuracy; returns the Figure."""
    if not isinstance(rows, dict) or not rows:
        raise FanlensError(f"rows must map training steps to snapshot results. Got {rows!r} instead.")
    import matplotlib.pyplot as plt

    steps = sorted(rows)
    if fig is None:
        fig = plt.figure(figsize=(12, 3.3), layout="constrained")
    ax_c, ax_p, ax_s = fig.subplots(1, 3)
    cmap = plt.get_cmap("viridis")
    for k, st in enumerate(steps):
        spec, probe = rows[st][0], rows[st][1]
        col = cmap(0.1 + 0.8 * k / max(len(steps) - 1, 1))
        ax_c.plot(spec.depth, spec.count(rule), marker="o", ms=3, color=col, label=f"step {st}")
        ax_p.plot(probe.depth, probe.values(sigma), marker="o", ms=3, color=col)
    ax_c.set(xlabel="relative depth", ylabel=_rule_label(rule or rows[steps[0]][0].rules[0]))
    sig = max(rows[steps[0]][1].sigmas) if sigma is None else sigma
    ax_p.set(xlabel="relative depth", ylabel=f"perturbation (sigma={sig:g})")
    ax_c.legend(fontsize=7)
    x = np.asarray(steps, float)
    ax_s.plot(x, [rows[s][4] for s in steps], marker="o", label="clean accuracy (val)", color=PALETTE[0])
    if all(rows[s][3] is not None for s in steps):
        ax_s.plot(x, [rows[s][3].robust_accuracy if rows[s][3].metric == "top1_error" else
                      1 - float(np.mean(rows[s][3].mean)) for s in steps], marker="s",
                  label=("corrupted accuracy" if rows[steps[0]][3].metric == "top1_error" else
                         "prediction kept under corruption (1 - flip rate)") +
                  f" (severity {','.join(map(str, rows[steps[0]][3].severities))})",
                  color=PALETTE[1])
    if all(rows[s][2] is not None for s in steps):
        ax_s.plot(x, [float(np.mean(rows[s][2].ari)) for s in steps], marker="^", label="mean mask ARI",
                  color=PALETTE[2])
    ax_s.set(xlabel="training step", ylim=(-0.05, 1.05))
    ax_s.legend(fontsize=7)
    for ax in (ax_c, ax_p, ax_s):
        ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------- legibility
def text_problems(fig, *, tolerance: float = 1.0, data: bool = True) -> list[str]:
    """Where the text of ``fig`` is not legible: each problem one line, ``[]`` when none.

    Checked after a draw, in display pixels: every title, axis label, visible tick label, text
    and legend (i) lies inside the figure (a constrained-layout figure is saved as it is; other
    figures are saved with their tight bounding box, so nothing of theirs is clipped), (ii) does
    not overlap another of them (tick labels of one axis included), and with ``data`` (iii) no
    legend covers a data point of its axes. ``tolerance``: pixels of overlap forgiven.
    """
    import warnings

    from matplotlib.layout_engine import ConstrainedLayoutEngine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    layout = [f"layout: {w.message}" for w in caught if "constrained_layout" in str(w.message)]
    items: list[tuple[str, Any, int]] = []  # (what, bbox, owner id: texts of one legend share one)

    def add(what: str, artist, owner: int | None = None) -> None:
        if artist is None or not artist.get_visible():
            return
        if hasattr(artist, "get_text") and not artist.get_text().strip():
            return
        bb = artist.get_window_extent(renderer)
        if bb.width > 0 and bb.height > 0:
            items.append((what, bb, id(artist) if owner is None else owner))

    suptitle = getattr(fig, "_suptitle", None)
    add("suptitle", suptitle)
    for t in fig.texts:
        add(f"figure text {t.get_text()!r}", t)
    for lg in fig.legends:
        add("figure legend", lg)
    legends = []
    for ai, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison and not ax.get_title():
            continue
        name = f"axes {ai}"
        for t in (ax.title, getattr(ax, "_left_title", None), getattr(ax, "_right_title", None)):
            add(f"{name} title {t.get_text()!r}" if t is not None else "", t)
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            add(f"{name} {axis.axis_name}-label {axis.label.get_text()!r}", axis.label)
            lo, hi = min(lim), max(lim)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                loc = tick.get_loc()
                if loc is None or not (lo - 1e-9 * (abs(lo) + 1) <= loc <= hi + 1e-9 * (abs(hi) + 1)):
                    continue
                for lab in (tick.label1, tick.label2):
                    if lab.get_visible():
                        add(f"{name} {axis.axis_name}-tick {lab.get_text()!r}", lab)
        for t in ax.texts:
            add(f"{name} text {t.get_text()!r}", t)
        lg = ax.get_legend()
        if lg is not None and lg.get_visible():
            add(f"{name} legend", lg)
            legends.append((name, ax, lg))
    problems = list(dict.fromkeys(layout))  # a constrained layout that gave up: the text does not fit
    fb = fig.bbox
    if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):
        for what, bb, _o in items:
            if (bb.x0 < fb.x0 - tolerance or bb.y0 < fb.y0 - tolerance or bb.x1 > fb.x1 + tolerance
                    or bb.y1 > fb.y1 + tolerance):
                problems.append(f"{what} is clipped by the figure's edge")
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (wa, a, oa), (wb, b, ob) = items[i], items[j]
            if oa == ob:
                continue
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if w > tolerance and h > tolerance:
                problems.append(f"{wa} overlaps {wb}")
    if data:
        for name, ax, lg in legends:
            bb = lg.get_window_extent(renderer)
            pts = _data_points(ax)
            if len(pts):
                inside = ((pts[:, 0] > bb.x0) & (pts[:, 0] < bb.x1) & (pts[:, 1] > bb.y0) & (pts[:, 1] < bb.y1))
                if inside.any():
                    problems.append(f"{name} legend covers {int(inside.sum())} data point(s)")
    return problems


def _data_points(ax) -> np.ndarray:
    """Display coordinates of the data points of ``ax`` (line vertices, scatter offsets, bar and
    error-bar ends), legend handles excluded."""
    pts = []
    for line in ax.get_lines():
        if not line.get_visible():
            continue
        x, y = np.atleast_1d(line.get_xdata()), np.atleast_1d(line.get_ydata())
        try:
            xy = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
        except (TypeError, ValueError):  # categorical or date data: not checked
            continue
        if len(xy):
            pts.append(line.get_transform().transform(xy))
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        offs = np.asarray(coll.get_offsets(), float)
        if len(offs) > 1 or len(offs) == 1 and np.any(offs):  # scatter points
            pts.append(coll.get_offset_transform().transform(offs))
        else:  # error-bar segments, fills: the vertices of small paths
            for path in coll.get_paths():
                if 0 < len(path.vertices) <= 64:
                    pts.append(coll.get_transform().transform(path.vertices))
    if not pts:
        return np.empty((0, 2))
    out = np.concatenate(pts)
    return out[np.isfinite(out).all(axis=1)]


def plot_claims_grid(result, *, fig=None, max_models: int = 6):
    """The specification curve of every headline statistic of a :class:`fanlens.grid.GridResult`:
    one panel per statistic, each model's cells sorted by value with their 95 % intervals, coloured
    by the cell's verdict; under each panel the cells' settings (sigma, space, measure, rule) as
    coloured strips. Returns the Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .grid import DIMENSIONS, GridResult

    _check_type("result", result, GridResult)
    fams = list(dict.fromkeys(h.statistic for h in result.headline if h.cells))
    if not fams:
        raise FanlensError("result has no headline statistic defined in any cell.")
    if fig is None:
        fig = plt.figure(figsize=(11, 2.9 * len(fams) + 0.6), layout="constrained")
    outer = fig.add_gridspec(2 * len(fams), 1, height_ratios=[3.2, 1.0] * len(fams))
    values = result.parameters.get("values", {})
    for k, fam in enumerate(fams):
        ax, strip = fig.add_subplot(outer[2 * k]), fig.add_subplot(outer[2 * k + 1])
        heads = [h for h in result.headline if h.statistic == fam and h.cells][:max_models]
        xs, settings, ticks = 0, [], []
        for h in heads:
            rows = sorted((g for g in result.rows if g.row.models == h.models and g.row.value is not None
                           and g.row.statistic.split(" ")[0].split("[")[0] == fam), key=lambda g: g.row.value)
            x = np.arange(xs, xs + len(rows))
            for xi, g in zip(x, rows):
                r = g.row
                ax.errorbar([xi], [r.value], yerr=[[r.value - r.ci_low], [r.ci_high - r.value]], fmt="o", ms=2.5,
                            lw=0.8, color=VERDICT_COLOURS.get(r.verdict, "k"))
                settings.append((int(xi), [getattr(g.cell, d) for d in DIMENSIONS]))
            if len(rows):
                ax.axhline(rows[0].row.null, color="0.5", lw=0.8, zorder=0)
                ticks.append(((x[0] + x[-1]) / 2, f"{_wrap_label(h.models, 28, 2)}\n{h.verdict}"))
                ax.axvspan(x[0] - 0.5, x[-1] + 0.5, color="0.93" if len(ticks) % 2 else "white", zorder=-1)
            xs += len(rows) + 2
        ax.set_xlim(-1, max(xs - 1, 1))
        ax.set_xticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=6)
        ax.set_title(f"{heads[0].claim} · {fam}: every cell, sorted by value within each model", fontsize=8, loc="left")
        ax.tick_params(axis="y", labelsize=7)
        # the settings of each cell: one strip per dimension, one colour per value
        codes = np.full((len(DIMENSIONS), max(xs - 2, 1)), np.nan)
        for xi, cell in settings:
            for d, dim in enumerate(DIMENSIONS):
                vals = list(values.get(dim, []))
                if cell[d] in vals:
                    codes[d, xi] = vals.index(cell[d]) / max(len(vals) - 1, 1)
        strip.imshow(np.ma.masked_invalid(codes), aspect="auto", cmap="viridis", interpolation="nearest",
                     extent=(-0.5, codes.shape[1] - 0.5, len(DIMENSIONS) - 0.5, -0.5))
        strip.set_xlim(ax.get_xlim())
        strip.set_yticks(range(len(DIMENSIONS)), [f"{d} ({' · '.join(map(str, values.get(d, [])))})"
                                                  for d in DIMENSIONS], fontsize=5)
        strip.set_xticks([])
    handles = [Line2D([], [], marker="o", ls="", color=c, label=v) for v, c in VERDICT_COLOURS.items()
               if v != "depends on the specification"]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7, frameon=False,
               title="verdict of the cell (strips: dark = first value listed, yellow = last)", title_fontsize=7)
    return fig
