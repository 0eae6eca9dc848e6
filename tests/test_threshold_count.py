"""Threshold counts without the eigendecomposition (spectral.threshold_count): known inertias by
hand, the same counts as the full decomposition, and the analyses' n_eig=0 path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fanlens
from fanlens import FanlensError
from fanlens import spectral as sp


def _rotated(eigenvalues, seed=0, dtype=torch.float64):
    """Symmetric matrices with the given eigenvalues (one row per matrix), rotated at random."""
    lam = torch.as_tensor(eigenvalues, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(lam.shape[0], lam.shape[1], lam.shape[1], generator=g, dtype=dtype))
    return q @ torch.diag_embed(lam) @ q.transpose(1, 2)


def test_inertia_counts_known_eigenvalues_at_every_shift():
    lam = [[3.0, 1.0, 0.5, -0.25, -2.0], [1.0, 1.0, 1.0, 0.0, -1.0]]
    m = _rotated(lam)
    for s, want in ((-3.0, (5, 5)), (-1.1, (4, 5)), (0.2, (3, 3)), (0.75, (2, 3)), (2.0, (1, 0)), (4.0, (0, 0))):
        got = sp._count_above(m, torch.full((2,), s, dtype=torch.float64))
        assert got.tolist() == list(want), s


def test_inertia_reads_two_by_two_pivots():
    # zero diagonal: Bunch-Kaufman must take 2x2 pivots; eigenvalues of [[0, 1], [1, 0]] are +-1
    pair = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    m = torch.block_diag(pair, 2.0 * pair, torch.tensor([[0.5]], dtype=torch.float64))[None]
    _ld, piv, _ = torch.linalg.ldl_factor_ex(m)
    assert (piv < 0).sum() == 4  # two 2x2 pivots: the branch is exercised
    for s, want in ((0.0, 3), (0.7, 2), (1.5, 1), (-1.5, 4), (-3.0, 5), (2.5, 0)):
        assert sp._count_above(m, torch.tensor([s], dtype=torch.float64)).item() == want, s


def test_inertia_equals_eigenvalue_count_on_random_indefinite_matrices():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(40, 23, 23, generator=g, dtype=torch.float64)
    m = m + m.transpose(1, 2)
    shifts = torch.randn(40, generator=g, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(m)
    want = (ev > shifts[:, None]).sum(-1)
    assert torch.equal(sp._count_above(m, shifts), want)


def test_perron_bounds_bracket_the_largest_eigenvalue():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(30, 17, 17, generator=g, dtype=torch.float64) ** 4
    a = a + a.transpose(1, 2)
    a[3, 5, :] = 0.0  # a zero row and column: an isolated eigenvalue 0
    a[3, :, 5] = 0.0
    a[4] = torch.block_diag(torch.full((8, 8), 0.5), torch.full((9, 9), 0.2)).double()  # reducible
    lmax = torch.linalg.eigvalsh(a)[:, -1]
    lo, hi = sp._perron_bounds(a, max_iter=3)  # loose, but still a bracket
    assert bool((lo <= lmax + 1e-12).all()) and bool((hi >= lmax - 1e-12).all())
    lo, hi = sp._perron_bounds(a)
    assert float(((hi - lo) / hi).max()) < 1e-3
    assert torch.allclose(lo, lmax, rtol=1e-3) and torch.allclose(hi, lmax, rtol=1e-3)


@pytest.mark.parametrize("kind", sp.AFFINITIES)
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_threshold_count_equals_the_full_decomposition(kind, dtype):
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(24, 5, 48, generator=g)
    labels = torch.randint(0, 5, (24, 70), generator=g)
    x = torch.gather(centres, 1, labels[..., None].expand(-1, -1, 48)) + 0.9 * torch.randn(24, 70, 48, generator=g)
    x = torch.cat([x, torch.randn(8, 70, 48, generator=g)])  # structureless too: a dense bulk of eigenvalues
    a = sp.affinity(x, kind=kind, knn=8)
    spec = sp.spectrum(a, dtype=dtype)
    for rule in sp.THRESHOLD_RULES:
        for tau in (None, 0.01, 0.2, 0.5, 0.95):
            want = sp.count_significant(spec, rule, threshold=tau)
            got = sp.threshold_count(a, rule, threshold=tau, dtype=dtype)
            assert got.dtype == a.dtype
            assert torch.equal(got, want), (rule, tau, (got != want).sum())


def test_threshold_count_of_disconnected_groups_is_the_group_count():
    a = torch.block_diag(*[torch.ones(6, 6, dtype=torch.float64)] * 4)[None]
    assert sp.threshold_count(a, "rel_threshold").item() == 4
    assert sp.threshold_count(a, "norm_threshold").item() == 4


def test_an_eigenvalue_on_the_threshold_is_decided_by_the_eigenvalues(monkeypatch):
    # eigenvalues 2 (all-ones 2x2 block), 0, and 0.1 = tau * lambda_max exactly: not counted (strict >)
    a = torch.block_diag(torch.ones(2, 2, dtype=torch.float64), torch.tensor([[0.1]], dtype=torch.float64))
    a = torch.stack([a, torch.diag(torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64))])
    calls = []
    real = sp.spectrum
    monkeypatch.setattr(sp, "spectrum", lambda m, **kw: calls.append(m.shape[0]) or real(m, **kw))
    got = sp.threshold_count(a, "rel_threshold", threshold=0.05)
    assert got.tolist() == [1.0, 2.0]
    assert calls == [1]  # only the undecidable matrix was decomposed
    assert torch.equal(got, sp.count_significant(real(a), "rel_threshold", threshold=0.05))


def test_threshold_count_edge_cases():
    zero = torch.zeros(2, 4, 4)
    assert sp.threshold_count(zero, "rel_threshold").tolist() == [0.0, 0.0]
    one = torch.ones(3, 1, 1)
    assert sp.threshold_count(one, "rel_threshold").tolist() == [1.0] * 3
    assert sp.threshold_count(one, "norm_threshold").tolist() == [1.0] * 3


def test_threshold_count_rejects_bad_input():
    a = torch.ones(1, 3, 3)
    with pytest.raises(FanlensError, match="rule must be one of"):
        sp.threshold_count(a, "eigengap")
    with pytest.raises(FanlensError, match="a must be non-negative"):
        sp.threshold_count(-a, "rel_threshold")
    bad = a.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(FanlensError, match="a must be finite"):
        sp.threshold_count(bad, "rel_threshold")
    with pytest.raises(FanlensError, match="threshold"):
        sp.threshold_count(a, "rel_threshold", threshold=1.5)
    with pytest.raises(FanlensError, match=r"a must be a tensor of shape \(B, N, N\)"):
        sp.threshold_count(torch.ones(3, 3), "rel_threshold")


def test_spectrum_without_mean_spectrum_computes_no_eigenvalue(tiny_vit, monkeypatch):
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rules = ("rel_threshold", "norm_threshold", "twonn")
    full = fanlens.spectrum(tiny_vit, x, rules=rules, batch_size=2, progress=False)
    calls = []
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = fanlens.spectrum(tiny_vit, x, rules=rules, n_eig=0, batch_size=2, progress=False)
    assert np.array_equal(fast.per_image, full.per_image)
    assert fast.eig_mean.shape == (len(fast.blocks), 0)
    assert fast.provenance.params["n_eig"] == 0
    # a rule that needs the eigenvalues still gets them
    both = fanlens.spectrum(tiny_vit, x, rules=("rel_threshold", "effective_rank"), n_eig=0, progress=False)
    assert calls  # eigengap/effective rank: decomposed
    n_calls = len(calls)
    fanlens.spectrum(tiny_vit, x, rules=rules, n_eig=0, progress=False)
    assert len(calls) == n_calls  # only threshold and dimension rules: never decomposed
    assert np.array_equal(both.per_image[..., 0], full.per_image[..., 0])


def test_n_eig_must_be_a_non_negative_int(tiny_vit):
    with pytest.raises(FanlensError, match=r"n_eig must be an int >= 0"):
        fanlens.spectrum(tiny_vit, torch.rand(1, 3, 64, 64), n_eig=-1, progress=False)
