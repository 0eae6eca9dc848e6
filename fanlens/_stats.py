"""Streaming statistics: memory bounded by the number of statistics, not of images.

:class:`RunningStats` keeps, for an array of statistics of any shape, the count, the
mean and the sum of squared deviations (Welford / Chan et al.), so batches can be
added one at a time and partial results of several processes merged exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["RunningStats", "Summary", "Z95"]

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class Summary:
    """Aggregates over images of one array of statistics.

    ``ci_low``/``ci_high`` bound the 95 % confidence interval of the mean
    (normal approximation, ``mean +- 1.96 * std / sqrt(n)``); ``std`` is the sample
    standard deviation over images (the spread of the per-image values).
    """

    n: int
    mean: np.ndarray
    std: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


class RunningStats:
    """Count, mean and squared deviations of per-image values, updated batch by batch.

    With ``keep=True`` the per-image values are kept too, with the images' dataset indices
    (:meth:`per_image`): the bootstrap of :mod:`fanlens.claims` resamples them. They cost
    ``8 * prod(shape)`` bytes per image.
    """

    def __init__(self, shape: tuple[int, ...], keep: bool = False) -> None:
        self.shape = tuple(shape)
        self.n = 0
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)
        self.keep = keep
        self.indices: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def update(self, values: np.ndarray, indices: Sequence[int] | None = None) -> None:
        """Add a batch: ``values`` has shape ``(B, *shape)``; ``indices`` are the images' dataset
        indices (needed with ``keep=True``)."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape[1:] != self.shape:
            raise ValueError(f"values must have shape (B, {self.shape}). Got {v.shape} instead.")
        nb = v.shape[0]
        if nb == 0:
            return
        if self.keep:
            if indices is None or len(indices) != nb:
                raise ValueError(f"indices must give one dataset index per image ({nb}). Got {indices!r} instead.")
            self.indices.append(np.asarray(indices, dtype=np.int64))
            self.values.append(v.copy())
        bm = v.mean(axis=0)
        bm2 = ((v - bm) ** 2).sum(axis=0)
        self._merge(nb, bm, bm2)

    def _merge(self, nb: int, bm: np.ndarray, bm2: np.ndarray) -> None:
        n = self.n + nb
        delta = bm - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + bm2 + delta**2 * (self.n * nb / n)
        self.n = n

    def merge(self, other: "RunningStats") -> None:
        """Fold another accumulator in (exact; order-independent up to rounding)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge stats of shape {other.shape} into {self.shape}.")
        if other.n:
            self._merge(other.n, other.mean, other.m2)
            if self.keep:
                idx, vals = other.per_image()
                self.indices.append(idx)
                self.values.append(vals)

    def per_image(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, values)`` of the kept per-image values, sorted by dataset index (so the
        order does not depend on batches or processes): ``(n,)`` and ``(n, *shape)``."""
        if not self.keep:
            raise ValueError("per-image values were not kept (keep=False).")
        if not self.indices:
            return np.zeros(0, dtype=np.int64), np.zeros((0, *self.shape))
        idx = np.concatenate(self.indices)
        vals = np.concatenate(self.values)
        order = np.argsort(idx, kind="stable")
        self.indices, self.values = [idx[order]], [vals[order]]
        return self.indices[0], self.values[0]

    def summary(self) -> Summary:
        n = self.n
        std = np.sqrt(self.m2 / (n - 1)) if n > 1 else np.full(self.shape, np.nan)
        half = Z95 * std / np.sqrt(n) if n > 1 else np.full(self.shape, np.nan)
        return Summary(n, self.mean.copy(), std, self.mean - half, self.mean + half)
