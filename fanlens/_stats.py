"""Streaming statistics: memory bounded by the number of statistics, not of images.

:class:`RunningStats` keeps, for an array of statistics of any shape, the count, the
mean and the sum of squared deviations (Welford / Chan et al.), so batches can be
added one at a time and partial results of several processes merged exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Count, mean and squared deviations of per-image values, updated batch by batch."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.n = 0
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)

    def update(self, values: np.ndarray) -> None:
        """Add a batch: ``values`` has shape ``(B, *shape)``."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape[1:] != self.shape:
            raise ValueError(f"values must have shape (B, {self.shape}). Got {v.shape} instead.")
        nb = v.shape[0]
        if nb == 0:
            return
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

    def summary(self) -> Summary:
        n = self.n
        std = np.sqrt(self.m2 / (n - 1)) if n > 1 else np.full(self.shape, np.nan)
        half = Z95 * std / np.sqrt(n) if n > 1 else np.full(self.shape, np.nan)
        return Summary(n, self.mean.copy(), std, self.mean - half, self.mean + half)
