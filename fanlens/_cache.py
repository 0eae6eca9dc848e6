"""The clean-token cache of a :class:`fanlens.Lens`: each image's block tokens captured once.

Entries are the clean rows of one forward batch: per block its patch tokens and prefix tokens
(on the CPU), and the model's output for those rows where the pass ran to the end. Entries are
held in memory up to ``max_bytes``; beyond that they are written to a private temporary folder
(``spill=True``, safetensors files, read back on demand) or not kept at all (``spill=False``: the
images of such an entry are forwarded again when an analysis needs them). The folder is removed
by :meth:`TokenCache.close` and when the cache is garbage collected.

Lookups are by dataset index, so any batching of the same images is served (a batch whose
images sit in several entries is gathered row by row).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .capture import BlockTokens

__all__ = ["TokenCache", "CachedBatch", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 2 * 2**30
"""A :class:`fanlens.Lens` keeps up to this many bytes of clean tokens in memory (2 GiB)."""


@dataclass
class CachedBatch:
    """The clean rows of a batch: ``blocks[i]`` is block ``i``'s :class:`BlockTokens`; ``output``
    the model's output for the rows (``None`` when the pass stopped after the last block)."""

    blocks: list[BlockTokens]
    output: torch.Tensor | None


@dataclass
class _Entry:
    indices: tuple[int, ...]
    meta: list[tuple[str, int, Any]]  # (name, call, layout) per block
    tensors: dict[str, torch.Tensor] | None  # None when spilled
    path: Path | None = None
    nbytes: int = 0
    has_output: bool = False
    rows: dict[int, int] = field(default_factory=dict)


def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class TokenCache:
    """Clean block tokens per image, within a byte budget (see the module docstring).

    Args:
        max_bytes: bytes of tensors kept in memory (0: none).
        spill: write entries beyond ``max_bytes`` to a temporary folder instead of dropping them.
    """

    def __init__(self, max_bytes: int, *, spill: bool = True) -> None:
        self.max_bytes, self.spill = int(max_bytes), bool(spill)
        self._entries: list[_Entry] = []
        self._where: dict[int, _Entry] = {}
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self.images_forwarded = 0
        """Clean images this cache saw forwarded (one per image unless entries were dropped)."""
        self.dropped = 0
        self._dir: str | None = None
        self._finalizer = None

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.spill

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, index: int) -> bool:
        return int(index) in self._where

    # ------------------------------------------------------------------ writing
    def put(self, indices: Sequence[int], blocks: Sequence[BlockTokens], output: Any) -> None:
        """Keep the clean rows ``[0, len(indices))`` of a forward batch."""
        b = len(indices)
        self.images_forwarded += b
        if not self.enabled:
            return
        tensors: dict[str, torch.Tensor] = {}
        meta = []
        for i, bt in enumerate(blocks):
            tensors[f"{i}.t"] = bt.tokens[:b].detach().to("cpu", copy=True).contiguous()
            tensors[f"{i}.p"] = bt.prefix[:b].detach().to("cpu", copy=True).contiguous()
            meta.append((bt.name, bt.call, bt.layout))
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        has_output = isinstance(out, torch.Tensor) and out.ndim >= 1 and out.shape[0] >= b
        if has_output:
            tensors["out"] = out[:b].detach().to("cpu", copy=True).contiguous()
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        idx = tuple(int(i) for i in indices)
        for i in idx:  # a newer capture of an image replaces the older one
            old = self._where.pop(i, None)
            if old is not None:
                old.rows.pop(i, None)
        entry = _Entry(idx, meta, tensors, None, nbytes, has_output, {i: r for r, i in enumerate(idx)})
        if self.bytes_in_memory + nbytes > self.max_bytes:
            if not self.spill:
                self.dropped += b
                return
            self._spill(entry)
        else:
            self.bytes_in_memory += nbytes
        self._entries.append(entry)
        for i in idx:
            self._where[i] = entry

    def _spill(self, entry: _Entry) -> None:
        from safetensors.torch import save_file

        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="fanlens-cache-")
            self._finalizer = weakref.finalize(self, _remove_dir, self._dir)
        entry.path = Path(self._dir) / f"entry-{len(self._entries):06d}.safetensors"
        save_file(entry.tensors, str(entry.path))
        self.bytes_on_disk += entry.nbytes
        entry.tensors = None

    # ------------------------------------------------------------------ reading
    def get(self, indices: Sequence[int], *, need_output: bool = False,
            device: torch.device | str | None = None) -> CachedBatch | None:
        """The clean rows of ``indices`` in that order, or ``None`` unless every image is cached
        (with its output when ``need_output``)."""
        idx = [int(i) for i in indices]
        entries = [self._where.get(i) for i in idx]
        if not idx or any(e is None for e in entries):
            return None
        if need_output and not all(e.has_output for e in entries):
            return None
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        for e in entries:
            if id(e) not in loaded:
                loaded[id(e)] = self._tensors(e)
        first = entries[0]
        if all(e is first for e in entries) and [first.rows[i] for i in idx] == list(
                range(first.rows[idx[0]], first.rows[idx[0]] + len(idx))):
            lo = first.rows[idx[0]]

            def take(key: str) -> torch.Tensor:
                return loaded[id(first)][key][lo : lo + len(idx)]
        else:
            def take(key: str) -> torch.Tensor:
                return torch.stack([loaded[id(e)][key][e.rows[i]] for e, i in zip(entries, idx)])

        blocks = []
        for k, (name, call, layout) in enumerate(first.meta):
            t, p = take(f"{k}.t"), take(f"{k}.p")
            if device is not None:
                t, p = t.to(device), p.to(device)
            blocks.append(BlockTokens(name, call, t, p, layout))
        out = None
        if need_output:
            out = take("out")
            out = out.to(device) if device is not None else out
        return CachedBatch(blocks, out)

    def _tensors(self, e: _Entry) -> dict[str, torch.Tensor]:
        if e.tensors is not None:
            return e.tensors
        from safetensors.torch import load_file

        return load_file(str(e.path))

    def close(self) -> None:
        """Drop every entry and remove the spill folder."""
        self._entries.clear()
        self._where.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._dir = None

    def __repr__(self) -> str:
        return (f"TokenCache({len(self)} images, {self.bytes_in_memory / 2**20:.1f} MiB in memory, "
                f"{self.bytes_on_disk / 2**20:.1f} MiB on disk, budget {self.max_bytes / 2**20:.0f} MiB)")
