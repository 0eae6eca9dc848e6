"""Giving the heap's free pages back to the system between batches.

A streamed analysis allocates and frees the same few hundred MiB every batch (activations,
affinities, decompositions). glibc's allocator serves blocks below its mmap threshold from its
arenas, and that threshold rises (up to 32 MiB) each time a larger mapped block is freed; the
worker threads of :func:`fanlens._threads.split_rows` have arenas of their own. The freed blocks
stay in the arenas, fragmented, and the resident size creeps up with the number of batches
(measured before each forward pass of a 400-image ViT-S ``analyze``: 868 -> 1634 MiB).
``malloc_trim(0)`` hands every free page of every arena back (``madvise``) without changing the
allocator's settings, so the user's process keeps its own configuration; with it, the same run
stays at 853-924 MiB.

:class:`HeapTrim` calls it between two batches when the time since its last call is at least
``1 / budget`` times what that call took (``budget`` = 2 %: ~26 ms per ViT-S batch of 16 images
that takes ~2 s, so every batch there; every few batches for a small model). The pages come
back when the next batch touches them again, and that costs time too: measured side by side
(``benchmarks/memory_rss.py --heap-trim both``, ViT-S ``analyze``, 9 rounds) the peak resident
size of 1,000 images is 1,389 MiB instead of 2,079 (1.089x the peak of 100 images instead of
1.541x) at 1.06x the time (per-round median; 1.13x the median time). A run that cannot afford
it sets ``FANLENS_HEAP_TRIM=0``. Only where the C library has ``malloc_trim`` (glibc);
elsewhere it does nothing. It changes no number a run computes.

Tried and left: trimming only when the resident size between batches grows past what the first
batches left (1 trim instead of 15-60 per 1,000 images, but 1.16x growth in one run: a batch
after a trim leaves more than the settled heap did).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Callable

from ._validation import check_choice

__all__ = ["HeapTrim", "trim_available"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _find_malloc_trim()
_now = time.perf_counter  # the clock of the budget


def trim_available() -> bool:
    """Whether this process can give free heap pages back (glibc) and is allowed to
    (``FANLENS_HEAP_TRIM``: ``1``, the default, or ``0``; any other value is refused)."""
    allowed = check_choice("FANLENS_HEAP_TRIM", os.environ.get("FANLENS_HEAP_TRIM", "1"), ("0", "1")) == "1"
    return allowed and _MALLOC_TRIM is not None


class HeapTrim:
    """Between the batches of a loop, ``malloc_trim(0)`` when its time budget allows (see module).

    Not after the last batch: a one-batch run pays nothing, and the memory a run leaves is the
    allocator's to keep or return as before.
    """

    def __init__(self, budget: float = 0.02) -> None:
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget!r}")
        self.budget = budget
        self.enabled = trim_available()
        self.calls = 0
        self._since = _now()
        self._cost = 0.0

    def between_batches(self) -> None:
        if not self.enabled:
            return
        now = _now()
        if now - self._since < self._cost / self.budget:
            return
        _MALLOC_TRIM(0)
        end = _now()
        self._cost, self._since = end - now, end
        self.calls += 1
