"""One execution policy per process: how many threads fanlens's work may use.

On a machine that runs something else (a training job, a notebook kernel), thread pools sized to
the whole machine fight for the cores: OpenMP threads spin at every barrier waiting for a partner
that is not scheduled, and the same work costs several times the CPU time (measured: ``reproduce``
beside one other job, 5.8 x the CPU seconds of the run alone). The policy sizes every pool to the
cores this process may use and finds free, once per command:

- **cores**: the CPUs of the process's affinity mask (``os.sched_getaffinity``), capped by a cgroup
  CPU quota (``cpu.max``, or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded down, at least 1;
- **load**: the cores that other processes keep busy, their CPU time over :data:`SAMPLE_S` seconds
  (``/proc/PID/stat``). Processes at a lower priority (a larger ``nice``) yield to fanlens and are not
  counted. Where ``/proc`` cannot be read the load is taken as 0;
- **threads** = the free cores (cores - load, rounded, at least 1; under torchrun divided between
  the processes of the node), or what the user set: ``--threads N`` on the command line, else the
  environment variable :data:`ENV_THREADS` (``FANLENS_THREADS=N``; ``auto`` for the rule above).

Applied: torch's intra-op threads (``torch.set_num_threads``), one inter-op thread (fanlens runs no
inter-op parallel work), every BLAS and OpenMP runtime found in the process (numpy's and scipy's
OpenBLAS, scikit-learn's OpenMP, through ``threadpoolctl``) at the same count, no data-loading
worker processes (images are decoded in the calling process). The command line also sets
``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) before torch is imported: OpenMP reads
it once, when it loads, and a waiting thread then sleeps instead of spinning. The policy is
recorded in every result's provenance (``execution``).

Memory reuse (the command line, on Linux with glibc): :func:`keep_freed_memory` lets the process keep
freed memory for the next tensor instead of handing it back to the system at once. By default glibc
serves every block above 128 KiB with a fresh ``mmap`` and returns it on ``free``, so each large
intermediate tensor is page-faulted and zeroed by the kernel again (measured: a batch of 32 images
pixelated in 10 ms instead of 4.5 ms, when other work ran between the calls). The command raises the
trim threshold to :data:`MALLOC_TRIM_BYTES` and serves blocks up to :data:`MALLOC_MMAP_BYTES` from the
heap (``mallopt``); the process then holds up to that much freed memory. Recorded as ``memory``;
``FANLENS_KEEP_FREED_MEMORY=0`` turns it off (``1``, the default, on).

Library use: :func:`policy` is a context manager that applies a policy and restores the caller's
settings on exit::

    import os
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported, if you want it
    import fanlens
    with fanlens.execution.policy():        # or policy(threads=1)
        fanlens.Lens("zoo:vit", "samples").spectrum()
    fanlens.execution.keep_freed_memory()   # optional: process-wide, for the rest of the process

Without it, fanlens uses the caller's torch settings as they are (and records them).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["ENV_KEEP_FREED", "ENV_THREADS", "MALLOC_MMAP_BYTES", "MALLOC_TRIM_BYTES", "MAX_THREADS", "SAMPLE_S", "ExecutionPolicy",
           "available_cores", "busy_elsewhere", "decide", "keep_freed_memory", "policy", "prepare_command_line",
           "record"]

ENV_THREADS = "FANLENS_THREADS"
ENV_KEEP_FREED = "FANLENS_KEEP_FREED_MEMORY"
"""``0`` keeps glibc's default allocator settings in the command (``1``, the default: :func:`keep_freed_memory`)."""
"""The environment variable that sets the threads (an integer, or ``auto``); ``--threads`` overrides it."""
MAX_THREADS = 1024
SAMPLE_S = 0.1
"""Seconds over which the other processes' load is sampled (their CPU time is counted in 10 ms ticks)."""
MALLOC_TRIM_BYTES = 512 << 20
"""Freed memory the process may keep for reuse under :func:`keep_freed_memory` (glibc's trim threshold)."""
MALLOC_MMAP_BYTES = 32 << 20
"""Blocks up to this size come from the reusable heap under :func:`keep_freed_memory` (glibc's largest
allowed mmap threshold on 64-bit systems); larger ones are still mapped and returned one by one."""
_MEMORY = ["default"]  # what keep_freed_memory did in this process


@dataclass(frozen=True)
class ExecutionPolicy:
    """The thread counts fanlens runs with, and how they were chosen."""

    threads: int
    """torch intra-op threads, BLAS and OpenMP threads, and fanlens's own worker threads."""
    interop_threads: int
    loader_workers: int
    cores: int
    """CPUs this process may use (affinity and cgroup quota)."""
    load: float | None
    """Cores kept busy by other processes when the policy was decided (``None``: not sampled)."""
    source: str
    """``"--threads"``, ``"FANLENS_THREADS"``, ``"auto"`` or ``"caller"`` (fanlens left the settings as found)."""
    omp_wait_policy: str
    processes_per_node: int = 1
    memory: str = "default"
    """``"default"``, or how :func:`keep_freed_memory` set the allocator."""

    def to_dict(self) -> dict:
        return asdict(self)


_ACTIVE: list[ExecutionPolicy] = []  # the policies applied now (innermost last)


def _cgroup_quota(root: Path = Path("/")) -> float | None:
    """The cgroup's CPU quota in cores, or None where there is none (or it cannot be read); ``root``
    is where ``proc`` and ``sys`` are found (tests)."""
    paths: list[Path] = []
    try:
        for line in (root / "proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0":  # cgroup v2
                paths.append(root / "sys/fs/cgroup" / parts[2].strip().lstrip("/") / "cpu.max")
    except OSError:
        pass
    paths.append(root / "sys/fs/cgroup/cpu.max")
    for p in paths:
        try:
            quota, period = p.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota == "max":
            return None
        with contextlib.suppress(ValueError, ZeroDivisionError):
            return float(quota) / float(period)
    try:  # cgroup v1
        quota = int((root / "sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int((root / "sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def available_cores() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup quota (rounded down), >= 1."""
    cpus = _affinity()
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _autogroup(pid: int | str) -> tuple[str, int] | None:
    """``(group, nice)`` of a process's scheduler autogroup (``/proc/PID/autogroup``), or None where the
    kernel has none or the file cannot be read."""
    try:
        with open(f"/proc/{pid}/autogroup", "rb") as f:
            name, _, nice = f.read().decode("ascii", "replace").split()[:3]
        return name, int(nice)
    except (OSError, ValueError):
        return None


def _autogroups_on() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled", "rb") as f:
            return f.read().strip() == b"1"
    except OSError:
        return False


def _others_ticks() -> dict[int, int] | None:
    """CPU clock ticks (user + system) so far of every other process that does not yield to this one,
    by pid; None where ``/proc`` cannot be read.

    A process yields when its ``nice`` is larger than ours — within one scheduler autogroup only: where
    the kernel groups processes by session (``sched_autogroup_enabled``, the default of desktop and many
    server kernels), a process of another session (another terminal, a notebook kernel, a job started
    with ``setsid``) competes as its group, whatever its own ``nice``; there the groups' nice values
    decide."""
    me = os.getpid()
    try:
        own_nice = os.getpriority(os.PRIO_PROCESS, 0)
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except (AttributeError, OSError):
        return None
    own_group = _autogroup("self") if _autogroups_on() else None
    out: dict[int, int] = {}
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone, or not ours to read
            continue
        try:  # fields from the state on: utime, stime are the 12th and 13th, nice the 17th
            utime, stime, nice = int(fields[11]), int(fields[12]), int(fields[16])
        except (IndexError, ValueError):
            continue
        group = _autogroup(pid) if own_group is not None else None
        if group is not None and group[0] != own_group[0]:
            competes = group[1] <= own_group[1]
        else:
            competes = nice <= own_nice
        if competes:
            out[pid] = utime + stime
    return out


def busy_elsewhere(seconds: float = SAMPLE_S) -> float | None:
    """Cores kept busy by other processes over the next ``seconds``: the CPU time of every other
    process at this process's priority or a higher one, per second, capped at :func:`available_cores`
    (``None`` where ``/proc`` cannot be read). Processes that yield to this one (a larger ``nice`` in
    the same scheduler autogroup: :func:`_others_ticks`) are not counted."""
    before = _others_ticks()
    if before is None:
        return None
    t0 = time.monotonic()
    time.sleep(seconds)
    after = _others_ticks()
    elapsed = time.monotonic() - t0
    if after is None:
        return None
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items() if t >= before.get(pid, 0))
    try:
        hz = os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        hz = 100
    return min(float(available_cores()), ticks / hz / max(elapsed, 1e-9))


def _processes_per_node() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:  # a malformed torchrun environment is refused where it is read (fanlens.distributed)
        return 1


def parse_threads(value: object, param: str = "threads") -> int | None:
    """A thread count (1 to :data:`MAX_THREADS`) or ``None`` for ``"auto"``/``None``."""
    from ._validation import FanlensError

    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    else:
        try:
            n = int(str(value).strip())
        except ValueError:
            n = None
    if n is None or not 1 <= n <= MAX_THREADS:
        raise FanlensError(f"{param} must be a whole number of threads from 1 to {MAX_THREADS}, or 'auto'. "
                           f"Got {value!r} instead.")
    return n


def decide(threads: int | str | None = None, *, sample_s: float = SAMPLE_S, param: str = "threads") -> ExecutionPolicy:
    """The policy for this process: ``threads`` if given (``param`` names it in errors and in the
    record), else :data:`ENV_THREADS`, else the free cores (sampled over ``sample_s`` seconds)."""
    from ._validation import check_choice

    check_choice(ENV_KEEP_FREED, os.environ.get(ENV_KEEP_FREED, "1"), ("0", "1"))
    cores = available_cores()
    per_node = _processes_per_node()
    n, source, load = parse_threads(threads, param), param, None
    if n is None and os.environ.get(ENV_THREADS, "").strip():
        n, source = parse_threads(os.environ[ENV_THREADS], ENV_THREADS), ENV_THREADS
    if n is None:
        source = "auto"
        load = busy_elsewhere(sample_s) if sample_s > 0 else None
        free = cores - (load or 0.0)
        n = max(1, min(cores, int(free / per_node + 0.5)))
    return ExecutionPolicy(threads=n, interop_threads=1, loader_workers=0, cores=cores,
                           load=None if load is None else round(load, 2), source=source,
                           omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
                           processes_per_node=per_node, memory=_MEMORY[0])


@contextlib.contextmanager
def policy(threads: int | str | None = None, *, sample_s: float = SAMPLE_S,
           param: str = "threads") -> Iterator[ExecutionPolicy]:
    """Apply :func:`decide`'s policy to torch and to every BLAS/OpenMP runtime in the process for the
    enclosed work; the caller's thread counts are restored on exit."""
    import torch

    pol = decide(threads, sample_s=sample_s, param=param)
    before = torch.get_num_threads()
    limits = None
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=pol.threads)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    torch.set_num_threads(pol.threads)
    with contextlib.suppress(RuntimeError):  # only possible before the inter-op pool has started
        torch.set_num_interop_threads(pol.interop_threads)
    _ACTIVE.append(pol)
    try:
        yield pol
    finally:
        _ACTIVE.remove(pol)
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(before)


def record() -> dict:
    """The execution policy in force, for a result's provenance (the caller's settings when fanlens
    applied none)."""
    if _ACTIVE:
        return _ACTIVE[-1].to_dict()
    import torch

    return ExecutionPolicy(threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
                           loader_workers=0, cores=available_cores(), load=None, source="caller",
                           omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
                           processes_per_node=_processes_per_node(), memory=_MEMORY[0]).to_dict()


def _launched_as_command() -> bool:
    """Whether this process is the ``fanlens`` command (console script, ``python -m fanlens.cli``)."""
    if Path(sys.argv[0] if sys.argv else "").name in ("fanlens", "fanlens.exe"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1] in ("fanlens", "fanlens.cli"):
            return True
    return any(a in ("-mfanlens", "-mfanlens.cli") for a in argv)


def keep_freed_memory() -> bool:
    """Let this process keep freed memory for its next tensors (glibc's ``mallopt``: trim threshold
    :data:`MALLOC_TRIM_BYTES`, mmap threshold :data:`MALLOC_MMAP_BYTES`), instead of returning every
    large block to the system and faulting it in again. Process-wide and not undone; a no-op that
    returns ``False`` where the C library is not glibc. The command line calls it at its start."""
    import ctypes
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_trim_threshold, MALLOC_TRIM_BYTES) != 1 or mallopt(m_mmap_threshold, MALLOC_MMAP_BYTES) != 1:
        return False  # pragma: no cover - values inside glibc's documented limits
    _MEMORY[0] = f"glibc: keeps up to {MALLOC_TRIM_BYTES >> 20} MiB freed, heap blocks up to {MALLOC_MMAP_BYTES >> 20} MiB"
    return True


def prepare_command_line() -> None:
    """Before torch loads, in the ``fanlens`` command only: OpenMP's threads sleep while they wait
    (``OMP_WAIT_POLICY=PASSIVE``) unless the environment chose otherwise, and freed memory is kept for
    reuse (:func:`keep_freed_memory`)."""
    if "torch" in sys.modules or not _launched_as_command():
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get(ENV_KEEP_FREED, "1") == "1":  # another value is refused by decide(), in one line
        keep_freed_memory()
