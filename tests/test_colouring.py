"""Continuous spectral colouring: eigenvector embedding of the joint token graph, alignment
across blocks, RGB mapping, and the analysis on a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fanlens
from fanlens import FanlensError
from fanlens import spectral as sp


def _clustered(k=4, b=2, n=60, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64)).Q.T
    lab = torch.randint(0, k, (b, n), generator=g)
    lab[:, :k] = torch.arange(k)  # every part in every image
    tok = dirs[lab] * 5 + 0.05 * torch.randn(b, n, dim, generator=g, dtype=torch.float64)
    return tok, lab


def test_same_part_same_colour_across_images_and_parts_apart():
    tok, lab = _clustered()
    emb = sp.spectral_embedding(tok, center=False)
    assert emb.shape == (2, 60, 3)
    np.testing.assert_allclose(emb.reshape(-1, 3).norm(dim=0).numpy(), 1.0, rtol=1e-9)
    col = sp.embedding_colours(sp.align_embedding(emb.reshape(-1, 3))).reshape(2, 60, 3)
    assert float(col.min()) >= 0.0 and float(col.max()) <= 1.0
    means = []
    for k in range(4):
        for i in range(2):  # within a part, in each image: one colour
            assert float(col[i][lab[i] == k].std(0).max()) < 0.02
        means.append(col[lab == k].mean(0))
        assert float((col[0][lab[0] == k].mean(0) - col[1][lab[1] == k].mean(0)).abs().max()) < 0.02
    d = torch.cdist(torch.stack(means), torch.stack(means))
    assert float(d[~torch.eye(4, dtype=torch.bool)].min()) > 0.3  # four clearly different colours


def test_alignment_removes_signs_and_rotations():
    tok, _ = _clustered(seed=1)
    e = sp.spectral_embedding(tok, center=False).reshape(-1, 3)
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).Q
    torch.testing.assert_close(sp.align_embedding(e @ q, e), e, atol=1e-10, rtol=0)
    flips = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(sp.align_embedding(e * flips), sp.align_embedding(e), atol=0, rtol=0)
    assert ((sp.align_embedding(e) ** 3).sum(0) > 0).all()  # positive third moment
    with pytest.raises(FanlensError, match="reference must have"):
        sp.align_embedding(e, e[:5])


def test_nystrom_agrees_with_the_exact_eigenvectors():
    tok, lab = _clustered(b=3, n=80, seed=3)
    exact = sp.spectral_embedding(tok, center=False).reshape(-1, 3)
    approx = sp.spectral_embedding(tok, center=False, landmarks=60, seed=5).reshape(-1, 3)
    # the same 3-d subspace (cosines of the principal angles; measured 1.00, 1.00, 0.96 here)
    cos = torch.linalg.svdvals(torch.linalg.qr(exact).Q.T @ torch.linalg.qr(approx).Q)
    assert float(cos.min()) > 0.95
    aligned = sp.align_embedding(approx, exact)
    ref = sp.align_embedding(exact)
    colours = sp.embedding_colours(sp.align_embedding(aligned, ref))
    assert float((colours - sp.embedding_colours(ref)).abs().max()) < 0.15  # measured 0.125
    # below the landmark count the extension is not used: identical to the exact result
    torch.testing.assert_close(sp.spectral_embedding(tok, center=False, landmarks=240).reshape(-1, 3), exact)


def test_small_graphs_and_bad_arguments():
    tok = torch.randn(1, 3, 8, dtype=torch.float64)  # 3 tokens: 2 non-trivial vectors, 1 zero column
    e = sp.spectral_embedding(tok, center=False)
    assert e.shape == (1, 3, 3) and float(e[..., 2].abs().max()) == 0.0
    with pytest.raises(FanlensError, match="landmarks must be"):
        sp.spectral_embedding(tok, landmarks=1)
    with pytest.raises(FanlensError, match="emb must have 3"):
        sp.embedding_colours(torch.zeros(4, 2))


def test_spectral_colouring_of_a_model(tiny_vit):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g)
    x = torch.cat([x, x[:1]])  # image 0 twice: one graph, so both copies get the same colours
    res = fanlens.spectral_colouring(tiny_vit, x, batch_size=3, progress=False)
    assert [b.name for b in res.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(c.shape == (4, 4, 4, 3) and c.dtype == np.float32 for c in res.colours)
    assert all(0.0 <= c.min() and c.max() <= 1.0 for c in res.colours)
    for c in res.colours:
        np.testing.assert_allclose(c[0], c[3], atol=1e-5)
    again = fanlens.spectral_colouring(tiny_vit, x, batch_size=1, progress=False)  # batch size does not matter
    for a, b in zip(res.colours, again.colours):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert res.provenance.params["landmarks"] == sp.DEFAULT_LANDMARKS and res.pixels.shape == (4, 64, 64, 3)


def test_plot_spectral_colours(tiny_vit):
    import matplotlib

    matplotlib.use("Agg")
    from fanlens import plotting

    res = fanlens.spectral_colouring(tiny_vit, torch.rand(2, 3, 64, 64), progress=False)
    fig = plotting.plot_spectral_colours(res)
    assert len(fig.axes) == 2 * 4
    np.testing.assert_allclose(fig.axes[2].get_images()[1].get_array(), res.colours[1][0])
    ax = plotting.plot_spectral_colour(res, image=1, block=2)
    np.testing.assert_allclose(ax.get_images()[1].get_array(), res.colours[2][1])
    with pytest.raises(FanlensError, match="block must be in"):
        plotting.plot_spectral_colour(res, block=3)
    with pytest.raises(FanlensError, match="result must be a SpectralColours"):
        plotting.plot_spectral_colours(object())
