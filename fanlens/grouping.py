"""Token groups against ground truth, and groups matched across blocks.

- :func:`mask_scores`: per block and image, how well the spectral clusters of a
  :class:`~fanlens.results.GroupsResult` recover a ground-truth object mask: the adjusted
  Rand index (ARI) between cluster labels and object/background, and the IoU of the
  cluster that best covers the object. Labels are upsampled (nearest) to the mask's
  resolution, so every pixel counts once.
- :func:`match_labels`: relabel each block's clusters to agree with the previous block's
  (Hungarian matching on overlap), so that a colour means the same group from block to block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from ._stats import RunningStats
from ._validation import FanlensError
from .results import STATISTICS, BlockInfo, GroupsResult

__all__ = ["GroupingScores", "mask_scores", "upsample_labels", "match_labels", "best_cluster_iou"]


def upsample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map ``(h, w)`` to ``shape``: pixel centres mapped to cells."""
    h, w = labels.shape
    H, W = shape
    rows = np.minimum((np.arange(H) + 0.5) * h / H, h - 1).astype(int)
    cols = np.minimum((np.arange(W) + 0.5) * w / W, w - 1).astype(int)
    return labels[rows[:, None], cols[None, :]]


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts of every (label of ``a``, label of ``b``) pair, from one ``bincount``; rows and
    columns in the order of the sorted distinct labels."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise FanlensError(f"labelings must have the same length. Got {a.size} and {b.size} instead.")
    if a.dtype == bool:
        a = a.astype(np.int64)
    if b.dtype == bool:
        b = b.astype(np.int64)
    small = (a.size and np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)
             and a.min() >= 0 and b.min() >= 0 and a.max() < 4096 and b.max() < 4096)
    if small:  # labels are already small indices: no sort needed, empty rows/columns dropped after
        na, nb = int(a.max()) + 1, int(b.max()) + 1
        t = np.bincount(a.astype(np.int64) * nb + b, minlength=na * nb).reshape(na, nb)
        return t[t.any(axis=1)][:, t.any(axis=0)]
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    return np.bincount(ia.ravel() * len(ub) + ib.ravel(), minlength=len(ua) * len(ub)).reshape(len(ua), len(ub))


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings, from their contingency table: the pair-confusion
    form scikit-learn's ``adjusted_rand_score`` uses (exact integer pair counts, 1.0 where the two
    labelings make no conflicting pair), without its input checks."""
    t = contingency(a, b).astype(np.int64)
    n = int(t.sum())
    sum_sq = int((t * t).sum())
    n_c, n_k = t.sum(axis=1), t.sum(axis=0)
    c01 = int((t @ n_k).sum()) - sum_sq
    c10 = int((t.T @ n_c).sum()) - sum_sq
    c11 = sum_sq - n
    c00 = n * n - c01 - c10 - sum_sq
    tn, fp, fn, tp = c00, c01, c10, c11
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def best_cluster_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    """Largest IoU between one cluster and the object mask (same shape)."""
    m = np.asarray(mask).astype(bool).ravel()
    t = contingency(labels, m)  # rows: clusters; columns: outside / inside the mask (where present)
    inside = t[:, -1] if m.any() else np.zeros(t.shape[0], dtype=np.int64)
    union = t.sum(axis=1) + int(m.sum()) - inside
    return float((inside / union).max()) if len(union) else 0.0


@dataclass(frozen=True)
class GroupingScores:
    """Agreement of the groups of each block with ground-truth masks.

    Attributes:
        model: model name of the groups.
        blocks: the blocks.
        ari, iou: ``(L, n_images)`` per block and image.
    """

    METRICS: ClassVar[tuple[str, str]] = ("mask_ari", "mask_best_iou")

    model: str
    blocks: tuple[BlockInfo, ...]
    ari: np.ndarray
    iou: np.ndarray

    def summary(self, metric: str) -> dict[str, np.ndarray]:
        """Mean, std and 95 % interval over images, per block."""
        vals = {"mask_ari": self.ari, "mask_best_iou": self.iou}.get(metric)
        if vals is None:
            raise FanlensError(f"metric must be one of {self.METRICS}. Got {metric!r} instead.")
        return per_block_summary(vals)

    def rows(self) -> list[dict]:
        return per_block_rows(self.model, self.blocks, {m: self.summary(m) for m in self.METRICS})


def per_block_summary(values: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, std and 95 % interval over images of ``(L, n_images)`` values, per block; images
    with a NaN in any block are left out (``n`` counts the images kept)."""
    values = np.asarray(values, dtype=float)
    keep = ~np.isnan(values).any(axis=0)
    st = RunningStats((values.shape[0],))
    if keep.any():
        st.update(values[:, keep].T)
    s = st.summary()
    return {"mean": s.mean, "std": s.std, "ci_low": s.ci_low, "ci_high": s.ci_high, "n": s.n}


def per_block_rows(model: str, blocks: Sequence[BlockInfo], summaries: dict[str, dict]) -> list[dict]:
    """Tidy rows (one per block, metric and statistic) from :func:`per_block_summary` outputs."""
    n = len(blocks)
    depth = np.linspace(0, 1, n) if n > 1 else np.zeros(n)
    rows = []
    for metric, s in summaries.items():
        for li, b in enumerate(blocks):
            for stat in STATISTICS:
                rows.append({"model": model, "block_index": b.index, "block": b.name, "depth": f"{depth[li]:.6g}",
                             "metric": metric, "statistic": stat, "value": f"{float(s[stat][li]):.8g}", "n": s["n"]})
    return rows


def mask_scores(groups: GroupsResult, masks: np.ndarray) -> GroupingScores:
    """Score each block's clusters against object masks ``(n_images, H, W)`` (bool)."""
    masks = np.asarray(masks).astype(bool)
    n_img = len(groups.images)
    if masks.ndim != 3 or masks.shape[0] != n_img:
        raise FanlensError(f"masks must have shape ({n_img}, H, W). Got {masks.shape} instead.")
    L = len(groups.blocks)
    ari = np.zeros((L, n_img))
    iou = np.zeros((L, n_img))
    for li in range(L):
        for i in range(n_img):
            lab = upsample_labels(groups.labels[li][i], masks.shape[1:])
            ari[li, i] = adjusted_rand(masks[i].ravel(), lab.ravel())
            iou[li, i] = best_cluster_iou(lab, masks[i])
    return GroupingScores(groups.model, groups.blocks, ari, iou)


def match_labels(label_maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Relabel a sequence of label maps (one per block, any grids) so colours persist.

    Each map is compared with the previous (already matched) one at the finer of the two
    resolutions; its clusters are assigned the previous labels by maximum overlap
    (Hungarian algorithm); clusters left over get fresh labels.
    """
    from scipy.optimize import linear_sum_assignment

    out: list[np.ndarray] = []
    for lab in label_maps:
        lab = np.asarray(lab)
        if not out:
            out.append(lab.copy())
            continue
        prev = out[-1]
        shape = max(prev.shape, lab.shape, key=lambda s: s[0] * s[1])
        a, b = upsample_labels(prev, shape).ravel(), upsample_labels(lab, shape).ravel()
        pa, pb = np.unique(a), np.unique(b)
        overlap = np.array([[np.count_nonzero((b == cb) & (a == ca)) for ca in pa] for cb in pb])
        rows, cols = linear_sum_assignment(-overlap)
        mapping = {int(pb[r]): int(pa[c]) for r, c in zip(rows, cols)}
        nxt = int(max(prev.max(), max(mapping.values(), default=-1))) + 1
        for c in pb:
            if int(c) not in mapping:
                mapping[int(c)] = nxt
                nxt += 1
        out.append(np.vectorize(mapping.get)(lab))
    return out
