"""The analyses: spectral counts, the noise probe and token groups, streamed over images.

Each function takes a model (a module or a spec string, see
:func:`fanlens.models.build_model`) and images (see :mod:`fanlens.data`), streams the
images through the model in batches under a :class:`~fanlens.capture.TokenCapture`,
turns each block's tokens into per-image statistics and drops the tokens. Memory is
bounded by the batch, not by the number of images.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from . import spectral as sp
from ._stats import RunningStats
from ._threads import map_items, one_thread
from ._validation import FanlensError, check_choice, check_fraction, check_nonneg_float, check_positive_int
from .data import DEFAULT_BATCH_SIZE
from .distributed import merge_stats
from .results import BlockInfo, GroupsResult, ProbeResult, Provenance, SpectrumResult
from .runner import (AccState, Part, Setup, make_noise, make_provenance, n_batches, state_key, stream)

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
    "spectrum_part",
    "probe_part",
    "pure_noise_probe",
    "token_norm_twin",
    "analyze_part",
    "groups_part",
    "corruption_probe_part",
    "make_noise",
    "parse_sigmas",
    "parse_corruptions",
]

_log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 1024
DEFAULT_SIGMAS = (0.1,)
DEFAULT_N_EIG = 32
DEFAULT_N_NOISE = 16
DEFAULT_CHECKPOINT_EVERY = 10
CLUSTER_DTYPE = torch.float64  # eigenvectors for clustering: float32 rounding reorders near-equal ones across CPUs
PROBE_MODES = ("additive", "pure", "pure_vs_clean")
"""``additive``: ||f(x + sigma eps) - f(x)|| / ||f(x)||; ``pure``: the token norm of f(eps) for pure
N(0, 1) inputs divided by block 0's (growth over depth); ``pure_vs_clean``: the token norm of f(eps_i)
divided by that of the clean image f(x_i) at the same block (the paper's Figure 3 input, decay)."""
NOISE_SPACES = ("pixel", "normalized")

























# --------------------------------------------------------------------------- accumulators
def _check_spectral_args(rules, thresholds, affinity, token_budget, n_eig) -> tuple[tuple[str, ...], dict]:
    rules = tuple(rules) if not isinstance(rules, str) else (rules,)
    if not rules:
        raise FanlensError("rules must name at least one rule. Got an empty list instead.")
    for r in rules:
        check_choice("rules", r, sp.ALL_RULES)
    check_choice("affinity", affinity, sp.AFFINITIES)
    thresholds = dict(thresholds or {})
    for k, v in thresholds.items():
        check_choice("thresholds key", k, tuple(sp.DEFAULT_THRESHOLDS))
        check_fraction(f"thresholds[{k!r}]", v)
    check_positive_int("token_budget", token_budget, minimum=2, maximum=MAX_TOKEN_BUDGET,
                       why="the affinity matrix of that many tokens is its square")
    check_positive_int("n_eig", n_eig, minimum=0, maximum=token_budget, why="no more eigenvalues than tokens")
    return rules, thresholds


def _finite_or_raise(values: np.ndarray, block: str, what: str) -> None:
    if not np.isfinite(values).all():
        raise FanlensError(
            f"block {block!r}: the {what} is not finite (NaN or inf) for {int((~np.isfinite(values)).any(axis=tuple(range(1, values.ndim))).sum())} "
            f"image(s); fanlens never reports a non-finite value as a result."
        )


class _SpectralAcc(AccState):
    """Per-block significant-eigenvalue counts of the clean images, accumulated over batches."""

    def __init__(self, rules, thresholds, affinity, center, knn, max_k, token_budget, include_prefix, n_eig,
                 eig_dtype) -> None:
        self.rules, self.thresholds = rules, thresholds
        self.affinity, self.center, self.knn, self.max_k = affinity, center, knn, max_k
        self.token_budget, self.include_prefix, self.n_eig, self.eig_dtype = token_budget, include_prefix, n_eig, eig_dtype
        self.infos: list[BlockInfo] = []
        self.stats: list[RunningStats] = []
        self.eig: list[RunningStats] = []

    def update(self, bts: list, b: int, idx: Sequence[int]) -> None:
        pooled = []
        for bt in bts:
            tok, g = sp.pool_tokens(bt.tokens[:b], bt.layout.grid, self.token_budget)
            if self.include_prefix and bt.prefix.shape[1]:
                tok = torch.cat([bt.prefix[:b], tok], dim=1)
            _check_token_count(bt.label, tok.shape[1], bt.layout.grid)
            pooled.append((tok, g))
        if not self.infos:
            self.infos = [BlockInfo(i, bt.label, bt.layout, g) for i, (bt, (_t, g)) in enumerate(zip(bts, pooled))]
            self.stats = [RunningStats((len(self.rules),), keep=True) for _ in bts]
            self.eig = [RunningStats((self.n_eig,)) for _ in bts]
        # one batched eigendecomposition per token count
        affs = [sp.affinity(tok.float(), kind=self.affinity, center=self.center, knn=min(self.knn, tok.shape[1]))
                for tok, _g in pooled]
        for lis in _by_token_count(affs):
            with one_thread():  # many small eigendecompositions and counts: see fanlens._threads
                self._count(lis, affs, pooled, b, idx)

    def _count(self, lis: list[int], affs: list, pooled: list, b: int, idx: Sequence[int]) -> None:
        """Eigenvalues, counts and the mean spectrum of the blocks ``lis`` (same token count).

        With ``n_eig=0`` (no mean spectrum) and only threshold and dimension rules, the threshold
        counts come from :func:`spectral.threshold_count` (no full spectrum).
        """
        a = torch.cat([affs[li] for li in lis], dim=0)
        spectral_rules = [r for r in self.rules if r in sp.RULES]
        spec = None
        if self.n_eig or any(r not in sp.THRESHOLD_RULES for r in spectral_rules):
            need_norm = any(r in sp.NORMALIZED_RULES for r in self.rules)
            spec = sp.spectrum(a, dtype=self.eig_dtype, normalized=need_norm)

        def one(r: str) -> torch.Tensor:
            if r not in sp.RULES:
                return torch.cat([sp.dimension(pooled[li][0].float(), r).to(a) for li in lis])
            if spec is None:
                return sp.threshold_count(a, r, threshold=self.thresholds.get(r), dtype=self.eig_dtype).to(a)
            return sp.count_significant(spec, r, threshold=self.thresholds.get(r), max_k=self.max_k).to(a)

        counts = torch.stack([one(r) for r in self.rules], dim=-1).cpu().numpy()
        top = np.full((a.shape[0], self.n_eig), np.nan)
        if self.n_eig:
            lam = spec.affinity
            rel = (lam / lam[:, :1].clamp_min(1e-12)).cpu().numpy()
            top[:, : min(self.n_eig, rel.shape[1])] = rel[:, : self.n_eig]
        for j, li in enumerate(lis):
            _finite_or_raise(counts[j * b : (j + 1) * b], self.infos[li].name,
                             "significant-eigenvalue count or dimension measure")
            self.stats[li].update(counts[j * b : (j + 1) * b], idx)
            self.eig[li].update(top[j * b : (j + 1) * b])

    def _stat_lists(self) -> dict[str, list[RunningStats]]:
        return {"stats": self.stats, "eig": self.eig}

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
            per_image=_per_image(stats),
        )


def _by_token_count(affs: Sequence[torch.Tensor]) -> list[list[int]]:
    """The block indices of ``affs`` (``(B, N, N)`` per block) grouped by ``N``, in block order:
    the blocks one batched call can take together."""
    groups: dict[int, list[int]] = {}
    for li, a in enumerate(affs):
        groups.setdefault(a.shape[-1], []).append(li)
    return list(groups.values())


def _per_image(stats: list[RunningStats]) -> np.ndarray:
    """``(n_images, L, C)`` per-image values of every block, in dataset-index order."""
    parts = [st.per_image() for st in stats]
    for idx, _v in parts[1:]:
        if not np.array_equal(idx, parts[0][0]):
            raise RuntimeError("blocks saw different images; fanlens needs every block for every image.")
    return np.stack([v for _i, v in parts], axis=1)


def _check_token_count(block: str, n: int, grid: tuple[int, int]) -> None:
    if n < 2:
        raise FanlensError(
            f"block {block!r} has {n} token ({grid[0]}x{grid[1]} grid) at this input size; a token affinity needs "
            f"at least 2. Use a larger input_size, or leave the block out (blocks=...)."
        )


def _block_norm(t: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each image's patch tokens: ``(B, N, C) -> (B,)`` (in float64, so that
    large but finite features do not overflow)."""
    return t.double().flatten(1).norm(dim=1)


class _ProbeAcc(AccState):
    """Per-block relative perturbation (additive) or relative feature norm (pure)."""

    def __init__(self, mode: str, sigmas: tuple[float, ...], perturbations: tuple[str, ...] = (),
                 token_norm: bool = False) -> None:
        self.mode, self.sigmas, self.perturbations = mode, sigmas, perturbations
        self.token_norm = bool(token_norm)  # per-token LayerNorm (no affine) before the norms
        self.n_cols = len(perturbations) if perturbations else len(sigmas)
        # the forwarded copy behind each column (sigma = 0 is answered without one: its value is 0)
        self.copy_of = (list(range(len(perturbations))) if perturbations else
                        [None if sg == 0 else sum(1 for v in sigmas[:k] if v != 0) for k, sg in enumerate(sigmas)])
        self.first_copy = 1  # the batch position of the first copy (set by runner.stream_parts)
        self.infos: list[BlockInfo] = []
        self.stats: list[RunningStats] = []

    def _block_values(self, bt: Any, b: int) -> np.ndarray:
        t = bt.tokens
        if self.token_norm:
            t = torch.nn.functional.layer_norm(t.float(), t.shape[-1:])
        if self.mode == "pure_vs_clean":  # copy 0: pure N(0, 1) inputs, paired with the images by index
            at = self.first_copy
            noise = t[at * b : (at + 1) * b].float().norm(dim=-1).mean(dim=1)
            clean = t[:b].float().norm(dim=-1).mean(dim=1).clamp_min(1e-12)
            return (noise / clean)[:, None].cpu().numpy()
        if self.mode == "additive":
            clean = t[:b]
            denom = _block_norm(clean).clamp_min(1e-12)
            at = self.first_copy
            cols = [torch.zeros_like(denom) if j is None else
                    _block_norm(t[(at + j) * b : (at + j + 1) * b] - clean) / denom for j in self.copy_of]
            return torch.stack(cols, dim=-1).cpu().numpy()
        return t.float().norm(dim=-1).mean(dim=1, keepdim=True).cpu().numpy()

    def update(self, bts: list, b: int, idx: Sequence[int]) -> None:
        # small reductions, block by block on the caller's cores, one intra-op thread each (fanlens._threads:
        # the same bits as one block after the other on one thread)
        vals = map_items(lambda bt: self._block_values(bt, b), bts, bts[0].tokens.device if bts else "cpu")
        if self.mode == "pure":
            first = np.clip(vals[0], 1e-12, None)
            vals = [v / first for v in vals]
        if not self.infos:
            self.infos = [BlockInfo(i, bt.label, bt.layout) for i, bt in enumerate(bts)]
            self.stats = [RunningStats((self.n_cols,), keep=True) for _ in bts]
        for li, v in enumerate(vals):
            _finite_or_raise(v, self.infos[li].name, self._what)
            self.stats[li].update(v, idx)

    @property
    def _what(self) -> str:
        return {"additive": "relative perturbation", "pure": "relative feature norm"}.get(
            self.mode, "noise-to-clean feature norm")

    def _stat_lists(self) -> dict[str, list[RunningStats]]:
        return {"stats": self.stats}

    def result(self, provenance: Provenance, space: str) -> ProbeResult:
        self._merged = merge_stats(self.stats)
        summ = [st.summary() for st in self._merged]
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
            perturbations=self.perturbations,
            per_image=_per_image(self._merged),
        )


def _noisy_part(s: Setup, acc: _ProbeAcc, sigmas: tuple[float, ...], space: str, seed: int) -> Part:
    """The probe's share of a pass: one noisy copy per non-zero sigma (noise paired by image
    index); sigma = 0 needs no copy (its perturbation is 0 by definition)."""
    sigmas = tuple(sg for sg in sigmas if sg != 0)

    def make(x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        eps = torch.stack([make_noise(seed, j, x.shape[1:]) for j in idx]).to(x.device)
        if space == "pixel":
            return [s.cfg.normalize(x + sg * eps) for sg in sigmas]
        xn = s.cfg.normalize(x)
        return [xn + sg * eps for sg in sigmas]

    return Part([acc], [f"sigma={v:g}" for v in sigmas], make if sigmas else None)


_NORM_DOC = {"additive": "Frobenius norm over patch tokens", "pure": "mean patch-token L2 norm / block 0",
             "pure_vs_clean": "mean patch-token L2 norm of f(eps_i) / that of f(x_i), same block"}


def _probe_params(mode: str, sig, space_used: str, labels, n_noise, batch_size: int, processes: int,
                  token_norm: bool = False) -> dict:
    return dict(
        analysis="probe", mode=mode, sigmas=list(sig), space=space_used, corruptions=list(labels) or None,
        n_noise=n_noise, blocks=None, batch_size=batch_size, num_prefix_tokens=None, layout=None, grid=None,
        processes=processes, noise=_NOISE_DOC, norm=_NORM_DOC[mode],
        token_norm="per-token LayerNorm (no affine) before the norm" if token_norm else None, ci=_CI_DOC,
    )


def _pure_part(acc: _ProbeAcc, seed: int) -> Part:
    """The pure-noise copy of each image: N(0, 1) in the normalised input space (``make_noise`` of the
    image's index), compared with the image's clean tokens (:data:`PROBE_MODES`)."""

    def make(x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        return [torch.stack([make_noise(seed, j, x.shape[1:]) for j in idx]).to(x.device)]

    return Part([acc], ["pure N(0, 1) input"], make)


def corruption_probe_part(s: Setup, cells: Sequence[tuple[str, int]], seed: int, *, batch_size: int,
                          processes: int) -> tuple[Part, dict]:
    """The probe under corruptions as a share of a pass: ``(part, params)``.

    The part adds one corrupted copy per (corruption, severity) cell (random parts from (seed,
    image index), :func:`fanlens.corruptions.corrupt`); :func:`noise_probe` streams it alone, and
    :func:`fanlens.robustness.robustness` (with ``probe_severity``) classifies the same forward
    pass, so neither image is forwarded twice. ``part.accs[0].result(provenance, "pixel")`` is the
    :class:`~fanlens.results.ProbeResult`.
    """
    from .corruptions import corrupt

    labels = tuple(f"{c}@{v}" for c, v in cells)
    params = _probe_params("additive", (), "pixel", labels, None, batch_size, processes)

    def make(x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        return [s.cfg.normalize(corrupt(x, c, v, seed=seed, indices=idx)) for c, v in cells]

    return Part([_ProbeAcc("additive", (), labels)], [f"{c} at severity {v}" for c, v in cells], make), params


def parse_corruptions(corruption: Any, severity: Any) -> list[tuple[str, int]]:
    """``corruption`` (a name, comma-separated names, a list, or ``"fog@3"`` labels) x ``severity``
    (an int or a list) as (name, severity) cells in order."""
    from .corruptions import NAMES, SEVERITIES

    items = corruption.split(",") if isinstance(corruption, str) else list(corruption)
    if isinstance(severity, str):
        sevs = [v for v in severity.split(",") if v.strip()]
    elif isinstance(severity, (list, tuple, range, np.ndarray)):
        sevs = list(severity)
    else:  # one value (an int; anything else is refused below)
        sevs = [severity]

    def level(v: Any) -> int | None:  # whole numbers only: 2.5 or 2.0 is not truncated to 2
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
        if isinstance(v, str) and v.strip().isascii() and v.strip().isdigit():  # '²' is a digit to str
            return int(v.strip())
        return None

    cells: list[tuple[str, int]] = []
    for it in items:
        name, at, lvl = str(it).strip().partition("@")
        check_choice("corruption", name, NAMES)
        if not at and not sevs:
            raise FanlensError(f"severity must hold at least one int in 1..5. Got {severity!r} instead.")
        for v in ([lvl] if at else sevs):
            v = level(v)
            if v not in SEVERITIES:
                raise FanlensError(f"severity must be ints in 1..5. Got {lvl if at else severity!r} instead.")
            cells.append((name, v))
    if not cells:
        raise FanlensError("corruption must name at least one corruption. Got none.")
    if len(set(cells)) != len(cells):
        raise FanlensError(f"corruption and severity must not repeat a cell. Got {cells!r} instead.")
    return cells


MAX_TOKEN_BUDGET = 16384
"""The most tokens per block the spectral step takes (a 16,384^2 float32 affinity is 1 GiB)."""
MAX_N_NOISE = 1_000_000
"""The most pure-noise inputs a probe takes."""

def parse_sigmas(sigmas: Any) -> tuple[float, ...]:
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
    state_dir: str | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
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
        rules: counting rules, from :data:`fanlens.spectral.RULES`, and the dimension measures
            of :data:`fanlens.spectral.DIMENSION_RULES` (``"twonn"``, ``"rankme"``, on the same
            pooled tokens); the first is the headline.
        thresholds: ``tau`` per threshold rule (defaults in ``spectral.DEFAULT_THRESHOLDS``).
        affinity: ``"cosine"`` (negatives clipped), ``"gaussian"`` or ``"knn"``.
        center: subtract each image's mean token before the affinity.
        token_budget: blocks with more tokens are average-pooled to a coarser grid.
        n_eig: top eigenvalues (divided by the largest) kept as the mean spectrum. ``0`` keeps
            none; with only threshold and dimension rules, the counts are then taken from LDL^T
            inertia (:func:`spectral.threshold_count`: the same counts, no eigenvalues except for
            a matrix with one too close to a threshold; about as fast on the CPU).
        eig_dtype: ``torch.float64`` to decompose in double precision.
        seed: seeds the random initialisation of a model built from a spec; recorded.
        progress: show a progress bar.
        shard: ``(rank, world_size)``: this process takes images ``rank, rank + world_size, ...``
            and the statistics are merged across the process group (default: from
            ``torch.distributed`` when initialised, else all images).
        state_dir: a folder for checkpoints: the accumulators are saved there every
            ``checkpoint_every`` batches and on SIGINT/SIGTERM (see :mod:`fanlens.runner`).
        resume: continue the run whose checkpoint is in ``state_dir`` (same parameters and
            images, else refused); the result equals an uninterrupted run exactly.

    Returns:
        :class:`~fanlens.results.SpectrumResult`.
    """
    from .lens import Lens

    lens = Lens.one_shot(model, images, blocks=blocks, batch_size=batch_size, device=device, seed=seed,
                         pretrained=pretrained, checkpoint=checkpoint, input_size=input_size,
                         num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, progress=progress, shard=shard,
                         state_dir=state_dir, checkpoint_every=checkpoint_every, resume=resume)
    return lens.spectrum(rules=rules, thresholds=thresholds, affinity=affinity, center=center, knn=knn, max_k=max_k,
                         token_budget=token_budget, include_prefix=include_prefix, n_eig=n_eig, eig_dtype=eig_dtype)


def spectrum_part(s: Setup, *, seed: int, batch_size: int, processes: int = 1, rules: Sequence[str] = sp.RULES,
                  thresholds: dict[str, float] | None = None, affinity: str = sp.DEFAULT_AFFINITY, center: bool = True,
                  knn: int = sp.DEFAULT_KNN, max_k: int = sp.DEFAULT_MAX_GAP_K,
                  token_budget: int = DEFAULT_TOKEN_BUDGET, include_prefix: bool = False, n_eig: int = DEFAULT_N_EIG,
                  eig_dtype: torch.dtype | None = None, blocks: str | Sequence[str] | None = None,
                  num_prefix_tokens: int | None = None, layout: str | None = None,
                  grid: tuple[int, int] | None = None) -> tuple[Part, dict, Any]:
    """:func:`spectrum` as a share of a pass (:func:`fanlens.runner.stream_parts`) for ``s`` made
    by :func:`fanlens.runner.setup`: ``(part, state key, finish)``; ``finish()`` returns the
    :class:`~fanlens.results.SpectrumResult`. ``blocks``, ``num_prefix_tokens``, ``layout`` and
    ``grid`` are only recorded (``s`` has them)."""
    rules, thresholds = _check_spectral_args(rules, thresholds, affinity, token_budget, n_eig)
    acc = _SpectralAcc(rules, thresholds, affinity, center, knn, max_k, token_budget, include_prefix, n_eig, eig_dtype)
    params = dict(analysis="spectrum", blocks=blocks, **acc.params(), batch_size=batch_size,
                  num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, processes=processes, ci=_CI_DOC)

    def finish() -> SpectrumResult:
        return acc.result(make_provenance(s, seed, params, s.images.names))

    return Part([acc]), state_key(s, seed, params), finish


# --------------------------------------------------------------------------- probe
def noise_probe(
    model: Any,
    images: Any = "samples",
    *,
    sigmas: Sequence[float] | float | str = DEFAULT_SIGMAS,
    mode: str = "additive",
    space: str = "pixel",
    n_noise: int = DEFAULT_N_NOISE,
    corruption: str | Sequence[str] | None = None,
    severity: int | Sequence[int] = 3,
    token_norm: bool = False,
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
    state_dir: str | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
) -> ProbeResult:
    """How much noise still moves the features, block by block.

    ``mode="additive"``: for each image ``x`` and level ``sigma``,
    ``delta_l = ||f_l(x + sigma eps) - f_l(x)|| / ||f_l(x)||`` (Frobenius norm over the
    patch tokens), ``eps ~ N(0, 1)`` drawn by :func:`make_noise` from ``seed`` and the
    image index, added in pixel space (before normalisation, no clipping) or in the
    normalised input space (``space``). The clean copy and one noisy copy per sigma go
    through the model in one batch.

    ``mode="pure"``: ``n_noise`` pure N(0, 1) inputs (normalised input space); per block
    the mean patch-token L2 norm, divided by the first block's, per sample (growth from block 0).

    ``mode="pure_vs_clean"``: per image ``x_i``, one pure N(0, 1) input ``eps_i`` (normalised
    input space); per block the mean patch-token L2 norm of ``f_l(eps_i)`` divided by that of
    ``f_l(x_i)``: how large the features of noise stay next to those of real images, block by block.

    ``token_norm``: a per-token LayerNorm (no affine) on the block outputs before the additive
    measure, so that a block that only rescales its tokens does not count as damping.

    ``corruption`` (names of :data:`fanlens.corruptions.NAMES`, comma-separated or a list, or
    ``"fog@3"`` labels) with ``severity`` (an int or a list): the same measure with the
    corrupted image ``c(x)`` in place of ``x + sigma eps`` (pixel space), one column per
    corruption and severity; ``sigmas`` is then not used.

    ``state_dir``, ``checkpoint_every`` and ``resume`` checkpoint and resume the run as in
    :func:`spectrum`. A block whose output holds NaN or inf (e.g. at a huge sigma) is an
    error naming the block and the sigma.

    Returns:
        :class:`~fanlens.results.ProbeResult` with ``(L, S)`` mean/std/95 % CI.
    """
    from .lens import Lens

    lens = Lens.one_shot(model, images if mode != "pure" else None, blocks=blocks, batch_size=batch_size,
                         device=device, seed=seed, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size,
                         num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, progress=progress, shard=shard,
                         state_dir=state_dir, checkpoint_every=checkpoint_every, resume=resume)
    return lens.probe(sigmas=sigmas, mode=mode, space=space, n_noise=n_noise, corruption=corruption,
                      severity=severity, token_norm=token_norm)


def probe_part(s: Setup, *, seed: int, batch_size: int, processes: int = 1,
               sigmas: Sequence[float] | float | str = DEFAULT_SIGMAS, space: str = "pixel",
               mode: str = "additive", token_norm: bool = False,
               corruption: str | Sequence[str] | None = None, severity: int | Sequence[int] = 3,
               blocks: str | Sequence[str] | None = None, num_prefix_tokens: int | None = None,
               layout: str | None = None, grid: tuple[int, int] | None = None) -> tuple[Part, dict, Any]:
    """The image probes of :func:`noise_probe` as a share of a pass, for ``s`` made by
    :func:`fanlens.runner.setup`: ``mode="additive"`` (Gaussian or, with ``corruption``, corrupted
    copies) or ``"pure_vs_clean"`` (one pure N(0, 1) input per image); ``(part, state key, finish)``,
    ``finish()`` returning the :class:`~fanlens.results.ProbeResult`. ``token_norm``: a per-token
    LayerNorm (no affine) before the norms (additive only)."""
    check_choice("space", space, NOISE_SPACES)
    check_choice("mode", mode, ("additive", "pure_vs_clean"))
    if token_norm and mode != "additive":
        raise FanlensError(f"token_norm goes with mode='additive' (a LayerNorm makes every token norm the same). "
                           f"Got mode={mode!r}.")
    sig = parse_sigmas(sigmas)
    cells = parse_corruptions(corruption, severity) if corruption is not None else []
    if cells and space != "pixel":
        raise FanlensError("corruption works in pixel space (ImageNet-C corrupts pixels). Got space='normalized'.")
    if cells and mode != "additive":
        raise FanlensError(f"corruption goes with mode='additive'. Got mode={mode!r}.")
    if mode == "pure_vs_clean":
        acc = _ProbeAcc("pure_vs_clean", (1.0,))
        params = _probe_params("pure_vs_clean", (1.0,), "normalized", (), None, batch_size, processes)
        part = _pure_part(acc, seed)
        space = "normalized"
    elif cells:
        part, params = corruption_probe_part(s, cells, seed, batch_size=batch_size, processes=processes)
        acc = part.accs[0]
    else:
        acc = _ProbeAcc("additive", sig, token_norm=token_norm)
        params = _probe_params("additive", sig, space, (), None, batch_size, processes, token_norm)
        part = _noisy_part(s, acc, sig, space, seed)
    params.update(blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid)

    def finish() -> ProbeResult:
        return acc.result(make_provenance(s, seed, params, s.images.names), space)

    return part, state_key(s, seed, params), finish


def token_norm_twin(s: Setup, part: Part, *, sigmas: Sequence[float], space: str, seed: int, batch_size: int,
                    processes: int = 1) -> Any:
    """Read the noisy copies of an additive probe ``part`` (the same ``sigmas`` and ``space``) a second
    time, after a per-token LayerNorm: no image is forwarded again. Returns ``finish()`` giving that
    :class:`~fanlens.results.ProbeResult` (``token_norm``)."""
    sig = parse_sigmas(sigmas)
    acc = _ProbeAcc("additive", sig, token_norm=True)
    part.accs = list(part.accs) + [acc]
    params = _probe_params("additive", sig, space, (), None, batch_size, processes, True)

    def finish() -> ProbeResult:
        return acc.result(make_provenance(s, seed, params, s.images.names), space)

    return finish


def pure_noise_probe(s: Setup, *, n_noise: int, seed: int, batch_size: int, shard: tuple[int, int],
                     progress: bool, blocks: str | Sequence[str] | None = None,
                     num_prefix_tokens: int | None = None, layout: str | None = None,
                     grid: tuple[int, int] | None = None) -> tuple[dict, Any]:
    """The pure-noise probe (``mode="pure"``): ``(state key, run)``; ``run(state)`` streams
    ``n_noise`` N(0, 1) inputs (this process's share of ``shard``) and returns the
    :class:`~fanlens.results.ProbeResult`. No image is read."""
    check_positive_int("n_noise", n_noise)
    if n_noise > MAX_N_NOISE:
        raise FanlensError(f"n_noise must be at most {MAX_N_NOISE:,} (fanlens.analysis.MAX_N_NOISE): the mean over "
                           f"pure-noise inputs is settled after a few hundred, and {n_noise:,} forward passes would "
                           f"take days. Got {n_noise} instead.")
    rank, world = shard
    acc = _ProbeAcc("pure", (1.0,))
    params = _probe_params("pure", (1.0,), "normalized", (), n_noise, batch_size, world)
    params.update(blocks=blocks, num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid)
    h, w = s.cfg.input_size
    ids = list(range(n_noise))[rank::world]

    def batches(skip: int):
        rest = ids[skip * batch_size:]
        for i in range(0, len(rest), batch_size):
            yield torch.stack([make_noise(seed, j, (3, h, w)) for j in rest[i : i + batch_size]]), rest[i : i + batch_size]

    def run(state) -> ProbeResult:
        stream(s, batches, n_batches(len(ids), batch_size), "probe (pure)", progress,
               lambda x, idx, clean: [x.to(s.device)], [acc], state, ["pure noise"])
        return acc.result(make_provenance(s, seed, params, [f"noise[{j}]" for j in range(n_noise)]), "normalized")

    return state_key(s, seed, params), run


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
    state_dir: str | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    groups: int | str | None = None,
    n_init: int = 4,
):
    """:func:`spectrum` and the additive :func:`noise_probe` from the same forward passes.

    Each batch holds the clean images and one noisy copy per non-zero sigma; the spectral
    statistics read the clean part, the probe compares the noisy parts with it. The
    results equal those of the two separate calls (same arguments), at the cost of the
    probe's forward passes alone. ``state_dir``, ``checkpoint_every`` and ``resume`` as in
    :func:`spectrum`.

    With ``groups`` (a cluster count, or ``"auto"`` for the eigengap) the clean tokens of the
    same pass are also grouped, as :func:`group_tokens` with ``n_clusters=groups`` (and
    ``n_init``) would group them, and ``(spectrum, probe, groups)`` is returned: no image is
    forwarded twice. Groups are not checkpointed or gathered across processes: with
    ``groups``, ``state_dir`` and several processes are refused.

    Returns:
        ``(SpectrumResult, ProbeResult)``, or ``(SpectrumResult, ProbeResult, GroupsResult)``
        with ``groups``.
    """
    from .lens import Lens

    lens = Lens.one_shot(model, images, blocks=blocks, batch_size=batch_size, device=device, seed=seed,
                         pretrained=pretrained, checkpoint=checkpoint, input_size=input_size,
                         num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, progress=progress, shard=shard,
                         state_dir=state_dir, checkpoint_every=checkpoint_every, resume=resume)
    return lens.analyze(sigmas=sigmas, space=space, rules=rules, thresholds=thresholds, affinity=affinity,
                        center=center, knn=knn, max_k=max_k, token_budget=token_budget, include_prefix=include_prefix,
                        n_eig=n_eig, eig_dtype=eig_dtype, groups=groups, n_init=n_init)


def analyze_part(s: Setup, *, sigmas: tuple[float, ...], seed: int, batch_size: int, processes: int = 1,
                 space: str = "pixel", rules: Sequence[str] = sp.RULES, thresholds: dict[str, float] | None = None,
                 affinity: str = sp.DEFAULT_AFFINITY, center: bool = True, knn: int = sp.DEFAULT_KNN,
                 max_k: int = sp.DEFAULT_MAX_GAP_K, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 include_prefix: bool = False, n_eig: int = DEFAULT_N_EIG, eig_dtype: torch.dtype | None = None,
                 blocks: str | Sequence[str] | None = None, num_prefix_tokens: int | None = None,
                 layout: str | None = None, grid: tuple[int, int] | None = None, groups: int | str | None = None,
                 n_init: int = 4) -> tuple[Part, dict, Any]:
    """:func:`analyze` as a share of a pass (:func:`fanlens.runner.stream_parts`), for ``s`` made
    by :func:`fanlens.runner.setup`: ``(part, state key, finish)``; ``finish()`` returns what
    :func:`analyze` returns. ``sigmas`` as :func:`parse_sigmas` returns them; ``blocks``,
    ``num_prefix_tokens``, ``layout`` and ``grid`` are only recorded (``s`` has them)."""
    rules, thresholds = _check_spectral_args(rules, thresholds, affinity, token_budget, n_eig)
    check_choice("space", space, NOISE_SPACES)
    sacc = _SpectralAcc(rules, thresholds, affinity, center, knn, max_k, token_budget, include_prefix, n_eig, eig_dtype)
    pacc = _ProbeAcc("additive", sigmas)
    common = dict(blocks=blocks, batch_size=batch_size, num_prefix_tokens=num_prefix_tokens, layout=layout,
                  grid=grid, processes=processes, ci=_CI_DOC,
                  computed_by="fanlens.analyze (one pass for spectrum and probe)")
    sparams = dict(analysis="spectrum", **sacc.params(), **common)
    pparams = dict(analysis="probe", mode="additive", sigmas=list(sigmas), space=space, n_noise=None,
                   noise=_NOISE_DOC, norm="Frobenius norm over patch tokens", **common)
    part = _noisy_part(s, pacc, sigmas, space, seed)
    part.accs = [sacc, pacc]
    gacc = None
    if groups is not None:
        k = None if groups == "auto" else check_positive_int("groups", groups)
        check_positive_int("n_init", n_init)
        gacc = _GroupsAcc(k, affinity, center, knn, max_k, token_budget, n_init, seed)
        part.accs.append(gacc)
        part.pixels = gacc.pixels

    def finish():
        names = s.images.names
        spec, probe = sacc.result(make_provenance(s, seed, sparams, names)), pacc.result(
            make_provenance(s, seed, pparams, names), space)
        if gacc is None:
            return spec, probe
        gparams = dict(analysis="groups", blocks=blocks, batch_size=batch_size, num_prefix_tokens=num_prefix_tokens,
                       layout=layout, grid=grid, n_images=None,
                       computed_by="fanlens.analyze (the clean tokens of its pass)", **gacc.params())
        return spec, probe, gacc.result(make_provenance(s, seed, gparams, names), names)

    return part, state_key(s, seed, {"spectrum": sparams, "probe": pparams}), finish


# --------------------------------------------------------------------------- groups
class _GroupsAcc:
    """Spectral clusters of the clean tokens of every block, per image (the groups analysis as
    an accumulator of the one batch loop, so that :func:`analyze` can group the tokens of its
    own forward pass). Labels depend on (seed, image index) alone."""

    def __init__(self, n_clusters, affinity, center, knn, max_k, token_budget, n_init, seed) -> None:
        self.n_clusters, self.affinity, self.center, self.knn = n_clusters, affinity, center, knn
        self.max_k, self.token_budget, self.n_init, self.seed = max_k, token_budget, n_init, seed
        self.infos: list[BlockInfo] = []
        self.labels: list[list[np.ndarray]] = []
        self.ks: list[list[np.ndarray]] = []
        self.pixels: list[np.ndarray] = []

    def update(self, bts: list, b: int, idx: Sequence[int]) -> None:
        # the affinity matmuls keep torch's threads; spectral_clustering splits its matrices over
        # the caller's cores. Blocks of one token count are clustered in one call (each matrix's
        # k-means draws depend on its image index alone, so the labels are those of one call per block).
        affs, grids = [], []
        for li, bt in enumerate(bts):
            tok, g = sp.pool_tokens(bt.tokens[:b], bt.layout.grid, self.token_budget)
            _check_token_count(bt.label, tok.shape[1], g)
            if self.n_clusters is not None and self.n_clusters > tok.shape[1]:
                raise FanlensError(
                    f"n_clusters must be <= the token count of every block; block {bt.label!r} has "
                    f"{tok.shape[1]} tokens ({g[0]}x{g[1]}). Got {self.n_clusters} instead."
                )
            affs.append(sp.affinity(tok.float(), kind=self.affinity, center=self.center,
                                    knn=min(self.knn, tok.shape[1])))
            grids.append(g)
            if len(self.infos) <= li:
                self.infos.append(BlockInfo(li, bt.label, bt.layout, g))
                self.labels.append([])
                self.ks.append([])
        for lis in _by_token_count(affs):
            lab, k = sp.spectral_clustering(torch.cat([affs[li] for li in lis]), self.n_clusters, max_k=self.max_k,
                                            n_init=self.n_init, seed=self.seed, indices=list(idx) * len(lis),
                                            dtype=CLUSTER_DTYPE)
            for j, li in enumerate(lis):
                self.labels[li].append(lab[j * b : (j + 1) * b].reshape(-1, *grids[li]).cpu().numpy())
                self.ks[li].append(k[j * b : (j + 1) * b].cpu().numpy())

    def params(self) -> dict:
        return dict(
            n_clusters=self.n_clusters, affinity=self.affinity, center=self.center, knn=self.knn, max_k=self.max_k,
            token_budget=self.token_budget, n_init=self.n_init,
            clustering="normalised spectral clustering (Ng-Jordan-Weiss) + batched k-means++ drawn from "
                       "SeedSequence([seed, image_index, 1]); labels by first appearance",
            cluster_dtype=str(CLUSTER_DTYPE),
        )

    def result(self, provenance: Provenance, names: Sequence[str]) -> GroupsResult:
        return GroupsResult(
            blocks=tuple(self.infos),
            images=tuple(names),
            labels=tuple(np.concatenate(lab) for lab in self.labels),
            n_clusters=np.stack([np.concatenate(k) for k in self.ks]),
            pixels=np.concatenate(self.pixels),
            provenance=provenance,
        )


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
        seed: seeds k-means: the labels of an image are a function of (seed, image index)
            alone, the same for every batch size.
        n_images: only the first ``n_images`` images (default: all).
        Other arguments as in :func:`spectrum`.

    Returns:
        :class:`~fanlens.results.GroupsResult`.
    """
    from .lens import Lens

    lens = Lens.one_shot(model, images, blocks=blocks, batch_size=batch_size, device=device, seed=seed,
                         pretrained=pretrained, checkpoint=checkpoint, input_size=input_size,
                         num_prefix_tokens=num_prefix_tokens, layout=layout, grid=grid, progress=progress)
    return lens.groups(k=n_clusters, affinity=affinity, center=center, knn=knn, max_k=max_k, token_budget=token_budget,
                       n_init=n_init, n_images=n_images)


def groups_part(s: Setup, *, n_clusters: int | None, seed: int, batch_size: int, n_images: int | None = None,
                affinity: str = sp.DEFAULT_AFFINITY, center: bool = True, knn: int = sp.DEFAULT_KNN,
                max_k: int = sp.DEFAULT_MAX_GAP_K, token_budget: int = DEFAULT_TOKEN_BUDGET, n_init: int = 4,
                blocks: str | Sequence[str] | None = None, num_prefix_tokens: int | None = None,
                layout: str | None = None, grid: tuple[int, int] | None = None) -> tuple[Part, Any]:
    """:func:`group_tokens` (arguments checked by the caller) as a share of a pass
    (:func:`fanlens.runner.stream_parts`) on the first ``n_images`` images: ``(part, finish)``;
    ``finish()`` returns the :class:`~fanlens.results.GroupsResult`."""
    check_choice("affinity", affinity, sp.AFFINITIES)
    if n_clusters is not None:
        check_positive_int("n_clusters", n_clusters, maximum=1024)
    check_positive_int("token_budget", token_budget, minimum=2)
    check_positive_int("n_init", n_init)
    if n_images is not None:
        check_positive_int("n_images", n_images)
    gacc = _GroupsAcc(n_clusters, affinity, center, knn, max_k, token_budget, n_init, seed)
    params = dict(analysis="groups", blocks=blocks, batch_size=batch_size, num_prefix_tokens=num_prefix_tokens,
                  layout=layout, grid=grid, n_images=n_images, **gacc.params())

    def finish() -> GroupsResult:
        names = s.images.names[:n_images]
        return gacc.result(make_provenance(s, seed, params, names), names)

    return Part([gacc], n_images=n_images, pixels=gacc.pixels), finish
