"""Spectral module: known answers on hand-built affinities and token sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from fanlens import FanlensError
from fanlens import spectral as sp


def block_diagonal(k: int, size: int = 5, *, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Affinity of k disconnected, equally sized, fully connected groups."""
    a = torch.block_diag(*[torch.ones(size, size, dtype=torch.float64) for _ in range(k)])
    if noise:
        g = torch.Generator().manual_seed(seed)
        e = noise * torch.rand(a.shape, generator=g, dtype=torch.float64)
        a = a + 0.5 * (e + e.T)
    return a[None]


def clustered_tokens(k: int, per: int, dim: int = 32, *, spread: float = 0.05, seed: int = 0,
                     shuffle: bool = True):
    """Tokens around k orthogonal directions (cosine affinity ~ block diagonal)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    centers = q[:k] * 3.0
    labels = torch.arange(k).repeat_interleave(per)
    x = centers[labels] + spread * torch.randn(k * per, dim, generator=g, dtype=torch.float64)
    if shuffle:
        perm = torch.randperm(k * per, generator=g)
        x, labels = x[perm], labels[perm]
    return x[None], labels


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("rule", sp.RULES)
def test_block_diagonal_gives_k_under_every_rule(k, rule):
    spec = sp.spectrum(block_diagonal(k))
    got = sp.count_significant(spec, rule).item()
    assert got == pytest.approx(k, abs=1e-6)


@pytest.mark.parametrize("rule", ["rel_threshold", "norm_threshold", "eigengap"])
def test_block_diagonal_with_weak_cross_links(rule):
    spec = sp.spectrum(block_diagonal(4, size=6, noise=0.02))
    assert sp.count_significant(spec, rule).item() == 4


@pytest.mark.parametrize("k", [2, 4, 6])
def test_clustered_tokens_counted_from_cosine_affinity(k):
    x, _ = clustered_tokens(k, per=10)
    a = sp.affinity(x, kind="cosine", center=False)
    spec = sp.spectrum(a)
    for rule in ("rel_threshold", "norm_threshold", "eigengap"):
        assert sp.count_significant(spec, rule).item() == k


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_eigenvalues_match_scipy(dtype, rtol):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 49, 16, generator=g, dtype=torch.float64)
    a = sp.affinity(x, kind="cosine")
    ours = sp.eigvalsh(a.to(dtype)).double().numpy()
    for i in range(a.shape[0]):
        ref = scipy.linalg.eigh(a[i].numpy(), eigvals_only=True)[::-1]
        scale = np.abs(ref).max()
        np.testing.assert_allclose(ours[i], ref, rtol=0, atol=rtol * scale)
        # and relative on the significant part of the spectrum
        big = ref > 1e-3 * scale
        np.testing.assert_allclose(ours[i][big], ref[big], rtol=max(rtol, 1e-10) * 10)


def test_float64_option_matches_scipy_to_1e5_relative():
    g = torch.Generator().manual_seed(4)
    a = sp.affinity(torch.randn(3, 196, 64, generator=g), kind="cosine")  # float32 input
    ours = sp.eigvalsh(a, dtype=torch.float64)
    spec = sp.spectrum(a, dtype=torch.float64)
    for i in range(3):
        ref = scipy.linalg.eigh(a[i].double().numpy(), eigvals_only=True)[::-1]
        big = ref > 1e-4 * ref[0]
        np.testing.assert_allclose(ours[i].numpy()[big], ref[big], rtol=1e-5)
    assert spec.normalized[:, 0].sub(1).abs().max() < 1e-5  # top eigenvalue of D^-1/2 A D^-1/2 is 1


def test_normalized_affinity_and_laplacian_known_values():
    a = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    m = sp.normalized_affinity(a)
    torch.testing.assert_close(m, torch.full((1, 2, 2), 0.5, dtype=torch.float64))
    lev = torch.linalg.eigvalsh(sp.laplacian(a))[0]
    torch.testing.assert_close(lev, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_cosine_affinity_clips_negatives_and_centres():
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])
    a = sp.affinity(x, center=False)
    torch.testing.assert_close(a[0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    xc = torch.tensor([[[2.0, 0.0], [4.0, 0.0]]])  # centred: (-1, 0), (1, 0)
    torch.testing.assert_close(sp.affinity(xc, center=True)[0], torch.eye(2))


def test_gaussian_bandwidth_is_median_distance():
    x = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]], dtype=torch.float64)  # distance 5
    a = sp.affinity(x, kind="gaussian", center=False)
    assert a[0, 0, 1].item() == pytest.approx(math.exp(-0.5))
    assert a[0, 0, 0].item() == pytest.approx(1.0)


def test_knn_graph_degree():
    x, _ = clustered_tokens(3, per=8)
    a = sp.affinity(x, kind="knn", knn=4)
    k = (a > 0).float()
    assert torch.equal(a, a.transpose(1, 2))
    assert (k.sum(-1) >= 4).all()  # each token keeps its 4 nearest (itself included)
    assert torch.equal(torch.diagonal(a, dim1=1, dim2=2), torch.ones(1, 24, dtype=a.dtype))


def test_effective_rank_and_participation_ratio_known_values():
    lam = torch.tensor([[4.0, 4.0, 2.0, 0.0]], dtype=torch.float64)
    spec = sp.Spectrum(lam, lam / 4)
    p = lam / lam.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    assert sp.count_significant(spec, "effective_rank").item() == pytest.approx(math.exp(h.item()))
    assert sp.count_significant(spec, "participation_ratio").item() == pytest.approx(100 / 36)
    assert sp.count_significant(spec, "rel_threshold", threshold=0.6).item() == 2
    assert sp.count_significant(spec, "rel_threshold", threshold=0.4).item() == 3


@pytest.mark.parametrize("k, seed", [(2, 0), (3, 1), (4, 2), (6, 3)])
def test_clustering_agrees_with_sklearn(k, seed):
    x, truth = clustered_tokens(k, per=12, spread=0.3, seed=seed)
    a = sp.affinity(x, kind="cosine", center=False)
    ours, ks = sp.spectral_clustering(a, k, seed=0)
    ref = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=0).fit_predict(a[0].numpy())
    assert ks.item() == k
    assert adjusted_rand_score(ref, ours[0].numpy()) >= 0.99
    assert adjusted_rand_score(truth.numpy(), ours[0].numpy()) >= 0.99


def test_clustering_chooses_k_by_eigengap_and_labels_are_canonical():
    x, truth = clustered_tokens(5, per=10, seed=7)
    a = sp.affinity(x, kind="cosine", center=False)
    lab1, k1 = sp.spectral_clustering(a, None, seed=0)
    lab2, _ = sp.spectral_clustering(a, None, seed=123)
    assert k1.item() == 5
    assert torch.equal(lab1, lab2)  # deterministic across seeds on a clean partition
    first = [lab1[0].tolist().index(c) for c in range(5)]
    assert first == sorted(first)  # labels numbered by first appearance
    assert lab1[0, 0].item() == 0


def test_clustering_batched_matches_one_by_one():
    xs = [clustered_tokens(3, per=9, spread=0.3, seed=s)[0] for s in range(4)]
    a = sp.affinity(torch.cat(xs), kind="cosine", center=False)
    batched, _ = sp.spectral_clustering(a, 3, seed=0)
    for i in range(4):
        single, _ = sp.spectral_clustering(a[i : i + 1], 3, seed=0)
        assert adjusted_rand_score(single[0].numpy(), batched[i].numpy()) == 1.0


@pytest.mark.parametrize("k", [2, 4, None])
def test_clustering_labels_do_not_depend_on_the_other_matrices_of_the_call(k):
    """Structureless tokens (k-means far from a clean optimum): each matrix's labels are the same,
    bit for bit, alone or in one call with other matrices sharing its image index (the groups
    analysis clusters every block of a token count in one call)."""
    g = torch.Generator().manual_seed(0)
    a = sp.affinity(torch.randn(12, 36, 16, generator=g), kind="cosine", center=True, knn=10)
    idx = [5, 9, 2, 5, 9, 2, 5, 9, 2, 5, 9, 2]  # four "blocks" of the same three images
    together, ks = sp.spectral_clustering(a, k, seed=3, indices=idx, dtype=torch.float64)
    for i in range(12):
        alone, k_alone = sp.spectral_clustering(a[i : i + 1], k, seed=3, indices=[idx[i]], dtype=torch.float64)
        assert torch.equal(alone[0], together[i]) and k_alone.item() == ks[i].item()


def test_top_eigh_partial_solver_matches_the_full_one(monkeypatch):
    """Large matrices take the partial solver: the same top pairs as the full decomposition (values to
    1e-12, vectors up to sign), and equal labels and k, bit for bit, from both paths on 3 noisy blocks of
    200-224 tokens (the eigengap finds the 3)."""
    g = torch.Generator().manual_seed(0)
    blocks = [torch.ones(m, m, dtype=torch.float64) for m in (200, 200, 224)]
    a = torch.block_diag(*blocks)
    e = 0.05 * torch.rand(a.shape, generator=g, dtype=torch.float64)
    a = (a + 0.5 * (e + e.T))[None].repeat(2, 1, 1)
    a[1] = a[1].flip(0).flip(1)
    m = sp.normalized_affinity(a)
    assert sp._top_eigh_partial(m, 3)
    vals, vecs = sp.top_eigh(m, 3)
    w, v = torch.linalg.eigh(m)
    assert torch.allclose(vals, w.flip(-1)[:, :3], atol=1e-12)
    assert torch.allclose(vals[:, 0], torch.ones(2, dtype=torch.float64), atol=1e-12)  # top of M is 1
    assert torch.allclose(vecs.abs(), v.flip(-1)[:, :, :3].abs(), atol=1e-10)
    partial = [sp.spectral_clustering(a, k, seed=0, dtype=torch.float64) for k in (3, None)]
    monkeypatch.setattr(sp, "TOP_EIGH_MIN_TOKENS", 10**9)
    assert not sp._top_eigh_partial(m, 3)
    full = [sp.spectral_clustering(a, k, seed=0, dtype=torch.float64) for k in (3, None)]
    truth = np.repeat([0, 1, 2], [200, 200, 224])
    for (lp, kp), (lf, kf) in zip(partial, full):
        assert torch.equal(lp, lf) and torch.equal(kp, kf)
        assert kp.tolist() == [3, 3]
        assert adjusted_rand_score(truth, lp[0].numpy()) == 1.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_partial_solver_without_the_gil_gives_scipys_bits(dtype, monkeypatch):
    """fanlens._lapack.syevr_top (LAPACK's ?syevr through ctypes, without the GIL) returns exactly what
    scipy's eigh(driver="evr") returns, in descending order, for 1, 2 and 33 pairs of a 600 x 600
    normalised affinity; top_eigh gives the same bits through either path."""
    from scipy.linalg import eigh

    from fanlens import _lapack

    assert _lapack.available(dtype)
    g = torch.Generator().manual_seed(1)
    tok = torch.randn(2, 600, 24, generator=g, dtype=torch.float64)
    m = sp.normalized_affinity(sp.affinity(tok))
    m = (0.5 * (m + m.transpose(1, 2))).numpy().astype(dtype)
    n = m.shape[-1]
    for top in (1, 2, 33):
        w, v = _lapack.syevr_top(m[0], top)
        w_ref, v_ref = eigh(m[0], subset_by_index=[n - top, n - 1], driver="evr", check_finite=False)
        assert w.dtype == v.dtype == np.dtype(dtype) and v.shape == (n, top)
        assert np.array_equal(w, w_ref[::-1]) and np.array_equal(v, v_ref[:, ::-1])
    assert m[0].flags.c_contiguous and np.array_equal(m[0], m[0].T)  # the input is left as it was
    t = torch.from_numpy(m)
    vals, vecs = sp.top_eigh(t, 2)
    monkeypatch.setattr(_lapack, "available", lambda dt: False)  # scipy's own call
    vals_s, vecs_s = sp.top_eigh(t, 2)
    assert torch.equal(vals, vals_s) and torch.equal(vecs, vecs_s)
    assert abs(float(vals[0, 0]) - 1.0) < (1e-12 if dtype == np.float64 else 1e-5)  # the top of M is 1


def test_clustering_rejects_k_above_token_count():
    a = block_diagonal(2, size=2)
    with pytest.raises(FanlensError, match="n_clusters must be <= the number of tokens"):
        sp.spectral_clustering(a, 5)


def test_pool_tokens_to_budget():
    t = torch.arange(56 * 56, dtype=torch.float32).reshape(1, 56 * 56, 1)
    p, g = sp.pool_tokens(t, (56, 56), 1024)
    assert g == (28, 28)
    grid = t.reshape(56, 56)
    assert p[0, 0, 0].item() == pytest.approx(grid[:2, :2].mean().item())
    same, g2 = sp.pool_tokens(t[:, :196], (14, 14), 1024)
    assert g2 == (14, 14) and same.shape == (1, 196, 1)
    _, g3 = sp.pool_tokens(torch.zeros(1, 50 * 30, 2), (50, 30), 200)
    assert g3[0] * g3[1] <= 200 and g3 == (17, 10)  # factor 3: ceil(50/3) x ceil(30/3)


def test_bad_inputs():
    with pytest.raises(FanlensError, match=r"tokens must be a tensor of shape \(B, N, C\)"):
        sp.affinity(torch.zeros(3, 4))
    with pytest.raises(FanlensError, match="kind must be one of"):
        sp.affinity(torch.zeros(1, 3, 4), kind="dot")
    with pytest.raises(FanlensError, match="rule must be one of"):
        sp.count_significant(sp.spectrum(block_diagonal(2)), "gap")
    with pytest.raises(FanlensError, match="threshold must be a float in"):
        sp.count_significant(sp.spectrum(block_diagonal(2)), "rel_threshold", threshold=1.5)
    with pytest.raises(FanlensError, match="finite"):
        sp.affinity(torch.full((1, 3, 4), float("nan")))


def test_normalized_spectrum_is_optional():
    a = block_diagonal(3)
    spec = sp.spectrum(a, normalized=False)
    assert spec.normalized is None
    assert sp.count_significant(spec, "rel_threshold").item() == 3
    with pytest.raises(FanlensError, match="needs the normalised spectrum"):
        sp.count_significant(spec, "eigengap")


# --------------------------------------------------------------------------- dimension measures
def _subspace(d: int, n: int, ambient: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(ambient, d, generator=g, dtype=torch.float64)).Q
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ q.T


@pytest.mark.parametrize("d", [2, 5, 10])
def test_twonn_recovers_the_dimension_of_a_linear_subspace(d):
    x = torch.stack([_subspace(d, 2000, 40, seed) for seed in range(3)])
    est = sp.twonn(x)
    assert est.shape == (3,)
    assert ((est - d).abs() / d <= 0.10).all(), est


def test_twonn_recovers_the_dimension_of_curved_manifolds():
    g = torch.Generator().manual_seed(7)
    for d in (2, 4):  # flat torus T^d embedded in R^(2d): no boundary, curved embedding
        a = torch.rand(1, 2000, d, generator=g, dtype=torch.float64) * 2 * math.pi
        est = sp.twonn(torch.cat([a.cos(), a.sin()], -1)).item()
        assert abs(est - d) / d <= 0.10, (d, est)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(2000, generator=g, dtype=torch.float64))
    h = 20 * torch.rand(2000, generator=g, dtype=torch.float64)
    roll = torch.stack([t * t.cos(), h, t * t.sin()], -1)  # the swiss roll: a 2-d sheet in R^3
    assert abs(sp.twonn(roll[None]).item() - 2) / 2 <= 0.10


def test_twonn_known_fit_and_degenerate_sets():
    # three points on a line at 0, 1, 3: ratios r2/r1 = 3, 2, 3/2 (sorted 1.5, 2, 3); with
    # nothing discarded the fit uses the two smallest (F = 1/3, 2/3; the largest has F = 1)
    x = torch.tensor([[[0.0], [1.0], [3.0]]], dtype=torch.float64)
    xs = torch.log(torch.tensor([1.5, 2.0], dtype=torch.float64))
    ys = -torch.log1p(-torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert sp.twonn(x, discard=0.0).item() == pytest.approx(float((xs * ys).sum() / (xs * xs).sum()))
    # repeated tokens count once: the same answer with duplicates
    dup = torch.cat([x, x[:, :2]], dim=1)
    assert sp.twonn(dup, discard=0.0).item() == pytest.approx(sp.twonn(x, discard=0.0).item())
    assert sp.twonn(torch.ones(1, 5, 3)).item() == 0.0  # one point
    assert sp.twonn(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])).item() == 1.0  # two points
    with pytest.raises(FanlensError, match="discard must be in"):
        sp.twonn(x, discard=1.0)


def test_rankme_known_values():
    g = torch.Generator().manual_seed(0)
    for r in (1, 3, 7):  # rank r, equal singular values: RankMe = r
        u = torch.linalg.qr(torch.randn(50, r, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(20, r, generator=g, dtype=torch.float64)).Q
        assert sp.rankme((2.5 * u @ v.T)[None]).item() == pytest.approx(r, rel=1e-4)
    # singular values 3, 1: p = 3/4, 1/4 (+1e-7)
    m = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))[None]
    p = torch.tensor([0.75, 0.25], dtype=torch.float64) + 1e-7
    assert sp.rankme(m).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)
    assert sp.rankme(torch.zeros(1, 4, 3)).item() == 0.0
    assert torch.equal(sp.dimension(m, "rankme"), sp.rankme(m))
    with pytest.raises(FanlensError, match="rule must be one of"):
        sp.dimension(m, "rel_threshold")
    with pytest.raises(FanlensError, match="finite"):
        sp.rankme(torch.full((1, 3, 2), float("nan")))
