"""Spectral analysis of token sets: affinities, batched eigendecompositions,
significant-eigenvalue rules and spectral clustering.

Everything here works on batches: ``tokens`` is ``(B, N, C)`` and every matrix
is ``(B, N, N)``, so the affinities of B images (or B images x L blocks of the same
token count) go through one :func:`torch.linalg.eigh` call, on CPU or CUDA.

Definitions (the FAN paper gives none; fanlens names and records each):

- ``affinity="cosine"`` (default): tokens L2-normalised, ``A = max(X X^T, 0)``.
- ``affinity="gaussian"``: ``A = exp(-d^2 / (2 h^2))`` with ``h`` the median off-diagonal
  pairwise distance of the image.
- ``affinity="knn"``: the ``k`` nearest neighbours by cosine similarity (self included),
  connectivity symmetrised as ``(K + K^T) / 2``.
- normalised affinity ``M = D^{-1/2} A D^{-1/2}`` (eigenvalues in [-1, 1], top one 1),
  Laplacian ``L = I - M``.

Significant-eigenvalue rules (see :data:`RULES`):

- ``"rel_threshold"``: eigenvalues of ``A`` above ``tau * lambda_max`` (default tau 0.05).
- ``"norm_threshold"``: eigenvalues of ``M`` above ``tau`` (default 0.9, i.e. Laplacian
  eigenvalues below 0.1: near-disconnected groups).
- ``"eigengap"``: ``argmax_k (mu_k - mu_{k+1})`` over the sorted eigenvalues ``mu`` of ``M``.
- ``"effective_rank"``: ``exp(H(p))`` with ``p = lambda / sum(lambda)`` over eigenvalues of ``A``.
- ``"participation_ratio"``: ``(sum lambda)^2 / sum lambda^2`` over eigenvalues of ``A``.

On an affinity made of ``k`` disconnected equal blocks every rule gives ``k``.

Two more "how many directions are in use" measures work on the tokens themselves, not on an
affinity (see :data:`DIMENSION_RULES`; :func:`dimension` computes them, and ``rules=`` of the
analyses accepts them beside the five above):

- ``"twonn"``: the TwoNN intrinsic dimension (Facco et al. 2017, used per layer by Ansuini et
  al. 2019): from each distinct token's ratio ``mu = r2 / r1`` of the distances to its two
  nearest neighbours, the slope through the origin of ``-log(1 - F(mu))`` against ``log mu``
  (``F`` the empirical distribution), the largest 10 % of the ratios discarded.
- ``"rankme"``: RankMe (Garrido et al. 2023), ``exp(H(p))`` with ``p_k = s_k / sum(s) + 1e-7``
  over the singular values ``s`` of the (uncentred) ``N x C`` token matrix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import torch

from ._threads import one_blas_thread, split_rows
from ._validation import FanlensError, all_finite, check_choice, check_fraction, check_positive_int, check_shape

__all__ = [
    "AFFINITIES",
    "RULES",
    "DEFAULT_AFFINITY",
    "DEFAULT_RULE",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_KNN",
    "DEFAULT_MAX_GAP_K",
    "Spectrum",
    "affinity",
    "normalized_affinity",
    "laplacian",
    "eigvalsh",
    "spectrum",
    "count_significant",
    "THRESHOLD_RULES",
    "threshold_count",
    "DIMENSION_RULES",
    "ALL_RULES",
    "dimension",
    "twonn",
    "rankme",
    "spectral_clustering",
    "kmeans",
    "pool_tokens",
    "spectral_embedding",
    "align_embedding",
    "embedding_colours",
]

AFFINITIES = ("cosine", "gaussian", "knn")
RULES = ("rel_threshold", "norm_threshold", "eigengap", "effective_rank", "participation_ratio")
DEFAULT_AFFINITY = "cosine"
DIMENSION_RULES = ("twonn", "rankme")
ALL_RULES = RULES + DIMENSION_RULES
DEFAULT_RULE = "rel_threshold"
TWONN_DISCARD = 0.1
RANKME_EPS = 1e-7
DEFAULT_THRESHOLDS = {"rel_threshold": 0.05, "norm_threshold": 0.9}
THRESHOLD_RULES = tuple(DEFAULT_THRESHOLDS)
DEFAULT_KNN = 10
DEFAULT_MAX_GAP_K = 32
_EPS = 1e-12


# --------------------------------------------------------------------------- affinity
def _check_finite_tokens(tokens: torch.Tensor) -> None:
    _check_tokens(tokens)
    _require_finite(tokens)


def _require_finite(tokens: torch.Tensor) -> None:
    if not all_finite(tokens):
        raise FanlensError("tokens must be finite. Got NaN or inf values instead (check the model's output).")


def _check_tokens(tokens: torch.Tensor) -> None:
    check_shape("tokens", tokens, ["B", "N", "C"])
    if not tokens.is_floating_point():
        raise FanlensError(f"tokens must be a floating-point tensor. Got dtype {tokens.dtype} instead.")


def affinity(
    tokens: torch.Tensor,
    *,
    kind: str = DEFAULT_AFFINITY,
    center: bool = True,
    knn: int = DEFAULT_KNN,
) -> torch.Tensor:
    """Token affinity matrices.

    Args:
        tokens: ``(B, N, C)``.
        kind: ``"cosine"``, ``"gaussian"`` or ``"knn"``.
        center: subtract each image's mean token first.
        knn: neighbours per token for ``kind="knn"``.

    Returns:
        ``(B, N, N)`` symmetric, non-negative affinities.
    """
    _check_tokens(tokens)
    check_choice("kind", kind, AFFINITIES)
    _require_finite(tokens)
    x = tokens
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    n = x.shape[1]
    if kind == "gaussian":
        sq = (x * x).sum(-1)
        d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * x @ x.transpose(1, 2)).clamp_min(0.0)
        off = ~torch.eye(n, dtype=torch.bool, device=x.device)
        if n < 2:
            return torch.ones_like(d2)
        h2 = d2[:, off].sqrt().median(dim=1).values.pow(2).clamp_min(_EPS)
        return torch.exp(-d2 / (2.0 * h2[:, None, None]))
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sim = xn @ xn.transpose(1, 2)
    if kind == "cosine":
        return sim.clamp_min(0.0)
    check_positive_int("knn", knn, maximum=16384, why="no more neighbours than tokens")
    if knn > n:
        raise FanlensError(f"knn must be <= the number of tokens ({n}). Got {knn} instead.")
    # the token itself is always its own nearest neighbour
    sim = sim + 2.0 * torch.eye(n, dtype=sim.dtype, device=sim.device)
    idx = sim.topk(knn, dim=-1).indices
    k = torch.zeros_like(sim).scatter_(-1, idx, 1.0)
    return 0.5 * (k + k.transpose(1, 2))


def normalized_affinity(a: torch.Tensor) -> torch.Tensor:
    """``D^{-1/2} A D^{-1/2}`` with ``D`` the degree matrix."""
    check_shape("a", a, ["B", "N", "N"])
    d = a.sum(-1).clamp_min(_EPS).rsqrt()
    return d[:, :, None] * a * d[:, None, :]


def laplacian(a: torch.Tensor) -> torch.Tensor:
    """Symmetric normalised Laplacian ``I - D^{-1/2} A D^{-1/2}``."""
    m = normalized_affinity(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return eye - m


def eigvalsh(m: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eigenvalues of a batch of symmetric matrices, sorted in **descending** order.

    One batched :func:`torch.linalg.eigh`; ``dtype=torch.float64`` computes in double.
    """
    check_shape("m", m, ["B", "N", "N"])
    work = m.to(dtype) if dtype is not None else m
    # many small decompositions: one intra-op thread each, on the caller's cores (fanlens._threads)
    return split_rows(_eigvalsh_descending, work).to(m.dtype)


def _eigvalsh_descending(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(0.5 * (m + m.transpose(1, 2))).flip(-1)


# --------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of a batch of affinities, descending.

    Attributes:
        affinity: ``(B, N)`` eigenvalues of ``A``.
        normalized: ``(B, N)`` eigenvalues of ``D^{-1/2} A D^{-1/2}``, or ``None`` when not computed.
    """

    affinity: torch.Tensor
    normalized: torch.Tensor | None


NORMALIZED_RULES = ("norm_threshold", "eigengap")


def spectrum(a: torch.Tensor, *, dtype: torch.dtype | None = None, normalized: bool = True) -> Spectrum:
    """Eigenvalues of ``A`` and (unless ``normalized=False``) of its normalised form, batched."""
    check_shape("a", a, ["B", "N", "N"])
    if not normalized:
        return Spectrum(eigvalsh(a, dtype=dtype), None)

    def both(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = eigvalsh(m, dtype=dtype)  # worker thread: no further split
        return lam, eigvalsh(normalized_affinity(m), dtype=dtype)

    return Spectrum(*split_rows(both, a))


def _eigengap(mu: torch.Tensor, max_k: int) -> torch.Tensor:
    n = mu.shape[-1]
    kmax = min(max_k, n - 1)
    if kmax < 1:
        return torch.ones(mu.shape[0], dtype=mu.dtype, device=mu.device)
    gaps = mu[:, :kmax] - mu[:, 1 : kmax + 1]
    return (gaps.argmax(dim=-1) + 1).to(mu.dtype)


def count_significant(
    spec: Spectrum,
    rule: str = DEFAULT_RULE,
    *,
    threshold: float | None = None,
    max_k: int = DEFAULT_MAX_GAP_K,
) -> torch.Tensor:
    """Number of significant eigenvalues per matrix under ``rule``.

    Args:
        spec: from :func:`spectrum`.
        rule: one of :data:`RULES`.
        threshold: ``tau`` of the threshold rules (defaults in :data:`DEFAULT_THRESHOLDS`).
        max_k: largest count the eigengap rule may return.

    Returns:
        ``(B,)`` float tensor (integers for the threshold and eigengap rules).
    """
    check_choice("rule", rule, RULES)
    if rule in NORMALIZED_RULES and spec.normalized is None:
        raise FanlensError(f"rule {rule!r} needs the normalised spectrum; compute it with spectrum(a, normalized=True).")
    if rule in DEFAULT_THRESHOLDS:
        tau = DEFAULT_THRESHOLDS[rule] if threshold is None else check_fraction("threshold", threshold)
        if rule == "rel_threshold":
            lam = spec.affinity
            return (lam > tau * lam[:, :1].clamp_min(_EPS)).sum(-1).to(lam.dtype)
        return (spec.normalized > tau).sum(-1).to(spec.normalized.dtype)
    if rule == "eigengap":
        return _eigengap(spec.normalized, check_positive_int("max_k", max_k))
    lam = spec.affinity.clamp_min(0.0)
    total = lam.sum(-1).clamp_min(_EPS)
    if rule == "effective_rank":
        p = lam / total[:, None]
        h = -(p * torch.log(p.clamp_min(_EPS))).sum(-1)
        return torch.exp(h)
    return total.pow(2) / lam.pow(2).sum(-1).clamp_min(_EPS)


# --------------------------------------------------------------------------- counts without the spectrum
def _count_above(m: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Number of eigenvalues of each symmetric ``m`` strictly above ``shift``, by Sylvester's law of inertia.

    ``m``'s diagonal is shifted in place for the factorisation and restored bit for bit.

    ``m - shift I = P L D L^T P^T`` (Bunch-Kaufman, LAPACK ``sytrf``) has as many positive
    eigenvalues as the block-diagonal ``D``: its 1x1 pivots are read by sign, its 2x2 pivots by
    their determinant and trace. No eigenvalue is computed.
    """
    n = m.shape[-1]
    diag = m.diagonal(dim1=-2, dim2=-1)
    kept = diag.clone()
    diag.sub_(shift[:, None])  # shifted in place (no copy of the batch), restored exactly below
    try:
        ld, piv, _info = torch.linalg.ldl_factor_ex(m)
    finally:
        diag.copy_(kept)
    d = ld.diagonal(dim1=-2, dim2=-1)
    two = piv < 0  # both rows of a 2x2 pivot carry a negative pivot index
    pos = torch.arange(n, device=m.device).expand_as(two)
    last_single = torch.where(two, torch.full_like(pos, -1), pos).cummax(dim=-1).values
    start = two & ((pos - last_single - 1) % 2 == 0)  # first row of each 2x2 pivot
    count = ((d > 0) & ~two).sum(-1)
    if n > 1 and bool(start.any()):
        a, c = d[:, :-1], d[:, 1:]
        b = ld.diagonal(offset=-1, dim1=-2, dim2=-1)
        det = a * c - b * b
        block = torch.where(det < 0, 1, torch.where(a + c > 0, 2, 0))
        count = count + (block * start[:, :-1]).sum(-1)
    return count


def _perron_bounds(a: torch.Tensor, *, rtol: float = 1e-3, max_iter: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified bounds ``lo <= lambda_max <= hi`` of non-negative symmetric matrices.

    Power iteration from the all-ones vector; ``hi`` is the Collatz-Wielandt bound
    ``max_i (A x)_i / x_i`` (valid for any non-negative ``A`` and ``x`` positive on its non-zero
    rows), ``lo`` the Rayleigh quotient. Stops when every bracket is within ``rtol``.
    """
    # a zero row (and column) is a block of its own with eigenvalue 0: left out of the ratios;
    # every other entry of x stays positive (floored), as the Collatz-Wielandt bound needs
    live = (a.sum(-1, keepdim=True) > 0).to(a.dtype)
    floor = torch.finfo(a.dtype).tiny ** 0.5
    x = live.clone()
    lo = hi = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(max_iter):
        y = a @ x
        hi = (live * y / x.clamp_min(floor)).amax(dim=(1, 2))
        lo = ((x * y).sum((1, 2)) / (x * x).sum((1, 2)).clamp_min(floor)).clamp_min(0.0).minimum(hi)
        if bool((hi - lo <= rtol * hi).all()):
            break
        x = live * (y / y.amax(dim=1, keepdim=True).clamp_min(floor)).clamp_min(floor)
    return lo, hi


def _bracket_counts(work: torch.Tensor, rule: str, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts above both ends of the threshold's bracket (see :func:`threshold_count`)."""
    m = 0.5 * (work + work.transpose(1, 2))
    if rule == "norm_threshold":
        m = normalized_affinity(m)
        lo = hi = torch.ones(m.shape[0], dtype=m.dtype, device=m.device)
    else:
        lo, hi = _perron_bounds(m)
        lo, hi = lo.clamp_min(_EPS), hi.clamp_min(_EPS)
    guard = m.shape[-1] * torch.finfo(m.dtype).eps * hi  # the factorisation's rounding, N eps |A|
    return _count_above(m, tau * hi + guard), _count_above(m, tau * lo - guard)


def threshold_count(
    a: torch.Tensor,
    rule: str = DEFAULT_RULE,
    *,
    threshold: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The count of a threshold rule (:data:`THRESHOLD_RULES`) without the eigendecomposition.

    Gives ``count_significant(spectrum(a, dtype=dtype), rule, threshold=threshold)`` for every
    matrix without computing an eigenvalue: the eigenvalues above a level ``s`` are counted from
    the inertia of ``A - sI`` (an LDL^T factorisation, :func:`_count_above`, about a quarter of
    the work of a symmetric eigendecomposition). ``rel_threshold`` needs ``lambda_max``, which is
    bracketed from both sides (:func:`_perron_bounds`: affinities are non-negative);
    ``norm_threshold``'s largest eigenvalue is 1 by construction. The count is taken at both
    ends of the threshold's bracket, each widened by ``N eps`` of the scale (the factorisation's
    rounding); where the two counts differ (an eigenvalue too close to the threshold to be
    decided that way), that matrix's eigenvalues are computed after all and counted as
    :func:`count_significant` does. Two factorisations and a few matrix-vector products per
    matrix instead of a decomposition: measured on 2 CPU cores, about as fast as the
    eigenvalues (0.96-1.04x inside :func:`fanlens.spectrum` on ViT-S, 1.2x at 1,024 tokens,
    0.76-0.87x on spectra crowded near the threshold, which are decomposed after all;
    ``benchmarks/spectral_engine.py``, ``benchmarks/RESULTS.md`` (b3)).

    Args:
        a: ``(B, N, N)`` non-negative symmetric affinities (from :func:`affinity`).
        rule: ``"rel_threshold"`` or ``"norm_threshold"``.
        threshold: ``tau`` (defaults in :data:`DEFAULT_THRESHOLDS`).
        dtype: compute in this dtype (as ``spectrum(..., dtype=)``).

    Returns:
        ``(B,)`` counts, in ``a``'s dtype.
    """
    check_shape("a", a, ["B", "N", "N"])
    check_choice("rule", rule, THRESHOLD_RULES)
    tau = DEFAULT_THRESHOLDS[rule] if threshold is None else check_fraction("threshold", threshold)
    work = a.to(dtype) if dtype is not None else a
    if not all_finite(work):
        raise FanlensError("a must be finite. Got NaN or inf values instead.")
    if bool((work < 0).any()):
        raise FanlensError("a must be non-negative affinities (from spectral.affinity). Got negative entries instead.")
    # matrix by matrix, on the caller's cores (fanlens._threads)
    count, lower = split_rows(lambda w: _bracket_counts(w, rule, tau), work)
    unsure = (count != lower).nonzero().flatten()
    if unsure.numel():
        spec = spectrum(a[unsure], dtype=dtype, normalized=rule == "norm_threshold")
        count[unsure] = count_significant(spec, rule, threshold=tau).to(count.dtype)
    return count.to(a.dtype)


# --------------------------------------------------------------------------- dimension measures
def rankme(tokens: torch.Tensor, *, eps: float = RANKME_EPS) -> torch.Tensor:
    """RankMe of each image's token matrix: ``exp(-sum p log p)``, ``p = s / sum(s) + eps``.

    Args:
        tokens: ``(B, N, C)``.
        eps: the paper's smoothing constant.

    Returns:
        ``(B,)`` float64: ``r`` for a rank-``r`` matrix with equal singular values (up to
        ``eps``), between 1 and ``min(N, C)`` in general, 0 for an all-zero matrix.
    """
    _check_finite_tokens(tokens)
    sv = torch.linalg.svdvals(tokens.double())
    total = sv.sum(-1, keepdim=True)
    p = sv / total.clamp_min(1e-300) + eps
    out = torch.exp(-(p * torch.log(p)).sum(-1))
    return torch.where(total[:, 0] > 0, out, torch.zeros_like(out))


def twonn(tokens: torch.Tensor, *, discard: float = TWONN_DISCARD) -> torch.Tensor:
    """TwoNN intrinsic dimension of each image's token set.

    Repeated tokens count once (the estimator needs distinct points). Fewer than three distinct
    tokens: 0 for a single point, 1 for two. Where every distinct token's two nearest distances
    are equal (a regular lattice) the estimator is undefined and the value is NaN, which the
    analyses refuse to report.

    Args:
        tokens: ``(B, N, C)``.
        discard: share of the largest ratios left out of the fit (Facco et al.: 0.1).

    Returns:
        ``(B,)`` float64.
    """
    _check_finite_tokens(tokens)
    discard = float(discard)
    if not 0.0 <= discard < 1.0:
        raise FanlensError(f"discard must be in [0, 1). Got {discard!r} instead.")
    x = tokens.double()
    out = torch.empty(x.shape[0], dtype=torch.float64)
    if x.shape[1] >= 3:
        d = torch.cdist(x, x)
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        r = d.topk(2, dim=-1, largest=False).values  # (B, N, 2)
        distinct = (r[..., 0] > 0).all(-1)
    else:
        distinct = torch.zeros(x.shape[0], dtype=torch.bool)
    for i in range(x.shape[0]):
        if bool(distinct[i]):
            out[i] = _twonn_fit(r[i, :, 1] / r[i, :, 0], discard)
            continue
        pts = torch.unique(x[i], dim=0)
        if pts.shape[0] < 3:
            out[i] = float(pts.shape[0] - 1)
            continue
        dd = torch.cdist(pts, pts)
        dd.fill_diagonal_(float("inf"))
        rr = dd.topk(2, dim=-1, largest=False).values
        out[i] = _twonn_fit(rr[:, 1] / rr[:, 0], discard)
    return out


def _twonn_fit(mu: torch.Tensor, discard: float) -> float:
    n = mu.shape[0]
    keep = max(2, int(np.floor(n * (1.0 - discard))))
    keep = min(keep, n - 1)  # F = 1 at the largest ratio: -log(0) is never used
    xs = torch.log(mu.sort().values[:keep])
    ys = -torch.log1p(-torch.arange(1, keep + 1, dtype=torch.float64) / n)
    sxx = float((xs * xs).sum())
    return float((xs * ys).sum()) / sxx if sxx > 0 else float("nan")


def dimension(tokens: torch.Tensor, rule: str) -> torch.Tensor:
    """One of :data:`DIMENSION_RULES` for each image's tokens ``(B, N, C)``: ``(B,)`` float64."""
    check_choice("rule", rule, DIMENSION_RULES)
    return split_rows(twonn if rule == "twonn" else rankme, tokens)  # image by image, on the caller's cores


# --------------------------------------------------------------------------- token budget
def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], budget: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Average-pool a token grid so that it holds at most ``budget`` tokens.

    The grid is shrunk by the smallest integer factor ``f`` with
    ``ceil(H/f) * ceil(W/f) <= budget`` (adaptive average pooling to that grid).
    Returns the pooled tokens ``(B, N', C)`` and the new grid; unchanged when within budget.
    """
    check_positive_int("budget", budget)
    h, w = grid
    if h * w <= budget:
        return tokens, (h, w)
    f = 2
    while -(-h // f) * -(-w // f) > budget:
        f += 1
    nh, nw = -(-h // f), -(-w // f)
    b, n, c = tokens.shape
    img = tokens.transpose(1, 2).reshape(b, c, h, w)
    pooled = torch.nn.functional.adaptive_avg_pool2d(img, (nh, nw))
    return pooled.flatten(2).transpose(1, 2), (nh, nw)


# --------------------------------------------------------------------------- clustering
_KMEANS_STREAM = 1  # k-means draws: a stream of their own, apart from the probe's noise of (seed, index)


def _row_uniforms(seed: int, indices: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``(B, *shape)`` uniforms in [0, 1): row ``i`` drawn from ``SeedSequence([seed, indices[i], 1])`` alone, so a
    row's numbers do not depend on the batch it travels in."""
    out = []
    for j in indices:
        st = np.random.SeedSequence([int(seed), int(j), _KMEANS_STREAM]).generate_state(2, dtype=np.uint32)
        g = torch.Generator(device="cpu").manual_seed(int(st[0]) << 32 | int(st[1]))
        out.append(torch.rand(shape, generator=g, dtype=torch.float64))
    return torch.stack(out) if out else torch.empty((0, *shape), dtype=torch.float64)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int = 4,
    max_iter: int = 50,
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Batched k-means (k-means++ seeding, Lloyd iterations), deterministic for a seed.

    The random draws of row ``i`` come from ``(seed, indices[i])`` only (default
    ``indices = range(B)``), so the labels of a point set do not depend on the batch size
    or on which other point sets share the batch.

    Args:
        x: ``(B, N, D)`` points.
        k: clusters per batch element.
        indices: one id per row (e.g. the image's dataset index).

    Returns:
        ``(B, N)`` int64 labels; the best of ``n_init`` runs by inertia.
    """
    check_shape("x", x, ["B", "N", "D"])
    b, n, d = x.shape
    indices = list(range(b)) if indices is None else [int(i) for i in indices]
    if len(indices) != b:
        raise FanlensError(f"indices must hold one id per row ({b}). Got {len(indices)} instead.")
    draws = _row_uniforms(seed, indices, (n_init, k)).to(x.device)  # (B, n_init, k)
    best_labels = None
    best_inertia = None
    ar = torch.arange(b, device=x.device)
    for r in range(n_init):
        # k-means++ seeding, batched
        first = (draws[:, r, 0] * n).long().clamp_max(n - 1)
        centers = x[ar, first][:, None, :]
        d2 = ((x - centers) ** 2).sum(-1)
        for _c in range(1, k):
            probs = d2.clamp_min(0.0).double()
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(_EPS)
            # rows with all-zero distance: pick uniformly
            zero = probs.sum(-1) <= 0
            if zero.any():
                probs[zero] = 1.0 / n
            u = draws[:, r, _c : _c + 1]
            idx = (probs.cumsum(-1) < u).sum(-1).clamp_max(n - 1)
            new = x[ar, idx][:, None, :]
            centers = torch.cat([centers, new], dim=1)
            d2 = torch.minimum(d2, ((x - new) ** 2).sum(-1))
        labels = None
        for _it in range(max_iter):
            dist = torch.cdist(x, centers, compute_mode="donot_use_mm_for_euclid_dist")
            new_labels = dist.argmin(-1)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
            counts = onehot.sum(1)
            sums = onehot.transpose(1, 2) @ x
            keep = counts[..., None] > 0
            centers = torch.where(keep, sums / counts[..., None].clamp_min(1.0), centers)
        inertia = ((x - centers.gather(1, labels[..., None].expand(-1, -1, d))) ** 2).sum((1, 2))
        if best_labels is None:
            best_labels, best_inertia = labels, inertia
        else:
            better = inertia < best_inertia - 1e-9 * best_inertia.abs()
            best_labels = torch.where(better[:, None], labels, best_labels)
            best_inertia = torch.where(better, inertia, best_inertia)
    return _canonical_labels(best_labels, k)


def _canonical_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Relabel so that clusters are numbered by first appearance in token order."""
    b, n = labels.shape
    pos = torch.arange(n, device=labels.device).expand(b, n)
    first = torch.full((b, k), n, dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(1, labels, pos, reduce="amin")
    order = first.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k, device=labels.device).expand(b, k))
    return rank.gather(1, labels)


def _fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each eigenvector (column) so that its entry of largest magnitude is positive."""
    idx = v.abs().argmax(dim=1, keepdim=True)
    s = torch.sign(v.gather(1, idx))
    s[s == 0] = 1.0
    return v * s


def spectral_clustering(
    a: torch.Tensor,
    n_clusters: int | None = None,
    *,
    max_k: int = DEFAULT_MAX_GAP_K,
    n_init: int = 4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral clustering of each affinity matrix of a batch.

    The embedding is the one of normalised spectral clustering (Ng, Jordan and Weiss):
    the top ``k`` eigenvectors of ``D^{-1/2} A D^{-1/2}`` with deterministic signs,
    row-normalised; then batched k-means. Labels are numbered by
    first appearance in token (raster) order, so equal partitions get equal labels.

    Args:
        a: ``(B, N, N)`` affinities.
        n_clusters: ``k``, or ``None`` to choose it per matrix by the eigengap.
        max_k: largest ``k`` the eigengap may choose.
        seed, indices: k-means draws of matrix ``i`` come from ``(seed, indices[i])``
            (default ``indices = range(B)``): labels do not depend on the batch.

    Returns:
        ``(labels (B, N) int64, k (B,) int64)``.
    """
    check_shape("a", a, ["B", "N", "N"])
    b, n, _ = a.shape
    if n_clusters is not None:
        check_positive_int("n_clusters", n_clusters, maximum=1024)
        if n_clusters > n:
            raise FanlensError(
                f"n_clusters must be <= the number of tokens ({n}). Got {n_clusters} instead."
            )
    indices = list(range(b)) if indices is None else [int(i) for i in indices]
    if len(indices) != b:
        raise FanlensError(f"indices must hold one id per matrix ({b}). Got {len(indices)} instead.")
    # small decompositions and k-means steps, matrix by matrix: on the caller's cores (fanlens._threads)
    with one_blas_thread() if _top_eigh_partial(a, _top_needed(n, n_clusters, max_k)) else contextlib.nullcontext():
        return split_rows(
            lambda a_, idx_: _spectral_clustering(a_, n_clusters, max_k, n_init, seed, dtype, idx_.tolist()),
            a, torch.tensor(indices, dtype=torch.long),
        )


# from this many tokens on, the clustering's top eigenpairs come from LAPACK's partial solver (scipy's
# ``eigh(subset_by_index=..., driver="evr")``, matrix by matrix) instead of a full batched ``torch.linalg.eigh``:
# measured on one thread, 1,024 tokens, float64: the top 2-33 pairs in 0.044 s against 0.132 s for all of
# them; at 256 tokens and below the batched full solver is as fast or faster. The pairs agree to ~1e-15.
TOP_EIGH_MIN_TOKENS = 512


def _top_needed(n: int, n_clusters: int | None, max_k: int) -> int:
    """How many of the top eigenpairs the clustering reads: ``k`` vectors, or the eigengap's values."""
    return min(n, n_clusters if n_clusters is not None else max_k + 1)


def _top_eigh_partial(m: torch.Tensor, top: int) -> bool:
    return m.device.type == "cpu" and m.shape[-1] >= TOP_EIGH_MIN_TOKENS and top <= m.shape[-1] // 4


def top_eigh(m: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest eigenvalues ``(B, top)`` and their eigenvectors ``(B, N, top)`` of each
    symmetric matrix of ``m``, descending. Large matrices on the CPU go through the partial solver
    (:data:`TOP_EIGH_MIN_TOKENS`), the rest through one batched full ``torch.linalg.eigh``."""
    check_shape("m", m, ["B", "N", "N"])
    sym = 0.5 * (m + m.transpose(1, 2))
    n = m.shape[-1]
    if not _top_eigh_partial(m, top):
        evals, evecs = torch.linalg.eigh(sym)
        return evals.flip(-1)[:, :top], evecs.flip(-1)[:, :, :top]
    from scipy.linalg import eigh as _scipy_eigh

    from ._lapack import available, syevr_top

    arr = sym.numpy()
    vals = np.empty((m.shape[0], top), dtype=arr.dtype)
    vecs = np.empty((m.shape[0], n, top), dtype=arr.dtype)
    # LAPACK's ?syevr without the GIL (fanlens._lapack: the same routine and bits as scipy's evr call, which
    # keeps the GIL, so that split_rows's workers ran one at a time)
    direct = available(arr.dtype)
    for i in range(m.shape[0]):
        if direct:
            vals[i], vecs[i] = syevr_top(arr[i], top)
        else:
            w, v = _scipy_eigh(arr[i], subset_by_index=[n - top, n - 1], driver="evr", check_finite=False)
            vals[i], vecs[i] = w[::-1], v[:, ::-1]
    return torch.from_numpy(vals), torch.from_numpy(vecs)


def _spectral_clustering(a, n_clusters, max_k, n_init, seed, dtype, indices):
    b, n, _ = a.shape
    m = normalized_affinity(a)
    work = m.to(dtype) if dtype is not None else m
    evals, evecs = top_eigh(work, _top_needed(n, n_clusters, max_k))
    evals, evecs = evals.to(a.dtype), evecs.to(a.dtype)
    if n_clusters is None:
        ks = _eigengap(evals, max_k).long()
    else:
        ks = torch.full((b,), n_clusters, dtype=torch.long, device=a.device)
    labels = torch.empty((b, n), dtype=torch.long, device=a.device)
    for k in torch.unique(ks).tolist():
        sel = (ks == k).nonzero(as_tuple=True)[0]
        u = _fix_signs(evecs[sel, :, :k])
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        labels[sel] = kmeans(u, int(k), n_init=n_init, seed=seed, indices=[indices[i] for i in sel.tolist()])
    return labels, ks


# --------------------------------------------------------------------------- spectral colouring
DEFAULT_LANDMARKS = 2048


def spectral_embedding(
    tokens: torch.Tensor,
    *,
    n_vectors: int = 3,
    kind: str = DEFAULT_AFFINITY,
    center: bool = True,
    knn: int = DEFAULT_KNN,
    landmarks: int = DEFAULT_LANDMARKS,
    seed: int = 0,
) -> torch.Tensor:
    """The top non-trivial eigenvectors of the normalised affinity of all tokens of all images
    together (one graph, so that the same part gets the same coordinates in every image).

    Args:
        tokens: ``(B, N, C)``; the ``B * N`` tokens form one graph. Centring (``center``)
            subtracts each image's mean token, as for the counts.
        n_vectors: eigenvectors kept after the trivial one (the top eigenvector of
            ``D^{-1/2} A D^{-1/2}``, proportional to ``sqrt(degree)``).
        kind, knn: the affinity (see :func:`affinity`).
        landmarks: above this many tokens the eigenvectors come from a Nyström extension:
            ``landmarks`` tokens drawn with ``seed`` carry the eigendecomposition (degrees
            estimated from them, scaled to all tokens), every token gets
            ``v(x) = sum_j M(x, j) u(j) / mu`` (equal to ``u`` on the landmarks).
        seed: draws the landmarks.

    Returns:
        ``(B, N, n_vectors)`` float64, each vector scaled to unit norm over all tokens (zero
        columns where the graph has fewer non-trivial eigenvectors).
    """
    _check_finite_tokens(tokens)
    check_choice("kind", kind, AFFINITIES)
    check_positive_int("n_vectors", n_vectors)
    check_positive_int("landmarks", landmarks, minimum=2)
    b, n, c = tokens.shape
    x = tokens.double()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    flat = x.reshape(1, b * n, c)
    total = b * n
    out = torch.zeros(total, n_vectors, dtype=torch.float64)
    if total <= landmarks:
        a = affinity(flat, kind=kind, center=False, knn=min(knn, total))[0]
        m = normalized_affinity(a[None])[0]
        ev, vec = torch.linalg.eigh(0.5 * (m + m.T))
        vec = vec.flip(-1)[:, 1 : 1 + n_vectors]
        out[:, : vec.shape[1]] = vec
    else:
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(total, generator=g)[:landmarks].sort().values
        w = _cross_affinity(flat[0], flat[0, idx], kind, knn)  # (total, m)
        deg = (w.sum(1) * (total / landmarks)).clamp_min(_EPS)  # every token's degree, estimated
        wl = w[idx]
        ml = wl / torch.sqrt(deg[idx][:, None] * deg[idx][None, :])
        mu, u = torch.linalg.eigh(0.5 * (ml + ml.T))
        mu, u = mu.flip(-1)[1 : 1 + n_vectors], u.flip(-1)[:, 1 : 1 + n_vectors]
        mx = w / torch.sqrt(deg[:, None] * deg[idx][None, :])
        keep = mu > 1e-8
        vec = torch.where(keep[None], mx @ u / torch.where(keep, mu, torch.ones_like(mu))[None], torch.zeros(1))
        out[:, : vec.shape[1]] = vec
    out = out / out.norm(dim=0, keepdim=True).clamp_min(_EPS)
    return out.reshape(b, n, n_vectors)


def _cross_affinity(x: torch.Tensor, y: torch.Tensor, kind: str, knn: int) -> torch.Tensor:
    """Affinity between every token of ``x`` (n, C) and the landmarks ``y`` (m, C), as
    :func:`affinity` defines it (the Gaussian bandwidth from the landmarks' distances; the knn
    graph: each token's ``knn`` nearest landmarks)."""
    if kind == "gaussian":
        d2 = torch.cdist(x, y).pow(2)
        dl = torch.cdist(y, y)
        off = ~torch.eye(y.shape[0], dtype=torch.bool)
        h2 = dl[off].median().pow(2).clamp_min(_EPS)
        return torch.exp(-d2 / (2.0 * h2))
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sim = xn @ yn.T
    if kind == "cosine":
        return sim.clamp_min(0.0)
    k = min(knn, y.shape[0])
    idx = sim.topk(k, dim=-1).indices
    return torch.zeros_like(sim).scatter_(-1, idx, 1.0)


def align_embedding(emb: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Make an embedding ``(T, k)`` (rows: tokens) independent of the eigensolver's arbitrary
    signs and rotations.

    With a ``reference`` of the same shape (the previous block's embedding of the same tokens)
    the orthogonal ``R`` minimising ``||emb R - reference||`` is applied (Procrustes: rotations
    and sign flips), so that colours stay comparable along depth. Without one, each column's
    sign is chosen so that its third moment is positive (the long tail points to bright
    colours); a column without skew keeps the sign that makes its largest entry positive.
    """
    if reference is not None:
        if reference.shape != emb.shape:
            raise FanlensError(f"reference must have the embedding's shape {tuple(emb.shape)}. "
                               f"Got {tuple(reference.shape)} instead.")
        u, _s, vt = torch.linalg.svd(emb.T @ reference)
        return emb @ (u @ vt)
    skew = (emb**3).sum(0)
    big = emb.gather(0, emb.abs().argmax(0, keepdim=True))[0]
    sign = torch.where(skew.abs() > 1e-12 * emb.abs().max().clamp_min(_EPS) ** 3, skew.sign(), big.sign())
    return emb * torch.where(sign == 0, torch.ones_like(sign), sign)[None]


def embedding_colours(emb: torch.Tensor, *, quantile: float = 0.99) -> torch.Tensor:
    """RGB in [0, 1] from an embedding ``(..., 3)``: each coordinate divided by the ``quantile``
    of its absolute values over all tokens (clipped to [-1, 1]) and mapped to ``0.5 + 0.5 e``:
    the origin is grey, each eigenvector moves one channel."""
    if emb.shape[-1] != 3:
        raise FanlensError(f"emb must have 3 coordinates in its last dimension. Got shape {tuple(emb.shape)} instead.")
    flat = emb.reshape(-1, 3)
    scale = torch.quantile(flat.abs(), float(quantile), dim=0).clamp_min(_EPS)
    return (0.5 + 0.5 * (emb / scale).clamp(-1, 1)).float()
