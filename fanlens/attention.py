"""Attention maps of timm ViTs (DeiT, registers included) with fused attention left on.

timm computes attention with ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, so
the softmax matrix never exists. fanlens does not switch that off in the user's model: a
forward hook on each attention module's ``q_norm`` and ``k_norm`` (identities unless the model
normalises q and k) reads the block's own q and k, after any q/k normalisation, and forms
``softmax(q k^T * scale)`` from them, the matrix timm builds with fused attention disabled.
The model's outputs are untouched.

``attention_maps(model, images)`` returns :class:`AttentionMaps`: per image, block and head the
``N x N`` matrix over all tokens (prefix tokens, i.e. CLS, distillation and register tokens,
first), with CLS-to-patch and patch-to-patch views. FAN's own maps stay
:meth:`fanlens.models.FAN.attention_maps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._validation import FanlensError, check_positive_int
from .capture import find_blocks, infer_grid
from .runner import call_model, n_batches, progress_iter, setup, uint8_images

__all__ = ["AttentionMaps", "attention_maps", "attention_module"]

_NEEDED = ("q_norm", "k_norm", "num_heads", "scale")


@dataclass(frozen=True)
class AttentionMaps:
    """Attention of every block, head and image.

    Attributes:
        blocks: the names of the blocks the maps belong to.
        maps: ``(B, L, H, N, N)`` float32, rows are queries and sum to 1; tokens in the model's
            order (``num_prefix_tokens`` prefix tokens, then the patch grid row by row).
        num_prefix_tokens: CLS / distillation / register tokens before the patches.
        grid: the patch grid ``(h, w)``.
        images: the images' names.
        pixels: ``(B, h, w, 3)`` uint8, the images as the model saw them.
    """

    blocks: tuple[str, ...]
    maps: np.ndarray
    num_prefix_tokens: int
    grid: tuple[int, int]
    images: tuple[str, ...]
    pixels: np.ndarray

    def _heads(self, head: int | None) -> np.ndarray:
        if head is None:
            return self.maps.mean(axis=2)
        n_heads = self.maps.shape[2]
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= head < n_heads:
            raise FanlensError(f"head must be an int in [0, {n_heads - 1}] or None (mean of the heads). "
                               f"Got {head!r} instead.")
        return self.maps[:, :, head]

    def cls_to_patch(self, head: int | None = None) -> np.ndarray:
        """``(B, L, h, w)``: how the first prefix token (CLS) attends to each patch; the mean of
        the heads unless ``head`` is given."""
        if self.num_prefix_tokens < 1:
            raise FanlensError("cls_to_patch needs a class token; this model has no prefix tokens. "
                               "Use patch_to_patch instead.")
        a = self._heads(head)[:, :, 0, self.num_prefix_tokens :]
        return a.reshape(*a.shape[:2], *self.grid)

    def patch_to_patch(self, head: int | None = None) -> np.ndarray:
        """``(B, L, P, P)`` with ``P = h * w``: attention among the patch tokens (rows: queries;
        the prefix columns are left out, so rows sum to at most 1)."""
        p = self.num_prefix_tokens
        return self._heads(head)[:, :, p:, p:]


    def overview(self, head: int | None = None) -> tuple[np.ndarray, str]:
        """``(B, L, h, w)`` one map per image and block, and what it shows: the CLS-to-patch
        attention where there is a class token, else the attention each patch receives (the
        patch-to-patch matrix averaged over the queries)."""
        if self.num_prefix_tokens:
            return self.cls_to_patch(head), "CLS attention"
        p2p = self.patch_to_patch(head)
        return p2p.mean(axis=2).reshape(*p2p.shape[:2], *self.grid), "attention received"


def _takes_rope(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes a rotary position embedding (timm's EVA attention does)."""
    import inspect

    try:
        return "rope" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def attention_module(model: nn.Module, block: str) -> nn.Module:
    """The attention module of ``block``: the block itself or its ``attn`` child, when it has timm
    Attention's ``q_norm``, ``k_norm``, ``num_heads`` and ``scale``. Refused where its forward takes a
    rotary position embedding (``rope``: timm's EVA) unless the model's ``rope`` is None: the rotation
    comes after ``q_norm`` and ``k_norm``, so the maps formed from them would be wrong."""
    mod = model.get_submodule(block)
    for cand in (mod, getattr(mod, "attn", None)):
        if cand is not None and all(hasattr(cand, a) for a in _NEEDED):
            if _takes_rope(cand) and getattr(model, "rope", True) is not None:
                raise FanlensError(
                    f"block {block!r}: its attention ({type(cand).__name__}) rotates q and k by a rotary position "
                    f"embedding after q_norm and k_norm; maps formed from q_norm and k_norm would leave the rotation "
                    f"out, so fanlens does not form them. Attention maps are available for timm ViT/DeiT blocks "
                    f"and through FAN.attention_maps for FAN.")
            return cand
    raise FanlensError(
        f"block {block!r} has no timm-style attention (a module, or an 'attn' child, with "
        f"{', '.join(_NEEDED)}). Got {type(mod).__name__} instead; attention maps are available for timm "
        f"ViT/DeiT blocks and through FAN.attention_maps for FAN."
    )


class _AttentionHooks:
    """Hooks on q_norm / k_norm of each attention module; the maps of one forward pass."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.maps: list[torch.Tensor | None] = [None] * len(self.modules)
        self._q: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list = []

    def __enter__(self) -> "_AttentionHooks":
        for i, m in enumerate(self.modules):
            self._handles.append(m.q_norm.register_forward_hook(self._keep_q(i)))
            self._handles.append(m.k_norm.register_forward_hook(self._attend(i, float(m.scale))))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _keep_q(self, i: int):
        def hook(_mod, _inp, out):
            self._q[i] = out

        return hook

    def _attend(self, i: int, scale: float):
        def hook(_mod, _inp, k):
            q = self._q[i]
            if q is None or q.shape != k.shape:
                raise FanlensError("attention hooks saw k without a matching q: the attention module does not "
                                   "call q_norm and k_norm on q and k as timm's Attention does.")
            attn = (q * scale) @ k.transpose(-2, -1)  # the non-fused path of timm's Attention
            self.maps[i] = attn.softmax(dim=-1).float().cpu()
            self._q[i] = None

        return hook


def attention_maps(
    model: Any,
    images: Any = "samples",
    *,
    blocks: str | Sequence[str] | None = None,
    n_images: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    progress: bool = True,
) -> AttentionMaps:
    """Attention maps of every selected block of a timm ViT/DeiT, per image and head.

    Args:
        model: a module, or a spec (timm name, ``file.py:factory``, ``module:factory``).
        images: a pixel tensor, folder, files, ``"samples"`` or a DataLoader.
        blocks: block names / glob patterns (default: the model family's blocks); each must be
            a timm attention block (see :func:`attention_module`).
        n_images: only the first ``n_images`` images (default: all). The maps take
            ``L * heads * N^2 * 4`` bytes per image (ViT-S/16 at 224²: 11 MB).
        num_prefix_tokens: force the number of prefix tokens (default: the model's).
        Other arguments as in :func:`fanlens.spectrum`.

    Returns:
        :class:`AttentionMaps`.
    """
    check_positive_int("batch_size", batch_size)
    if n_images is not None:
        check_positive_int("n_images", n_images)
    s = setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
              blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=None, grid=None, seed=seed)
    specs = find_blocks(s.lm.model, blocks, num_prefix_tokens=num_prefix_tokens)
    mods = [attention_module(s.lm.model, sp.name) for sp in specs]
    prefix = {sp.num_prefix_tokens for sp in specs}
    if len(prefix) != 1:
        raise FanlensError(f"the selected blocks disagree on their prefix tokens ({sorted(prefix)}); select blocks "
                           f"of one kind or pass num_prefix_tokens.")
    n_prefix = prefix.pop()
    names = list(s.images.names[:n_images])
    maps, pix = [], []
    with torch.inference_mode(), _AttentionHooks(mods) as hooks:
        batches = s.images.batches(batch_size, stop=n_images)
        for pixels, _idx in progress_iter(batches, n_batches(len(names), batch_size), "attention", progress):
            hooks.maps = [None] * len(mods)
            call_model(s.lm.model, s.cfg.normalize(pixels.to(s.device)))
            missing = [specs[i].name for i, m in enumerate(hooks.maps) if m is None]
            if missing:
                raise FanlensError(f"blocks {missing} did not run their attention in the forward pass.")
            a = torch.stack(hooks.maps, dim=1)  # (B, L, H, N, N)
            if not bool(torch.isfinite(a).all()):
                raise FanlensError("the attention is not finite (NaN or inf) for some image; fanlens never "
                                   "reports a non-finite value as a result.")
            maps.append(a.numpy())
            pix.append(uint8_images(pixels))
    out = np.concatenate(maps)
    n_patch = out.shape[-1] - n_prefix
    grid = infer_grid(n_patch, tuple(s.cfg.input_size[-2:]), where=f"block {specs[0].name!r}")
    return AttentionMaps(blocks=tuple(sp.name for sp in specs), maps=out, num_prefix_tokens=n_prefix,
                         grid=tuple(grid), images=tuple(names), pixels=np.concatenate(pix))
