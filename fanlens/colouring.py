"""Continuous spectral colouring of the tokens of every block (no k to choose).

Per block, the tokens of all images form one graph (the affinity of :mod:`fanlens.spectral`);
the top three non-trivial eigenvectors of its normalised affinity become the red, green and
blue of each token (:func:`fanlens.spectral.spectral_embedding`, Nyström above
``landmarks`` tokens). Eigenvectors have arbitrary signs and, where eigenvalues are close,
arbitrary rotations: the first block fixes its signs by the third moment, and every later
block is turned onto the previous one by orthogonal Procrustes on the same images' tokens
(:func:`fanlens.spectral.align_embedding`), so that a colour means the same direction from
block to block. Colours then map each coordinate's 99th percentile of ``|value|`` to full
intensity (:func:`fanlens.spectral.embedding_colours`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import spectral as sp
from ._validation import check_choice, check_positive_int
from .results import BlockInfo, Provenance
from .runner import Part, Setup, make_provenance, n_batches, setup, stream_parts

__all__ = ["SpectralColours", "spectral_colouring", "colouring_part"]


@dataclass(frozen=True)
class SpectralColours:
    """Spectral colours of the tokens of every block.

    Attributes:
        blocks: the analysed blocks (their pooled grids in ``analysed_grid``).
        colours: one ``(B, h, w, 3)`` float32 array in [0, 1] per block.
        images: the images' names.
        pixels: ``(B, H, W, 3)`` uint8, the images as the model saw them.
        provenance: model, weights, versions, parameters.
    """

    blocks: tuple[BlockInfo, ...]
    colours: tuple[np.ndarray, ...]
    images: tuple[str, ...]
    pixels: np.ndarray
    provenance: Provenance

    @property
    def model(self) -> str:
        return self.provenance.model

    def save_npz(self, path) -> None:
        """The colours as ``colours_<block index>`` arrays in one ``.npz`` file (written
        atomically)."""
        import io

        from ._output import write_atomic

        buf = io.BytesIO()
        np.savez_compressed(buf, **{f"colours_{i}": c for i, c in enumerate(self.colours)})
        write_atomic(path, buf.getvalue())


class _TokenAcc:
    """The pooled patch tokens of every block (and the pixels) of all images, gathered by the one
    batch loop (:func:`fanlens.runner.stream`, which also checks that they are finite)."""

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self.infos: list[BlockInfo] = []
        self.tokens: list[list[torch.Tensor]] = []
        self.pixels: list[np.ndarray] = []

    def update(self, bts: list, b: int, idx) -> None:
        for li, bt in enumerate(bts):
            tok, g = sp.pool_tokens(bt.tokens[:b], bt.layout.grid, self.token_budget)
            if len(self.infos) <= li:
                self.infos.append(BlockInfo(li, bt.label, bt.layout, g))
                self.tokens.append([])
            self.tokens[li].append(tok.float().cpu())


def spectral_colouring(
    model: Any,
    images: Any = "samples",
    *,
    blocks: str | Sequence[str] | None = None,
    n_images: int | None = None,
    affinity: str = sp.DEFAULT_AFFINITY,
    center: bool = True,
    knn: int = sp.DEFAULT_KNN,
    token_budget: int = 1024,
    landmarks: int = sp.DEFAULT_LANDMARKS,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    layout: str | None = None,
    grid: tuple[int, int] | None = None,
    progress: bool = True,
) -> SpectralColours:
    """Colour the patch tokens of every block by the top-3 non-trivial eigenvectors of the joint
    token graph of all images, aligned from block to block.

    Args:
        n_images: only the first ``n_images`` images (default: all). All their pooled tokens
            of one block are held at once (``n_images * tokens * channels`` floats).
        landmarks: tokens of one block above which the eigenvectors come from a Nyström
            extension on ``landmarks`` tokens drawn with ``seed``.
        Other arguments as in :func:`fanlens.group_tokens`.

    Returns:
        :class:`SpectralColours`.
    """
    check_choice("affinity", affinity, sp.AFFINITIES)
    check_positive_int("token_budget", token_budget, minimum=2)
    check_positive_int("landmarks", landmarks, minimum=2)
    check_positive_int("batch_size", batch_size)
    if n_images is not None:
        check_positive_int("n_images", n_images)
    s = setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
              blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, seed=seed)
    part, finish = colouring_part(s, n_images=n_images, affinity=affinity, center=center, knn=knn,
                                  token_budget=token_budget, landmarks=landmarks, batch_size=batch_size, seed=seed,
                                  blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid)
    stream_parts(s, [part], lambda skip: s.images.batches(batch_size, start=skip * batch_size, stop=n_images),
                 n_batches(len(s.images.names[:n_images]), batch_size), "colours", progress)
    return finish()


def colouring_part(s: Setup, *, seed: int, batch_size: int, n_images: int | None = None,
                   affinity: str = sp.DEFAULT_AFFINITY, center: bool = True, knn: int = sp.DEFAULT_KNN,
                   token_budget: int = 1024, landmarks: int = sp.DEFAULT_LANDMARKS,
                   blocks: str | Sequence[str] | None = None, num_prefix_tokens: int | None = None,
                   layout: str | None = None, grid: tuple[int, int] | None = None) -> tuple[Part, Any]:
    """:func:`spectral_colouring` (arguments checked by the caller) as a share of a pass
    (:func:`fanlens.runner.stream_parts`) on the first ``n_images`` images: ``(part, finish)``;
    ``finish()`` computes the colours from the gathered tokens."""
    acc = _TokenAcc(token_budget)
    params = dict(analysis="spectral_colours", blocks=blocks, n_images=n_images, affinity=affinity, center=center,
                  knn=knn, token_budget=token_budget, landmarks=landmarks, batch_size=batch_size,
                  num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid,
                  method="top-3 non-trivial eigenvectors of D^-1/2 A D^-1/2 over all images' tokens; first block: "
                         "signs by third moment; later blocks: orthogonal Procrustes onto the previous block; "
                         "RGB = 0.5 + 0.5 * clip(v / q99(|v|))")

    def finish() -> SpectralColours:
        names = list(s.images.names[:n_images])
        infos, toks, pix = acc.infos, acc.tokens, acc.pixels
        colours, prev = [], None
        for li, info in enumerate(infos):
            t = torch.cat(toks[li])
            b, n = t.shape[:2]
            emb = sp.spectral_embedding(t, kind=affinity, center=center, knn=knn, landmarks=landmarks, seed=seed)
            gh, gw = info.analysed_grid
            emb = emb.reshape(b, gh, gw, 3)
            if prev is None:
                emb = sp.align_embedding(emb.reshape(-1, 3)).reshape(b, gh, gw, 3)
            else:  # the previous block's embedding on this block's grid
                ref = F.interpolate(prev.permute(0, 3, 1, 2), size=(gh, gw), mode="bilinear", align_corners=False)
                ref = ref.permute(0, 2, 3, 1).reshape(-1, 3)
                emb = sp.align_embedding(emb.reshape(-1, 3), ref).reshape(b, gh, gw, 3)
            prev = emb
            colours.append(sp.embedding_colours(emb).numpy())
            toks[li] = []  # free the block's tokens
        return SpectralColours(blocks=tuple(infos), colours=tuple(colours), images=tuple(names),
                               pixels=np.concatenate(pix), provenance=make_provenance(s, seed, params, names))

    return Part([acc], n_images=n_images, pixels=acc.pixels), finish
