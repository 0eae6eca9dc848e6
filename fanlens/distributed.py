"""Multi-process runs: shard the images across ranks, reduce the statistics exactly.

Under ``torchrun --nproc_per_node=N`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``), :func:`init_from_env` joins the process group (gloo
on CPU, NCCL for CUDA). :func:`fanlens.spectrum` and :func:`fanlens.noise_probe` then take
every ``world_size``-th image starting at their rank and merge the per-rank accumulators
(count, mean, squared deviations; Chan et al.) in rank order, so every rank ends with the
statistics of all images: equal to a single-process run up to float rounding.

Errors end every rank: a rank that fails publishes its one-line message in the process
group's key-value store (:func:`report_error`); the others look for it after every batch
(:func:`check_peers`) and while waiting for each other before the final merge, and stop
with the same message (:class:`PeerError`) instead of waiting in a collective.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from ._stats import RunningStats
from ._validation import FanlensError

__all__ = ["init_from_env", "rank_and_world", "merge_stats", "is_main", "report_error", "check_peers", "PeerError",
           "wait_for_all"]

_ERROR_KEY = "fanlens/error"
_POLL_S = 0.02


class PeerError(FanlensError):
    """Another rank of the process group failed; the message is that rank's."""


def _store():
    """The default process group's key-value store (``None`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def report_error(message: str) -> None:
    """Publish this rank's error so that every other rank stops with it (no-op in one process)."""
    store = _store()
    if store is not None and rank_and_world()[1] > 1:
        try:
            if not store.check([_ERROR_KEY]):
                store.set(_ERROR_KEY, message)
        except RuntimeError:  # the store is gone: the others end on their own
            pass


def check_peers() -> None:
    """Raise :class:`PeerError` when another rank has reported an error (cheap; no collective)."""
    store = _store()
    if store is None or rank_and_world()[1] == 1:
        return
    if store.check([_ERROR_KEY]):
        raise PeerError(store.get(_ERROR_KEY).decode())


def wait_for_all(name: str) -> None:
    """A barrier through the store that gives up with :class:`PeerError` as soon as a rank reports an error."""
    store = _store()
    rank, world = rank_and_world()
    if store is None or world == 1:
        return
    key = f"fanlens/arrived/{name}"
    store.add(key, 1)
    while True:
        check_peers()
        if store.add(key, 0) >= world:
            return
        time.sleep(_POLL_S)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


RENDEZVOUS_TIMEOUT_S = 120.0
"""How long a process waits for its peers to join (``FANLENS_RENDEZVOUS_TIMEOUT`` in seconds overrides)."""


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw.strip())
    except ValueError:
        raise FanlensError(f"environment variable {name} must be an integer. Got {raw!r} instead.") from None
    if v < minimum:
        raise FanlensError(f"environment variable {name} must be at least {minimum}. Got {raw!r} instead.")
    return v


def rendezvous_timeout() -> float:
    raw = os.environ.get("FANLENS_RENDEZVOUS_TIMEOUT")
    if raw is None or raw == "":
        return RENDEZVOUS_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v < 1e7):
        raise FanlensError(f"environment variable FANLENS_RENDEZVOUS_TIMEOUT must be a positive number of seconds. "
                           f"Got {raw!r} instead.")
    return v


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group described by the environment; ``False`` when not launched that way.

    The launcher's variables are checked first (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``: integers,
    ``0 <= RANK < WORLD_SIZE``); peers that do not arrive within :func:`rendezvous_timeout` seconds end
    the run with one line instead of a wait without end."""
    import datetime

    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1, minimum=1)
    if world <= 1 or not dist.is_available():
        return False
    rank = _env_int("RANK", 0)
    if rank >= world:
        raise FanlensError(f"environment variable RANK must be below WORLD_SIZE ({world}). Got {rank} instead.")
    local = _env_int("LOCAL_RANK", 0)
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise FanlensError(f"WORLD_SIZE={world} asks for several processes, but {name} is not set: launch "
                                   f"with torchrun (which sets it), or unset WORLD_SIZE.")
        _env_int("MASTER_PORT", 0)
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        timeout = rendezvous_timeout()
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError, OSError) as e:  # the launcher's rendezvous: one line, not a trace
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise FanlensError(f"the process group of {world} processes could not be joined within {timeout:g} s "
                               f"(rank {rank}; FANLENS_RENDEZVOUS_TIMEOUT sets the wait): {first}") from None
        if backend == "nccl":
            torch.cuda.set_device(local)
    return True


_merges = 0


def merge_stats(stats: Sequence[RunningStats]) -> list[RunningStats]:
    """Merge per-rank accumulators across the process group (identity with one process)."""
    rank, world = rank_and_world()
    if world == 1:
        return list(stats)
    import torch.distributed as dist

    global _merges
    _merges += 1
    wait_for_all(f"merge-{_merges}")  # every rank is here and none has failed: the collective cannot hang
    mine = [(s.shape, s.n, s.mean, s.m2, *(s.per_image() if s.keep else (None, None))) for s in stats]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if any(len(g) != len(mine) for g in gathered):
        raise RuntimeError("ranks disagree on the number of statistics; every rank must see the same blocks.")
    merged = []
    for i in range(len(mine)):
        keep = stats[i].keep
        acc = RunningStats(mine[i][0], keep=keep)
        for g in gathered:  # rank order: the same result on every rank
            part = RunningStats(g[i][0], keep=keep)
            part.n, part.mean, part.m2 = g[i][1], g[i][2], g[i][3]
            if keep:
                part.indices, part.values = [g[i][4]], [g[i][5]]
            acc.merge(part)
        merged.append(acc)
    return merged
