"""The threading policy for small work.

The per-block statistics (batched eigendecompositions of ~200 x 200 affinities, k-means on a few
hundred tokens, norms of the probe) are many small operations. With torch's intra-op pool at 2+
threads, each of them wakes the pool and waits for it; when other processes share the cores
those waits dominate (measured: a batched ``eigvalsh`` of 192 matrices of 196² 10.7x slower at 2
threads than at 1 with a competing job; 0.97x on a quiet machine). :func:`one_thread` runs such
work on one intra-op thread and restores the caller's setting afterwards, so the user's global
torch configuration is the same before and after every fanlens call.

One intra-op thread would leave the other cores idle during the work that dominates it, the
batched decompositions. :func:`split_rows` hands the matrices of such a batch out in as many
chunks as the caller had threads, to worker threads that each run their chunk on one intra-op
thread: no pool barrier to wait at, every core busy (measured, 192 matrices of 196²: 0.095 s vs
0.190 s on one thread quietly, 0.19 s vs 0.88 s on torch's two-thread pool beside a competing
job). It is used only for work that is computed matrix by matrix (LAPACK's decompositions,
row-seeded k-means), so the results are identical, bit for bit, however the batch is split.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["one_thread", "one_blas_thread", "split_rows", "for_chunks", "map_items"]

# the thread count the outermost one_thread found: what split_rows may use
_CALLER_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("fanlens_caller_threads", default=None)
# the most bytes of input one call of a split function gets: a 4 MiB chunk (~27 affinities of
# 197 x 197 float32) keeps each worker's temporaries (float64 copies, LAPACK's input copy) small
CHUNK_BYTES = 4 << 20
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed (small, CPU) work on one intra-op thread; restore the thread count after."""
    if _CALLER_THREADS.get() is not None:  # nested: already on one thread
        yield
        return
    n = torch.get_num_threads()
    token = _CALLER_THREADS.set(n)
    try:
        if n > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if n > 1:
                torch.set_num_threads(n)
    finally:
        _CALLER_THREADS.reset(token)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the enclosed work with the BLAS libraries (numpy's and scipy's OpenBLAS) on one thread each,
    for LAPACK calls made from :func:`split_rows`'s workers: one BLAS pool per worker would put
    workers x BLAS threads on the cores. Set from the calling thread (the limit is process-wide) and
    restored after."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: it must not wait on their queue."""
    global _POOL, _POOL_SIZE, _POOL_LOCK, _POOL_PID
    _POOL, _POOL_SIZE, _POOL_LOCK, _POOL_PID = None, 0, threading.Lock(), os.getpid()


_POOL_PID = os.getpid()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool(n: int) -> ThreadPoolExecutor:
    """fanlens' worker threads (created once per process, reused; joined by Python at exit)."""
    global _POOL, _POOL_SIZE
    if _POOL_PID != os.getpid():  # forked without the at-fork hook
        _forget_pool_in_child()
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fanlens"), n
        return _POOL


def split_rows(fn: Callable[..., torch.Tensor | tuple], *rows: torch.Tensor,
               bounded: bool = True) -> torch.Tensor | tuple:
    """``fn(*rows)``, computed on chunks of the rows (dim 0) by the caller's number of threads.

    Each chunk runs on a worker thread with one intra-op thread; the outputs (a tensor, or a
    tuple of tensors, with one row per input row) are concatenated in order. ``fn`` must treat
    rows independently. With ``bounded`` the chunks hold at most :data:`CHUNK_BYTES` of ``rows[0]``
    each (at least one row), so that the temporaries ``fn`` makes stay small (see
    :mod:`fanlens._heap`); otherwise one chunk per thread. Off the CPU, or for one row,
    ``fn(*rows)`` is called as is.
    """
    with one_thread():
        b = rows[0].shape[0]
        n = min(_CALLER_THREADS.get() or 1, b)
        if b <= 1 or rows[0].device.type != "cpu":
            return fn(*rows)
        k = n
        if bounded:
            k = max(k, -(-b * rows[0][0].numel() * rows[0].element_size() // CHUNK_BYTES))
        k = min(k, b)
        if k <= 1:
            return fn(*rows)
        chunks = [r.tensor_split(k) for r in rows]
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work(*c: torch.Tensor):  # the caller's autograd modes (thread-local), as in for_chunks
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(*c)

        parts = list(_pool(n).map(work, *chunks)) if n > 1 else [fn(*c) for c in zip(*chunks)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def map_items(fn: Callable[[Any], Any], items: Sequence[Any], device: torch.device | str = "cpu") -> list:
    """``[fn(item) for item in items]``, the items handed out to as many worker threads as the caller
    had threads, each running its items on one intra-op thread; the outputs in the items' order.

    For independent pieces of work that each use torch's intra-op pool poorly, such as forward passes
    of a small model over batches of a few dozen images (measured, the zoo ViT on 32 images of 64²:
    2.13 ms an image on torch's two-thread pool, 2.9-3.1 ms on each of two one-thread streams side by
    side, 1.4 x the throughput). Work nested in ``fn`` (:func:`split_rows`, :func:`for_chunks`) runs
    inline on its worker. Off the CPU, or for one item or one thread, the items run in order on the
    calling thread."""
    with one_thread():
        k = min(_CALLER_THREADS.get() or 1, len(items))
        if k <= 1 or torch.device(device).type != "cpu":
            return [fn(item) for item in items]
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work(item: Any) -> Any:
            token = _CALLER_THREADS.set(1)  # nested one_thread, split_rows, for_chunks: inline, one thread
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    return fn(item)
            finally:
                _CALLER_THREADS.reset(token)

        return list(_pool(k).map(work, items))


def for_chunks(fn: Callable[[int, int], None], n: int, device: torch.device | str = "cpu") -> None:
    """``fn(start, stop)`` over ``range(n)`` in one contiguous chunk per caller thread, each on a
    worker thread with one intra-op thread; ``fn`` writes its results itself (into slices of an
    output the caller allocated: no concatenation). Off the CPU, or for one row or one thread,
    ``fn(0, n)`` is called as is."""
    with one_thread():
        k = min(_CALLER_THREADS.get() or 1, n)
        if k <= 1 or torch.device(device).type != "cpu":
            fn(0, n)
            return
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        # autograd's modes are thread-local: the workers take the caller's (an output made under
        # inference mode can only be written to under it)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work(b: tuple[int, int]) -> None:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                fn(*b)

        list(_pool(k).map(work, bounds))
