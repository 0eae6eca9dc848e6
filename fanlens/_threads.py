"""The threading policy for small work.

The per-block statistics (batched eigendecompositions of ~200 x 200 affinities, k-means on a few
hundred tokens, norms of the probe) are many small operations. With torch's intra-op pool at 2+
threads, each of them wakes the pool and waits for it; when other processes share the cores
those waits dominate (measured: a batched ``eigvalsh`` of 192 matrices of 196² 10.7x slower at 2
threads than at 1 with a competing job; 0.97x on a quiet machine). :func:`one_thread` runs such
work on one intra-op thread and restores the caller's setting afterwards, so the user's global
torch configuration is the same before and after every fanlens call.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["one_thread"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed (small, CPU) work on one intra-op thread; restore the thread count after."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
