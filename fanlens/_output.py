"""Output folders, checkpoints and signals: the writing half of :mod:`fanlens.runner`.

It imports nothing of fanlens but the error type, so that :mod:`fanlens.results` and
:mod:`fanlens.data` can use it while :mod:`fanlens.runner` builds on them; use it through
:mod:`fanlens.runner`.

Output folders (:class:`OutputFolder`)
--------------------------------------
Every file a fanlens run writes goes through one writer with these rules:

- **Nothing is replaced without being asked.** A run refuses an output folder that is not
  empty (hidden entries aside) unless ``overwrite=True`` (CLI ``--overwrite``), or
  ``resume=True`` for the run whose checkpoint it holds. With ``overwrite``, the files of the
  earlier fanlens run (listed in its ``.fanlens-run.json``) and the files the new run writes
  are replaced; any other file in the folder is left alone.
- **Checked before the work.** The folder is created and tested for writing before any
  analysis starts; a read-only or missing location fails at once with a one-line error.
- **One unit.** A run's files are first written to a hidden staging folder inside the output
  folder; only when every file is written are they moved into place (renames within one
  file system: no space needed, nothing half-written). A write failure (full disk) leaves
  the folder with the earlier set untouched, never a mix of old and new files.
- **Never into the package.** An output folder inside the installed fanlens package is
  refused (the maintainer option of ``fanlens train-zoo --into-package`` is the exception).
- **Never read back as input.** The ``.fanlens-run.json`` marker makes image-folder listing
  (:func:`fanlens.data.resolve_images`) skip the folder, so ``--images .`` never picks up a
  run's own figures.

Checkpoints (:class:`RunState`)
-------------------------------
Long streaming analyses (:func:`fanlens.spectrum`, :func:`fanlens.noise_probe`,
:func:`fanlens.analyze`) given a ``state_dir`` save their accumulators (count, mean and
squared deviations per statistic, the Welford state) every ``checkpoint_every`` batches and
when SIGINT or SIGTERM arrives, in one file per process, written atomically; a run killed
outright keeps its last checkpoint. With ``resume=True`` a run restores them and goes on with
the next batch: the result equals an uninterrupted run exactly (same batches, same merge
order). A checkpoint carries a key of every parameter that shapes the numbers and the image
list; resuming with another key is refused, and so is starting over on an existing checkpoint
without ``resume``. A completed run removes its checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import tempfile
import threading
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ._validation import FanlensError

__all__ = [
    "inside", "write_atomic",
    "RUN_MARKER",
    "STATE_DIRNAME",
    "OutputFolder",
    "RunState",
    "Interrupted",
    "is_run_folder",
    "package_dir",
]

RUN_MARKER = ".fanlens-run.json"
LOCK_NAME = ".fanlens.lock"
"""The pid of the run that holds a folder's lock (a ``flock`` on the folder); removed with the lock."""
STATE_DIRNAME = ".fanlens-state"
_STAGING_PREFIX = ".fanlens-staging-"
_OLD_PREFIX = ".fanlens-old-"
STATE_FORMAT = 1


NPZ_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError,
                   NotImplementedError, RuntimeError, struct.error, OverflowError, MemoryError)
"""What reading a damaged ``.npz`` raises (zipfile and numpy): a flipped flag reads as encryption
(RuntimeError) or an unknown compression method (NotImplementedError), a damaged header as a
``struct.error``, an impossible size as OverflowError or MemoryError. Found by the fuzz suite."""


def state_dir(out: str | Path, command: str) -> Path:
    """The checkpoint folder of ``command``'s run in output folder ``out`` (every rank computes it)."""
    return Path(out) / STATE_DIRNAME / (command or "run")


def package_dir() -> Path:
    """The installed fanlens package folder (never written to by a run)."""
    return Path(__file__).resolve().parent


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is the output folder of a fanlens run (holds the run marker)."""
    return (Path(path) / RUN_MARKER).is_file()


def inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _short_oserror(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None and e.strerror else str(e)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing its checkpoint."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- output folder
class OutputFolder:
    """The one writer of fanlens output folders (see the module doc for the rules).

    Usage::

        out = OutputFolder("fanlens_out/spectrum", overwrite=False)  # checks, before any work
        ... run the analysis ...
        with out.staging() as tmp:        # write every file of the run into tmp
            result.save_files(tmp)
        out.written                       # the files now in place

    Args:
        path: the output folder (created with its parents).
        overwrite: replace the files of an earlier run (and same-named files).
        resume: the folder may hold this run's own checkpoint (``STATE_DIRNAME``).
        command: what is being written (recorded in the marker; names the run in messages).
        allow_package: allow a folder inside the installed package (maintainer option).
        param: the parameter name used in error messages.
        marker: record the run's files in ``.fanlens-run.json`` (replaced as a set next time);
            without it, only same-named files are replaced.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False, command: str = "",
                 allow_package: bool = False, param: str = "out", marker: bool = True) -> None:
        if path is None or (isinstance(path, str) and not path.strip()):
            raise FanlensError(f"{param} must name a folder. Got {path!r} instead.")
        if not isinstance(path, (str, os.PathLike)):
            raise FanlensError(f"{param} must be a folder path. Got {type(path).__name__} instead.")
        self.param = param
        self.path = Path(path)
        self.overwrite, self.resume, self.command, self.marker = bool(overwrite), bool(resume), command, bool(marker)
        self.written: list[Path] = []
        resolved = self.path.resolve()
        if not allow_package and inside(resolved, package_dir()):
            raise FanlensError(
                f"{param} must be outside the installed fanlens package ({package_dir()}). Got {str(self.path)!r} "
                f"instead (fanlens never writes into its own files)."
            )
        if self.path.exists() and not self.path.is_dir():
            raise FanlensError(f"{param} must be a folder. Got {str(self.path)!r}, which is a file.")
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".fanlens-write-test-", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            self._cleanup_created()
            raise FanlensError(
                f"{param} must be a folder fanlens can write to. Got {str(self.path)!r}: {_short_oserror(e)}."
            ) from None
        self._lock_fd: int | None = None
        self._lock()
        try:
            self._check_conflicts()
        except BaseException:
            self.release()
            raise

    # ------------------------------------------------------------------ the run's lock
    def _lock(self) -> None:
        """Hold an exclusive ``flock`` on the folder itself while this run owns it (released when the run
        ends or its process dies): a second run into the same folder stops before any work. The holder's
        pid is written to ``LOCK_NAME`` for the message, and removed with the lock."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock (documented)
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FanlensError(f"{self.param} {str(self.path)!r} could not be opened to lock it "
                               f"({_short_oserror(e)}).") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                holder = (self.path / LOCK_NAME).read_text()[:32].strip()
            except (OSError, UnicodeDecodeError):
                holder = ""
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise FanlensError(f"{self.param} {str(self.path)!r} is in use by another fanlens run{who}; wait for it "
                               f"to finish, or choose another --out.") from None
        self._lock_fd = fd
        with contextlib.suppress(OSError):
            (self.path / LOCK_NAME).write_text(str(os.getpid()))

    def release(self) -> None:
        """Let other runs use the folder (after the files are in place, or when this run gives up)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock

    def __del__(self) -> None:
        self.release()

    # ------------------------------------------------------------------ checks
    def _visible(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))

    def _check_conflicts(self) -> None:
        state = self.path / STATE_DIRNAME
        if state.is_dir() and any(state.iterdir()) and not (self.resume or self.overwrite):
            raise FanlensError(
                f"{self.param} {str(self.path)!r} holds the checkpoint of an unfinished run; pass --resume "
                f"(resume=True) to continue it, or --overwrite to start over."
            )
        if self.overwrite:
            return
        visible = self._visible()
        if visible:
            shown = ", ".join(visible[:5]) + (", ..." if len(visible) > 5 else "")
            raise FanlensError(
                f"{self.param} must be a new or empty folder, so that no earlier result is replaced. Got "
                f"{str(self.path)!r}, which holds {shown}; choose another --out, or pass --overwrite to replace "
                f"the earlier run's files."
            )

    def _cleanup_created(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def abandon(self) -> None:
        """The run failed before writing: remove the folder if this run created it and it is empty."""
        self.release()
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self._cleanup_created()

    @property
    def state_dir(self) -> Path:
        """Where the run's checkpoints live until its files are in place."""
        return state_dir(self.path, self.command)

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden folder to write the run's files into; on exit they replace the earlier set."""
        tmp = self.path / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            self._commit(tmp)
        except OSError as e:
            raise FanlensError(
                f"{self.param} {str(self.path)!r} could not be written ({_short_oserror(e)}); the folder keeps "
                f"its earlier files unchanged."
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _previous_entries(self) -> list[str]:
        marker = self.path / RUN_MARKER
        try:
            data = json.loads(marker.read_text())
            return [str(n) for n in data.get("entries", []) if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]
        except (OSError, ValueError, AttributeError):
            return []

    def _commit(self, tmp: Path) -> None:
        new = sorted(p.name for p in tmp.iterdir())
        if self.marker:
            marker = {"command": self.command, "entries": new, "format": STATE_FORMAT}
            (tmp / RUN_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            replace = sorted(set(self._previous_entries()) | set(new) | {RUN_MARKER})
        else:
            replace = new
        old = self.path / f"{_OLD_PREFIX}{uuid.uuid4().hex[:8]}"
        old.mkdir()
        moved_old: list[str] = []
        moved_new: list[str] = []
        try:
            for name in replace:  # move the earlier set aside
                if os.path.lexists(self.path / name):
                    os.replace(self.path / name, old / name)
                    moved_old.append(name)
            for name in new + ([RUN_MARKER] if self.marker else []):  # and the new set in
                os.replace(tmp / name, self.path / name)
                moved_new.append(name)
        except OSError:
            for name in moved_new:  # put everything back as it was
                with contextlib.suppress(OSError):
                    os.replace(self.path / name, tmp / name)
            for name in moved_old:
                with contextlib.suppress(OSError):
                    os.replace(old / name, self.path / name)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        self.written = [self.path / n for n in new]
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.path / STATE_DIRNAME).rmdir()
        self.release()


# --------------------------------------------------------------------------- checkpoints
def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _integrity(meta: dict, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over a checkpoint's metadata (the run key and counters included, ``integrity`` left out) and
    every array's name, dtype, shape and bytes: an edited or damaged checkpoint does not verify."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "integrity"}, sort_keys=True,
                                  default=str).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class RunState:
    """Checkpoint file of one process of a streaming analysis.

    Args:
        state_dir: folder of the checkpoints (``None``: no checkpoints, no resume).
        key: every parameter that shapes the numbers, and the image names; a checkpoint
            with another key is refused on resume.
        rank, world: this process and the process count (one file per process).
        every: checkpoint every ``every`` batches.
        resume: restore an existing checkpoint; without it an existing one is refused.
    """

    def __init__(self, state_dir: str | Path | None, key: dict, *, rank: int = 0, world: int = 1, every: int = 10,
                 resume: bool = False) -> None:
        self.enabled = state_dir is not None
        self.every, self.resume = int(every), bool(resume)
        self.key = _jsonable(key)
        self.digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.path = Path(state_dir) / f"rank{rank}-of-{world}.npz" if self.enabled else None
        self.batches_done = 0
        self._restored: dict | None = None
        if not self.enabled:
            if resume:
                raise FanlensError("resume needs a state_dir (the folder of the checkpoints). Got none.")
            return
        if self.path.is_file():
            if not resume:
                raise FanlensError(
                    f"state_dir {str(self.path.parent)!r} holds the checkpoint of an earlier run; pass resume=True "
                    f"(--resume) to continue it, or remove it to start over."
                )
            self._restored = self._read()
        elif resume:
            others = sorted(p.name for p in self.path.parent.glob("rank*-of-*.npz")) if self.path.parent.is_dir() else []
            if others:
                raise FanlensError(
                    f"resume must use the process count of the interrupted run. Found {others} in "
                    f"{str(self.path.parent)!r}, but this run is rank {rank} of {world}."
                )

    def _start_over(self) -> str:
        return (f"remove {str(self.path.parent)!r} (or run again with --overwrite instead of --resume) to start "
                f"over")

    def _read(self) -> dict:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["__meta__"]).decode())
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
        except NPZ_READ_ERRORS as e:
            raise FanlensError(f"checkpoint {str(self.path)!r} cannot be read ({type(e).__name__}); "
                               f"{self._start_over()}.") from None
        if not isinstance(meta, dict) or meta.get("integrity") != _integrity(meta, arrays):
            raise FanlensError(f"checkpoint {str(self.path)!r} does not verify (its content or run key was edited or "
                               f"damaged); {self._start_over()}.")
        if meta.get("digest") != self.digest:
            old = meta.get("key", {})
            diff = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
            raise FanlensError(
                f"resume must use the parameters and images of the interrupted run. The checkpoint in "
                f"{str(self.path.parent)!r} differs in: {', '.join(diff) or 'its format'}."
            )
        self.batches_done = int(meta["batches_done"])
        return {"meta": meta, "arrays": arrays}

    def restore(self, accs: Sequence[Any]) -> int:
        """Load the accumulators' state from the checkpoint; returns the batches already done."""
        if self._restored is None:
            return 0
        meta, arrays = self._restored["meta"], self._restored["arrays"]
        try:
            if len(meta["accs"]) != len(accs):
                raise ValueError("accumulator count")
            for i, acc in enumerate(accs):
                acc.load_state(meta["accs"][i], {k.split("/", 1)[1]: v for k, v in arrays.items()
                                                 if k.startswith(f"{i}/")})
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise FanlensError(f"checkpoint {str(self.path)!r} does not fit this run ({type(e).__name__}: {e}); "
                               f"{self._start_over()}.") from None
        return self.batches_done

    def save(self, accs: Sequence[Any], batches_done: int) -> None:
        if not self.enabled:
            return
        arrays: dict[str, np.ndarray] = {}
        metas = []
        for i, acc in enumerate(accs):
            m, arr = acc.state()
            metas.append(m)
            arrays.update({f"{i}/{k}": v for k, v in arr.items()})
        meta = {"format": STATE_FORMAT, "digest": self.digest, "key": self.key, "batches_done": int(batches_done),
                "accs": metas}
        meta["integrity"] = _integrity(meta, arrays)
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(self.path, buf.getvalue())
        self.batches_done = int(batches_done)

    def finish(self) -> None:
        """The run is complete and its result returned: its checkpoint goes."""
        if not self.enabled:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # only when empty (other ranks' files stay)

    def due(self, batches_done: int) -> bool:
        return self.enabled and batches_done % self.every == 0


@contextlib.contextmanager
def signal_guard(enabled: bool) -> Iterator[list[int]]:
    """While active, SIGINT/SIGTERM only set a flag (the caller checkpoints and stops after the
    current batch); a second signal stops at once. Yields the list that receives the signal."""
    got: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {}

    def handler(signum, frame):
        if got:  # second signal: stop now
            raise KeyboardInterrupt
        got.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
