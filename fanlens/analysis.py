"""The analyses: spectral counts, the noise probe and token groups, streamed over images.

Each function takes a model (a module or a spec string, see
:func:`fanlens.models.build_model`) and images (see :mod:`fanlens.data`), streams the
images through the model in batches under a :class:`~fanlens.capture.TokenCapture`,
turns each block's tokens into per-image statistics and drops the tokens. Memory is
bounded by the batch, not by the number of images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from . import spectral as sp
from ._stats import RunningStats
from ._validation import FanlensError, check_choice, check_fraction, check_nonneg_float, check_positive_int
from .capture import TokenCapture
from .distributed import merge_stats, rank_and_world
from .data import DEFAULT_BATCH_SIZE, DataConfig, ImageSet, data_config, resolve_images
from .models import LoadedModel, build_model
from .results import BlockInfo, GroupsResult, ProbeResult, Provenance, SpectrumResult

__all__ = [
    "DEFAULT_TOKEN_BUDGET",
    "DEFAULT_SIGMAS",
    "DEFAULT_N_EIG",
    "DEFAULT_N_NOISE",
    "PROBE_MODES",
    "NOISE_SPACES",
    "spectrum",
    "noise_probe",
    "analyze",
    "group_tokens",
    "make_noise",
]

_log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 1024
DEFAULT_SIGMAS = (0.1,)
DEFAULT_N_EIG = 32
DEFAULT_N_NOISE = 16
PROBE_MODES = ("additive", "pure")
NOISE_SPACES = ("pixel", "normalized")


# --------------------------------------------------------------------------- shared plumbing
@dataclass
class _Setup:
    lm: LoadedModel
    cfg: DataConfig
    images: ImageSet | None
    device: torch.device
    capture_kwargs: dict


def _setup(
    model: Any,
    images: Any,
    *,
    pretrained: bool,
    checkpoint: Any,
    input_size: Any,
    device: Any,
    blocks: Any,
    num_prefix_tokens: int | None,
    layout: str | None,
    grid: Any,
    seed: int = 0,
    need_images: bool = True,
    check_blocks: bool = True,
) -> _Setup:
    if isinstance(model, LoadedModel):
        lm = model
    else:
        lm = build_model(model, pretrained=pretrained, checkpoint=checkpoint, seed=seed)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FanlensError(f"device must be a torch device such as 'cpu' or 'cuda'. Got {device!r} instead.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FanlensError(f"device must be available on this machine. Got {device!r}, but CUDA is not available.")
    cfg = data_config(lm.model, input_size=input_size)
    imgs = resolve_images(images, cfg) if need_images else None
    if imgs is not None and len(imgs) == 0:
        raise FanlensError("images must hold at least one image. Got none.")
    lm.model.to(dev).eval()
    ck = dict(blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid)
    if check_blocks:  # validate the block selection before any image is read
        TokenCapture(lm.model, **ck)
    return _Setup(lm, cfg, imgs, dev, ck)


def _shard(shard: tuple[int, int] | None, n_items: int) -> tuple[int, int]:
    rank, world = rank_and_world() if shard is None else shard
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise FanlensError(f"shard must be (rank, world_size) with 0 <= rank < world_size. Got {shard!r} instead.")
    if n_items < world:
        raise FanlensError(f"every process needs at least one image: {n_items} images for {world} processes.")
    return rank, world


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    return progress_bar(iterable, total=total, desc=desc, unit="batch", leave=False)


def progress_bar(iterable: Iterable, **kwargs):
    """tqdm's notebook bar where ipywidgets is installed, its text bar elsewhere (no warning)."""
    try:
        import ipywidgets  # noqa: F401

        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm(iterable, **kwargs)


def _n_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _forward(cap: TokenCapture, x: torch.Tensor) -> None:
    """Run the model under the capture; a failing forward becomes a FanlensError with the input shape."""
    try:
        cap.run(x)
    except FanlensError:
        raise
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FanlensError(
            f"the model's forward pass failed on an input of shape {tuple(x.shape)}: {first}. "
            f"Check input_size and the model's expected input."
        ) from e


def uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """Pixel batch ``(B, 3, H, W)`` in [0, 1] as ``(B, H, W, 3)`` uint8, for overlays in results."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The N(0, 1) noise of image ``index`` for ``seed``: same for every model, batch size and device."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(tuple(shape), generator=g)


def _provenance(s: _Setup, seed: int, params: dict, images: list[str]) -> Provenance:
    params = dict(params)
    params["data_config"] = s.cfg.to_dict()
    params["device"] = str(s.device)
    return Provenance(
        model=s.lm.name,
        weights=s.lm.weights,
        weights_sha256=s.lm.weights_sha256,
        seed=int(seed),
        params=params,
        images=images,
    )


# --------------------------------------------------------------------------- accumulators
def _check_spectral_args(rules, thresholds, affinity, token_budget, n_eig) -> tuple[tuple[str, ...], dict]:
    rules = tuple(rules) if not isinstance(rules, str) else (rules,)
    if not rules:
        raise FanlensError("rules must name at least one rule. Got an empty list instead.")
    for r in rules:
        check_choice("rules", r, sp.RULES)
    check_choice("affinity", affinity, sp.AFFINITIES)
    thresholds = dict(thresholds or {})
    for k, v in thresholds.items():
        check_choice("thresholds key", k, tuple(sp.DEFAULT_THRESHOLDS))
        check_fraction(f"thresholds[{k!r}]", v)
    check_positive_int("token_budget", token_budget, minimum=2)
    check_positive_int("n_eig", n_eig)
    return rules, thresholds


class _SpectralAcc:
    """Per-block significant-eigenvalue counts of the clean images, accumulated over batches."""

    def __init__(self, rules, thresholds, affinity, center, knn, max_k, token_budget, include_prefix, n_eig,
                 eig_dtype) -> None:
        self.rules, self.thresholds = rules, thresholds
        self.affinity, self.center, self.knn, self.max_k = affinity, center, knn, max_k
        self.token_budget, self.include_prefix, self.n_eig, self.eig_dtype = token_budget, include_prefix, n_eig, eig_dtype
        self.infos: list[BlockInfo] = []
        self.stats: list[RunningStats] = []
        self.eig: list[RunningStats] = []

    def update(self, bts: list, b: int) -> None:
        pooled = []
        for bt in bts:
            tok, g = sp.pool_tokens(bt.tokens[:b], bt.layout.grid, self.token_budget)
            if self.include_prefix and bt.prefix.shape[1]:
                tok = torch.cat([bt.prefix[:b], tok], dim=1)
            pooled.append((tok, g))
        if not self.infos:
            self.infos = [BlockInfo(i, bt.label, bt.layout, g) for i, (bt, (_t, g)) in enumerate(zip(bts, pooled))]
            self.stats = [RunningStats((len(self.rules),)) for _ in bts]
            self.eig = [RunningStats((self.n_eig,)) for _ in bts]
        # group blocks by token count: one batched eigendecomposition per group
        groups: dict[int, list[int]] = {}
        affs = []
        for li, (tok, _g) in enumerate(pooled):
            groups.setdefault(tok.shape[1], []).append(li)
            affs.append(sp.affinity(tok.float(), kind=self.affinity, center=self.center, knn=min(self.knn, tok.shape[1])))
        for lis in groups.values():
            need_norm = any(r in sp.NORMALIZED_RULES for r in self.rules)
            spec = sp.spectrum(torch.cat([affs[li] for li in lis], dim=0), dtype=self.eig_dtype, normalized=need_norm)
            counts = torch.stack(
                [sp.count_significant(spec, r, threshold=self.thresholds.get(r), max_k=self.max_k) for r in self.rules],
                dim=-1,
            ).cpu().numpy()
            lam = spec.affinity
            rel = (lam / lam[:, :1].clamp_min(1e-12)).cpu().numpy()
            top = np.full((rel.shape[0], self.n_eig), np.nan)
            top[:, : min(self.n_eig, rel.shape[1])] = rel[:, : self.n_eig]
            for j, li in enumerate(lis):
                self.stats[li].update(counts[j * b : (j + 1) * b])
                self.eig[li].update(top[j * b : (j + 1) * b])

    def params(self) -> dict:
        return dict(
            rules=list(self.rules),
            thresholds={r: self.thresholds.get(r, sp.DEFAULT_THRESHOLDS[r]) for r in sp.DEFAULT_THRESHOLDS},
            affinity=self.affinity, center=self.center, knn=self.knn, max_k=self.max_k,
            token_budget=self.token_budget, include_prefix=self.include_prefix, n_eig=self.n_eig,
            eig_dtype=str(self.eig_dtype or "float32"),
        )

    def result(self, provenance: Provenance) -> SpectrumResult:
        merged = merge_stats(self.stats + self.eig)
        stats, eig = merged[: len(self.stats)], merged[len(self.stats) :]
        summ = [st.summary() for st in stats]
        return SpectrumResult(
            blocks=tuple(self.infos),
            rules=self.rules,
            n_images=summ[0].n,
            count_mean=np.stack([x.mean for x in summ]),
            count_std=np.stack([x.std for x in summ]),
            count_ci_low=np.stack([x.ci_low for x in summ]),
            count_ci_high=np.stack([x.ci_high for x in summ]),
            eig_mean=np.stack([e.summary().mean for e in eig]),
            provenance=provenance,
        )


def _block_norm(t: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each image's patch tokens: ``(B, N, C) -> (B,)``."""
    return t.float().flatten(1).norm(dim=1)


class _ProbeAcc:
    """Per-block relative perturbation (additive) or relative feature norm (pure)."""

    def __init__(self, mode: str, sigmas: tuple[float, ...]) -> None:
        self.mode, self.sigmas = mode, sigmas
        self.infos: list[BlockInfo] = []
        self.stats: list[RunningStats] = []

    def update(self, bts: list, b: int) -> None:
        vals = []
        for bt in bts:
            t = bt.tokens
            if self.mode == "additive":
                clean = t[:b]
                denom = _block_norm(clean).clamp_min(1e-12)
                cols = [_block_norm(t[(k + 1) * b : (k + 2) * b] - clean) / denom for k in range(len(self.sigmas))]
                vals.append(torch.stack(cols, dim=-1).cpu().numpy())
            else:
                vals.append(t.float().norm(dim=-1).mean(dim=1, keepdim=True).cpu().numpy())
        if self.mode == "pure":
            first = np.clip(vals[0], 1e-12, None)
            vals = [v / first for v in vals]
        if not self.infos:
            self.infos = [BlockInfo(i, bt.label, bt.layout) for i, bt in enumerate(bts)]
            self.stats = [RunningStats((len(self.sigmas),)) for _ in bts]
        for li, v in enumerate(vals):
            self.stats[li].update(v)

    def result(self, provenance: Provenance, space: str) -> ProbeResult:
        summ = [st.summary() for st in merge_stats(self.stats)]
        return ProbeResult(
            blocks=tuple(self.infos),
            mode=self.mode,
            sigmas=self.sigmas,
            space=space,
            n_images=summ[0].n,
            mean=np.stack([x.mean for x in summ]),
            std=np.stack([x.std for x in summ]),
            ci_low=np.stack([x.ci_low for x in summ]),
            ci_high=np.stack([x.ci_high for x in summ]),
            provenance=provenance,
        )


def _stream(s: _Setup, batches: Iterable, total: int, desc: str, progress: bool,
            make_input: Callable[[torch.Tensor, list[int]], torch.Tensor], accs: Sequence) -> None:
    """One forward pass per batch under the capture; each accumulator reads the block tokens."""
    with torch.inference_mode(), TokenCapture(s.lm.model, stop_early=True, **s.capture_kwargs) as cap:
        n_blocks = None
        for x, idx in _progress(batches, total, desc, progress):
            cap.clear()
            _forward(cap, make_input(x, idx))
            bts = list(cap.block_tokens())
            cap.clear()
            if n_blocks is None:
                n_blocks = len(bts)
            elif len(bts) != n_blocks:
                raise FanlensError("the number of block calls changed between batches; fanlens needs a fixed forward.")
            for acc in accs:
                acc.update(bts, x.shape[0])
            del bts


def _noisy_input(s: _Setup, sigmas: tuple[float, ...], space: str, seed: int):
    """Clean copy, then one noisy copy per sigma, in one batch (noise paired by image index)."""

    def make(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
        eps = torch.stack([make_noise(seed, j, x.shape[1:]) for j in idx])
        if space == "pixel":
            return s.cfg.normalize(torch.cat([x] + [x + sg * eps for sg in sigmas]).to(s.device))
        xn = s.cfg.normalize(x)
        return torch.cat([xn] + [xn + sg * eps for sg in sigmas]).to(s.device)

    return make


def _parse_sigmas(sigmas: Any) -> tuple[float, ...]:
    if isinstance(sigmas, (int, float)):
        sigmas = (sigmas,)
    if isinstance(sigmas, str):
        try:
            sigmas = [float(v) for v in sigmas.split(",") if v.strip()]
        except ValueError:
            raise FanlensError(f"sigmas must be comma-separated numbers. Got {sigmas!r} instead.") from None
    out = tuple(check_nonneg_float("sigmas", v) for v in sigmas)
    if not out:
        raise FanlensError("sigmas must hold at least one noise level. Got none.")
    if len(set(out)) != len(out):
        raise FanlensError(f"sigmas must be distinct. Got {out!r} instead.")
    return out


_NOISE_DOC = "N(0,1) per image from SeedSequence([seed, image_index]); no clipping"
_CI_DOC = "normal 95% interval of the mean over images"


# --------------------------------------------------------------------------- spectrum
def spectrum(
    model: Any,
    images: Any = "samples",
    *,
    blocks: str | Sequence[str] | None = None,
    rules: Sequence[str] = sp.RULES,
    thresholds: dict[str, float] | None = None,
    affinity: str = sp.DEFAULT_AFFINITY,
    center: bool = True,
    knn: int = sp.DEFAULT_KNN,
    max_k: int = sp.DEFAULT_MAX_GAP_K,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    include_prefix: bool = False,
    n_eig: int = DEFAULT_N_EIG,
    eig_dtype: torch.dtype | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    layout: str | None = None,
    grid: tuple[int, int] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> SpectrumResult:
    """Significant-eigenvalue counts of the token affinity of every block.

    Per image and block: tokens (patch tokens; prefix tokens with ``include_prefix``)
    pooled to at most ``token_budget``, optionally centred, turned into an affinity
    (``affinity``), eigen-decomposed in one batched call per token count, and counted
    under every rule of ``rules``. Counts are aggregated over images (mean, std, 95 % CI).

    Args:
        model: a module, or a spec (timm name, ``file.py:factory``, ``module:factory``).
        images: a pixel tensor, folder, files, ``"samples"`` or a DataLoader.
        blocks: block names / glob patterns; ``None`` for the model family's blocks.
        rules: counting rules, from :data:`fanlens.spectral.RULES`; the first is the headline.
        thresholds: ``tau`` per threshold rule (defaults in ``spectral.DEFAULT_THRESHOLDS``).
        affinity: ``"cosine"`` (negatives clipped), ``"gaussian"`` or ``"knn"``.
        center: subtract each image's mean token before the affinity.
        token_budget: blocks with more tokens are average-pooled to a coarser grid.
        n_eig: top eigenvalues (divided by the largest) kept as the mean spectrum.
        eig_dtype: ``torch.float64`` to decompose in double precision.
        seed: seeds the random initialisation of a model built from a spec; recorded.
        progress: show a progress bar.
        shard: ``(rank, world_size)``: this process takes images ``rank, rank + world_size, ...``
            and the statistics are merged across the process group (default: from
            ``torch.distributed`` when initialised, else all images).

    Returns:
        :class:`~fanlens.results.SpectrumResult`.
    """
    rules, thresholds = _check_spectral_args(rules, thresholds, affinity, token_budget, n_eig)
    check_positive_int("batch_size", batch_size)
    s = _setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
               blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, seed=seed)
    rank, world = _shard(shard, len(s.images))
    acc = _SpectralAcc(rules, thresholds, affinity, center, knn, max_k, token_budget, include_prefix, n_eig, eig_dtype)
    n_local = len(range(rank, len(s.images), world))
    _stream(s, s.images.batches(batch_size, start=rank, step=world), _n_batches(n_local, batch_size), "spectrum",
            progress, lambda x, idx: s.cfg.normalize(x.to(s.device)), [acc])
    params = dict(analysis="spectrum", blocks=blocks, **acc.params(), batch_size=batch_size,
                  num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, processes=world, ci=_CI_DOC)
    return acc.result(_provenance(s, seed, params, s.images.names))


# --------------------------------------------------------------------------- probe
def noise_probe(
    model: Any,
    images: Any = "samples",
    *,
    sigmas: Sequence[float] | float | str = DEFAULT_SIGMAS,
    mode: str = "additive",
    space: str = "pixel",
    n_noise: int = DEFAULT_N_NOISE,
    blocks: str | Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    layout: str | None = None,
    grid: tuple[int, int] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> ProbeResult:
    """How much noise still moves the features, block by block.

    ``mode="additive"``: for each image ``x`` and level ``sigma``,
    ``delta_l = ||f_l(x + sigma eps) - f_l(x)|| / ||f_l(x)||`` (Frobenius norm over the
    patch tokens), ``eps ~ N(0, 1)`` drawn by :func:`make_noise` from ``seed`` and the
    image index, added in pixel space (before normalisation, no clipping) or in the
    normalised input space (``space``). The clean copy and one noisy copy per sigma go
    through the model in one batch.

    ``mode="pure"``: ``n_noise`` pure N(0, 1) inputs (normalised input space); per block
    the mean patch-token L2 norm, divided by the first block's, per sample.

    Returns:
        :class:`~fanlens.results.ProbeResult` with ``(L, S)`` mean/std/95 % CI.
    """
    check_choice("mode", mode, PROBE_MODES)
    check_choice("space", space, NOISE_SPACES)
    check_positive_int("batch_size", batch_size)
    sig = _parse_sigmas(sigmas) if mode == "additive" else (1.0,)
    if mode == "pure":
        check_positive_int("n_noise", n_noise)
    s = _setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
               blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, seed=seed,
               need_images=(mode == "additive"))
    n_total = len(s.images) if mode == "additive" else n_noise
    rank, world = _shard(shard, n_total)
    acc = _ProbeAcc(mode, sig)
    n_local = len(range(rank, n_total, world))
    if mode == "additive":
        batches = s.images.batches(batch_size, start=rank, step=world)
        make = _noisy_input(s, sig, space, seed)
    else:
        h, w = s.cfg.input_size
        ids = list(range(n_noise))[rank::world]
        batches = (
            (torch.stack([make_noise(seed, j, (3, h, w)) for j in ids[i : i + batch_size]]), ids[i : i + batch_size])
            for i in range(0, len(ids), batch_size)
        )
        make = lambda x, idx: x.to(s.device)  # noqa: E731
    _stream(s, batches, _n_batches(n_local, batch_size), f"probe ({mode})", progress, make, [acc])
    space_used = space if mode == "additive" else "normalized"
    params = dict(
        analysis="probe", mode=mode, sigmas=list(sig), space=space_used,
        n_noise=n_noise if mode == "pure" else None, blocks=blocks, batch_size=batch_size,
        num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, processes=world, noise=_NOISE_DOC,
        norm="Frobenius norm over patch tokens" if mode == "additive" else "mean patch-token L2 norm / block 0",
        ci=_CI_DOC,
    )
    names = s.images.names if s.images is not None else [f"noise[{j}]" for j in range(n_noise)]
    return acc.result(_provenance(s, seed, params, names), space_used)


# --------------------------------------------------------------------------- both in one pass
def analyze(
    model: Any,
    images: Any = "samples",
    *,
    sigmas: Sequence[float] | float | str = DEFAULT_SIGMAS,
    space: str = "pixel",
    blocks: str | Sequence[str] | None = None,
    rules: Sequence[str] = sp.RULES,
    thresholds: dict[str, float] | None = None,
    affinity: str = sp.DEFAULT_AFFINITY,
    center: bool = True,
    knn: int = sp.DEFAULT_KNN,
    max_k: int = sp.DEFAULT_MAX_GAP_K,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    include_prefix: bool = False,
    n_eig: int = DEFAULT_N_EIG,
    eig_dtype: torch.dtype | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    layout: str | None = None,
    grid: tuple[int, int] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> tuple[SpectrumResult, ProbeResult]:
    """:func:`spectrum` and the additive :func:`noise_probe` from the same forward passes.

    Each batch holds the clean images and one noisy copy per sigma; the spectral
    statistics read the clean part, the probe compares the noisy parts with it. The
    results equal those of the two separate calls (same arguments), at the cost of the
    probe's forward passes alone.
    """
    rules, thresholds = _check_spectral_args(rules, thresholds, affinity, token_budget, n_eig)
    check_choice("space", space, NOISE_SPACES)
    check_positive_int("batch_size", batch_size)
    sig = _parse_sigmas(sigmas)
    s = _setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
               blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, seed=seed)
    rank, world = _shard(shard, len(s.images))
    sacc = _SpectralAcc(rules, thresholds, affinity, center, knn, max_k, token_budget, include_prefix, n_eig, eig_dtype)
    pacc = _ProbeAcc("additive", sig)
    n_local = len(range(rank, len(s.images), world))
    _stream(s, s.images.batches(batch_size, start=rank, step=world), _n_batches(n_local, batch_size), "analyze",
            progress, _noisy_input(s, sig, space, seed), [sacc, pacc])
    common = dict(blocks=blocks, batch_size=batch_size, num_prefix_tokens=num_prefix_tokens, layout=layout,
                  grid=grid, processes=world, ci=_CI_DOC, computed_by="fanlens.analyze (one pass for spectrum and probe)")
    sprov = _provenance(s, seed, dict(analysis="spectrum", **sacc.params(), **common), s.images.names)
    pprov = _provenance(
        s, seed,
        dict(analysis="probe", mode="additive", sigmas=list(sig), space=space, n_noise=None, noise=_NOISE_DOC,
             norm="Frobenius norm over patch tokens", **common),
        s.images.names,
    )
    return sacc.result(sprov), pacc.result(pprov, space)


# --------------------------------------------------------------------------- groups
def group_tokens(
    model: Any,
    images: Any = "samples",
    *,
    n_clusters: int | None = 4,
    blocks: str | Sequence[str] | None = None,
    affinity: str = sp.DEFAULT_AFFINITY,
    center: bool = True,
    knn: int = sp.DEFAULT_KNN,
    max_k: int = sp.DEFAULT_MAX_GAP_K,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    n_init: int = 4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    input_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    layout: str | None = None,
    grid: tuple[int, int] | None = None,
    n_images: int | None = None,
    progress: bool = True,
) -> GroupsResult:
    """Spectral clustering of the patch tokens of every block: one label map per block and image.

    Args:
        n_clusters: groups per block, or ``None`` to choose per block and image by the eigengap.
        seed: seeds k-means (labels are deterministic for a seed).
        n_images: only the first ``n_images`` images (default: all).
        Other arguments as in :func:`spectrum`.

    Returns:
        :class:`~fanlens.results.GroupsResult`.
    """
    check_choice("affinity", affinity, sp.AFFINITIES)
    if n_clusters is not None:
        check_positive_int("n_clusters", n_clusters)
    check_positive_int("token_budget", token_budget, minimum=2)
    if n_images is not None:
        check_positive_int("n_images", n_images)
    s = _setup(model, images, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size, device=device,
               blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, seed=seed)
    labels: list[list[np.ndarray]] = []
    ks: list[list[np.ndarray]] = []
    pix: list[np.ndarray] = []
    infos: list[BlockInfo] = []
    with torch.inference_mode(), TokenCapture(s.lm.model, stop_early=True, **s.capture_kwargs) as cap:
        names = s.images.names[:n_images]
        batches = s.images.batches(batch_size, stop=n_images)
        for pixels, _idx in _progress(batches, _n_batches(len(names), batch_size), "groups", progress):
            cap.clear()
            _forward(cap, s.cfg.normalize(pixels.to(s.device)))
            pix.append(uint8_images(pixels))
            for li, bt in enumerate(cap.block_tokens()):
                tok, g = sp.pool_tokens(bt.tokens, bt.layout.grid, token_budget)
                if n_clusters is not None and n_clusters > tok.shape[1]:
                    raise FanlensError(
                        f"n_clusters must be <= the token count of every block; block {bt.label!r} has "
                        f"{tok.shape[1]} tokens ({g[0]}x{g[1]}). Got {n_clusters} instead."
                    )
                a = sp.affinity(tok.float(), kind=affinity, center=center, knn=min(knn, tok.shape[1]))
                lab, k = sp.spectral_clustering(a, n_clusters, max_k=max_k, n_init=n_init, seed=seed)
                if len(infos) <= li:
                    infos.append(BlockInfo(li, bt.label, bt.layout, g))
                    labels.append([])
                    ks.append([])
                labels[li].append(lab.reshape(-1, *g).cpu().numpy())
                ks[li].append(k.cpu().numpy())
            cap.clear()
    params = dict(
        analysis="groups", n_clusters=n_clusters, blocks=blocks, affinity=affinity, center=center, knn=knn,
        max_k=max_k, token_budget=token_budget, n_init=n_init, batch_size=batch_size,
        num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, n_images=n_images,
        clustering="normalised spectral clustering (Ng-Jordan-Weiss) + batched k-means++; labels by first appearance",
    )
    return GroupsResult(
        blocks=tuple(infos),
        images=tuple(names),
        labels=tuple(np.concatenate(l) for l in labels),
        n_clusters=np.stack([np.concatenate(k) for k in ks]),
        pixels=np.concatenate(pix),
        provenance=_provenance(s, seed, params, names),
    )
