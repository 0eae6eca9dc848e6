"""Token capture: the only place in fanlens that touches forward hooks.

:class:`TokenCapture` records the output of each selected block of any
``nn.Module`` during forward passes and turns it into patch tokens ``(B, N, C)``
with the prefix tokens (CLS, distillation, registers) kept apart. The token
layout of each block (prefix count, grid, memory layout) is derived from the
model and the input, never hard-coded; a shape that does not fit is an error.

Example::

    with TokenCapture(model) as cap:
        cap.run(x)
        for bt in cap.block_tokens():
            print(bt.name, bt.layout.grid, bt.tokens.shape)
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ._validation import FanlensError, check_choice

__all__ = [
    "LAYOUTS",
    "TokenLayout",
    "BlockSpec",
    "BlockTokens",
    "TokenCapture",
    "find_blocks",
    "match_modules",
    "infer_grid",
]


LAYOUTS = ("NLC", "NCHW", "NHWC")
MAX_CANDIDATES_SHOWN = 12


@dataclass(frozen=True)
class TokenLayout:
    """How one block's output maps to tokens.

    Attributes:
        layout: memory layout of the block output, ``"NLC"``, ``"NCHW"`` or ``"NHWC"``.
        num_prefix_tokens: tokens before the patch tokens (CLS, distillation, registers).
        grid: patch-token grid ``(H, W)``; ``H * W`` patch tokens in row-major order.
        channels: channels per token.
    """

    layout: str
    num_prefix_tokens: int
    grid: tuple[int, int]
    channels: int

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return {
            "layout": self.layout,
            "num_prefix_tokens": self.num_prefix_tokens,
            "grid": list(self.grid),
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(d["layout"], int(d["num_prefix_tokens"]), tuple(d["grid"]), int(d["channels"]))


@dataclass(frozen=True)
class BlockSpec:
    """A module whose output is read as tokens.

    Attributes:
        name: qualified module name (``model.get_submodule(name)``).
        layout: ``"NLC"``, ``"NCHW"``, ``"NHWC"``, or ``None`` to decide from the output
            (3-D: NLC, 4-D: NCHW).
        num_prefix_tokens: prefix tokens in an NLC output.
        default: analysed when no blocks are named (``False`` for optional extra blocks,
            such as FAN's class-attention blocks, that a pattern can still select).
    """

    name: str
    layout: str | None = None
    num_prefix_tokens: int = 0
    default: bool = True


@dataclass(frozen=True)
class BlockTokens:
    """The tokens of one call of one block.

    Attributes:
        name: module name.
        call: 0 for the first call of the module in the forward pass, 1 for the second, ...
        tokens: patch tokens ``(B, N, C)`` with ``N = H * W`` in row-major grid order.
        prefix: prefix tokens ``(B, P, C)`` (``P`` may be 0).
        layout: the derived :class:`TokenLayout`.
    """

    name: str
    call: int
    tokens: torch.Tensor
    prefix: torch.Tensor
    layout: TokenLayout

    @property
    def label(self) -> str:
        return self.name if self.call == 0 else f"{self.name}#{self.call}"

    def grid_tokens(self) -> torch.Tensor:
        """Patch tokens as an image ``(B, C, H, W)``."""
        b, n, c = self.tokens.shape
        h, w = self.layout.grid
        return self.tokens.transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------- discovery
def _split_glob(pattern: str) -> list[str]:
    return [p for p in pattern.split(".") if p != ""]


def _match_segments(pat: list[str], name: list[str]) -> bool:
    if not pat:
        return not name
    head = pat[0]
    if head == "**":
        return any(_match_segments(pat[1:], name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    return fnmatch.fnmatchcase(name[0], head) and _match_segments(pat[1:], name[1:])


def match_modules(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Names of the modules of ``model`` matching any glob pattern, in module order.

    Patterns match dot-separated name segments: ``*`` and ``?`` stay inside one segment
    (``blocks.*`` matches ``blocks.3`` but not ``blocks.3.attn``), ``**`` spans any
    number of segments. An exact module name is a pattern that matches itself.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    pats = [_split_glob(p) for p in patterns]
    out = []
    for name, _ in model.named_modules():
        if not name:
            continue
        segs = name.split(".")
        if any(_match_segments(p, segs) for p in pats):
            out.append(name)
    return out


def _candidate_names(model: nn.Module) -> list[str]:
    """Containers of repeated blocks, written as patterns (``blocks.*``), then top-level children."""
    cands = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 1 and name:
            kinds = {type(m).__name__ for m in mod}
            if len(kinds) <= 2:
                cands.append(f"{name}.* ({len(mod)} x {sorted(kinds)[0]})")
    if not cands:
        cands = [n for n, _ in model.named_children()]
    return cands


def _family_blocks(model: nn.Module) -> tuple[str, list[BlockSpec]] | None:
    """Default blocks of known model families, or None."""
    # A model can describe its own blocks (fanlens' FAN does).
    describe = getattr(model, "fanlens_blocks", None)
    if callable(describe):
        return type(model).__name__, list(describe())

    cls = type(model).__name__
    mro = {c.__name__ for c in type(model).__mro__}
    names = dict(model.named_modules())

    if "VisionTransformer" in mro and isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList):
        p = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
        return cls, [BlockSpec(f"blocks.{i}", "NLC", p) for i in range(len(model.blocks))]
    if mro & {"SwinTransformer", "SwinTransformerV2", "SwinTransformerV2Cr"} and hasattr(model, "layers"):
        specs = [BlockSpec(n, "NHWC", 0) for n in names if _match_segments(["layers", "*", "blocks", "*"], n.split("."))]
        if specs:
            return cls, specs
    if "ConvNeXt" in mro and hasattr(model, "stages"):
        specs = [BlockSpec(n, "NCHW", 0) for n in names if _match_segments(["stages", "*", "blocks", "*"], n.split("."))]
        if specs:
            return cls, specs
    if "ResNet" in mro and all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        specs = [
            BlockSpec(n, "NCHW", 0)
            for n in names
            if _match_segments(["layer[1-4]", "*"], n.split("."))
        ]
        return cls, specs
    return _repeated_blocks(model)


def _repeated_blocks(model: nn.Module) -> tuple[str, list[BlockSpec]] | None:
    """Other models whose blocks sit where timm puts them, each a container of at least two modules of one
    class that are not themselves containers: a top-level ``blocks`` (timm's EVA, BEiT, MLP-Mixer), or a
    ``blocks`` in every stage of a top-level ``stages`` (MetaFormer/PoolFormer, PVTv2, MaxViT, EdgeNeXt, ...).
    The same blocks as ``blocks="blocks.*"`` (or ``"stages.*.blocks.*"``): the layout read from each output
    (3-D: NLC with the model's ``num_prefix_tokens``; 4-D: NCHW, checked against the input), or None."""

    def uniform(c: Any) -> bool:
        return (isinstance(c, (nn.Sequential, nn.ModuleList)) and len(c) > 0
                and len({type(m) for m in c}) == 1 and not isinstance(c[0], (nn.Sequential, nn.ModuleList)))

    if hasattr(model, "unroll") or hasattr(model, "reroll"):
        return None  # timm's Hiera keeps its tokens in mask-unit order, not raster order: no grid to read them on
    p = int(getattr(model, "num_prefix_tokens", 0) or 0)
    top = getattr(model, "blocks", None)
    if isinstance(top, nn.Module) and uniform(top) and len(top) > 1:
        return type(model).__name__, [BlockSpec(f"blocks.{i}", None, p) for i in range(len(top))]
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) > 0 and all(
            uniform(getattr(st, "blocks", None)) for st in stages):
        specs = [BlockSpec(f"stages.{i}.blocks.{j}", None, p) for i, st in enumerate(stages) for j in range(len(st.blocks))]
        if len(specs) > 1:
            return type(model).__name__, specs
    return None


def find_blocks(
    model: nn.Module,
    blocks: str | Sequence[str] | None = None,
    *,
    layout: str | None = None,
    num_prefix_tokens: int | None = None,
) -> list[BlockSpec]:
    """The blocks of ``model`` whose outputs are read as tokens.

    Args:
        model: any module.
        blocks: ``None`` for the model family's blocks (timm ViT/DeiT, Swin, ConvNeXt,
            timm/torchvision ResNet, fanlens FAN, any model with a ``fanlens_blocks()``
            method, and models whose blocks sit in a top-level ``blocks`` or in each stage's
            ``blocks`` of a top-level ``stages``: :func:`_repeated_blocks`), or module names /
            glob patterns such as ``"blocks.*"``.
        layout: force the memory layout (``"NLC"``, ``"NCHW"``, ``"NHWC"``) of every block.
        num_prefix_tokens: force the number of prefix tokens of NLC outputs.

    Raises:
        FanlensError: when nothing matches; the message lists candidate module names.
    """
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    family = _family_blocks(model)
    if blocks is None:
        if family is None:
            raise FanlensError(
                f"blocks must be given for a model of type {type(model).__name__}: fanlens does not know "
                f"its blocks. Pass module names or glob patterns; candidates: "
                f"{', '.join(_candidate_names(model)[:MAX_CANDIDATES_SHOWN])}."
            )
        specs = [s for s in family[1] if s.default]
    else:
        if isinstance(blocks, str):
            blocks = [b for b in blocks.split(",") if b.strip()] if "," in blocks else [blocks]
        blocks = [b.strip() for b in blocks]
        names = match_modules(model, blocks)
        if not names:
            raise FanlensError(
                f"blocks must match module names of the model. Got {blocks!r} instead, which matches "
                f"nothing; candidates: {', '.join(_candidate_names(model)[:MAX_CANDIDATES_SHOWN])}."
            )
        fam = {s.name: s for s in family[1]} if family else {}
        first = next(iter(fam.values()), None)
        default_layout = first.layout if first else None
        default_prefix = first.num_prefix_tokens if first else int(getattr(model, "num_prefix_tokens", 0) or 0)
        specs = [fam.get(n, BlockSpec(n, default_layout, default_prefix)) for n in names]
    if layout is not None or num_prefix_tokens is not None:
        specs = [
            BlockSpec(
                s.name,
                layout if layout is not None else s.layout,
                num_prefix_tokens if num_prefix_tokens is not None else s.num_prefix_tokens,
            )
            for s in specs
        ]
    if not specs:
        raise FanlensError(f"the model {type(model).__name__} has no blocks to capture.")
    return specs


# --------------------------------------------------------------------------- layout
def infer_grid(num_tokens: int, input_hw: tuple[int, int], *, where: str = "block") -> tuple[int, int]:
    """The grid ``(h, w)`` with ``h * w == num_tokens`` whose shape follows the input's.

    The stride ``s = sqrt(H * W / N)`` is estimated from the input size ``(H, W)``;
    the factorisation of ``N`` closest to ``(H / s, W / s)`` is taken when each side
    is within one token of it (floor or ceil of a strided size).
    """
    H, W = input_hw
    if num_tokens <= 0:
        raise FanlensError(f"{where}: expected at least one patch token. Got {num_tokens} instead.")
    s = math.sqrt(H * W / num_tokens)
    th, tw = H / s, W / s
    best, best_score = None, float("inf")
    for h in range(1, num_tokens + 1):
        if num_tokens % h:
            continue
        w = num_tokens // h
        score = max(abs(h - th), abs(w - tw))
        if score < best_score:
            best, best_score = (h, w), score
    if best is None or best_score >= 1.0:
        raise FanlensError(
            f"{where}: {num_tokens} patch tokens do not form a grid that follows the "
            f"{H}x{W} input (closest {best}). Check num_prefix_tokens, or pass grid=(H, W)."
        )
    return best


def grid_follows_input(grid: tuple[int, int], input_hw: tuple[int, int]) -> bool:
    """Whether an ``h x w`` token grid can be the ``H x W`` input seen through one stride ``s``
    (each side the floor or ceil of the input side over ``s``, or within one of it):
    the stride intervals ``(H/(h+1), H/(h-1))`` and ``(W/(w+1), W/(w-1))`` must meet."""
    (h, w), (H, W) = grid, input_hw
    lo = max(H / (h + 1), W / (w + 1))
    hi = min(H / (h - 1) if h > 1 else math.inf, W / (w - 1) if w > 1 else math.inf)
    return lo < hi


def _as_tensor(output, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise FanlensError(
        f"block {name!r} must return a tensor (or a tuple starting with one). "
        f"Got {type(output).__name__} instead."
    )


def to_tokens(
    out: torch.Tensor,
    spec: BlockSpec,
    input_hw: tuple[int, int] | None,
    *,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
    """Split a raw block output into patch tokens ``(B, N, C)``, prefix tokens and layout."""
    layout = spec.layout or ("NLC" if out.ndim == 3 else "NCHW" if out.ndim == 4 else None)
    if layout is None:
        raise FanlensError(
            f"block {spec.name!r}: output must be 3-D (B, N, C) or 4-D (B, C, H, W). "
            f"Got shape {tuple(out.shape)} instead."
        )
    if layout == "NLC":
        if out.ndim != 3:
            raise FanlensError(
                f"block {spec.name!r}: expected an NLC output (B, N, C). Got shape {tuple(out.shape)} instead."
            )
        b, n, c = out.shape
        p = spec.num_prefix_tokens
        if p < 0 or p >= n:
            raise FanlensError(
                f"block {spec.name!r}: num_prefix_tokens must be in [0, {n - 1}]. Got {p} instead."
            )
        n_patch = n - p
        if grid is not None:
            if grid[0] * grid[1] != n_patch:
                raise FanlensError(
                    f"block {spec.name!r}: grid {grid} holds {grid[0] * grid[1]} tokens, but the output has "
                    f"N={n} tokens = {p} prefix + {n_patch} patch tokens."
                )
            hw = tuple(grid)
        else:
            if input_hw is None:
                raise FanlensError(f"block {spec.name!r}: the input size is unknown; pass grid=(H, W).")
            hw = infer_grid(n_patch, input_hw, where=f"block {spec.name!r} (N={n}, {p} prefix tokens)")
        return out[:, p:], out[:, :p], TokenLayout("NLC", p, hw, c)
    if out.ndim != 4:
        raise FanlensError(
            f"block {spec.name!r}: expected a 4-D {layout} output. Got shape {tuple(out.shape)} instead."
        )
    if layout == "NCHW":
        b, c, h, w = out.shape
        tokens = out.flatten(2).transpose(1, 2)
    else:
        b, h, w, c = out.shape
        tokens = out.reshape(b, h * w, c)
    if grid is None and input_hw is not None and not grid_follows_input((h, w), input_hw):
        other = "NHWC" if layout == "NCHW" else "NCHW"
        raise FanlensError(
            f"block {spec.name!r}: read as {layout}, its output {tuple(out.shape)} gives a {h}x{w} token grid with "
            f"{c} channels, which does not follow the {input_hw[0]}x{input_hw[1]} input. Check layout (is it "
            f"{other}?), or pass grid=(H, W) if the grid is right."
        )
    return tokens, out.new_zeros((b, 0, c)), TokenLayout(layout, 0, (h, w), c)


# --------------------------------------------------------------------------- capture
class _StopForward(Exception):
    """Raised inside a hook to end the forward pass after the last block needed."""


class TokenCapture:
    """Context manager that records block outputs of ``model`` during forward passes.

    Every hook is registered on ``__enter__`` and removed on ``__exit__``, also when the
    forward pass raises. A module called several times in one forward pass is recorded
    once per call. Stored tensors are detached (and moved to ``device`` / ``dtype``).

    Args:
        model: the model.
        blocks: see :func:`find_blocks`.
        layout: force the layout of every block.
        num_prefix_tokens: force the prefix-token count of NLC outputs.
        grid: force the patch grid ``(H, W)`` of NLC outputs.
        stop_early: end the forward pass once every block has been seen (``run`` then
            returns ``None``); saves the compute of the head.
        device: move stored tensors there (default: keep).
        dtype: cast stored floating tensors (default: keep).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: str | Sequence[str] | None = None,
        *,
        layout: str | None = None,
        num_prefix_tokens: int | None = None,
        grid: tuple[int, int] | None = None,
        stop_early: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module) and \
                type(model).__name__ == "LoadedModel":  # what fanlens.build_model returns: capture its module
            model = model.model
        if not isinstance(model, nn.Module):
            hint = " (a model spec string is built by fanlens.build_model(spec); pass its .model)" if isinstance(
                model, str) else ""
            raise FanlensError(f"model must be a torch.nn.Module or a fanlens LoadedModel. Got "
                               f"{type(model).__name__} instead{hint}.")
        self.model = model
        self.specs = find_blocks(model, blocks, layout=layout, num_prefix_tokens=num_prefix_tokens)
        self.grid = tuple(grid) if grid is not None else None
        self.stop_early = bool(stop_early)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._handles: list = []
        self._records: dict[str, list[torch.Tensor]] = {}
        self._input_hw: tuple[int, int] | None = None
        self._ran = False  # a forward went through run() since the last clear()
        self._active = False
        self._paused = False

    # -- context
    def __enter__(self) -> "TokenCapture":
        if self._active:
            raise FanlensError("TokenCapture is already active; it cannot be entered twice.")
        self.clear()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._input_hook, with_kwargs=True))
            for spec in self.specs:
                mod = self.model.get_submodule(spec.name)
                self._handles.append(mod.register_forward_hook(self._make_hook(spec.name)))
        except BaseException:
            self._remove()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        self._active = False
        return False

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks
    def _input_hook(self, module, args, kwargs):
        if self._paused:
            return None
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor) and a.ndim >= 3:
                self._input_hw = (int(a.shape[-2]), int(a.shape[-1]))
                break
        return None

    def _make_hook(self, name: str):
        last = self.specs[-1].name

        def hook(module, args, output):
            if self._paused:
                return None
            t = _as_tensor(output, name).detach()
            if self.device is not None or self.dtype is not None:
                t = t.to(
                    device=self.device if self.device is not None else t.device,
                    dtype=self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype,
                )
            self._records.setdefault(name, []).append(t)
            if self.stop_early and name == last and len(self._records) == len(self.specs):
                raise _StopForward()
            return None

        return hook

    # -- use
    def run(self, *args, **kwargs):
        """Run ``model(*args, **kwargs)``; returns its output, or ``None`` when stopped early."""
        if not self._active:
            raise FanlensError("TokenCapture.run must be called inside `with TokenCapture(...)`.")
        self._ran = True
        try:
            return self.model(*args, **kwargs)
        except _StopForward:
            return None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside record nothing (the hooks stay in place, idle)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def clear(self) -> None:
        """Drop every recorded tensor (call between batches when streaming)."""
        self._records = {}
        self._input_hw = None
        self._ran = False

    @property
    def input_hw(self) -> tuple[int, int] | None:
        return self._input_hw

    def raw(self, name: str) -> list[torch.Tensor]:
        """The raw outputs of block ``name``, one per call."""
        if name not in self._records:
            raise FanlensError(
                f"name must be a captured block that ran. Got {name!r} instead; "
                f"recorded: {sorted(self._records)}."
            )
        return self._records[name]

    def block_tokens(self) -> Iterator[BlockTokens]:
        """Tokens of every recorded call of every block, in block order."""
        missing = [s.name for s in self.specs if s.name not in self._records]
        if missing and not self._records and not self._ran:
            raise FanlensError("no block output was recorded: run a forward pass inside the capture first.")
        if missing:
            raise FanlensError(
                f"blocks {missing[:MAX_CANDIDATES_SHOWN]} did not run in the forward pass; "
                f"choose blocks that the forward pass calls."
            )
        for spec in self.specs:
            for call, out in enumerate(self._records[spec.name]):
                tokens, prefix, lay = to_tokens(out, spec, self._input_hw, grid=self.grid)
                yield BlockTokens(spec.name, call, tokens, prefix, lay)
