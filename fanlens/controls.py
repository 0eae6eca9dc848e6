"""Controls that calibrate the claims' verdicts: a network built so that every claim holds.

The positive control (:func:`merging_network`) is a hand-built token network in which the
paper's mechanism is true by construction. Its patch tokens (flattened 4 x 4 pixel patches of a
32 x 32 image) go through :data:`DEPTH` merging blocks; each block pulls every token towards the
mean of the tokens that look like it (similarity attention, a mean-shift step)::

    x <- x + strength * (A x - x),   A = softmax(-||x_i - x_j||^2 / tau)  (row-wise)

On :func:`control_images` (regions of clearly different colours, pixel texture inside them),
``A`` averages within a region, so every block contracts the deviations from the region means,
the clean texture and the added noise alike, by the known factor ``1 - strength``, while the
region means stay. Hence, by construction:

- C1: the count of significant eigenvalues falls from block to block (the texture goes, the
  regions stay) and the perturbation falls with it; images with more regions keep more
  eigenvalues *and* more noise (a region mean averages fewer tokens), so inside every block the
  two go together across images;
- C2: the perturbation decays (last / first block < 1), against :func:`static_network`, a
  ``NCHW`` "CNN" whose blocks leave its features as they are (ratio 1);
- C3: the two-cluster groups match the object mask better block by block as the perturbation
  falls, and a stronger merge gives both better groups and less perturbation across networks;
- C4: ``heads`` sets the merge strength (``1 - (1 - BASE_STRENGTH) ** heads``): more heads,
  more contraction.

:func:`evidence` runs fanlens's own analyses (capture, spectrum, probe, mask groups) on these
networks and returns what :func:`fanlens.claims.check` needs. Null controls (the same inputs with
the perturbation drawn independently of the count, or without decay) are simulated in the tests;
their false-*holds* rates are in the README.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._validation import FanlensError, check_positive_int

__all__ = ["MergingBlock", "MergingNetwork", "merging_network", "static_network", "control_images", "evidence",
           "IMAGE_SIZE", "PATCH", "DEPTH", "BASE_STRENGTH", "TAU"]

IMAGE_SIZE, PATCH, DEPTH = 32, 4, 6
BASE_STRENGTH = 0.25
"""The merge strength of a one-head block."""
TAU = 0.1
"""The attention temperature (squared token distance): regions differ by far more, texture by far less."""
_CFG = dict(input_size=(3, IMAGE_SIZE, IMAGE_SIZE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0,
            crop_mode="center", interpolation="bilinear", num_classes=2)


class MergingBlock(nn.Module):
    """One mean-shift step over the tokens ``(B, N, C)``: ``x + strength * (A x - x)``."""

    def __init__(self, strength: float, tau: float = TAU) -> None:
        super().__init__()
        if not 0.0 <= float(strength) < 1.0:
            raise FanlensError(f"strength must be in [0, 1). Got {strength!r} instead.")
        self.strength, self.tau = float(strength), float(tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax(-torch.cdist(x, x).pow(2) / self.tau, dim=-1)
        return x + self.strength * (attn @ x - x)


class MergingNetwork(nn.Module):
    """Patch tokens, :data:`DEPTH` merging blocks (``blocks.0`` ...), mean-pooled logits of a fixed head."""

    def __init__(self, strength: float, depth: int = DEPTH) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[MergingBlock(strength) for _ in range(check_positive_int("depth", depth))])
        gen = torch.Generator().manual_seed(0)
        self.head = nn.Linear(3 * PATCH * PATCH, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen))
            self.head.bias.zero_()
        self.pretrained_cfg = dict(_CFG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (B, 3, H/p, W/p, p, p)
        t = t.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * PATCH * PATCH)
        return self.head(self.blocks(t).mean(1))


class _Static(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0


class StaticNetwork(nn.Module):
    """A ``NCHW`` network whose blocks keep their input: the perturbation never decays (the C2 comparator)."""

    def __init__(self, depth: int = DEPTH) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Static() for _ in range(check_positive_int("depth", depth))])
        self.head = nn.Linear(3 * PATCH * PATCH, 2)
        self.pretrained_cfg = dict(_CFG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (B, 3, H/p, W/p, p, p)
        t = t.permute(0, 1, 4, 5, 2, 3).reshape(b, 3 * PATCH * PATCH, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)
        return self.head(self.blocks(t).mean((2, 3)))


def merging_network(*, heads: int = 1, strength: float | None = None, depth: int = DEPTH) -> MergingNetwork:
    """The positive control: merge strength ``strength``, or from ``heads`` (module docstring)."""
    if strength is None:
        strength = 1.0 - (1.0 - BASE_STRENGTH) ** check_positive_int("heads", heads)
    return MergingNetwork(strength, depth).eval()


def static_network(*, depth: int = DEPTH) -> StaticNetwork:
    """The C2 comparator: a "CNN" (``NCHW`` blocks) whose perturbation stays as it enters."""
    return StaticNetwork(depth).eval()


def control_images(n: int, *, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` images ``(n, 3, 32, 32)`` in [0, 1] and their object masks ``(n, 32, 32)``.

    Each image: a grey background (0.3-0.6) and a reddish square object (+0.12, -0.04, -0.04) aligned
    with the 4 x 4 patches, and a texture of patch-wise colour offsets whose amplitude is the image's own (0.01-0.05 per
    pixel): the stronger its texture, the less alike an image's tokens, the less a merging block
    averages them.
    """
    check_positive_int("n", n)
    rng = np.random.default_rng([int(seed), 24])
    s, cells = IMAGE_SIZE, IMAGE_SIZE // PATCH
    xs = np.empty((n, 3, s, s), np.float32)
    masks = np.zeros((n, s, s), bool)
    for i in range(n):
        img = np.full((3, s, s), rng.uniform(0.3, 0.6))
        side = int(rng.integers(2, 5)) * PATCH
        y0, x0 = (int(v) * PATCH for v in rng.integers(0, cells - side // PATCH + 1, size=2))
        img[:, y0:y0 + side, x0:x0 + side] += np.array([0.12, -0.04, -0.04])[:, None, None]
        masks[i, y0:y0 + side, x0:x0 + side] = True
        amp = rng.uniform(0.01, 0.05)
        offsets = amp * rng.standard_normal((3, cells, cells, PATCH, PATCH))
        img = img + offsets.transpose(0, 1, 3, 2, 4).reshape(3, s, s)
        xs[i] = np.clip(img, 0.0, 1.0)
    return torch.from_numpy(xs), masks


def evidence(networks: dict[str, Any], images: torch.Tensor, masks: np.ndarray | None = None, *,
             sigmas: Sequence[float] = (0.05,), seed: int = 0, heads: dict[str, int] | None = None,
             architectures: dict[str, str] | None = None) -> list:
    """Run fanlens's spectrum, probe and (with ``masks``) two-cluster mask groups on each network of
    ``networks`` (label -> module) and return :class:`fanlens.claims.Evidence` for each."""
    from . import claims
    from .grouping import mask_scores
    from .lens import Lens

    out = []
    for label, net in networks.items():
        lens = Lens(net, images, blocks="blocks.*", progress=False, seed=seed, cache_bytes=0, cache_spill=False)
        res = lens.analyze(sigmas=tuple(sigmas), groups=2 if masks is not None else None)
        spec, probe = res[0], res[1]
        scores = mask_scores(res[2], masks) if masks is not None else None
        out.append(claims.Evidence(label, spec, probe, scores=scores, heads=(heads or {}).get(label),
                                   architecture=(architectures or {}).get(label)))
    return out
