"""Figures from results. Plotting never computes an analysis; matplotlib is imported lazily.

Every function takes a result and ``ax=None`` (or ``fig=None``), draws, and returns the
Axes (or Figure); none calls ``show()`` or saves: saving belongs to the CLI/pipeline.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ._validation import FanlensError
from .results import GroupsResult, ProbeResult, SpectrumResult

__all__ = ["PALETTE", "plot_spectrum", "plot_probe", "plot_groups"]

# Okabe-Ito: colour-blind safe
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    return ax


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
    ax.set_ylabel(f"significant eigenvalues ({rule})")
    ax.set_xticks(x)
    ax.legend(frameon=False)
    return ax


def plot_probe(result: ProbeResult, *, sigmas: Sequence[float] | None = None, ax=None, log: bool = False):
    """Relative perturbation (or relative feature norm) per block, one line per sigma; returns the Axes."""
    if not isinstance(result, ProbeResult):
        raise FanlensError(f"result must be a ProbeResult. Got {type(result).__name__} instead.")
    ax = _axes(ax)
    x = np.arange(len(result.blocks))
    for i, s in enumerate(result.sigmas if sigmas is None else sigmas):
        c = PALETTE[i % len(PALETTE)]
        lab = f"sigma={s:g}" if result.mode == "additive" else "pure N(0,1)"
        ax.plot(x, result.values(s), marker="o", color=c, label=lab)
        ax.fill_between(x, result.values(s, "ci_low"), result.values(s, "ci_high"), color=c, alpha=0.2)
    ax.set_xlabel("block")
    ax.set_ylabel("relative perturbation" if result.mode == "additive" else "feature norm / block 0")
    ax.set_title(result.model)
    ax.set_xticks(x)
    if log:
        ax.set_yscale("log")
    ax.legend(frameon=False)
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
