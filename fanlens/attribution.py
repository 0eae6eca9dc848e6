"""What the prediction rests on, next to the token groups; how much noise flips it.

Bridges to captum, on the same models, images and noise as the rest of fanlens:

- :func:`attribute`: one attribution map per image for the predicted class (or a given
  target), by Integrated Gradients on the pixels (``method="ig"``) or Grad-CAM on the
  output of one block (``method="gradcam"``, any token layout: NLC outputs are viewed as
  a grid for captum's ``LayerGradCam`` and put back, so the model runs unchanged).
- :func:`attribution_share`: per block and image, the share of the attribution mass that
  falls inside the token group holding the most of it, and that group's share of the
  image area (what a uniform map would give).
- :func:`min_flip_sigma`: per image, the smallest noise level ``sigma`` on a grid at
  which ``x + sigma * eps`` changes the predicted class (``captum.robust.MinParamPerturbation``),
  with ``eps`` the very noise :func:`fanlens.noise_probe` adds to that image, so the
  number sits next to the per-block perturbation curve.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ._validation import FanlensError, check_choice, check_positive_int
from .analysis import NOISE_SPACES
from .runner import call_model, class_logits, make_noise, make_provenance, n_batches, progress_iter, setup, uint8_images
from .capture import BlockSpec, find_blocks, to_tokens
from .grouping import per_block_rows, per_block_summary, upsample_labels
from .results import AttributionResult, BlockInfo, FlipResult, GroupsResult

__all__ = [
    "gradcam_block", "ATTRIBUTION_METHODS",
    "IG_BASELINES",
    "AttributionResult",
    "AttributionShare",
    "FlipResult",
    "attribute",
    "attribution_share",
    "min_flip_sigma",
]

ATTRIBUTION_METHODS = ("ig", "gradcam")
IG_BASELINES = ("black", "mean")
DEFAULT_IG_STEPS = 64
IG_CONVERGENCE_WARN = 0.1  # completeness error above which attribute() warns
DEFAULT_FLIP_MAX_SIGMA = 1.0
DEFAULT_FLIP_STEP = 0.01

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class AttributionShare:
    """Per block and image: how much of the attribution one token group holds.

    Attributes:
        model, method: of the attributions.
        blocks: the blocks of the groups.
        images: image names.
        share: ``(L, n_images)`` the largest fraction of the attribution mass inside one group.
        area: ``(L, n_images)`` that group's fraction of the image area: the share a uniform
            attribution map would give; ``share / area`` above 1 means the mass concentrates.
        group: ``(L, n_images)`` the label of that group.
    """

    METRICS: ClassVar[tuple[str, str]] = ("attribution_share", "attribution_group_area")

    model: str
    method: str
    blocks: tuple[BlockInfo, ...]
    images: tuple[str, ...]
    share: np.ndarray
    area: np.ndarray
    group: np.ndarray

    def summary(self, metric: str = "attribution_share") -> dict[str, np.ndarray]:
        """Mean, std and 95 % interval over images (images with NaN left out), per block."""
        vals = {"attribution_share": self.share, "attribution_group_area": self.area}.get(metric)
        if vals is None:
            raise FanlensError(f"metric must be one of {self.METRICS}. Got {metric!r} instead.")
        return per_block_summary(vals)

    def rows(self) -> list[dict]:
        return per_block_rows(self.model, self.blocks, {f"{m}_{self.method}": self.summary(m) for m in self.METRICS})


def _import_captum():
    """Import captum's attribution and robustness APIs. captum imports ``tqdm.auto`` at import
    time, which warns inside Jupyter when ipywidgets is absent; fanlens shows no captum bars."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import captum.attr
        import captum.robust
    return captum


# --------------------------------------------------------------------------- forward helpers
class _PixelForward(nn.Module):
    """``model(normalize(x))`` for inputs in pixel space; checks the output is ``(B, classes)`` logits."""

    def __init__(self, model: nn.Module, normalize) -> None:
        super().__init__()
        self.model = model
        self._normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return class_logits(call_model(self.model, self._normalize(x) if self._normalize is not None else x),
                            "attributions")


def _check_target(target: Any, n_images: int) -> torch.Tensor | None:
    if target is None:
        return None
    t = torch.as_tensor(target)
    if t.dtype in (torch.float16, torch.float32, torch.float64) or t.ndim > 1:
        raise FanlensError(f"target must be a class index or one per image. Got {target!r} instead.")
    if t.ndim == 1 and len(t) != n_images:
        raise FanlensError(f"target must hold one class per image ({n_images}). Got {len(t)} instead.")
    return t.long().expand(n_images) if t.ndim == 0 else t.long()


def gradcam_block(model: nn.Module, block: str | None, **capture_kwargs) -> BlockSpec:
    try:
        specs = find_blocks(model, block, layout=capture_kwargs.get("layout"),
                            num_prefix_tokens=capture_kwargs.get("num_prefix_tokens"))
    except FanlensError as e:
        if block is None:
            raise FanlensError(f"block must name the Grad-CAM block: {e}") from None
        raise
    if block is None:
        return specs[-1]
    if len(specs) != 1:
        raise FanlensError(
            f"block must name exactly one block for Grad-CAM. Got {block!r} instead, which matches "
            f"{len(specs)}: {', '.join(s.name for s in specs[:6])}."
        )
    return specs[0]


class _GridTap:
    """Forward hook that routes a block's patch tokens through an identity module as an
    ``(B, C, h, w)`` grid and puts them back: captum's LayerGradCam reads that grid."""

    def __init__(self, model: nn.Module, spec: BlockSpec, grid) -> None:
        self.adapter = nn.Identity()
        self.spec = spec
        self.grid = grid
        self.input_hw: tuple[int, int] | None = None
        self.layout = None
        self._module = dict(model.named_modules())[spec.name]
        self._handle = None

    def __enter__(self) -> "_GridTap":
        self._handle = self._module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, output):
        first = output[0] if isinstance(output, (tuple, list)) else output
        tok, prefix, layout = to_tokens(first, self.spec, self.input_hw, grid=self.grid)
        self.layout = layout
        b, n, c = tok.shape
        h, w = layout.grid
        g = self.adapter(tok.transpose(1, 2).reshape(b, c, h, w))
        if layout.layout == "NLC":
            new = torch.cat([prefix, g.flatten(2).transpose(1, 2)], dim=1)
        elif layout.layout == "NCHW":
            new = g
        else:
            new = g.permute(0, 2, 3, 1)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        if isinstance(output, list):
            return [new] + list(output[1:])
        return new


# --------------------------------------------------------------------------- attribute
def attribute(
    model: Any,
    images: Any = "samples",
    *,
    method: str = "ig",
    target: int | Sequence[int] | None = None,
    block: str | None = None,
    n_steps: int = DEFAULT_IG_STEPS,
    baseline: str = "black",
    internal_batch_size: int | None = None,
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
) -> AttributionResult:
    """Attribution maps for the predicted class (or ``target``) of each image.

    Args:
        model: a module, a spec string or a :class:`~fanlens.models.LoadedModel`; it must
            return class logits.
        images: as in :func:`fanlens.spectrum`.
        method: ``"ig"`` (captum ``IntegratedGradients`` on the pixels) or ``"gradcam"``
            (captum ``LayerGradCam`` on the output of ``block``).
        target: the class to attribute: one index for every image, one per image, or
            ``None`` for each image's predicted class.
        block: Grad-CAM block: a module name or pattern matching one block (default: the
            last of the model family's blocks).
        n_steps: IG steps of the path integral (captum's Gauss-Legendre rule); a warning is
            logged when the completeness error of an image exceeds 0.1.
        baseline: IG baseline in pixel space: ``"black"`` (all zeros) or ``"mean"`` (the
            normalisation mean, i.e. a zero input to the network).
        internal_batch_size: IG: evaluate the path in chunks of this many inputs.
        batch_size: images per batch.

    Returns:
        :class:`AttributionResult`.
    """
    _import_captum()
    from captum.attr import IntegratedGradients, LayerGradCam

    check_choice("method", method, ATTRIBUTION_METHODS)
    check_choice("baseline", baseline, IG_BASELINES)
    check_positive_int("n_steps", n_steps, minimum=2, maximum=10_000, why="each step is a forward and a backward pass")
    check_positive_int("batch_size", batch_size)
    if internal_batch_size is not None:
        check_positive_int("internal_batch_size", internal_batch_size)
    if method == "ig" and block is not None:
        raise FanlensError("block applies to method='gradcam'; Integrated Gradients attributes the pixels.")
    s = setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
               blocks=None, num_prefix_tokens=None, layout=None, grid=None, seed=seed, check_blocks=False)
    targets_all = _check_target(target, len(s.images))
    fwd = _PixelForward(s.lm.model, s.cfg.normalize)
    infos: tuple[BlockInfo, ...] = ()
    tap = None
    if method == "gradcam":
        spec = gradcam_block(s.lm.model, block, layout=layout, num_prefix_tokens=num_prefix_tokens)
        tap = _GridTap(s.lm.model, spec, grid)
    maps, tgts, preds, conv, pix = [], [], [], [], []
    batches = s.images.batches(batch_size)
    with tap if tap is not None else contextlib.nullcontext():
        for pixels, idx in progress_iter(batches, n_batches(len(s.images), batch_size), f"attribution ({method})",
                                     progress):
            x = pixels.to(s.device).float()
            if tap is not None:
                tap.input_hw = tuple(x.shape[-2:])
            with torch.no_grad():
                logits = _finite_logits(fwd(x), idx)
            pred = logits.argmax(-1)
            tgt = pred if targets_all is None else targets_all[idx].to(s.device)
            if targets_all is not None and not bool(((tgt >= 0) & (tgt < logits.shape[1])).all()):
                raise FanlensError(
                    f"target must be a valid class index in [0, {logits.shape[1] - 1}] of the model's output. "
                    f"Got {target!r} instead."
                )
            if method == "ig":
                base = torch.zeros_like(x) if baseline == "black" else \
                    torch.tensor(s.cfg.mean, dtype=x.dtype, device=x.device)[None, :, None, None].expand_as(x).contiguous()
                ig = IntegratedGradients(fwd)
                attr, delta = ig.attribute(x, baselines=base, target=tgt, n_steps=n_steps,
                                           internal_batch_size=internal_batch_size, return_convergence_delta=True)
                with torch.no_grad():
                    gap = (logits - fwd(base)).gather(1, tgt[:, None])[:, 0]
                conv.append((delta.abs() / gap.abs().clamp_min(1e-12)).detach().cpu().numpy())
                maps.append(attr.detach().abs().sum(1).cpu().numpy())
            else:
                cam = LayerGradCam(fwd, tap.adapter).attribute(x, target=tgt, relu_attributions=True)
                up = torch.nn.functional.interpolate(cam.detach(), size=tuple(x.shape[-2:]), mode="nearest")
                maps.append(up[:, 0].clamp_min(0).cpu().numpy())
                conv.append(np.full(len(idx), np.nan))
                if not infos:
                    infos = (BlockInfo(0, spec.name, tap.layout, tap.layout.grid),)
            if not np.isfinite(maps[-1]).all():
                raise FanlensError(
                    f"the {method} attribution of images {idx} is not finite (NaN or inf); fanlens never reports a "
                    f"non-finite value as a result."
                )
            tgts.append(tgt.cpu().numpy())
            preds.append(pred.cpu().numpy())
            pix.append(uint8_images(pixels))
    conv_all = np.concatenate(conv).astype(np.float64)
    if method == "ig" and np.nanmax(conv_all) > IG_CONVERGENCE_WARN:
        _log.warning(
            "Integrated Gradients with n_steps=%d: completeness error above %.2g on %d of %d images (max %.3g); "
            "raise n_steps for a more exact path integral", n_steps, IG_CONVERGENCE_WARN,
            int(np.sum(conv_all > IG_CONVERGENCE_WARN)), len(conv_all), float(np.nanmax(conv_all)),
        )
    params = dict(
        analysis="attribution", method=method, target=None if target is None else np.asarray(target).tolist(),
        block=infos[0].name if infos else None, n_steps=n_steps if method == "ig" else None,
        baseline=baseline if method == "ig" else None, batch_size=batch_size,
        num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid,
        map="sum over channels of |IG attribution|" if method == "ig" else
        "ReLU(Grad-CAM) on the block's patch-token grid, nearest-upsampled to the input",
    )
    return AttributionResult(
        blocks=infos, method=method, images=tuple(s.images.names), maps=np.concatenate(maps).astype(np.float32),
        targets=np.concatenate(tgts).astype(np.int64), predicted=np.concatenate(preds).astype(np.int64),
        convergence=conv_all, pixels=np.concatenate(pix),
        provenance=make_provenance(s, seed, params, s.images.names),
    )


# --------------------------------------------------------------------------- share per group
def attribution_share(groups: GroupsResult, attributions: AttributionResult) -> AttributionShare:
    """Per block and image, the share of the attribution mass inside the group that holds the most.

    Each block's label map is upsampled (nearest) to the attribution maps' resolution, so
    every pixel counts once. Images must be the same, in the same order. An image whose
    map has no mass (e.g. Grad-CAM all negative) gets NaN.
    """
    if not isinstance(groups, GroupsResult):
        raise FanlensError(f"groups must be a GroupsResult. Got {type(groups).__name__} instead.")
    if not isinstance(attributions, AttributionResult):
        raise FanlensError(f"attributions must be an AttributionResult. Got {type(attributions).__name__} instead.")
    if tuple(groups.images) != tuple(attributions.images):
        raise FanlensError(
            f"groups and attributions must cover the same images in the same order. Got {len(groups.images)} "
            f"images ({', '.join(groups.images[:3])}, ...) and {len(attributions.images)} "
            f"({', '.join(attributions.images[:3])}, ...)."
        )
    maps = np.asarray(attributions.maps, dtype=np.float64)
    L, n = len(groups.blocks), len(groups.images)
    share = np.full((L, n), np.nan)
    area = np.full((L, n), np.nan)
    best = np.full((L, n), -1, dtype=np.int64)
    for li in range(L):
        for i in range(n):
            m = maps[i]
            total = m.sum()
            if not np.isfinite(total) or total <= 0:
                continue
            lab = upsample_labels(groups.labels[li][i], m.shape).ravel()
            ids, inv = np.unique(lab, return_inverse=True)
            mass = np.bincount(inv, weights=m.ravel(), minlength=len(ids))
            j = int(np.argmax(mass))
            share[li, i] = mass[j] / total
            area[li, i] = np.count_nonzero(inv == j) / inv.size
            best[li, i] = int(ids[j])
    return AttributionShare(attributions.model, attributions.method, groups.blocks, tuple(groups.images),
                            share, area, best)


def _finite_logits(logits: torch.Tensor, idx) -> torch.Tensor:
    if not bool(torch.isfinite(logits).all()):
        raise FanlensError(
            f"the model's output holds non-finite values (NaN or inf) for images {list(idx)}; a prediction, and "
            f"an attribution of it, would be meaningless."
        )
    return logits


# --------------------------------------------------------------------------- noise that flips the prediction
def min_flip_sigma(
    model: Any,
    images: Any = "samples",
    *,
    max_sigma: float = DEFAULT_FLIP_MAX_SIGMA,
    step: float = DEFAULT_FLIP_STEP,
    space: str = "pixel",
    perturbations_per_eval: int = 25,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    progress: bool = True,
) -> FlipResult:
    """The smallest ``sigma`` that changes each image's predicted class.

    For image ``i`` (its index in ``images``) the perturbation is ``x + sigma * eps_i``
    with ``eps_i = make_noise(seed, i, x.shape)``, the same N(0, 1) draw that
    :func:`fanlens.noise_probe` adds to that image with the same ``seed`` and ``space``;
    captum's ``MinParamPerturbation`` searches ``sigma`` linearly over ``step, 2 step, ...,
    max_sigma`` and returns the first value whose prediction differs from the clean one.
    One noise direction per image: a different seed gives a different (random) direction.

    Args:
        max_sigma: the largest level tried (pixel values live in [0, 1]).
        step: grid spacing, which is also the resolution of the answer.
        space: ``"pixel"`` (noise on the [0, 1] pixels, no clipping) or ``"normalized"``.
        perturbations_per_eval: grid values evaluated per forward pass.

    Returns:
        :class:`FlipResult`; ``min_sigma`` is NaN for images not flipped up to ``max_sigma``.
    """
    _import_captum()
    from captum.robust import MinParamPerturbation

    check_choice("space", space, NOISE_SPACES)
    check_positive_int("perturbations_per_eval", perturbations_per_eval)
    try:
        max_sigma, step = float(max_sigma), float(step)
    except (TypeError, ValueError):
        raise FanlensError(f"max_sigma and step must be numbers. Got {max_sigma!r} and {step!r} instead.") from None
    if not (math.isfinite(step) and step > 0):
        raise FanlensError(f"step must be a positive number. Got {step!r} instead.")
    if not (math.isfinite(max_sigma) and max_sigma >= 2 * step):
        raise FanlensError(f"max_sigma must be at least 2 * step = {2 * step:g}. Got {max_sigma!r} instead.")
    s = setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
               blocks=None, num_prefix_tokens=None, layout=None, grid=None, seed=seed, check_blocks=False)
    fwd = _PixelForward(s.lm.model, s.cfg.normalize if space == "pixel" else None)

    def attack(inp: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        return inp + sigma * noise

    # captum's grid is arg_min + k * arg_step for arg_min + k * arg_step < arg_max
    mpp = MinParamPerturbation(forward_func=fwd, attack=attack, arg_name="sigma", arg_min=step,
                               arg_max=max_sigma + step / 2, arg_step=step, mode="linear")
    mins, preds, flips = [], [], []
    n = len(s.images)
    it = progress_iter(s.images.batches(1), n, "min flip sigma", progress)
    with torch.no_grad():
        for pixels, idx in it:
            x = pixels.to(s.device).float()
            if space == "normalized":
                x = s.cfg.normalize(x)
            pred = _finite_logits(fwd(x), idx).argmax(-1)
            eps = make_noise(seed, idx[0], x.shape[1:])[None].to(s.device)
            _, sig = mpp.evaluate(x, target=pred, perturbations_per_eval=perturbations_per_eval,
                                  attack_kwargs={"noise": eps})
            preds.append(int(pred[0]))
            if sig is None:
                mins.append(np.nan)
                flips.append(-1)
            else:
                flips.append(int(fwd(attack(x, float(sig), eps)).argmax(-1)[0]))
                mins.append(round(float(sig) / step) * step)  # captum accumulates the grid in floating point
    params = dict(
        analysis="min_flip_sigma", max_sigma=max_sigma, step=step, space=space, search="linear",
        perturbations_per_eval=perturbations_per_eval,
        noise="N(0,1) per image from SeedSequence([seed, image_index]); no clipping (as in noise_probe)",
        method="captum.robust.MinParamPerturbation",
    )
    return FlipResult(
        blocks=(), images=tuple(s.images.names), space=space, max_sigma=max_sigma, step=step,
        min_sigma=np.asarray(mins, dtype=np.float64), predicted=np.asarray(preds, dtype=np.int64),
        flipped_to=np.asarray(flips, dtype=np.int64), provenance=make_provenance(s, seed, params, s.images.names),
    )
